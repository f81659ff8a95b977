"""Algorithm 1 end to end in-process: the policies' extremes equal each model's own greedy decoding."""

import pytest
import torch

from engine.default_models import build_tokenizer
from orchestrator.engine_client import LocalEngineClient
from orchestrator.loop import Budget, Progress, stitch
from orchestrator.policies import LLM, SLM, EntropyPolicy
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .conftest import PROMPTS

MAX_NEW = 40


def run(orchestrator, prompt, policy, tau=None):
    spec = opb.GenerationSpec(text=prompt, policy=policy, max_new_tokens=MAX_NEW)
    if tau is not None:
        spec.tau = tau
    session = orchestrator.complete(spec)
    tokens = [t for s in session.spans for t in s.token_ids]
    sources = [s.source for s in session.spans for _ in s.token_ids]
    entropies = [h for s in session.spans for h in s.entropies]
    return session, tokens, sources, entropies


def hf_greedy(engine, prompt_ids):
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                    pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tau_zero_is_the_llm_and_tau_one_is_the_slm(orchestrator, engines, prompt):
    session, llm_only, llm_sources, _ = run(orchestrator, prompt, opb.POLICY_LLM)
    assert set(llm_sources) == {LLM}
    assert llm_only == hf_greedy(engines["llm"], list(session.prompt_token_ids))

    _, stitched, sources, entropies = run(orchestrator, prompt, opb.POLICY_ENTROPY, tau=0.0)
    # The paper's rule keeps an SLM token whose entropy is exactly 0 even at tau = 0.
    kept_by_slm = [i for i, s in enumerate(sources) if s == SLM]
    assert all(entropies[i] == 0.0 for i in kept_by_slm)
    if not kept_by_slm:
        assert stitched == llm_only

    session, slm_only, slm_sources, _ = run(orchestrator, prompt, opb.POLICY_SLM)
    assert set(slm_sources) == {SLM}
    assert slm_only == hf_greedy(engines["slm"], list(session.prompt_token_ids))
    _, stitched, sources, _ = run(orchestrator, prompt, opb.POLICY_ENTROPY, tau=1.0)
    assert stitched == slm_only and set(sources) == {SLM}


def test_stitched_generation_switches_and_follows_the_rule(orchestrator):
    tau = 0.3
    session, tokens, sources, entropies = run(orchestrator, PROMPTS[1], opb.POLICY_ENTROPY, tau=tau)
    assert session.stats.switches >= 3 and {SLM, LLM} <= set(sources)
    assert session.stats.slm_tokens + session.stats.llm_tokens == len(tokens)
    for i, (source, h) in enumerate(zip(sources, entropies)):
        if source == SLM:
            assert h <= tau  # an uncertain SLM token is never kept
        elif i + 1 < len(sources) and sources[i + 1] == SLM:
            assert h <= tau  # the LLM hands back only after a confident token
    # Every token is prefilled once by each model that later writes after it: no full re-prefill.
    seq_len = len(session.prompt_token_ids) + len(tokens)
    assert session.stats.slm_prefill_tokens <= seq_len and session.stats.llm_prefill_tokens <= seq_len


def test_partial_prefill_after_switches_equals_full_prefill(engines):
    """After a real stitched run, each engine's next-token logits equal one full prefill's."""
    from orchestrator.engine_client import LocalEngineClient
    from orchestrator.store import Journal, MemorySessionStore

    tokenizer = build_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Stitch me"}], add_generation_prompt=True,
                                           return_dict=False)
    clients = {SLM: LocalEngineClient(engines["slm"]), LLM: LocalEngineClient(engines["llm"])}
    progress = Progress("partial-prefill", prompt, max_new_tokens=60, stop_token_ids=[])
    store = MemorySessionStore()
    header = opb.Session(session_id="partial-prefill", status=opb.STATUS_RUNNING)
    journal = Journal(store, store.create(header, "test", SLM))
    list(stitch(progress, EntropyPolicy(0.3), clients, journal, Budget()))
    assert progress.stats.switches >= 4
    for role, name in ((SLM, "slm"), (LLM, "llm")):
        engine = engines[name]
        base = progress.synced[role]
        engine.prefill(epb.PrefillRequest(session_id="partial-prefill", base_len=base,
                                          token_ids=progress.sequence[base:], rule=epb.SpanRule(max_tokens=0)))
        stitched = engine.sessions._sessions["partial-prefill"].state.next_logits
        with torch.inference_mode():
            full = engine.model(torch.tensor([progress.sequence])).logits[0, -1]
        # float32 sums in a different order (cached vs one pass) differ by ~1e-4 after many steps.
        torch.testing.assert_close(stitched, full, rtol=1e-3, atol=1e-3)
        assert stitched.argmax() == full.argmax()
        engine.release(epb.ReleaseRequest(session_id="partial-prefill"))


