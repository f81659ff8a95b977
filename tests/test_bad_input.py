"""Bad input over real gRPC: every malformed request gets the right status code and a message a person
understands, and leaves the sessions that exist alone.

Both engines and the orchestrator run in this process behind their real gRPC servers on loopback; the
orchestrator reaches the engines over gRPC and keeps its sessions in a real redis-server. The engine
contract's own error cases (tests/test_engine_contract.py) are not repeated here.
"""

import math
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import grpc
import pytest

from common.errors import CACHE_LEN_KEY
from common.grpc_server import start_server
from engine.servicer import SERVICE_NAME as ENGINE_SERVICE
from engine.servicer import EngineServicer
from orchestrator.engine_client import GrpcEngineClient
from orchestrator.router import Router
from orchestrator.service import Orchestrator
from orchestrator.servicer import SERVICE_NAME as ORCHESTRATOR_SERVICE
from orchestrator.servicer import OrchestratorServicer
from orchestrator.store import RedisSessionStore
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import engine_pb2_grpc, orchestrator_pb2_grpc
from rstitch.v1 import orchestrator_pb2 as opb

PROMPT = [3, 48, 81, 8, 92, 80, 77, 90, 77, 6, 4]
VOCAB, CONTEXT = 103, 512  # the tiny pair's
UINT32_MAX = 2**32 - 1
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def stack(engines, redis_server):
    servers = []

    def serve(add, name):
        server, port = start_server(add, [name], "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{port}"

    slm, llm = (serve(lambda s, e=engines[role]: engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(e), s),
                      ENGINE_SERVICE) for role in ("slm", "llm"))
    clients = [GrpcEngineClient(slm), GrpcEngineClient(llm)]
    orchestrator = Orchestrator(*clients, RedisSessionStore(redis_server.url))
    address = serve(lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(
        OrchestratorServicer(orchestrator), s), ORCHESTRATOR_SERVICE)
    channels = [grpc.insecure_channel(a) for a in (address, slm)]
    stubs = {"orchestrator": orchestrator_pb2_grpc.OrchestratorStub(channels[0]),
             "slm": engine_pb2_grpc.EngineStub(channels[1])}
    engine = stubs["slm"]
    reference = engine.Prefill(epb.PrefillRequest(session_id="bad-input-ref", token_ids=PROMPT,
                                                  rule=epb.SpanRule(max_tokens=1))).span.token_ids[0]
    engine.Release(epb.ReleaseRequest(session_id="bad-input-ref"))
    finished = stubs["orchestrator"].Complete(opb.CompleteRequest(spec=opb.GenerationSpec(
        text="Hello", max_new_tokens=6, tau=0.3)), timeout=60).session
    assert finished.status == opb.STATUS_FINISHED and finished.spans
    yield SimpleNamespace(stubs=stubs, next_token=reference, finished=finished)
    for channel in channels:
        channel.close()
    for client in clients:
        client.close()
    for server in servers:
        server.stop(None)


@dataclass
class Case:
    id: str
    target: str  # "orchestrator" or "slm"
    method: str
    request: Callable  # ctx -> request message
    code: grpc.StatusCode
    message: str  # a substring of the status message
    setup: Callable | None = None  # ctx -> None, run on the engine stub first
    metadata: dict = field(default_factory=dict)  # trailing metadata the error must carry


def spec(**fields):
    return lambda ctx: opb.CompleteRequest(spec=opb.GenerationSpec(**fields))


def session(method_request, session_id):
    return lambda ctx: method_request(session_id=session_id(ctx) if callable(session_id) else session_id)


def prefill(session_id=lambda ctx: ctx.live, base=None, tokens=(5,), verify=False, **rule):
    return lambda ctx: epb.PrefillRequest(
        session_id=session_id(ctx), base_len=len(PROMPT) if base is None else base, token_ids=list(tokens),
        verify=verify, rule=epb.SpanRule(**rule))


def decode(session_id=lambda ctx: ctx.live, base=len(PROMPT), **rule):
    return lambda ctx: epb.DecodeRequest(session_id=session_id(ctx), base_len=base, rule=epb.SpanRule(**rule))


def new_session(ctx):
    return ctx.other


def emptied(ctx):
    """A session that held tokens and was rolled back to none."""
    ctx.stub.Prefill(epb.PrefillRequest(session_id=ctx.other, token_ids=PROMPT, rule=epb.SpanRule(max_tokens=0)))
    ctx.stub.Rollback(epb.RollbackRequest(session_id=ctx.other, length=0))


