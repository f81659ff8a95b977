"""Limits and backpressure, KV pressure, deadlines and cancellation, session expiry."""

import threading
import time

import grpc
import pytest

from common import errors
from common.grpc_server import start_server
from engine.hf import HFEngine
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator, RequestError, Settings
from orchestrator.servicer import SERVICE_NAME, OrchestratorServicer
from orchestrator.store import MemorySessionStore, RedisSessionStore
from rstitch import RStitchClient
from rstitch.client import GenerationResult, _gather
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb
from rstitch.v1 import orchestrator_pb2_grpc

from .conftest import PROMPTS

SPEC = opb.GenerationSpec(text="Hello", max_new_tokens=5)


def local(engines, store=None, **settings):
    return Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                        store or MemorySessionStore(), Settings(**settings))


def test_generations_past_the_session_and_queue_limits_are_refused(engines):
    orchestrator = local(engines, max_sessions=1, max_queue=1)
    running = orchestrator.generate(SPEC)
    next(running)  # holds the only slot
    queued = []
    waiter = threading.Thread(target=lambda: queued.append(list(orchestrator.generate(SPEC))))
    waiter.start()
    while orchestrator.admission.waiting < 1:
        time.sleep(0.01)
    with pytest.raises(RequestError) as refused:
        next(orchestrator.generate(SPEC))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-sessions 1" in str(refused.value) and "--max-queue 1" in str(refused.value)
    list(running)  # its end frees the slot for the queued one
    waiter.join(30)
    assert queued[0][-1].finished.finish_reason == opb.FINISH_REASON_MAX_NEW_TOKENS


@pytest.mark.parametrize("settings, spec, flag", [
    ({"max_prompt_tokens": 3}, opb.GenerationSpec(text="a longer prompt", raw=True), "--max-prompt-tokens"),
    ({"max_new_tokens_limit": 10}, opb.GenerationSpec(text="x", max_new_tokens=11), "--max-new-tokens-limit"),
])
def test_request_size_limits(engines, settings, spec, flag):
    with pytest.raises(RequestError) as refused:
        next(local(engines, **settings).generate(spec))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and flag in str(refused.value)


def test_engine_session_and_call_limits(model_paths):
    engine = HFEngine(model_paths["slm"], role="slm", max_sessions=2, max_calls=1)
    prefill = lambda sid: engine.prefill(epb.PrefillRequest(session_id=sid, token_ids=[5, 6, 7],  # noqa: E731
                                                           rule=epb.SpanRule(max_tokens=1)))
    for sid in ("a", "b", "c"):
        prefill(sid)
    assert len(engine.sessions) == 2 and engine.info().kv_evictions == 1  # "a", least recently used, went
    with pytest.raises(errors.SessionNotFound):
        engine.decode(epb.DecodeRequest(session_id="a", base_len=4, rule=epb.SpanRule(max_tokens=1)))
    with engine.admission.slot():  # one call in flight: the limit
        with pytest.raises(errors.EngineOverloaded, match="--max-calls 1") as busy:
            prefill("d")
    assert busy.value.retryable


def test_kv_pressure_evicts_idle_sessions_and_the_orchestrator_recovers(engines, model_paths):
    want = {p: local(engines).complete(opb.GenerationSpec(text=p, tau=0.3, max_new_tokens=60)) for p in PROMPTS[:4]}
    tight = {role: HFEngine(path, role=role) for role, path in model_paths.items()}
    for role, engine in tight.items():  # room for about two sessions of the four running at once
        engine.sessions.capacity = 150
    orchestrator = local(tight)
    got = {}
    threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, orchestrator.complete(
        opb.GenerationSpec(text=p, tau=0.3, max_new_tokens=60)))) for p in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for prompt, session in want.items():
        assert [s.token_ids for s in got[prompt].spans] == [s.token_ids for s in session.spans]
    assert sum(e.info().kv_evictions for e in tight.values()) > 0
    assert all(e.sessions.used <= e.sessions.capacity for e in tight.values())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_sessions_expire_after_their_ttl(engines, redis_server, kind):
    store = MemorySessionStore(ttl_s=1) if kind == "memory" else RedisSessionStore(redis_server.url, ttl_s=1)
    orchestrator = local(engines, store)
    session_id = orchestrator.complete(SPEC).session_id
    if kind == "redis":
        assert 0 < store.ttl(session_id) <= 1
    time.sleep(1.6)
    with pytest.raises(RequestError) as gone:
        orchestrator.session(session_id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


class SlowCountingEngine(LocalEngineClient):
    """An in-process engine that takes 10 ms a call and counts its calls."""

    def __init__(self, engine):
        super().__init__(engine)
        self.calls = 0

    def prefill(self, req, timeout=None):
        self.calls += 1
        time.sleep(0.01)
        return super().prefill(req, timeout)

    def decode(self, req, timeout=None):
        self.calls += 1
        time.sleep(0.01)
        return super().decode(req, timeout)


@pytest.fixture
def served(engines):
    slm, llm = SlowCountingEngine(engines["slm"]), SlowCountingEngine(engines["llm"])
    orchestrator = Orchestrator(slm, llm, MemorySessionStore())
    server, port = start_server(
        lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(orchestrator), s),
        [SERVICE_NAME], "127.0.0.1", 0)
    yield orchestrator, lambda: slm.calls + llm.calls, f"127.0.0.1:{port}"
    server.stop(0)


LONG = dict(policy="random", slm_probability=0.5, seed=3, max_new_tokens=300)  # ~150 spans, ~1.5 s


def settle(calls):
    """Engine calls once they stop changing."""
    before = -1
    while calls() != before:
        before = calls()
        time.sleep(0.3)
    return before


def test_a_client_that_cancels_stops_engine_work_within_one_span(served):
    orchestrator, calls, address = served
    with RStitchClient(address) as client:
        stream = client.stream(PROMPTS[0], **LONG)
        got = _gather([next(stream), next(stream)], GenerationResult())
        at_cancel = calls()
        stream.cancel()
    assert settle(calls) - at_cancel <= 2  # the span in flight, and at most the one being started
    session = orchestrator.session(got.session_id)
    assert session.status == opb.STATUS_CANCELLED and session.finish_reason == opb.FINISH_REASON_CANCELLED
    assert session.stats.spans < 20


def test_a_deadline_ends_the_session_and_its_engine_work(served):
    orchestrator, calls, address = served
    with RStitchClient(address, timeout=0.3) as client:
        with pytest.raises(grpc.RpcError) as late:
            client.complete(PROMPTS[0], **LONG)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    work = settle(calls)
    assert work < 60  # an undisturbed run makes about 150 calls
    [session_id] = orchestrator.store._meta  # the only session this orchestrator ever had
    assert orchestrator.session(session_id).status in (opb.STATUS_CANCELLED, opb.STATUS_FAILED)
