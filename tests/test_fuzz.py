"""Fuzzing the deployment: more than 1,000 random requests to each service, then everything still stands.

slm_service, llm_service and the orchestrator run as separate processes (the tiny pair) with a real
redis-server. Each service gets well-formed requests built from its proto messages with random field
values (extreme integers, NaN and infinite floats, any unicode, random ids and enum numbers), and raw
random bytes on every method path (and on paths that do not exist). Every answer must be OK or a client
error; never INTERNAL, never UNAVAILABLE. Every field is drawn over its full range (max_new_tokens up to
2^32 - 1 included); generations stay cheap because the engines' context is short, not because lengths
are capped. Orchestrator calls go with and without a deadline. Sessions made before the fuzzing (a
finished generation, a prefilled session on each engine, sent bad requests by the fuzzer too) come out
intact.
"""

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import CACHE_LEN_KEY
from rstitch.local import LocalDeployment
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import engine_pb2_grpc, orchestrator_pb2_grpc
from rstitch.v1 import orchestrator_pb2 as opb

PROMPT = [3, 48, 81, 8, 92, 80, 77, 90, 77, 6, 4]
# Examples per kind of request; each sends one request: 1,100 to each service.
EXAMPLES = {"engine": {"valid": 300, "random": 350, "at-known": 150, "raw": 300},
            "orchestrator": {"valid": 250, "random": 400, "sessions": 150, "raw": 300}}
CONTEXT = 48  # the engines' --max-context: every generation, however long it asks to be, ends within it
MAX_NEW_TOKENS_LIMIT = 4096  # the orchestrator's default --max-new-tokens-limit
TIMEOUT_S = 30
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}
SERVICES = {"slm": epb.DESCRIPTOR.services_by_name["Engine"], "llm": epb.DESCRIPTOR.services_by_name["Engine"],
            "orchestrator": opb.DESCRIPTOR.services_by_name["Orchestrator"]}
FUZZ_SETTINGS = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def deployment(redis_server, model_paths, tmp_path_factory):
    engine_args = ["--max-context", str(CONTEXT)]
    with LocalDeployment(redis=redis_server.url, slm_args=["--model", str(model_paths["slm"]), *engine_args],
                         llm_args=["--model", str(model_paths["llm"]), *engine_args],
                         log_dir=tmp_path_factory.mktemp("fuzz-logs")) as d:
        channels = {"slm": grpc.insecure_channel(d.slm.address), "llm": grpc.insecure_channel(d.llm.address),
                    "orchestrator": grpc.insecure_channel(d.address)}
        d.channels = channels
        d.stubs = {"slm": engine_pb2_grpc.EngineStub(channels["slm"]),
                   "llm": engine_pb2_grpc.EngineStub(channels["llm"]),
                   "orchestrator": orchestrator_pb2_grpc.OrchestratorStub(channels["orchestrator"])}
        yield d
        for channel in channels.values():
            channel.close()


def next_token(stub, session_id: str) -> int:
    """The engine's next token for a session at len(PROMPT), leaving the session as it was: a gate at
    tau 0 stops on the first token (entropy > 0) without committing it."""
    span = stub.Decode(epb.DecodeRequest(session_id=session_id, base_len=len(PROMPT), rule=epb.SpanRule(
        max_tokens=1, gate=epb.GATE_STOP_ABOVE, tau=0.0)), timeout=TIMEOUT_S).span
    assert span.stop_reason == epb.STOP_REASON_GATE and span.cache_len == len(PROMPT)
    return span.candidate.token_id


@pytest.fixture(scope="module")
def known(deployment):
    """The sessions that exist before the fuzzing, and what they hold."""
    sessions = {}
    for role in ("slm", "llm"):
        stub = deployment.stubs[role]
        sid = f"known-{role}"
        stub.Prefill(epb.PrefillRequest(session_id=sid, token_ids=PROMPT, rule=epb.SpanRule(max_tokens=0)))
        sessions[role] = (sid, next_token(stub, sid))
    info = deployment.stubs["slm"].Info(epb.InfoRequest())
    finished = deployment.stubs["orchestrator"].Complete(opb.CompleteRequest(spec=opb.GenerationSpec(
        text="Hello", max_new_tokens=6, tau=0.3)), timeout=TIMEOUT_S).session
    assert finished.status == opb.STATUS_FINISHED and finished.spans
    return {"engines": sessions, "finished": finished, "vocab": info.vocab_size, "context": info.max_context}


# --- strategies -------------------------------------------------------------------------------

EXTREME_U32 = st.sampled_from([2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])


def uint32(small: int):
    return st.one_of(st.integers(0, small), EXTREME_U32, st.integers(0, 2**32 - 1))


def enum(values):
    return st.one_of(st.sampled_from(sorted(values)), st.integers(-2**31, 2**31 - 1))


