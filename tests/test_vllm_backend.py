"""The vllm backend under the orchestrator: the policies' extremes equal vLLM's own greedy generation,
speculative decoding equals LLM greedy, and concurrent sessions (batched in the same steps) answer
exactly what they answer one at a time. Sampling, logprobs, returned distributions and speculative
sampling's verification give what the hf backend gives for the same requests, and a session's spans
continue one vLLM request. The contract itself runs in test_engine_contract.py."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
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
# Token prompts the trained pair is unsure after (not its task's format): sampling has choices to make.
UNSURE = [[3, *(5 + (i * 7 + j) % 90 for j in range(5 + i % 7)), 4] for i in range(16)]
SAMPLINGS = [epb.Sampling(temperature=1.0, seed=11), epb.Sampling(temperature=0.6, top_p=0.95, seed=12),
             epb.Sampling(temperature=0.8, top_k=8, seed=13), epb.Sampling(temperature=1.0, min_p=0.05, seed=14),
             epb.Sampling(temperature=0.9, top_p=0.9, top_k=20, min_p=0.02, seed=15)]


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


def test_the_router_on_a_vllm_slm_decides_as_on_the_hf_slm(vllm_engines, hf_engines):
    """The committed router on the trained pair: the vllm SLM hands it the final hidden state the hf SLM
    does (within float tolerance), so every decision, and with it every token and source, is the same."""
    from engine.default_models import default_router_path

    spec = dict(policy=opb.POLICY_ROUTER, tau=0.05, router=default_router_path().read_bytes(), max_new_tokens=MAX_NEW)
    answers = {}
    for backend, engines in (("vllm", vllm_engines), ("hf", hf_engines)):
        orchestrator = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                                    MemorySessionStore())
        sessions = [orchestrator.complete(opb.GenerationSpec(text=problem.question, **spec)) for problem in heldout(8)]
        answers[backend] = [([t for s in session.spans for t in s.token_ids],
                             [s.source for s in session.spans for _ in s.token_ids],
                             session.stats.router_kept_tokens, session.stats.switches) for session in sessions]
    assert answers["vllm"] == answers["hf"]
    assert sum(kept for _, _, kept, _ in answers["hf"]) > 0 and sum(n for *_, n in answers["hf"]) > 0


@pytest.mark.parametrize("tau", [0.0, 0.05])
def test_a_gated_candidate_carries_the_hidden_state_the_hf_engine_gives(vllm_engines, hf_engines, tau):
    """At a gated token, and again at the one a Decode chooses from the kept distribution."""
    rule = epb.SpanRule(max_tokens=40, gate=epb.GATE_STOP_ABOVE, tau=tau, return_hidden=True)
    spans = {}
    for backend, engines in (("vllm", vllm_engines), ("hf", hf_engines)):
        sid = f"hidden-{backend}-{tau}"
        gated = engines["slm"].prefill(epb.PrefillRequest(session_id=sid, token_ids=UNSURE[0], rule=rule)).span
        again = engines["slm"].decode(epb.DecodeRequest(session_id=sid, base_len=gated.cache_len, rule=rule)).span
        engines["slm"].release(epb.ReleaseRequest(session_id=sid))
        spans[backend] = (gated, again)
    for vllm_span, hf_span in zip(spans["vllm"], spans["hf"]):
        assert vllm_span.stop_reason == hf_span.stop_reason == epb.STOP_REASON_GATE
        assert list(vllm_span.token_ids) == list(hf_span.token_ids)
        vllm_hidden, hf_hidden = (np.frombuffer(s.candidate.hidden, "<f4") for s in (vllm_span, hf_span))
        assert vllm_hidden.shape == (vllm_engines["slm"].hidden_size,)
        np.testing.assert_allclose(vllm_hidden, hf_hidden, rtol=1e-4, atol=1e-4)


# --- sampling, logprobs and distributions, as on hf ----------------------------------------------

@pytest.fixture(scope="module")
def hf_engines(vllm_pair):
    from engine.hf import HFEngine

    return {role: HFEngine(path, role=role) for role, path in vllm_pair.items()}


def sampled_session(engine, sid, prompt, sampling, *, tau=0.25, spans=4, per_span=6) -> list[epb.Span]:
    """A session decoded in gated spans under `sampling`, the way the orchestrator drives one engine: a
    span stops above tau, the next one decodes from the gated candidate's distribution (Decode), or
    appends the last committed token (Prefill); each span's draws are keyed from its answer position."""
    rule = {"sampling": sampling, "gate": epb.GATE_STOP_ABOVE, "tau": tau, "max_tokens": per_span, "logprobs": True,
            "top_logprobs": 3, "return_distributions": sampling.temperature > 0}
    out = engine.prefill(epb.PrefillRequest(session_id=sid, token_ids=prompt, rule=epb.SpanRule(**rule))).span
    result, position = [out], len(out.token_ids)
    for _ in range(spans - 1):
        rule["position"] = position
        if out.stop_reason == epb.STOP_REASON_GATE:
            rule["gate"] = epb.GATE_UNSPECIFIED  # take the candidate, as if the other model agreed
            out = engine.decode(epb.DecodeRequest(session_id=sid, base_len=out.cache_len,
                                                  rule=epb.SpanRule(**rule))).span
        else:
            rule["gate"] = epb.GATE_STOP_ABOVE
            out = engine.prefill(epb.PrefillRequest(session_id=sid, base_len=out.cache_len,
                                                    token_ids=[out.token_ids[-1]], rule=epb.SpanRule(**rule))).span
        result.append(out)
        position += len(out.token_ids)
    engine.release(epb.ReleaseRequest(session_id=sid))
    return result


