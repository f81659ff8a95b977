"""The one interface every engine backend implements, and what they all share: the constructor's
preamble (tokenizer, served vocabulary, context, KV budget), Info, the tokenizer files, the contract's
checks, and the three ways a span is called (unary, streamed, decode from the cache's end).

Requests and responses are the proto messages themselves: the proto is the only contract, and an
engine called in-process answers exactly what its gRPC service would.
"""

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from common import telemetry
from common.admission import Admission, Overloaded
from common.errors import CacheMismatch, EngineOverloaded, InvalidRequest, validate_session_id
from rstitch.v1 import engine_pb2 as pb

from . import checkpoints, latency
from .sampling import RowRequest
from .sessions import Session, SessionTable
from .span import OnToken, validate_drafts, validate_rule, validate_tokens


def _ignore(token: pb.CommittedToken) -> None:
    pass


def row_request(builder) -> RowRequest:
    """What the next choice of a span (an engine.span.SpanBuilder) asks for."""
    rule = builder.rule
    return RowRequest(rule.sampling, builder.position, rule.top_logprobs if rule.logprobs else -1,
                      rule.return_distributions)


@dataclass
class ModelFacts:
    """What a backend reads off a checkpoint for the shared preamble."""
    config: Any  # the text config: context, hidden size, heads
    generation_config: Any
    output_rows: int  # the width of the model's logits


