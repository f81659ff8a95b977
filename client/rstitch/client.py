"""A small Python client for the orchestrator's gRPC API."""

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from .security import ClientTLS, channel
from .v1 import orchestrator_pb2 as opb
from .v1 import orchestrator_pb2_grpc

POLICIES = {"entropy": opb.POLICY_ENTROPY, "llm": opb.POLICY_LLM, "slm": opb.POLICY_SLM, "random": opb.POLICY_RANDOM,
            "spec": opb.POLICY_SPEC, "router": opb.POLICY_ROUTER}
# A broken stream worth attaching to again: the replica went away, or another one took the session over.
REATTACH_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
SOURCE_NAMES = {opb.SOURCE_SLM: "slm", opb.SOURCE_LLM: "llm"}


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


class RStitchClient:
    def __init__(self, address: str, timeout: float | None = 300, *, tls: ClientTLS | None = None,
                 token: str | None = None):
        """tls: TLS (mutual with a client certificate); token: for an orchestrator that requires one."""
        self.address = address
        self.timeout = timeout
        self._channel = channel(address, tls, token)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._channel.close()

    def stream(self, prompt=None, **options) -> Iterator[opb.GenerateResponse]:
        """The raw event stream: Started, Delta per span, Finished."""
        return self._stub.Generate(opb.GenerateRequest(spec=make_spec(prompt, **options)), timeout=self.timeout)

    def generate(self, prompt=None, reattach: int = 3, on_text=None, **options) -> GenerationResult:
        """Stream one generation and gather it. Options: see make_spec. on_text(source, text), if given,
        is called with each piece of text as it arrives ("slm" or "llm": the model that wrote it).

        If the stream breaks after the session started (its orchestrator replica died or lost the
        session to another one), the client attaches to the session again with Resume, up to
        `reattach` times, and receives exactly the tokens it is missing. Give the client an address
        that reaches several replicas (a DNS name, or "ipv4:HOST:PORT,HOST:PORT") so it can fail over.
        """
        result = GenerationResult()
        events = self.stream(prompt, **options)
        for attempt in range(reattach + 1):
            try:
                return _gather(events, result, on_text)
            except grpc.RpcError as e:
                if not result.session_id or e.code() not in REATTACH_CODES or attempt == reattach:
                    raise
            time.sleep(0.25 * 2**attempt)
            events = self._resume_stream(result.session_id, len(result.token_ids))
        raise AssertionError("unreachable")

    def resume(self, session_id: str, received_tokens: int = 0) -> GenerationResult:
        """Attach to a session by id: its answer from token `received_tokens` on, to its end."""
        return _gather(self._resume_stream(session_id, received_tokens), GenerationResult())

    def _resume_stream(self, session_id, received_tokens):
        request = opb.ResumeRequest(session_id=session_id, received_tokens=received_tokens)
        return self._stub.Resume(request, timeout=self.timeout)

    def complete(self, prompt=None, **options) -> opb.Session:
        return self._stub.Complete(opb.CompleteRequest(spec=make_spec(prompt, **options)), timeout=self.timeout).session

    def session(self, session_id: str) -> opb.Session:
        return self._stub.GetSession(opb.GetSessionRequest(session_id=session_id), timeout=self.timeout).session

    def cancel(self, session_id: str) -> int:
        return self._stub.Cancel(opb.CancelRequest(session_id=session_id), timeout=self.timeout).status


def _gather(events, result: GenerationResult, on_text=None) -> GenerationResult:
    for event in events:
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
    return result


def finish_reason_name(value: int) -> str:
    """"eos", "stop", "max_new_tokens", ...: the enum's own name, so a reason added to the proto needs no
    change here; a number this client's stubs do not know yet (a newer server) is shown as such."""
    known = opb.FinishReason.DESCRIPTOR.values_by_number.get(value)
    return known.name.removeprefix("FINISH_REASON_").lower() if known else f"finish_reason_{value}"


def stats_dict(stats: opb.Stats) -> dict:
    fields = {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}