def assert_same_spans(spans: list[epb.Span], reference: list[epb.Span]) -> None:
    """The same tokens, stops and candidates; entropies, logprobs and distributions within float32 noise."""
    for span, ref in zip(spans, reference, strict=True):
        assert (list(span.token_ids), span.stop_reason, span.candidate.token_id) == \
            (list(ref.token_ids), ref.stop_reason, ref.candidate.token_id)
        assert list(span.entropies) == pytest.approx(list(ref.entropies), abs=1e-4)
        for lp, ref_lp in zip(span.logprobs, ref.logprobs, strict=True):
            assert lp.logprob == pytest.approx(ref_lp.logprob, abs=1e-4)
            assert list(lp.top_token_ids) == list(ref_lp.top_token_ids)
            assert list(lp.top_logprobs) == pytest.approx(list(ref_lp.top_logprobs), abs=1e-4)
        for dist, ref_dist in zip(span.distributions, ref.distributions, strict=True):
            probs, ref_probs = dict(zip(dist.token_ids, dist.probs)), dict(zip(ref_dist.token_ids, ref_dist.probs))
            ids = sorted(probs.keys() | ref_probs.keys())  # a token at the edge of float32 may underflow on one
            assert [probs.get(t, 0.0) for t in ids] == pytest.approx([ref_probs.get(t, 0.0) for t in ids], abs=1e-4)


@pytest.mark.parametrize("role", ["slm", "llm"])
def test_sampled_sessions_give_the_hf_backends_tokens(vllm_engines, hf_engines, role):
    """Temperature 0.6-1.0 with top-p, top-k and min-p, several seeds, gated spans and Decode from a gated
    candidate: the same tokens, entropies, logprobs and sampling distributions on both backends."""
    greedy_differs = 0
    for i, sampling in enumerate(SAMPLINGS):
        for j, prompt in enumerate(UNSURE[:3]):
            sid = f"sampled-{role}-{i}-{j}"
            spans = sampled_session(vllm_engines[role], sid, prompt, sampling)
            assert_same_spans(spans, sampled_session(hf_engines[role], sid, prompt, sampling))
            greedy = sampled_session(vllm_engines[role], sid + "-greedy", prompt, epb.Sampling())
            greedy_differs += [list(s.token_ids) for s in spans] != [list(s.token_ids) for s in greedy]
    assert greedy_differs > 0  # the draws did choose other tokens than the argmax