FLOATS = st.one_of(st.floats(0, 1, width=32), st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf,
                                                                                    -0.0, 1.0000001]))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "\ufffd" * 3, "ab " * 5000]))


def engine_requests(vocab: int, context: int, known: dict[str, tuple[str, int]], role: str):
    token = st.one_of(st.integers(0, vocab - 1), st.integers(vocab, vocab + 3), EXTREME_U32)
    tokens = st.one_of(st.lists(token, max_size=24), st.just([5] * (context + 1)))
    sid = st.one_of(st.sampled_from(["", "fuzz-0", "fuzz-1", "fuzz-2", "s" * 300]), st.text(max_size=20))
    rule = st.builds(epb.SpanRule,
                     max_tokens=st.one_of(st.integers(0, 8), st.integers(context + 1, 2**32 - 1), EXTREME_U32),
                     stop_token_ids=st.one_of(st.lists(token, max_size=4), st.just([1] * 1025)),
                     gate=enum(epb.Gate.values()), tau=FLOATS, return_hidden=st.booleans())
    bad_rule = st.one_of(
        st.builds(epb.SpanRule, tau=st.one_of(st.floats(2.0, 2.0**100, width=32), st.just(math.nan), st.just(-0.5))),
        st.builds(epb.SpanRule, gate=st.integers(3, 2**31 - 1)),
        st.builds(epb.SpanRule, max_tokens=st.integers(context + 1, 2**32 - 1)),
        st.builds(epb.SpanRule, stop_token_ids=st.lists(st.integers(vocab, 2**32 - 1), min_size=1, max_size=3)),
    )
    in_vocab = st.integers(0, vocab - 1)
    good_rule = st.builds(epb.SpanRule, max_tokens=st.integers(0, 6), stop_token_ids=st.lists(in_vocab, max_size=3),
                          gate=st.sampled_from(sorted(epb.Gate.values())), tau=st.floats(0, 1, width=32),
                          return_hidden=st.booleans())
    pool = st.sampled_from([f"fuzz-{i}" for i in range(6)])
    # Mostly valid requests on a few sessions: they create, grow, decode, roll back and release them.
    valid = st.one_of(
        st.tuples(st.just("Prefill"), st.builds(epb.PrefillRequest, session_id=pool, base_len=st.integers(0, 60),
                                                token_ids=st.lists(in_vocab, min_size=1, max_size=16), rule=good_rule,
                                                verify=st.booleans())),
        st.tuples(st.just("Decode"), st.builds(epb.DecodeRequest, session_id=pool, base_len=st.integers(0, 60),
                                               rule=good_rule)),
        st.tuples(st.just("Rollback"), st.builds(epb.RollbackRequest, session_id=pool, length=st.integers(0, 60))),
        st.tuples(st.just("Release"), st.builds(epb.ReleaseRequest, session_id=pool)),
    )
    known_id, _ = known[role]
    wrong_base = st.one_of(st.integers(0, len(PROMPT) - 1), st.integers(len(PROMPT) + 1, 2**32 - 1))
    # Requests that name the session made before the fuzzing: each must be refused and change nothing.
    at_known = st.one_of(
        st.tuples(st.just("Prefill"), st.builds(epb.PrefillRequest, session_id=st.just(known_id), base_len=wrong_base,
                                                token_ids=tokens, rule=rule, verify=st.booleans())),
        st.tuples(st.just("Prefill"), st.builds(
            epb.PrefillRequest, session_id=st.just(known_id), base_len=st.just(len(PROMPT)),
            token_ids=st.lists(token, max_size=4).map(lambda t: t + [vocab]), rule=rule, verify=st.booleans())),
        st.tuples(st.just("Prefill"), st.builds(epb.PrefillRequest, session_id=st.just(known_id),
                                                base_len=st.just(len(PROMPT)), token_ids=st.lists(token, max_size=4)
                                                .map(lambda t: [x % vocab for x in t]), rule=bad_rule)),
        st.tuples(st.just("Decode"), st.builds(epb.DecodeRequest, session_id=st.just(known_id), base_len=wrong_base,
                                               rule=rule)),
        st.tuples(st.just("Decode"), st.builds(epb.DecodeRequest, session_id=st.just(known_id),
                                               base_len=st.just(len(PROMPT)), rule=bad_rule)),
        st.tuples(st.just("Rollback"), st.builds(epb.RollbackRequest, session_id=st.just(known_id),
                                                 length=st.integers(len(PROMPT) + 1, 2**32 - 1))),
    )
    anything = st.one_of(
        st.tuples(st.just("Prefill"), st.builds(epb.PrefillRequest, session_id=sid, base_len=uint32(40),
                                                token_ids=tokens, rule=rule, verify=st.booleans())),
        st.tuples(st.just("Decode"), st.builds(epb.DecodeRequest, session_id=sid, base_len=uint32(40), rule=rule)),
        st.tuples(st.just("Rollback"), st.builds(epb.RollbackRequest, session_id=sid, length=uint32(40))),
        st.tuples(st.just("Release"), st.builds(epb.ReleaseRequest, session_id=sid)),
        st.tuples(st.just("Info"), st.just(epb.InfoRequest())),
        st.tuples(st.just("GetTokenizer"), st.just(epb.GetTokenizerRequest())),
    )
    # (method, request, sync): with sync the test puts in the length the engine holds (as far as it knows).
    return {"valid": st.tuples(valid, st.booleans()).map(lambda v: (*v[0], v[1])),
            "random": anything.map(lambda v: (*v, False)), "at-known": at_known.map(lambda v: (*v, False))}