ORCHESTRATOR_CASES = [
    Case("no-prompt", "orchestrator", "Complete", spec(), Code.INVALID_ARGUMENT, "has no prompt"),
    Case("empty-text", "orchestrator", "Complete", spec(text=""), Code.INVALID_ARGUMENT, "prompt is empty"),
    Case("empty-raw-text", "orchestrator", "Complete", spec(text="", raw=True), Code.INVALID_ARGUMENT,
         "prompt is empty"),
    Case("no-messages", "orchestrator", "Complete", spec(messages=opb.Messages()), Code.INVALID_ARGUMENT,
         "messages is empty"),
    Case("empty-token-ids", "orchestrator", "Complete", spec(token_ids=opb.TokenIds()), Code.INVALID_ARGUMENT,
         "prompt is empty"),
    Case("router-policy-without-a-router", "orchestrator", "Complete", spec(text="x", policy=opb.POLICY_ROUTER),
         Code.FAILED_PRECONDITION, "the router policy needs a router"),
    Case("router-not-a-router-file", "orchestrator", "Complete",
         spec(text="x", policy=opb.POLICY_ROUTER, router=b"PK\x03\x04 a zip file"), Code.INVALID_ARGUMENT,
         "the router is not a safetensors file"),
    Case("router-for-another-slm", "orchestrator", "Complete",
         spec(text="x", policy=opb.POLICY_ROUTER, router=Router.constant(128, switch=True).to_bytes()),
         Code.INVALID_ARGUMENT, "the router reads hidden states of size 128, but the SLM"),
    Case("prompt-over-context", "orchestrator", "Complete", spec(token_ids=opb.TokenIds(token_ids=[5] * 600)),
         Code.INVALID_ARGUMENT, f"context holds {CONTEXT}"),
    # 4 M characters take ~10 s to tokenize: they are refused by their length before that.
    Case("text-far-over-context", "orchestrator", "Complete", spec(text="ab " * 1_400_000), Code.INVALID_ARGUMENT,
         "4200000 characters"),
    Case("messages-far-over-context", "orchestrator", "Complete", spec(messages=opb.Messages(
        messages=[opb.ChatMessage(role="user", content="hi")] * 600)), Code.INVALID_ARGUMENT, "600 messages"),
    Case("token-id-outside-vocab", "orchestrator", "Complete", spec(token_ids=opb.TokenIds(token_ids=[5, VOCAB])),
         Code.INVALID_ARGUMENT, f"token ids [{VOCAB}] are outside the vocabulary of {VOCAB}"),
    Case("token-id-uint32-max", "orchestrator", "Complete", spec(token_ids=opb.TokenIds(token_ids=[UINT32_MAX])),
         Code.INVALID_ARGUMENT, "outside the vocabulary"),
    Case("stop-token-id-outside-vocab", "orchestrator", "Complete", spec(text="hi", stop_token_ids=[1, VOCAB]),
         Code.INVALID_ARGUMENT, f"stop_token_ids [{VOCAB}] are outside the vocabulary"),
    Case("too-many-stop-token-ids", "orchestrator", "Complete", spec(text="hi", stop_token_ids=[1] * 300),
         Code.INVALID_ARGUMENT, "stop_token_ids has 300 entries"),
    *[Case(f"tau-{tau}", "orchestrator", "Complete", spec(text="hi", tau=tau), Code.INVALID_ARGUMENT,
           "tau must be in [0, 1]") for tau in (-0.1, 1.5, math.nan, math.inf)],
    *[Case(f"policy-{p}", "orchestrator", "Complete", spec(text="hi", policy=p), Code.INVALID_ARGUMENT,
           f"unknown policy {p}; use POLICY_ENTROPY") for p in (99, -1)],
    *[Case(f"slm-probability-{p}", "orchestrator", "Complete", spec(text="hi", policy=opb.POLICY_RANDOM,
                                                                   slm_probability=p),
           Code.INVALID_ARGUMENT, "slm_probability must be in [0, 1]") for p in (-0.5, 2.0, math.nan)],
    *[Case(f"draft-tokens-{k}", "orchestrator", "Complete", spec(text="hi", policy=opb.POLICY_SPEC, draft_tokens=k),
           Code.INVALID_ARGUMENT, f"draft_tokens {k} is too many") for k in (65, UINT32_MAX)],
    Case("max-new-tokens-over-limit", "orchestrator", "Complete", spec(text="hi", max_new_tokens=UINT32_MAX),
         Code.RESOURCE_EXHAUSTED, "above this server's limit"),
]
# The same refusals through the streaming call.
ORCHESTRATOR_CASES += [
    Case(c.id + "-streamed", c.target, "Generate", lambda ctx, c=c: opb.GenerateRequest(spec=c.request(ctx).spec),
         c.code, c.message) for c in ORCHESTRATOR_CASES
]
ORCHESTRATOR_CASES += [
    *[Case(f"{m}-empty-id", "orchestrator", m, session(r, ""), Code.INVALID_ARGUMENT, "session_id is empty")
      for m, r in (("GetSession", opb.GetSessionRequest), ("Cancel", opb.CancelRequest),
                   ("Resume", opb.ResumeRequest))],
    *[Case(f"{m}-unknown-id", "orchestrator", m, session(r, "no-such-session"), Code.NOT_FOUND,
           "no session 'no-such-session'")
      for m, r in (("GetSession", opb.GetSessionRequest), ("Cancel", opb.CancelRequest),
                   ("Resume", opb.ResumeRequest))],
    Case("Resume-past-the-answer", "orchestrator", "Resume",
         lambda ctx: opb.ResumeRequest(session_id=ctx.finished.session_id, received_tokens=10_000),
         Code.OUT_OF_RANGE, "received_tokens is 10000"),
]

