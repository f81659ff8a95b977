"""The vllm backend under the orchestrator: the policies' extremes equal vLLM's own greedy generation,
speculative decoding equals LLM greedy, and concurrent sessions (batched in the same steps) answer
exactly what they answer one at a time. The contract itself runs in test_engine_contract.py."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.engine_client import LocalEngineClient
from orchestrator.policies import LLM, SLM
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from training.task import heldout

from .test_stitching import MAX_NEW, run

PROMPTS = [p.question for p in heldout(3)]


def vllm_greedy(engine, session) -> list[int]:
    """vLLM's own greedy generation of the session's prompt, up to and including the first EOS."""
    out = engine.greedy(list(session.prompt_token_ids), MAX_NEW)
    ends = [i for i, t in enumerate(out) if t in engine.eos_token_ids]
    return out[: ends[0] + 1] if ends else out


@pytest.fixture
def orchestrator(vllm_engines):
    return Orchestrator(LocalEngineClient(vllm_engines["slm"]), LocalEngineClient(vllm_engines["llm"]),
                        MemorySessionStore())


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_tau_zero_is_the_llm_and_tau_one_is_the_slm(orchestrator, vllm_engines, prompt):
    session, llm_only, sources, _ = run(orchestrator, prompt, opb.POLICY_LLM)
    assert set(sources) == {LLM}
    assert llm_only == vllm_greedy(vllm_engines["llm"], session)
    _, stitched, sources, entropies = run(orchestrator, prompt, opb.POLICY_ENTROPY, tau=0.0)
    kept_by_slm = [i for i, s in enumerate(sources) if s == SLM]
    assert all(entropies[i] == 0.0 for i in kept_by_slm)
    if not kept_by_slm:
        assert stitched == llm_only

    session, slm_only, sources, _ = run(orchestrator, prompt, opb.POLICY_SLM)
    assert set(sources) == {SLM}
    assert slm_only == vllm_greedy(vllm_engines["slm"], session)
    _, stitched, sources, _ = run(orchestrator, prompt, opb.POLICY_ENTROPY, tau=1.0)
    assert stitched == slm_only and set(sources) == {SLM}


@pytest.mark.parametrize("tau", [0.01, 0.05])
def test_stitching_matches_the_hf_backend(orchestrator, vllm_pair, tau):
    """Same models, same rule: the vllm pair stitches exactly like the hf pair (float32 on both)."""
    from engine.hf import HFEngine

    hf = Orchestrator(*(LocalEngineClient(HFEngine(vllm_pair[r], role=r)) for r in ("slm", "llm")), MemorySessionStore())
    for prompt in PROMPTS:
        _, tokens, sources, entropies = run(orchestrator, prompt, opb.POLICY_ENTROPY, tau=tau)
        _, ref_tokens, ref_sources, ref_entropies = run(hf, prompt, opb.POLICY_ENTROPY, tau=tau)
        assert (tokens, sources) == (ref_tokens, ref_sources)
        assert entropies == pytest.approx(ref_entropies, abs=1e-4)


@pytest.mark.parametrize("draft_tokens", [1, 4])
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_speculative_decoding_equals_llm_greedy(orchestrator, prompt, draft_tokens):
    spec = opb.GenerationSpec(text=prompt, policy=opb.POLICY_SPEC, draft_tokens=draft_tokens, max_new_tokens=MAX_NEW)
    session = orchestrator.complete(spec)
    tokens = [t for s in session.spans for t in s.token_ids]
    assert tokens == run(orchestrator, prompt, opb.POLICY_LLM)[1]
    assert session.stats.slm_tokens + session.stats.llm_tokens == len(tokens)


def test_sixteen_concurrent_sessions_equal_one_at_a_time(vllm_engines):
    engine = vllm_engines["slm"]
    prompts = [[3, *(5 + (i * 7 + j) % 90 for j in range(5 + i % 7)), 4] for i in range(16)]

    def session(i, tag):
        sid = f"concurrent-{tag}-{i}"
        rule = epb.SpanRule(max_tokens=24, gate=epb.GATE_STOP_ABOVE, tau=0.35)
        out = engine.prefill(epb.PrefillRequest(session_id=sid, token_ids=prompts[i], rule=rule)).span
        spans = [(list(out.token_ids), out.candidate.token_id, out.stop_reason)]
        if out.stop_reason == epb.STOP_REASON_GATE:  # go on past the gate, as the LLM's hand-back would
            more = engine.prefill(epb.PrefillRequest(session_id=sid, base_len=out.cache_len,
                                                     token_ids=[out.candidate.token_id],
                                                     rule=epb.SpanRule(max_tokens=16))).span
            spans.append((list(more.token_ids), more.candidate.token_id, more.stop_reason))
        engine.release(epb.ReleaseRequest(session_id=sid))
        return spans, list(out.entropies)

    alone = [session(i, "alone") for i in range(16)]
    assert engine.peak_batch == 1
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: session(i, "together"), range(16)))
    assert engine.peak_batch > 1  # the sessions' spans shared steps
    assert [a[0] for a in together] == [a[0] for a in alone]
    for (_, h_together), (_, h_alone) in zip(together, alone):
        assert h_together == pytest.approx(h_alone, abs=1e-4)


def test_the_router_policy_is_refused_without_hidden_states(orchestrator, vllm_engines):
    """vLLM gives no hidden states: the router policy says so instead of routing blind."""
    import grpc

    from orchestrator.router import Router
    from orchestrator.service import RequestError

    router = Router.constant(vllm_engines["slm"].hidden_size, switch=True).to_bytes()
    spec = opb.GenerationSpec(text=PROMPTS[0], policy=opb.POLICY_ROUTER, tau=0.02, router=router)
    with pytest.raises(RequestError, match="hidden states, which the vllm backend does not give") as refused:
        orchestrator.complete(spec)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
