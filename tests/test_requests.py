"""Requests real clients send that once ended in INTERNAL or in a wrong status: no deadline, an answer
longer than the context, bytes that do not parse, huge session ids; and what the orchestrator logs."""

import json
import re
import subprocess

import grpc
import pytest

from orchestrator.engine_client import LocalEngineClient
from orchestrator.router import Router
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch.local import LocalDeployment
from rstitch.v1 import orchestrator_pb2 as opb
from rstitch.v1 import orchestrator_pb2_grpc

ORCHESTRATOR = "/rstitch.v1.Orchestrator/"
ENGINE = "/rstitch.v1.Engine/"
# A GetSessionRequest (field 1, a string) holding bytes that are not UTF-8; and bytes that are no protobuf.
INVALID_UTF8 = b"\x0a\x02\xff\xfe"
CORRUPT = b"\xff\xff\xff\xff"


@pytest.fixture(scope="module")
def deployment(redis_server, model_paths, tmp_path_factory):
    with LocalDeployment(redis=redis_server.url, slm_args=["--model", str(model_paths["slm"])],
                         llm_args=["--model", str(model_paths["llm"])],
                         log_dir=tmp_path_factory.mktemp("request-logs")) as d:
        with grpc.insecure_channel(d.address) as orchestrator, grpc.insecure_channel(d.slm.address) as slm:
            d.channel, d.engine_channel = orchestrator, slm
            d.stub = orchestrator_pb2_grpc.OrchestratorStub(orchestrator)
            yield d


def spec(**fields) -> opb.GenerationSpec:
    return opb.GenerationSpec(text="Hello", max_new_tokens=6, **fields)


def test_calls_without_a_deadline_run_to_the_end(deployment):
    session = deployment.stub.Complete(opb.CompleteRequest(spec=spec())).session  # no timeout=
    assert session.status == opb.STATUS_FINISHED and session.spans
    events = list(deployment.stub.Generate(opb.GenerateRequest(spec=spec())))
    assert events[-1].finished.finish_reason in (opb.FINISH_REASON_MAX_NEW_TOKENS, opb.FINISH_REASON_EOS)
    assert [t for e in events for t in e.delta.span.token_ids] == [t for s in session.spans for t in s.token_ids]


def test_grpcurl_with_its_default_of_no_deadline_completes(deployment):
    request = json.dumps({"spec": {"text": "Hello", "maxNewTokens": 6}})
    proc = subprocess.run(["grpcurl", "-plaintext", "-d", request, deployment.address,
                           "rstitch.v1.Orchestrator/Complete"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["session"]["status"] == "STATUS_FINISHED"


@pytest.fixture(scope="module")
def short_context(model_paths):
    """In-process engines whose context holds 40 tokens, with a router that always hands over."""
    from engine.hf import HFEngine

    engines = {role: HFEngine(path, role=role, max_context=40) for role, path in model_paths.items()}
    orchestrator = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                                MemorySessionStore())
    orchestrator.router = Router.constant(engines["slm"].info().hidden_size, switch=True).to_bytes()
    return orchestrator


@pytest.mark.parametrize("policy", ["entropy", "llm", "slm", "router", "random", "spec"])
@pytest.mark.parametrize("max_new_tokens", [39, 40, 400, 4096])
def test_an_answer_longer_than_the_context_ends_when_the_context_is_full(short_context, policy, max_new_tokens):
    session = short_context.complete(opb.GenerationSpec(
        token_ids=opb.TokenIds(token_ids=[3, 48, 81]), policy=opb.Policy.Value(f"POLICY_{policy.upper()}"),
        tau=0.3, max_new_tokens=max_new_tokens))
    answer = [t for s in session.spans for t in s.token_ids]
    assert session.status == opb.STATUS_FINISHED, session.error
    if session.finish_reason == opb.FINISH_REASON_CONTEXT_FULL:
        assert 3 + len(answer) == 40 and max_new_tokens > 37
    else:  # the tiny models' EOS, or the length asked for, came first
        assert session.finish_reason in (opb.FINISH_REASON_EOS, opb.FINISH_REASON_MAX_NEW_TOKENS)
        assert 3 + len(answer) <= 40 and len(answer) <= max_new_tokens


def raw_call(channel, path: str, data: bytes, streaming: bool):
    make = channel.unary_stream if streaming else channel.unary_unary
    call = make(path, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        result = call(data, timeout=30)
        if streaming:
            list(result)
    return caught.value


@pytest.mark.parametrize("data", [INVALID_UTF8, CORRUPT], ids=["invalid-utf8", "corrupt"])
@pytest.mark.parametrize("target, method, streaming", [
    ("orchestrator", "Generate", True), ("orchestrator", "Resume", True), ("orchestrator", "Complete", False),
    ("orchestrator", "GetSession", False), ("orchestrator", "Cancel", False),
    ("engine", "Prefill", False), ("engine", "Rollback", False), ("engine", "Release", False),
])
def test_bytes_that_do_not_parse_are_invalid_argument(deployment, data, target, method, streaming):
    channel = deployment.channel if target == "orchestrator" else deployment.engine_channel
    error = raw_call(channel, (ORCHESTRATOR if target == "orchestrator" else ENGINE) + method, data, streaming)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "does not parse" in error.details()
    logs = deployment.orchestrator.log.read_text() + deployment.slm.log.read_text()
    assert "Exception deserializing" not in logs and "Traceback" not in logs


@pytest.mark.parametrize("method", ["GetSession", "Resume", "Cancel"])
def test_a_huge_session_id_is_refused_with_a_short_message(deployment, method):
    request = getattr(opb, f"{method}Request")(session_id="s" * 100_000)
    call = getattr(deployment.stub, method)
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, timeout=30)
        if method == "Resume":
            list(result)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100000 characters" in caught.value.details() and len(caught.value.details()) < 200


def test_one_log_line_per_request_and_no_traceback_for_what_the_client_chose(deployment):
    finished = deployment.stub.Complete(opb.CompleteRequest(spec=spec()), timeout=60).session
    with pytest.raises(grpc.RpcError) as late:  # a deadline the client chose, too short for 300 tokens
        list(deployment.stub.Generate(opb.GenerateRequest(spec=opb.GenerationSpec(text="x", max_new_tokens=300)),
                                      timeout=0.3))
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = deployment.stub.Generate(opb.GenerateRequest(spec=opb.GenerationSpec(text="x", max_new_tokens=300)))
    cancelled = next(stream).started.session_id
    stream.cancel()
    status = deployment.stub.GetSession(opb.GetSessionRequest(session_id=cancelled)).session.status
    while status == opb.STATUS_RUNNING:  # the replica ends it at its next span boundary
        status = deployment.stub.GetSession(opb.GetSessionRequest(session_id=cancelled)).session.status
    log = deployment.orchestrator.log.read_text()
    line = re.search(rf"session {finished.session_id} finished: policy entropy, (\d+) SLM \+ (\d+) LLM tokens, "
                     rf"(\d+) switches, finish (\w+), \d+ ms", log)
    assert line, log[-2000:]
    assert int(line[1]) + int(line[2]) == finished.stats.slm_tokens + finished.stats.llm_tokens
    assert len(re.findall(rf"session {finished.session_id} ", log)) == 1
    assert re.search(rf"session {cancelled} cancelled: .* finish cancelled", log)
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