ENGINE_CASES = [
    *[Case(f"{m}-empty-session-id", "slm", m, r, Code.INVALID_ARGUMENT, "session_id is empty") for m, r in (
        ("Prefill", prefill(lambda ctx: "", base=0)), ("Decode", decode(lambda ctx: "", base=0)),
        ("Rollback", session(epb.RollbackRequest, "")), ("Release", session(epb.ReleaseRequest, "")))],
    *[Case(f"{m}-absurd-session-id", "slm", m, r, Code.INVALID_ARGUMENT, "session_id has 10000 characters")
      for m, r in (("Prefill", prefill(lambda ctx: "s" * 10_000, base=0)),
                   ("Decode", decode(lambda ctx: "s" * 10_000, base=0)),
                   ("Rollback", session(epb.RollbackRequest, "s" * 10_000)),
                   ("Release", session(epb.ReleaseRequest, "s" * 10_000)))],
    Case("Rollback-unknown-session", "slm", "Rollback", session(epb.RollbackRequest, "never-prefilled"),
         Code.NOT_FOUND, "'never-prefilled' is not on this engine"),
    # base_len 0 names a new session; on one that exists it is a mismatch like any other.
    Case("Prefill-base-0-on-a-live-session", "slm", "Prefill", prefill(base=0), Code.FAILED_PRECONDITION,
         f"the engine holds {len(PROMPT)}", metadata={CACHE_LEN_KEY: str(len(PROMPT))}),
    Case("Decode-base-0-on-a-live-session", "slm", "Decode", decode(base=0), Code.FAILED_PRECONDITION,
         f"the engine holds {len(PROMPT)}", metadata={CACHE_LEN_KEY: str(len(PROMPT))}),
    Case("Prefill-token-id-uint32-max", "slm", "Prefill", prefill(tokens=[UINT32_MAX]), Code.INVALID_ARGUMENT,
         f"token ids [{UINT32_MAX}] are outside the vocabulary of {VOCAB}"),
    Case("Prefill-past-the-context", "slm", "Prefill", prefill(tokens=[5] * (CONTEXT - len(PROMPT) + 1)),
         Code.INVALID_ARGUMENT, f"prefill would hold {CONTEXT + 1} tokens; the model's context is {CONTEXT}"),
    *[Case(f"{m}-max-tokens-uint32-max", "slm", m, r(max_tokens=UINT32_MAX), Code.INVALID_ARGUMENT,
           f"max_tokens {UINT32_MAX} exceeds the model's context") for m, r in (("Prefill", prefill),
                                                                                 ("Decode", decode))],
    *[Case(f"{m}-tau-{tau}", "slm", m, r(gate=epb.GATE_STOP_ABOVE, tau=tau), Code.INVALID_ARGUMENT,
           "tau must be in [0, 1]") for m, r in (("Prefill", prefill), ("Decode", decode))
      for tau in (-0.1, math.inf)],
    *[Case(f"{m}-gate-{g}", "slm", m, r(gate=g), Code.INVALID_ARGUMENT, f"unknown gate {g}")
      for m, r in (("Prefill", prefill), ("Decode", decode)) for g in (7, -1)],
    *[Case(f"{m}-too-many-stop-ids", "slm", m, r(stop_token_ids=[1] * 2000), Code.INVALID_ARGUMENT,
           "stop_token_ids has 2000 entries") for m, r in (("Prefill", prefill), ("Decode", decode))],
    Case("Decode-stop-id-uint32-max", "slm", "Decode", decode(stop_token_ids=[UINT32_MAX]),
         Code.INVALID_ARGUMENT, "stop_token_ids [4294967295] are outside the vocabulary"),
    Case("Prefill-no-tokens-on-a-new-session", "slm", "Prefill", prefill(new_session, base=0, tokens=[]),
         Code.INVALID_ARGUMENT, "token_ids is empty"),
    Case("Decode-with-no-cached-tokens", "slm", "Decode", decode(new_session, base=0), Code.FAILED_PRECONDITION,
         "holds no tokens", setup=emptied, metadata={CACHE_LEN_KEY: "0"}),
    Case("Prefill-verify-without-tokens", "slm", "Prefill", prefill(tokens=[], verify=True),
         Code.INVALID_ARGUMENT, "verify needs tokens"),
    Case("Prefill-verify-on-a-new-session-past-the-context", "slm", "Prefill",
         prefill(new_session, base=0, tokens=[5] * (CONTEXT + 1), verify=True), Code.INVALID_ARGUMENT,
         f"the model's context is {CONTEXT}"),
]