def test_sixteen_sampled_sessions_at_once_equal_one_at_a_time(vllm_engines):
    engine = vllm_engines["llm"]
    requests = [(UNSURE[i], SAMPLINGS[i % len(SAMPLINGS)]) for i in range(16)]
    alone = [sampled_session(engine, f"sampled-alone-{i}", *r) for i, r in enumerate(requests)]
    steps_before = engine.load()["steps"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: sampled_session(engine, f"sampled-together-{i}", *requests[i]), range(16)))
    assert engine.load()["step_tokens"] > 0 and engine.load()["steps"] > steps_before
    for spans, ref in zip(together, alone):
        assert_same_spans(spans, ref)


def test_greedy_logprobs_equal_hf_for_spans_candidates_and_verification(vllm_engines, hf_engines):
    prompt = UNSURE[5]
    rule = epb.SpanRule(max_tokens=12, gate=epb.GATE_STOP_ABOVE, tau=0.2, logprobs=True, top_logprobs=5)
    verify = epb.PrefillRequest(session_id="logprobs-verify", token_ids=prompt + [41, 41, 7], verify=True,
                                rule=epb.SpanRule(max_tokens=0, logprobs=True, top_logprobs=5))
    outs = {}
    for backend, engines in (("vllm", vllm_engines), ("hf", hf_engines)):
        span = engines["llm"].prefill(epb.PrefillRequest(session_id="logprobs", token_ids=prompt, rule=rule)).span
        outs[backend] = span, engines["llm"].prefill(verify)
        for sid in ("logprobs", "logprobs-verify"):
            engines["llm"].release(epb.ReleaseRequest(session_id=sid))
    (span, verified), (ref, ref_verified) = outs["vllm"], outs["hf"]
    assert span.stop_reason == epb.STOP_REASON_GATE and len(span.logprobs) == len(span.token_ids) > 0
    assert_same_spans([span], [ref])
    for lp, ref_lp in ((span.candidate.logprobs, ref.candidate.logprobs),
                       *zip(verified.greedy_logprobs, ref_verified.greedy_logprobs, strict=True)):
        assert lp.logprob == pytest.approx(ref_lp.logprob, abs=1e-4)
        assert list(lp.top_token_ids) == list(ref_lp.top_token_ids)
        assert list(lp.top_logprobs) == pytest.approx(list(ref_lp.top_logprobs), abs=1e-4)
    assert list(verified.greedy_token_ids) == list(ref_verified.greedy_token_ids)


def test_speculative_sampling_verification_accepts_and_resamples_as_hf(vllm_engines, hf_engines):
    """Sampled drafts and the distributions they came from, verified by the LLM on both backends: the same
    number accepted and the same next token. Drafted by the SLM, some drafts are rejected and the next
    token is a residual draw; drafted by the LLM itself (q = p), all are accepted and the next token is
    drawn from the row after the last one (on vllm: the processor's row, not a prompt row)."""
    outcomes = {"slm": [], "llm": []}
    for seed in range(12):
        sampling = epb.Sampling(temperature=1.0, top_k=10, seed=seed)
        drafter = hf_engines["slm" if seed % 2 else "llm"]
        draft = drafter.prefill(epb.PrefillRequest(
            session_id=f"drafter-{seed}", token_ids=UNSURE[seed],
            rule=epb.SpanRule(max_tokens=4, sampling=sampling, return_distributions=True))).span
        drafter.release(epb.ReleaseRequest(session_id=f"drafter-{seed}"))
        request = epb.PrefillRequest(session_id=f"verify-{seed}", token_ids=UNSURE[seed] + list(draft.token_ids),
                                     verify=True, draft_distributions=draft.distributions,
                                     rule=epb.SpanRule(max_tokens=0, sampling=sampling, logprobs=True, top_logprobs=2))
        verified, ref = (engines["llm"].prefill(request) for engines in (vllm_engines, hf_engines))
        assert (verified.accepted, verified.next_token_id) == (ref.accepted, ref.next_token_id)
        assert verified.next_entropy == pytest.approx(ref.next_entropy, abs=1e-4)
        assert verified.next_logprobs.logprob == pytest.approx(ref.next_logprobs.logprob, abs=1e-4)
        assert list(verified.next_logprobs.top_token_ids) == list(ref.next_logprobs.top_token_ids)
        outcomes[drafter.role].append(verified.accepted)
        for engines in (vllm_engines, hf_engines):
            engines["llm"].release(epb.ReleaseRequest(session_id=f"verify-{seed}"))
    assert outcomes["llm"] == [4] * 6
    assert any(a < 4 for a in outcomes["slm"]), outcomes