def test_the_store_holds_what_the_stream_delivered(orchestrator):
    events = list(orchestrator.generate(opb.GenerationSpec(text=PROMPTS[0], tau=0.3, max_new_tokens=MAX_NEW)))
    started, deltas, finished = events[0].started, [e.delta for e in events[1:-1]], events[-1].finished
    stored = orchestrator.session(started.session_id)
    assert stored.status == opb.STATUS_FINISHED and stored.finish_reason == finished.finish_reason
    # One Delta per token, as the engines streamed them; the log keeps them per span.
    assert all(len(d.span.token_ids) == 1 for d in deltas)
    for field in ("token_ids", "entropies"):
        assert [x for s in stored.spans for x in getattr(s, field)] == [getattr(d.span, field)[0] for d in deltas]
    assert [s.source for s in stored.spans for _ in s.token_ids] == [d.span.source for d in deltas]
    assert stored.text == finished.text == "".join(d.text for d in deltas)
    assert stored.stats.slm_tokens == finished.stats.slm_tokens and stored.stats.switches == finished.stats.switches


def test_cancel_stops_within_two_span_boundaries(orchestrator):
    """The cancel flag comes back with a span's log write, which runs behind the loop: the loop reads it
    at the boundary after that span's."""
    events = orchestrator.generate(opb.GenerationSpec(text=PROMPTS[1], tau=0.3, max_new_tokens=200))
    session_id = next(events).started.session_id
    assert orchestrator.cancel(session_id) == opb.STATUS_RUNNING
    rest = list(events)
    assert rest[-1].finished.finish_reason == opb.FINISH_REASON_CANCELLED
    stored = orchestrator.session(session_id)
    written = sum(len(span.token_ids) for span in stored.spans)
    assert len(stored.spans) == 2 and len(rest) == written + 1  # two spans' tokens, one Delta each, Finished
    assert written < 200
    assert stored.status == opb.STATUS_CANCELLED
    assert orchestrator.cancel(session_id) == opb.STATUS_CANCELLED  # no-op once finished


def test_engines_with_different_tokenizers_are_refused(engines, foreign_tokenizer_model):
    from engine.hf import HFEngine
    from orchestrator.engine_client import LocalEngineClient
    from orchestrator.service import Orchestrator
    from orchestrator.store import MemorySessionStore

    foreign = LocalEngineClient(HFEngine(foreign_tokenizer_model, role="slm"))
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        Orchestrator(foreign, LocalEngineClient(engines["llm"]), MemorySessionStore())


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_random_routing_extremes_are_the_single_models(orchestrator, prompt):
    def routed(p, seed=0):
        spec = opb.GenerationSpec(text=prompt, policy=opb.POLICY_RANDOM, slm_probability=p, seed=seed,
                                  max_new_tokens=MAX_NEW)
        session = orchestrator.complete(spec)
        return [t for s in session.spans for t in s.token_ids], [s.source for s in session.spans for _ in s.token_ids]

    assert routed(1.0)[0] == run(orchestrator, prompt, opb.POLICY_SLM)[1]
    assert routed(0.0)[0] == run(orchestrator, prompt, opb.POLICY_LLM)[1]
    mixed = routed(0.5, seed=7)
    assert mixed == routed(0.5, seed=7)  # seeded: the same routing every time
    assert {SLM, LLM} <= set(mixed[1]) or len(mixed[1]) < 8


@pytest.mark.parametrize("draft_tokens", [1, 4, 7])
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_speculative_decoding_equals_llm_greedy(orchestrator, engines, prompt, draft_tokens):
    spec = opb.GenerationSpec(text=prompt, policy=opb.POLICY_SPEC, draft_tokens=draft_tokens, max_new_tokens=MAX_NEW)
    session = orchestrator.complete(spec)
    tokens = [t for s in session.spans for t in s.token_ids]
    assert tokens == run(orchestrator, prompt, opb.POLICY_LLM)[1]
    stats = session.stats
    assert stats.drafted_tokens >= stats.accepted_tokens and stats.slm_tokens == stats.accepted_tokens
    assert stats.slm_tokens + stats.llm_tokens == len(tokens)


