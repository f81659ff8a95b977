"""Token streaming: an engine span leaves the engine token by token, and the client gets one Delta per
token as it is decoded, before the span ends and is logged."""

import grpc
import pytest

from common.grpc_server import start_server
from engine.servicer import SERVICE_NAME, EngineServicer
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import engine_pb2_grpc
from rstitch.v1 import orchestrator_pb2 as opb

PROMPT = [3, 48, 81, 8, 92, 80, 77, 90, 77, 6, 4]


@pytest.fixture(scope="module")
def slm_stub(engines):
    server, port = start_server(lambda s: engine_pb2_grpc.add_EngineServicer_to_server(
        EngineServicer(engines["slm"]), s), [SERVICE_NAME], "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield engine_pb2_grpc.EngineStub(channel)
    server.stop(None)


def test_an_engine_span_streams_each_committed_token_then_the_response(slm_stub):
    rule = epb.SpanRule(max_tokens=32)
    unary = slm_stub.Prefill(epb.PrefillRequest(session_id="unary", token_ids=PROMPT, rule=rule), timeout=30)
    events = list(slm_stub.StreamSpan(epb.StreamSpanRequest(prefill=epb.PrefillRequest(
        session_id="streamed", token_ids=PROMPT, rule=rule)), timeout=30))
    tokens, done = events[:-1], events[-1].done
    assert [e.WhichOneof("event") for e in tokens] == ["token"] * 32
    assert [e.token.token_id for e in tokens] == list(done.span.token_ids) == list(unary.span.token_ids)
    assert [e.token.entropy for e in tokens] == list(done.span.entropies)
    assert done.span.cache_len == unary.span.cache_len
    # Without tokens, a stream decodes on from the kept distribution (Decode), as Prefill would.
    gated = slm_stub.StreamSpan(epb.StreamSpanRequest(prefill=epb.PrefillRequest(
        session_id="streamed", base_len=done.span.cache_len, token_ids=[done.span.token_ids[-1]],
        rule=epb.SpanRule(max_tokens=4, gate=epb.GATE_STOP_ABOVE, tau=0.0))), timeout=30)
    assert [e.WhichOneof("event") for e in gated] == ["done"]  # a gated candidate is never streamed


def test_a_streamed_span_refused_by_the_engine_gets_its_status(slm_stub):
    with pytest.raises(grpc.RpcError) as refused:
        list(slm_stub.StreamSpan(epb.StreamSpanRequest(prefill=epb.PrefillRequest(
            session_id="never-made", base_len=5, rule=epb.SpanRule(max_tokens=3))), timeout=30))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("policy", [opb.POLICY_SLM, opb.POLICY_ENTROPY, opb.POLICY_RANDOM])
def test_the_client_gets_each_token_before_its_span_is_logged(orchestrator, policy):
    events = orchestrator.generate(opb.GenerationSpec(token_ids=opb.TokenIds(token_ids=PROMPT), policy=policy,
                                                      tau=0.3, max_new_tokens=32, slm_probability=0.5, seed=3))
    session_id = next(events).started.session_id
    first = next(events)
    assert first.HasField("delta") and len(first.delta.span.token_ids) == 1
    assert not orchestrator.session(session_id).spans  # the first span is still being decoded
    rest = list(events)
    deltas = [first.delta] + [e.delta for e in rest[:-1]]
    stored = orchestrator.session(session_id)
    assert [d.span.token_ids[0] for d in deltas] == [t for s in stored.spans for t in s.token_ids]
    assert len(deltas) == 32 or rest[-1].finished.finish_reason == opb.FINISH_REASON_EOS
    if policy == opb.POLICY_SLM:
        assert len(stored.spans) == 1 and len(deltas) >= 16  # one span, streamed token by token