# --- one vLLM request per session -----------------------------------------------------------------

def vllm_requests(engine) -> dict:
    """The requests vLLM's scheduler holds (white box: the in-process engine core's)."""
    return engine._core.engine_core.scheduler.requests


def test_a_sessions_spans_continue_one_vllm_request_until_a_rollback_cuts_into_it(vllm_engines):
    engine = vllm_engines["slm"]
    held = set(vllm_requests(engine))
    first = engine.prefill(epb.PrefillRequest(session_id="turns", token_ids=UNSURE[1],
                                              rule=epb.SpanRule(max_tokens=5))).span
    (request,) = set(vllm_requests(engine)) - held
    second = engine.prefill(epb.PrefillRequest(session_id="turns", base_len=first.cache_len,
                                               token_ids=[first.token_ids[-1]], rule=epb.SpanRule(max_tokens=5))).span
    assert set(vllm_requests(engine)) - held == {request}
    assert vllm_requests(engine)[request].num_computed_tokens == second.cache_len  # nothing recomputed or lost
    engine.rollback(epb.RollbackRequest(session_id="turns", length=len(UNSURE[1]) + 2))
    again = engine.prefill(epb.PrefillRequest(session_id="turns", base_len=len(UNSURE[1]) + 2,
                                              token_ids=list(first.token_ids[2:]),
                                              rule=epb.SpanRule(max_tokens=5))).span
    assert list(again.token_ids) == list(second.token_ids)
    (restarted,) = set(vllm_requests(engine)) - held
    assert restarted != request
    engine.release(epb.ReleaseRequest(session_id="turns"))
    engine.greedy([3, 4], 1)  # a round trip through the engine thread: the release's abort has run
    assert set(vllm_requests(engine)) == held


def test_more_sessions_than_request_slots_are_served_alike(vllm_pair):
    """Idle sessions hold vLLM request slots: past max_num_seqs the least recently used gives its slot
    up (and later continues from the prefix cache) instead of leaving a new session waiting for ever."""
    from engine.vllm_backend import VLLMEngine

    engine = VLLMEngine(vllm_pair["slm"], role="slm", kv_budget_mb=4, max_num_seqs=3)
    try:
        first_spans = [engine.prefill(epb.PrefillRequest(session_id=f"slots-{i}", token_ids=UNSURE[i],
                                                         rule=epb.SpanRule(max_tokens=4))).span
                       for i in range(6)]  # six sessions open at once, three slots
        for i, span in enumerate(first_spans):
            more = engine.prefill(epb.PrefillRequest(session_id=f"slots-{i}", base_len=span.cache_len,
                                                     token_ids=[span.token_ids[-1]], rule=epb.SpanRule(max_tokens=4)))
            whole = engine.prefill(epb.PrefillRequest(session_id=f"whole-{i}", token_ids=UNSURE[i],
                                                      rule=epb.SpanRule(max_tokens=8)))
            assert list(span.token_ids) + list(more.span.token_ids) == list(whole.span.token_ids)
            engine.release(epb.ReleaseRequest(session_id=f"whole-{i}"))
        assert len(vllm_requests(engine)) <= 3
    finally:
        engine.close()