def test_speculative_decoding_accepts_everything_when_the_draft_is_the_llm(engines, model_paths):
    """With the LLM as its own drafter every draft is accepted: the acceptance path and rollbacks."""
    from engine.hf import HFEngine
    from orchestrator.engine_client import LocalEngineClient
    from orchestrator.service import Orchestrator
    from orchestrator.store import MemorySessionStore

    drafter = LocalEngineClient(HFEngine(model_paths["llm"], role="slm"))
    orchestrator = Orchestrator(drafter, LocalEngineClient(engines["llm"]), MemorySessionStore())
    session = orchestrator.complete(opb.GenerationSpec(text=PROMPTS[0], policy=opb.POLICY_SPEC, draft_tokens=5,
                                                       max_new_tokens=MAX_NEW))
    assert session.stats.accepted_tokens == session.stats.drafted_tokens > 0
    assert [t for s in session.spans for t in s.token_ids] == run(orchestrator, PROMPTS[0], opb.POLICY_LLM)[1]


def test_a_caller_that_goes_away_leaves_a_cancelled_session(orchestrator):
    events = orchestrator.generate(opb.GenerationSpec(text=PROMPTS[1], tau=0.3, max_new_tokens=40))
    session_id = next(events).started.session_id
    events.close()  # what the gRPC servicer does when the client disconnects
    session = orchestrator.session(session_id)
    assert session.status == opb.STATUS_CANCELLED and session.finish_reason == opb.FINISH_REASON_CANCELLED


def test_extremes_on_the_trained_default_pair():
    """The same property on the committed trained pair, where most entropies are near zero."""
    from engine.default_models import default_model_path, trained_models_dir
    from engine.hf import HFEngine
    from orchestrator.engine_client import LocalEngineClient
    from orchestrator.service import Orchestrator
    from orchestrator.store import MemorySessionStore
    from training.task import heldout

    assert default_model_path("llm") == trained_models_dir() / "rstitch-llm"
    engines = {role: HFEngine(default_model_path(role), role=role) for role in ("slm", "llm")}
    orchestrator = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                                MemorySessionStore())
    for problem in heldout(4):
        session, llm_only, _, _ = run(orchestrator, problem.question, opb.POLICY_LLM)
        assert llm_only == hf_greedy(engines["llm"], list(session.prompt_token_ids))
        _, at_zero, sources, entropies = run(orchestrator, problem.question, opb.POLICY_ENTROPY, tau=0.0)
        kept_by_slm = [i for i, s in enumerate(sources) if s == SLM]
        assert all(entropies[i] == 0.0 for i in kept_by_slm)
        if not kept_by_slm:
            assert at_zero == llm_only
        session, slm_only, _, _ = run(orchestrator, problem.question, opb.POLICY_SLM)
        assert slm_only == hf_greedy(engines["slm"], list(session.prompt_token_ids))
        assert run(orchestrator, problem.question, opb.POLICY_ENTROPY, tau=1.0)[1] == slm_only


class EvictedBeforeEachRollback(LocalEngineClient):
    """An engine that lost the session (evicted under KV pressure) just before every rollback."""

    def rollback(self, req, timeout=None):
        self.engine.release(epb.ReleaseRequest(session_id=req.session_id))
        return super().rollback(req, timeout)


def test_speculation_survives_a_session_evicted_before_its_rollback(engines):
    spec = opb.GenerationSpec(text=PROMPTS[1], policy=opb.POLICY_SPEC, max_new_tokens=40)
    plain = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]), MemorySessionStore())
    evicting = Orchestrator(EvictedBeforeEachRollback(engines["slm"]), EvictedBeforeEachRollback(engines["llm"]),
                            MemorySessionStore())
    want, got = plain.complete(spec), evicting.complete(spec)
    assert got.status == opb.STATUS_FINISHED, got.error
    assert [t for s in got.spans for t in s.token_ids] == [t for s in want.spans for t in s.token_ids]
    assert got.stats.llm_prefill_tokens > want.stats.llm_prefill_tokens  # re-prefilled after each loss