def orchestrator_requests(vocab: int, context: int, finished_id: str):
    token = st.one_of(st.integers(0, vocab - 1), st.integers(vocab, vocab + 3), EXTREME_U32)
    sid = st.one_of(st.sampled_from(["", finished_id, "no-such-session", "s" * 257, "s" * 100_000]),
                    st.text(max_size=40))

    @st.composite
    def generation_spec(draw):
        spec = opb.GenerationSpec(
            raw=draw(st.booleans()), policy=draw(enum(opb.Policy.values())),
            max_new_tokens=draw(uint32(2 * MAX_NEW_TOKENS_LIMIT)),
            stop_token_ids=draw(st.one_of(st.lists(token, max_size=3), st.just([1] * 300))),
            seed=draw(st.integers(0, 2**64 - 1)),
            draft_tokens=draw(uint32(80)))
        kind = draw(st.sampled_from(["none", "text", "messages", "token_ids"]))
        if kind == "text":
            spec.text = draw(TEXT)
        elif kind == "messages":
            spec.messages.SetInParent()
            spec.messages.messages.extend(draw(st.lists(st.builds(opb.ChatMessage, role=st.one_of(
                st.sampled_from(["user", "assistant", "system"]), st.text(max_size=10)), content=TEXT), max_size=3)))
        elif kind == "token_ids":
            spec.token_ids.SetInParent()
            spec.token_ids.token_ids.extend(draw(st.one_of(st.lists(token, max_size=20),
                                                           st.just([5] * (context + 1)))))
        if draw(st.booleans()):
            spec.tau = draw(FLOATS)
        if draw(st.booleans()):
            spec.slm_probability = draw(FLOATS)
        return spec

    in_vocab = st.integers(0, vocab - 1)
    valid_spec = st.builds(
        opb.GenerationSpec, text=st.text(min_size=1, max_size=20), policy=st.sampled_from(sorted(opb.Policy.values())),
        tau=st.floats(0, 1, width=32), max_new_tokens=st.integers(0, MAX_NEW_TOKENS_LIMIT),
        stop_token_ids=st.lists(in_vocab, max_size=2), slm_probability=st.floats(0, 1, width=32),
        seed=st.integers(0, 2**64 - 1), draft_tokens=st.integers(0, 64))
    valid_ids_spec = st.builds(opb.GenerationSpec, token_ids=st.builds(
        opb.TokenIds, token_ids=st.lists(in_vocab, min_size=1, max_size=12)), policy=st.sampled_from(
        sorted(opb.Policy.values())), max_new_tokens=st.integers(0, MAX_NEW_TOKENS_LIMIT))
    valid = st.one_of(valid_spec, valid_ids_spec)
    kinds = {
        "valid": st.one_of(st.tuples(st.just("Generate"), st.builds(opb.GenerateRequest, spec=valid)),
                           st.tuples(st.just("Complete"), st.builds(opb.CompleteRequest, spec=valid))),
        "random": st.one_of(st.tuples(st.just("Generate"), st.builds(opb.GenerateRequest, spec=generation_spec())),
                            st.tuples(st.just("Complete"), st.builds(opb.CompleteRequest, spec=generation_spec()))),
        "sessions": st.one_of(
            st.tuples(st.just("Resume"), st.builds(opb.ResumeRequest, session_id=sid,
                                                   received_tokens=uint32(2 * CONTEXT))),
            st.tuples(st.just("GetSession"), st.builds(opb.GetSessionRequest, session_id=sid)),
            st.tuples(st.just("Cancel"), st.builds(opb.CancelRequest, session_id=sid))),
    }
    # The flag says the call goes without a deadline (grpcurl's default), as many real clients send it.
    return {kind: st.tuples(strategy, st.booleans()).map(lambda v: (*v[0], v[1])) for kind, strategy in kinds.items()}