@dataclass(eq=False)
class SpanCall:
    """One Prefill/Decode as the backend runs it: append `tokens` to the session's cache, then decode
    a span under `rule`, calling on_token with each committed token as it is chosen; resolve `future`
    with the pb.PrefillResponse (with verify: the greedy choice after each appended token, or with
    `drafts` the speculative sampling outcome). A set `cancelled` ends the span at the next step."""
    session: Session
    tokens: list[int]
    rule: pb.SpanRule
    verify: bool
    on_token: OnToken
    drafts: list[pb.Distribution] = field(default_factory=list)
    future: Future = field(default_factory=Future)
    # The trace context of the thread that asked: the backend's step loop records spans under it.
    trace_context: Any = field(default_factory=telemetry.current_context)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine(ABC):
    backend: str

    def __init__(self, model_path, *, role: str, device: str = "cpu", dtype: str = "float32",
                 kv_budget_mb: float = 1024, max_context: int | None = None, model_id: str | None = None,
                 max_sessions: int = 0, max_calls: int = 64):
        self.role, self.device, self.dtype = role, device, dtype
        self.model_id = model_id or str(model_path)
        self.tokenizer = checkpoints.load_tokenizer(model_path)
        facts = self._load(model_path)
        vocab = checkpoints.served_vocabulary(self.tokenizer, facts.generation_config, facts.output_rows,
                                              str(model_path))
        self.vocab_size, self.eos_token_ids = vocab.size, vocab.eos_token_ids
        self.max_context = min(facts.config.max_position_embeddings, max_context or facts.config.max_position_embeddings)
        self.hidden_size = facts.config.hidden_size
        self.kv_bytes_per_token = checkpoints.kv_bytes_per_token(facts.config, checkpoints.torch_dtype(dtype))
        self.sessions = SessionTable(int(kv_budget_mb * 2**20 // self.kv_bytes_per_token), max_sessions)
        # Calls beyond max_calls would only wait for the model behind the others: turn them away early.
        self.admission = Admission(max_calls, 0, f"the {role} engine")
        self.latency_model = latency.stored_proto(model_path, self.backend, device, dtype)
        self.fingerprint = checkpoints.tokenizer_fingerprint(self.tokenizer, vocab.size)
        self._tokenizer_files = checkpoints.tokenizer_files(self.tokenizer)

    # --- the contract -------------------------------------------------------------------------

    def prefill(self, req: pb.PrefillRequest, on_token: OnToken | None = None) -> pb.PrefillResponse:
        """on_token(token_id, entropy) is called with each committed token as soon as it is chosen."""
        tokens = self._checked(req)
        with self._admitted(), self.sessions.checkout(req.session_id, req.base_len, create=req.base_len == 0) as session:
            return self._run(SpanCall(session, tokens, req.rule, req.verify, on_token or _ignore,
                                      list(req.draft_distributions)))

    def stream_span(self, req: pb.StreamSpanRequest) -> Iterator[pb.StreamSpanResponse]:
        """Prefill whose committed tokens are yielded as they are chosen, then the whole response. A
        reader that stops reading (the caller went away) ends the span at the backend's next step."""
        prefill = req.prefill
        tokens = self._checked(prefill)
        events: queue.SimpleQueue = queue.SimpleQueue()
        with self._admitted(), self.sessions.checkout(prefill.session_id, prefill.base_len,
                                                      create=prefill.base_len == 0) as session:
            call = SpanCall(session, tokens, prefill.rule, prefill.verify, events.put,
                            list(prefill.draft_distributions))
            call.future.add_done_callback(lambda _: events.put(None))
            self._start(call)
            try:
                while (event := events.get()) is not None:
                    yield pb.StreamSpanResponse(token=event)
                response = call.future.result()
            finally:
                if not call.future.done():  # closed early: hold the session until the span has stopped
                    call.cancelled.set()
                    call.future.exception()
        yield pb.StreamSpanResponse(done=response)

    def decode(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        validate_session_id(req.session_id)
        validate_rule(req.rule, self.vocab_size, self.max_context)
        with self._admitted(), self.sessions.checkout(req.session_id, req.base_len) as session:
            return pb.DecodeResponse(span=self._run(SpanCall(session, [], req.rule, False, _ignore)).span)

    def rollback(self, req: pb.RollbackRequest) -> pb.RollbackResponse:
        validate_session_id(req.session_id)
        with self.sessions.checkout(req.session_id, None) as session:
            if req.length > session.length:
                raise InvalidRequest(
                    f"cannot roll forward: the cache holds {session.length} tokens, asked {req.length}")
            if req.length < session.length:
                self._truncate(session, req.length)
                self.sessions.shrink(session, req.length)
            return pb.RollbackResponse(cache_len=session.length)

    def release(self, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
        validate_session_id(req.session_id)
        return pb.ReleaseResponse(released=self.sessions.release(req.session_id))

    def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            model_id=self.model_id, role=self.role, vocab_size=self.vocab_size,
            tokenizer_fingerprint=self.fingerprint, max_context=self.max_context,
            kv_capacity_tokens=self.sessions.capacity, kv_used_tokens=self.sessions.used,
            sessions=len(self.sessions), kv_evictions=self.sessions.evictions, eos_token_ids=self.eos_token_ids,
            backend=self.backend, device=self.device, dtype=self.dtype, hidden_size=self.hidden_size,
            latency_model=self.latency_model, **self.load())

    def load(self) -> dict:
        """The step loop's counters (InfoResponse steps, step_tokens, busy_seconds, forward_seconds)."""
        return {}

    def tokenizer_files(self) -> pb.GetTokenizerResponse:
        return pb.GetTokenizerResponse(files=self._tokenizer_files, fingerprint=self.fingerprint)

    # --- what a backend provides --------------------------------------------------------------

    @abstractmethod
    def _load(self, model_path) -> ModelFacts:
        """Load the model (or read its config), before the shared preamble runs."""

    @abstractmethod
    def _begin(self, call: SpanCall) -> None:
        """Start the call in the backend's step loop; resolve call.future when the span ends (or fail
        it). Raising here fails the call at once."""

    @abstractmethod
    def _truncate(self, session: Session, length: int) -> None:
        """Cut the session's cache to its first `length` tokens."""

    # --- shared checks ------------------------------------------------------------------------

    def _checked(self, req: pb.PrefillRequest) -> list[int]:
        validate_session_id(req.session_id)
        tokens = list(req.token_ids)
        validate_tokens(tokens, self.vocab_size)
        validate_rule(req.rule, self.vocab_size, self.max_context)
        if req.base_len + len(tokens) > self.max_context:
            raise InvalidRequest(
                f"prefill would hold {req.base_len + len(tokens)} tokens; the model's context is {self.max_context}")
        if req.verify and not tokens:
            raise InvalidRequest("verify needs tokens to verify")
        if not tokens and req.base_len == 0:
            raise InvalidRequest("token_ids is empty: a session's first Prefill needs at least one token")
        if req.draft_distributions:
            validate_drafts(req, tokens, self.vocab_size)
        return tokens

    def _start(self, call: SpanCall) -> None:
        try:
            self._begin(call)
        except BaseException as e:  # noqa: BLE001 - the call's reader raises it
            call.future.set_exception(e)

    def _run(self, call: SpanCall):
        self._start(call)
        return call.future.result()

    @contextmanager
    def _admitted(self):
        try:
            with self.admission.slot():
                yield
        except Overloaded as e:
            raise EngineOverloaded(f"{e} (--max-calls {self.admission.limit})") from None

    @staticmethod
    def nothing_to_decode(session: Session) -> CacheMismatch:
        """A Decode (no tokens) on a cache whose end's distribution is not kept."""
        if session.length == 0:
            return CacheMismatch(f"session {session.id!r} holds no tokens (rolled back to 0): Prefill its tokens "
                                 "before decoding", cache_len=0)
        return CacheMismatch(f"session {session.id!r}: no next-token distribution is kept at the cache's end "
                             f"({session.length} tokens); send the last token again with Prefill",
                             cache_len=session.length)
