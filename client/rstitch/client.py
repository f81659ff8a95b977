"""A small Python client for the orchestrator's gRPC API."""

import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.experimental
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .security import ClientTLS, channel
from .v1 import orchestrator_pb2 as opb
from .v1 import orchestrator_pb2_grpc

POLICIES = {"entropy": opb.POLICY_ENTROPY, "llm": opb.POLICY_LLM, "slm": opb.POLICY_SLM, "random": opb.POLICY_RANDOM,
            "spec": opb.POLICY_SPEC, "router": opb.POLICY_ROUTER}
# A call worth making again: no orchestrator replica answered (or one lost Redis), or another replica took the
# session over.
RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
SOURCE_NAMES = {opb.SOURCE_SLM: "slm", opb.SOURCE_LLM: "llm"}
# Long enough for an orchestrator replica to restart, or for another one to take over a session once the dead
# one's lease (10 s by default) has lapsed.
DEFAULT_RETRY_S = 30.0
# Calls spread over every address the target resolves to (each orchestrator replica), and skip dead ones. gRPC's
# default reconnect backoff grows to 2 minutes; a restarted replica should be found again within two seconds.
CHANNEL_OPTIONS = [("grpc.lb_policy_name", "round_robin"), ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
# A Generate stream read on the caller's own thread instead of handed over by the channel's spin thread
# (grpcio's option for unary-stream calls): 25-30 % less client CPU per token at 64 sessions (docs/concurrency.md).
SINGLE_THREADED_STREAMS = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.1, 2.0  # backoff between retries
CONNECT_ERROR_S = 1.0  # time a call to an unconnected channel gets to report why it is not connected


@dataclass
class GenerationResult:
    session_id: str = ""
    text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    # Per token, with logprobs asked: {"logprob": float, "top": [(token_id, logprob), ...]}.
    logprobs: list[dict] = field(default_factory=list)
    # (source, text) per span, for showing which model wrote what.
    pieces: list[tuple[str, str]] = field(default_factory=list)
    finish_reason: str = ""
    stats: dict = field(default_factory=dict)
    # Calls made after the first one broke: Resume, or Generate again where the session provably never started.
    reattaches: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "pieces"}


# The policies each option applies to: make_spec (and so the CLI) refuses it with any other policy,
# rather than sending a knob that would be silently ignored.
POLICY_OPTIONS = {"tau": ("entropy", "router"), "slm_probability": ("random",), "draft_tokens": ("spec",),
                  "router": ("router",)}
# Limits of a GenerationSpec (orchestrator.proto), checked here and by the server alike.
MAX_TOP_LOGPROBS = 20  # alternatives a request may ask log-probabilities of (as OpenAI's API)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


class OptionNotForPolicy(ValueError):
    """An option given with a policy it does not apply to (see POLICY_OPTIONS)."""

    def __init__(self, option: str, policy: str):
        self.option, self.policy, self.policies = option, policy, POLICY_OPTIONS[option]
        super().__init__(f"{option} applies to policy {' and '.join(self.policies)} only, not {policy}")


def check_policy_options(policy: str, **options) -> None:
    """Raises OptionNotForPolicy for an option of POLICY_OPTIONS given (not None) with another policy."""
    for option, value in options.items():
        if value is not None and policy not in POLICY_OPTIONS[option]:
            raise OptionNotForPolicy(option, policy)


