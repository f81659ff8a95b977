"""The engine contract (engine.proto), run against every backend through every transport.

Each test talks to an engine client: the engine called in-process, or the same engine behind its
real gRPC server on loopback. Both must answer identically, errors included.
"""

import pytest
import torch

from common import errors
from common.grpc_server import start_server
from engine.servicer import SERVICE_NAME, EngineServicer
from orchestrator.engine_client import GrpcEngineClient, LocalEngineClient
from rstitch.v1 import engine_pb2 as pb
from rstitch.v1 import engine_pb2_grpc

from .conftest import BACKENDS, make_engine

PROMPT = [3, 48, 81, 8, 92, 80, 77, 90, 77, 6, 4]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, model_paths):
    """One engine per backend, shared by both transports (the tests' session ids differ per transport)."""
    return make_engine(request.param, model_paths["llm"], role="llm", kv_budget_mb=1.5)  # 512 tokens


@pytest.fixture(scope="module", params=["in-process", "grpc"])
def client(request, engine):
    transport = request.param
    if transport == "in-process":
        yield LocalEngineClient(engine)
        return
    server, port = start_server(lambda s: engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(engine), s),
                                [SERVICE_NAME], "127.0.0.1", 0)
    remote = GrpcEngineClient(f"127.0.0.1:{port}")
    remote.engine = engine  # white-box access for the logits checks
    yield remote
    remote.close()
    server.stop(None)


@pytest.fixture
def sid(request):
    return request.node.name


def prefill(client, sid, tokens, base=0, **rule):
    return client.prefill(pb.PrefillRequest(session_id=sid, base_len=base, token_ids=tokens, rule=pb.SpanRule(**rule)))


def test_info_describes_the_model(client):
    info = client.info()
    assert info.role == "llm" and info.backend == client.engine.backend
    assert info.vocab_size == 103 and info.max_context == 512 and info.eos_token_ids == [1]
    assert len(info.tokenizer_fingerprint) == 64
    assert client.tokenizer_files().fingerprint == info.tokenizer_fingerprint
    assert "tokenizer.json" in client.tokenizer_files().files


def test_span_commits_tokens_and_leaves_the_last_unfed(client, sid):
    span = prefill(client, sid, PROMPT, max_tokens=5).span
    assert len(span.token_ids) == len(span.entropies) == 5
    assert span.stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert span.cache_len == len(PROMPT) + 4  # the 5th token is appended by the next call
    assert all(0.0 <= h <= 1.0 for h in span.entropies)
    more = prefill(client, sid, [span.token_ids[-1]], base=span.cache_len, max_tokens=3).span
    assert more.cache_len == span.cache_len + 3


def test_spans_concatenate_to_one_greedy_run(client, sid):
    whole = prefill(client, sid + "-whole", PROMPT, max_tokens=12).span.token_ids
    first = prefill(client, sid, PROMPT, max_tokens=5).span
    second = prefill(client, sid, [first.token_ids[-1]], base=first.cache_len, max_tokens=7).span
    assert list(first.token_ids) + list(second.token_ids) == list(whole)


def test_greedy_span_reports_a_point_mass_when_asked_for_distributions(client, sid):
    span = prefill(client, sid, PROMPT, max_tokens=4, return_distributions=True).span
    assert len(span.distributions) == 4
    for token, dist in zip(span.token_ids, span.distributions):
        assert list(dist.token_ids) == [token] and list(dist.probs) == [1.0]