def raw_requests(service):
    """(path, streaming, bytes) on every method of the service and on two that do not exist."""
    methods = [(f"/{service.full_name}/{m.name}", m.server_streaming) for m in service.methods]
    methods += [(f"/{service.full_name}/NoSuchMethod", False), ("/no.such.Service/Call", False)]
    return st.tuples(st.sampled_from(methods), st.one_of(st.binary(max_size=200), st.binary(min_size=1000,
                                                                                          max_size=5000)))


# --- sending ----------------------------------------------------------------------------------

def outcome(call):
    """(code, message, response, trailing metadata) of a call."""
    try:
        result = call()
        if hasattr(result, "__next__"):  # a stream: read it to its end
            for _ in result:
                pass
        return grpc.StatusCode.OK, "", result, {}
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None, dict(e.trailing_metadata() or ())


def track(lengths: dict, method: str, request, code: grpc.StatusCode, response, trailing: dict) -> None:
    """What the engine holds for each session, as its answers tell."""
    sid = getattr(request, "session_id", "")
    if code == grpc.StatusCode.OK and method in ("Prefill", "Decode"):
        lengths[sid] = response.span.cache_len
    elif code == grpc.StatusCode.OK and method == "Rollback":
        lengths[sid] = response.cache_len
    elif (code == grpc.StatusCode.OK and method == "Release") or code == grpc.StatusCode.NOT_FOUND:
        lengths.pop(sid, None)
    elif CACHE_LEN_KEY in trailing:
        lengths[sid] = int(trailing[CACHE_LEN_KEY])


def check(code: grpc.StatusCode, details: str, what: str, allowed=frozenset()) -> None:
    if code == grpc.StatusCode.OK or code in CLIENT_ERRORS | allowed:
        assert code == grpc.StatusCode.OK or details.strip(), f"{what}: {code.name} without a message"
        return
    raise AssertionError(f"{what} got {code.name}: {details}")


@pytest.mark.parametrize("target", ["slm", "llm", "orchestrator"])
def test_fuzzed_requests_get_client_errors_and_break_nothing(deployment, known, redis_server, target):
    stub, channel = deployment.stubs[target], deployment.channels[target]
    sent = {}
    lengths = {}  # engine session -> cache length
    if target == "orchestrator":
        kinds = orchestrator_requests(known["vocab"], known["context"], known["finished"].session_id)
        examples = EXAMPLES["orchestrator"]
    else:
        kinds = engine_requests(known["vocab"], known["context"], known["engines"], target)
        examples = EXAMPLES["engine"]

    def well_formed(kind):
        def send(example):
            method, request, flag = example
            sync, timeout = (False, None if flag else TIMEOUT_S) if target == "orchestrator" else (flag, TIMEOUT_S)
            if sync:
                request = type(request).FromString(request.SerializeToString())
                held = lengths.get(request.session_id, 0)
                if method == "Rollback":
                    request.length = min(request.length, held)
                elif method != "Release":
                    request.base_len = held
            sent[kind] = sent.get(kind, 0) + 1
            code, details, response, trailing = outcome(lambda: getattr(stub, method)(request, timeout=timeout))
            check(code, details, f"{target} {method}({str(request)[:300]!r})")
            track(lengths, method, request, code, response, trailing)

        return send

    def raw(path_bytes):
        (path, streaming), data = path_bytes
        sent["raw"] = sent.get("raw", 0) + 1
        make = channel.unary_stream if streaming else channel.unary_unary
        call = make(path, request_serializer=None, response_deserializer=None)
        code, details, _, _ = outcome(lambda: call(data, timeout=TIMEOUT_S))
        if code == grpc.StatusCode.UNIMPLEMENTED:
            assert "NoSuchMethod" in path or path.startswith("/no."), f"{path} is UNIMPLEMENTED"
        check(code, details, f"{target} {path}({data!r})", {grpc.StatusCode.UNIMPLEMENTED})

    for kind, strategy in kinds.items():
        settings(FUZZ_SETTINGS, max_examples=examples[kind])(given(strategy)(well_formed(kind)))()
    settings(FUZZ_SETTINGS, max_examples=examples["raw"])(given(raw_requests(SERVICES[target]))(raw))()
    assert sum(sent.values()) >= 1000, sent
    assert_everything_stands(deployment, known, redis_server)


def assert_everything_stands(deployment, known, redis_server):
    assert redis_server.process.poll() is None, "redis-server exited"
    services = {"slm": deployment.slm, "llm": deployment.llm, "orchestrator": deployment.orchestrator}
    for name, service in services.items():
        assert service.process.poll() is None, f"{name} exited with {service.process.returncode}"
        health = health_pb2_grpc.HealthStub(deployment.channels[name])
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    for role, (sid, token) in known["engines"].items():
        assert next_token(deployment.stubs[role], sid) == token, f"{role} session {sid} changed"
    finished = known["finished"]
    orchestrator = deployment.stubs["orchestrator"]
    assert orchestrator.GetSession(opb.GetSessionRequest(session_id=finished.session_id)).session == finished