def call(stub, method: str, request, timeout: float = 5):
    """The call's outcome: (code, message, trailing metadata)."""
    rpc = getattr(stub, method)
    try:
        if method in ("Generate", "Resume"):
            responses = rpc(request, timeout=timeout)
            list(responses)
            return responses.code(), responses.details(), dict(responses.trailing_metadata() or ())
        _, outcome = rpc.with_call(request, timeout=timeout)
        return outcome.code(), outcome.details(), dict(outcome.trailing_metadata() or ())
    except grpc.RpcError as e:
        return e.code(), e.details(), dict(e.trailing_metadata() or ())


@pytest.mark.parametrize("case", ORCHESTRATOR_CASES + ENGINE_CASES, ids=lambda c: f"{c.target}-{c.id}")
def test_bad_input_gets_its_status_and_a_clear_message(stack, case):
    ctx = SimpleNamespace(finished=stack.finished, stub=stack.stubs["slm"], live=f"live-{uuid.uuid4().hex}",
                          other=f"other-{uuid.uuid4().hex}")
    engine = stack.stubs["slm"]
    if case.target == "slm":  # a live session beside every engine case: bad input must leave it alone
        engine.Prefill(epb.PrefillRequest(session_id=ctx.live, token_ids=PROMPT, rule=epb.SpanRule(max_tokens=0)))
    if case.setup:
        case.setup(ctx)
    code, message, metadata = call(stack.stubs[case.target], case.method, case.request(ctx))
    assert (code, case.message in (message or "")) == (case.code, True), message
    for key, value in case.metadata.items():
        assert metadata.get(key) == value
    if case.target == "slm":
        after = engine.Decode(epb.DecodeRequest(session_id=ctx.live, base_len=len(PROMPT),
                                                rule=epb.SpanRule(max_tokens=1))).span
        assert list(after.token_ids) == [stack.next_token] and after.cache_len == len(PROMPT)
        for sid in (ctx.live, ctx.other):
            engine.Release(epb.ReleaseRequest(session_id=sid))


def test_cancelling_a_finished_session_is_a_no_op_that_answers_its_status(stack):
    orchestrator = stack.stubs["orchestrator"]
    sid = stack.finished.session_id
    before = orchestrator.GetSession(opb.GetSessionRequest(session_id=sid)).session
    assert orchestrator.Cancel(opb.CancelRequest(session_id=sid)).status == opb.STATUS_FINISHED
    assert orchestrator.Cancel(opb.CancelRequest(session_id=sid)).status == opb.STATUS_FINISHED
    after = orchestrator.GetSession(opb.GetSessionRequest(session_id=sid)).session
    assert after == before == stack.finished
    # and its answer still replays in full
    events = list(orchestrator.Resume(opb.ResumeRequest(session_id=sid), timeout=10))
    assert [t for e in events if e.HasField("delta") for t in e.delta.span.token_ids] == \
        [t for s in before.spans for t in s.token_ids]
    assert events[-1].finished.finish_reason == before.finish_reason