def make_spec(prompt: str | Sequence[int] | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
              policy: str = "entropy", tau: float | None = None, max_new_tokens: int = 0, raw: bool = False,
              stop_token_ids: Sequence[int] = (), slm_probability: float | None = None, seed: int | None = None,
              draft_tokens: int | None = None, router: bytes | None = None, temperature: float | None = None,
              top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
              stop: Sequence[str] = (), logprobs: int | None = None) -> opb.GenerationSpec:
    """The request for one generation; raises ValueError for one that cannot be made.

    prompt: text (through the model's chat template unless raw) or token ids; or instead messages:
    chat messages [{"role": "user", "content": "..."}, ...]. stop_token_ids: ids that end the answer
    besides the model's EOS (finish reason "stop"); stop: strings that do (the text stops before them).
    Sampling (None: not given): temperature (0: greedy, the default), top_p, top_k, min_p; seed: of every
    random draw (sampling, random routing, speculative acceptance; None: the server picks one).
    logprobs: N to get each token's log-probability and its N most likely alternatives'. Policy knobs
    (None: the server's default): tau for entropy and router, slm_probability for random,
    draft_tokens for spec, router (a router file's bytes; b"": the orchestrator's own) for router. A
    knob given with another policy raises OptionNotForPolicy.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    check_policy_options(policy, tau=tau, slm_probability=slm_probability, draft_tokens=draft_tokens, router=router)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    spec = opb.GenerationSpec(policy=POLICIES[policy], max_new_tokens=max_new_tokens, raw=raw,
                              stop_token_ids=stop_token_ids, draft_tokens=draft_tokens or 0, router=router or b"",
                              top_k=top_k or 0, stop=stop, logprobs=logprobs is not None, top_logprobs=logprobs or 0)
    if (prompt is None) == (messages is None):
        raise ValueError("give either a prompt (text or token ids) or messages")
    if messages is not None:
        spec.messages.messages.extend(opb.ChatMessage(**message) for message in messages)
    elif isinstance(prompt, str):
        spec.text = prompt
    else:
        spec.token_ids.token_ids.extend(prompt)
    for name, value in (("tau", tau), ("slm_probability", slm_probability), ("seed", seed),
                        ("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if value is not None:
            setattr(spec, name, value)
    return spec


class RetriesExhausted(grpc.RpcError):
    """A call given up after the client's retry_s seconds of waiting and retrying without progress: the last
    error's code, and its details with how long the client tried and, for a generation, the session's id (under
    which it may still exist, to resume later)."""

    def __init__(self, last: grpc.RpcError, tried_s: float, session_id: str = ""):
        super().__init__()
        self.last, self.tried_s, self.session_id = last, tried_s, session_id

    def code(self) -> grpc.StatusCode:
        return self.last.code()

    def details(self) -> str:
        session = f"; session {self.session_id}" if self.session_id else ""
        return f"{self.last.details()} (gave up after {self.tried_s:.1f} s of retries{session})"

    def __str__(self) -> str:
        return f"{self.code().name}: {self.details()}"


class RStitchClient:
    def __init__(self, address: str, timeout: float | None = 300, *, tls: ClientTLS | None = None,
                 token: str | None = None, retry_s: float = DEFAULT_RETRY_S):
        """address: any gRPC target; one that reaches several orchestrator replicas ("ipv4:HOST:PORT,HOST:PORT",
        or a DNS name resolving to several) spreads calls over them and fails over. timeout: the deadline of a
        whole generation (its re-attaches included) and of each other call. retry_s: how long a call keeps
        trying, with backoff, while no orchestrator replica can serve it (0: fail at once). tls: TLS (mutual
        with a client certificate); token: for an orchestrator that requires one."""
        self.address = address
        self.timeout = timeout
        self.retry_s = retry_s
        self._channel = channel(address, tls, token, CHANNEL_OPTIONS + SINGLE_THREADED_STREAMS)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._channel.close()

    def stream(self, prompt=None, **options) -> Iterator[opb.GenerateResponse]:
        """The raw event stream of one Generate call (Started, a Delta per token, Finished), never retried."""
        return self._stub.Generate(opb.GenerateRequest(spec=make_spec(prompt, **options)), timeout=self.timeout)

    def generate(self, prompt=None, on_text=None, session_id: str | None = None, **options) -> GenerationResult:
        """Stream one generation and gather it. Options: see make_spec. on_text(source, text), if given,
        is called with each piece of text as it arrives ("slm" or "llm": the model that wrote it).

        The generation rides through the restart of any one component: when its stream breaks (its
        orchestrator replica died, lost Redis, or lost the session to another replica), the client attaches
        to the session again with Resume and receives exactly the tokens it is missing. The session's id
        (session_id, else a new random one) goes with Generate, which the server never runs twice under one
        id: a call that broke before the session was known to exist is made again only once Resume says it
        never did, and a generate() given the id of an existing session attaches to it. Retries back off for
        up to retry_s seconds without a new token, then RetriesExhausted is raised; other errors at once."""
        attachment = _Attachment(self, make_spec(prompt, **options), session_id or uuid.uuid4().hex, on_text)
        return attachment.run()

    def resume(self, session_id: str, received_tokens: int = 0) -> GenerationResult:
        """Attach to a session by id: its answer from token `received_tokens` on, to its end (re-attaching,
        as generate() does, when the stream breaks)."""
        return _Attachment(self, None, session_id, received_tokens=received_tokens).run()

    def complete(self, prompt=None, **options) -> opb.Session:
        """The unary Complete call: it waits for a reachable orchestrator, but is not retried once sent (it names
        no session to attach to); generate() is the call that rides through failures."""
        request = opb.CompleteRequest(spec=make_spec(prompt, **options))
        return self._unary(self._stub.Complete, request, retry=False).session

    def session(self, session_id: str) -> opb.Session:
        return self._unary(self._stub.GetSession, opb.GetSessionRequest(session_id=session_id)).session

    def cancel(self, session_id: str) -> int:
        return self._unary(self._stub.Cancel, opb.CancelRequest(session_id=session_id)).status

    def _unary(self, method, request, retry: bool = True):
        patience = _Patience(self.retry_s, self._deadline())
        while True:
            try:
                return self._call(method, request, patience)
            except grpc.RpcError as e:
                if not retry or e.code() not in RETRY_CODES:
                    raise
                patience.back_off(e)

    def _call(self, method, request, patience: "_Patience"):
        """One call, made once a replica answers a health check (wait-for-ready: the check waits, within the
        patience left, for the channel to connect). Where none does, the call is made anyway and fails at once
        with the channel's own error (connection refused, a TLS handshake refused...), given a moment past the
        deadline to say so: that error says more than DEADLINE_EXCEEDED."""
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True,
                               timeout=max(0.0, patience.give_up_at() - time.monotonic()))
        except grpc.RpcError:
            left = patience.time_left()
            return method(request, timeout=None if left is None else max(left, CONNECT_ERROR_S))
        return method(request, timeout=patience.time_left(), wait_for_ready=True)

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout


class _Patience:
    """Retries of one call or generation: jittered exponential backoff, for up to retry_s seconds without
    progress (from the start, or from the last failure that came after new tokens), never past the deadline."""

    def __init__(self, retry_s: float, deadline: float | None):
        self.retry_s, self.deadline = retry_s, deadline
        self.since = time.monotonic()
        self.pause = FIRST_PAUSE_S

    def give_up_at(self) -> float:
        give_up = self.since + self.retry_s
        return give_up if self.deadline is None else min(give_up, self.deadline)

    def time_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def progressed(self) -> None:
        self.since, self.pause = time.monotonic(), FIRST_PAUSE_S

    def next_pause(self, error: grpc.RpcError, session_id: str = "") -> float:
        """How long to wait before the next try; when none fits in time, raises `error` (as RetriesExhausted,
        unless retries are off)."""
        now = time.monotonic()
        pause = self.pause * random.uniform(0.5, 1.0)  # jitter: clients cut off together do not return together
        if now + pause >= self.give_up_at():
            raise RetriesExhausted(error, now - self.since, session_id) if self.retry_s > 0 else error
        self.pause = min(self.pause * 2, LONGEST_PAUSE_S)
        return pause

    def back_off(self, error: grpc.RpcError, session_id: str = "") -> None:
        time.sleep(self.next_pause(error, session_id))


class _Attachment:
    """One generation as this client follows it, across broken streams: the session's id, what was received,
    and which call continues it."""

    def __init__(self, client: RStitchClient, spec: opb.GenerationSpec | None, session_id: str, on_text=None,
                 received_tokens: int = 0):
        self.client, self.spec, self.on_text = client, spec, on_text
        self.result = GenerationResult(session_id=session_id)
        self.held_before = received_tokens  # answer tokens the caller holds from before (resume())
        self.started = spec is None  # whether the session is known to exist: a Started event came

    def run(self) -> GenerationResult:
        patience = _Patience(self.client.retry_s, self.client._deadline())
        generating = self.spec is not None
        while True:
            received = len(self.result.token_ids)
            try:
                for event in (self._generate if generating else self._resume)(patience):
                    self.started |= event.HasField("started")
                    _take(event, self.result, self.on_text)
                return self.result
            except grpc.RpcError as e:
                if len(self.result.token_ids) > received:
                    patience.progressed()
                generating = _generate_next(generating, self.started, e)
                patience.back_off(e, self.result.session_id)
                self.result.reattaches += 1

    def _generate(self, patience: _Patience):
        request = opb.GenerateRequest(spec=self.spec, session_id=self.result.session_id)
        return self.client._call(self.client._stub.Generate, request, patience)

    def _resume(self, patience: _Patience):
        request = opb.ResumeRequest(session_id=self.result.session_id,
                                    received_tokens=self.held_before + len(self.result.token_ids))
        return self.client._call(self.client._stub.Resume, request, patience)


def _generate_next(generating: bool, started: bool, error: grpc.RpcError) -> bool:
    """Whether Generate (else Resume) continues a generation after its call (Generate if `generating`) raised
    `error`; raises it if no call can. `started`: the session is known to exist."""
    code = error.code()
    if code in RETRY_CODES or (generating and code == grpc.StatusCode.ALREADY_EXISTS):
        return False
    if not generating and code == grpc.StatusCode.NOT_FOUND and not started:
        return True  # the store has no such session: no replica ever created it, so start it now
    raise error


def _gather(events, result: GenerationResult, on_text=None) -> GenerationResult:
    for event in events:
        _take(event, result, on_text)
    return result


def _take(event: opb.GenerateResponse, result: GenerationResult, on_text=None) -> None:
    """Adds one event of a Generate or Resume stream to `result`."""
    kind = event.WhichOneof("event")
    if kind == "started":
        result.session_id = event.started.session_id
        result.prompt_token_ids = list(event.started.prompt_token_ids)
    elif kind == "delta":
        span = event.delta.span
        source = SOURCE_NAMES.get(span.source, "")  # "": the text held back for stop strings, at the end
        result.token_ids += span.token_ids
        result.sources += [source] * len(span.token_ids)
        result.entropies += span.entropies
        result.logprobs += [{"logprob": lp.logprob, "top": list(zip(lp.top_token_ids, lp.top_logprobs))}
                            for lp in span.logprobs]
        result.pieces.append((source, event.delta.text))
        if on_text is not None and event.delta.text:
            on_text(source, event.delta.text)
    else:
        finished = event.finished
        result.text = finished.text
        result.finish_reason = finish_reason_name(finished.finish_reason)
        result.stats = stats_dict(finished.stats)


def finish_reason_name(value: int) -> str:
    """"eos", "stop", "max_new_tokens", ...: the enum's own name, so a reason added to the proto needs no
    change here; a number this client's stubs do not know yet (a newer server) is shown as such."""
    known = opb.FinishReason.DESCRIPTOR.values_by_number.get(value)
    return known.name.removeprefix("FINISH_REASON_").lower() if known else f"finish_reason_{value}"


def stats_dict(stats: opb.Stats) -> dict:
    fields = {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}