def test_stop_above_returns_the_gated_candidate_uncommitted(client, sid):
    ref = prefill(client, sid + "-ref", PROMPT, max_tokens=20).span
    tau = sorted(ref.entropies)[len(ref.entropies) // 2]
    first_high = next(i for i, h in enumerate(ref.entropies) if h > tau)
    span = prefill(client, sid, PROMPT, max_tokens=20, gate=pb.GATE_STOP_ABOVE, tau=tau, return_hidden=True).span
    assert span.stop_reason == pb.STOP_REASON_GATE
    assert list(span.token_ids) == list(ref.token_ids[:first_high])
    assert span.candidate.token_id == ref.token_ids[first_high]
    assert span.candidate.entropy > tau
    assert len(span.candidate.hidden) == 4 * client.engine.hidden_size  # float32 values
    assert span.cache_len == len(PROMPT) + first_high  # everything kept is fed; the candidate is not


def test_decode_continues_from_a_gated_stop(client, sid):
    ref = prefill(client, sid + "-ref", PROMPT, max_tokens=20).span
    tau = sorted(ref.entropies)[len(ref.entropies) // 2]
    gated = prefill(client, sid, PROMPT, max_tokens=20, gate=pb.GATE_STOP_ABOVE, tau=tau).span
    rest = client.decode(pb.DecodeRequest(session_id=sid, base_len=gated.cache_len, rule=pb.SpanRule(max_tokens=3))).span
    assert rest.token_ids[0] == gated.candidate.token_id


def test_stop_at_or_below_keeps_the_confident_token(client, sid):
    ref = prefill(client, sid + "-ref", PROMPT, max_tokens=20).span
    tau = sorted(ref.entropies)[len(ref.entropies) // 2]
    first_low = next(i for i, h in enumerate(ref.entropies) if h <= tau)
    span = prefill(client, sid, PROMPT, max_tokens=20, gate=pb.GATE_STOP_AT_OR_BELOW, tau=tau).span
    assert span.stop_reason == pb.STOP_REASON_GATE
    assert list(span.token_ids) == list(ref.token_ids[: first_low + 1])


def test_stop_token_is_committed_and_ends_the_span(client, sid):
    ref = prefill(client, sid + "-ref", PROMPT, max_tokens=10).span
    stop = ref.token_ids[3]
    span = prefill(client, sid, PROMPT, max_tokens=10, stop_token_ids=[stop]).span
    assert span.stop_reason == pb.STOP_REASON_STOP_TOKEN
    assert span.token_ids[-1] == stop and len(span.token_ids) == list(ref.token_ids).index(stop) + 1


def test_context_full_stops_the_span(client, sid):
    tokens = (PROMPT * 50)[:508]
    span = prefill(client, sid, tokens, max_tokens=50).span
    assert span.stop_reason == pb.STOP_REASON_CONTEXT_FULL
    assert len(tokens) + len(span.token_ids) == 512


def test_verify_returns_the_greedy_choice_after_every_token(client, sid):
    ref = prefill(client, sid + "-ref", PROMPT, max_tokens=8).span
    draft = list(ref.token_ids[:4]) + [(ref.token_ids[4] + 1) % 100] + list(ref.token_ids[5:8])
    out = client.prefill(pb.PrefillRequest(session_id=sid, base_len=0, token_ids=PROMPT + draft, verify=True,
                                           rule=pb.SpanRule(max_tokens=0)))
    greedy = list(out.greedy_token_ids)
    assert len(greedy) == len(PROMPT) + len(draft)
    assert greedy[len(PROMPT) - 1: len(PROMPT) + 4] == list(ref.token_ids[:5])


def test_rollback_is_exact(client, sid):
    ref = prefill(client, sid + "-ref", PROMPT, max_tokens=10).span
    span = prefill(client, sid, PROMPT, max_tokens=10).span
    back = client.rollback(pb.RollbackRequest(session_id=sid, length=len(PROMPT) - 1))
    assert back.cache_len == len(PROMPT) - 1
    again = prefill(client, sid, PROMPT[-1:], base=len(PROMPT) - 1, max_tokens=10).span
    assert list(again.token_ids) == list(ref.token_ids) == list(span.token_ids)


def test_partial_prefill_after_switches_equals_one_full_prefill(client, sid):
    """The cache built from many small appends (as switches produce) gives the logits of one pass."""
    engine = client.engine
    sequence = (PROMPT + list(range(5, 60)))[:64]
    base = 0
    for chunk in (11, 1, 7, 3, 1, 1, 20, 5):  # prompt, then span-sized appends
        prefill(client, sid, sequence[base: base + chunk], base=base, max_tokens=0)
        base += chunk
    if engine.backend != "hf":
        # No logits to inspect (vLLM recomputes the tail from its prefix cache): the spans must agree.
        stitched = client.decode(pb.DecodeRequest(session_id=sid, base_len=base, rule=pb.SpanRule(max_tokens=8))).span
        full = prefill(client, sid + "-full", sequence[:base], max_tokens=8).span
        assert list(stitched.token_ids) == list(full.token_ids)
        torch.testing.assert_close(list(stitched.entropies), list(full.entropies), rtol=1e-3, atol=1e-4)
        return
    stitched = engine.sessions._sessions[sid].state.next_logits
    with torch.inference_mode():
        full = engine.model(torch.tensor([sequence[:base]])).logits[0, -1]
    # float32 sums in a different order (cached vs one pass) differ by ~1e-4 after many steps.
    torch.testing.assert_close(stitched, full, rtol=1e-3, atol=1e-3)
    assert stitched.argmax() == full.argmax()


# --- errors -----------------------------------------------------------------------------------

def test_wrong_base_len_is_failed_precondition_with_the_real_length(client, sid):
    span = prefill(client, sid, PROMPT, max_tokens=2).span
    with pytest.raises(errors.CacheMismatch) as e:
        prefill(client, sid, [1], base=span.cache_len + 3, max_tokens=1)
    assert e.value.cache_len == span.cache_len
    assert "holds" in str(e.value)


def test_unknown_session_is_not_found(client):
    with pytest.raises(errors.SessionNotFound):
        client.decode(pb.DecodeRequest(session_id="never-seen", base_len=0, rule=pb.SpanRule(max_tokens=1)))
    with pytest.raises(errors.SessionNotFound):
        prefill(client, "never-seen", [5], base=4, max_tokens=1)


def test_decode_without_a_kept_distribution_is_failed_precondition(client, sid):
    span = prefill(client, sid, PROMPT, max_tokens=2).span
    with pytest.raises(errors.CacheMismatch, match="send the last token again"):
        client.decode(pb.DecodeRequest(session_id=sid, base_len=span.cache_len, rule=pb.SpanRule(max_tokens=1)))
    # The refusal leaves the cache alone: the caller can go on from where it was.
    more = prefill(client, sid, [span.token_ids[-1]], base=span.cache_len, max_tokens=1).span
    assert more.cache_len == span.cache_len + 1


@pytest.mark.parametrize("tokens, rule, message", [
    ([500], {}, "outside the vocabulary"),
    ([5], {"tau": 1.5}, "tau must be in"),
    ([5], {"tau": float("nan")}, "tau must be in"),
    ([5], {"max_tokens": 10_000}, "exceeds the model's context"),
    ([5], {"stop_token_ids": [103]}, "outside the vocabulary"),
    ([5] * 600, {}, "context is 512"),
])
def test_bad_requests_are_invalid_argument(client, sid, tokens, rule, message):
    with pytest.raises(errors.InvalidRequest, match=message):
        prefill(client, sid, tokens, **rule)


def test_rollback_cannot_roll_forward(client, sid):
    prefill(client, sid, PROMPT, max_tokens=0)
    with pytest.raises(errors.InvalidRequest, match="roll forward"):
        client.rollback(pb.RollbackRequest(session_id=sid, length=len(PROMPT) + 1))


def test_release_frees_the_session(client, sid):
    prefill(client, sid, PROMPT, max_tokens=1)
    assert client.release(pb.ReleaseRequest(session_id=sid)).released
    assert not client.release(pb.ReleaseRequest(session_id=sid)).released
    with pytest.raises(errors.SessionNotFound):
        prefill(client, sid, [5], base=len(PROMPT), max_tokens=1)


def test_a_session_released_during_its_span_is_freed_when_the_span_ends(client, sid):
    """A Release that arrives while a span runs (the orchestrator's, after its client went away) is not
    refused: the span ends as it would, then the session is gone."""
    stream = client.stream_span(pb.PrefillRequest(session_id=sid, token_ids=PROMPT, rule=pb.SpanRule(max_tokens=8)))
    next(stream)  # the span holds the session now
    assert client.release(pb.ReleaseRequest(session_id=sid)).released
    with pytest.raises(StopIteration) as ended:
        while True:
            next(stream)
    assert len(ended.value.value.span.token_ids) == 8
    with pytest.raises(errors.SessionNotFound):
        prefill(client, sid, [5], base=ended.value.value.span.cache_len, max_tokens=1)


def test_kv_budget_evicts_the_least_recently_used_session(client, sid):
    capacity = client.info().kv_capacity_tokens  # 1.5 MiB / 3 KiB per token
    assert capacity == 512
    prefill(client, sid + "-a", PROMPT * 30, max_tokens=0)
    prefill(client, sid + "-b", PROMPT * 30, max_tokens=0)  # does not fit beside -a: -a is evicted
    assert client.info().kv_used_tokens <= capacity
    with pytest.raises(errors.SessionNotFound):
        prefill(client, sid + "-a", [5], base=len(PROMPT) * 30, max_tokens=1)
    client.release(pb.ReleaseRequest(session_id=sid + "-b"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_session_larger_than_the_whole_budget_is_resource_exhausted(model_paths, backend):
    # 0.05 MiB / 512 B = 102 tokens (the tiny SLM; vLLM has no CPU kernel for its head_dim 16, so the
    # vllm backend takes the tiny LLM: 0.05 MiB / 3 KiB = 17 tokens).
    role, capacity = ("slm", 102) if backend == "hf" else ("llm", 17)
    engine = make_engine(backend, model_paths[role], role="slm", kv_budget_mb=0.05)
    with pytest.raises(errors.KVExhausted, match=f"whole KV budget is {capacity}"):
        prefill(LocalEngineClient(engine), "big", PROMPT * 10, max_tokens=0)
    assert engine.sessions.used == 0 and len(engine.sessions) == 0
