"""The one interface every engine backend implements, and the contract checks they share.

Requests and responses are the proto messages themselves: the proto is the only contract, and an
engine called in-process answers exactly what its gRPC service would.
"""

from abc import ABC, abstractmethod
import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rstitch.v1 import engine_pb2 as pb

from .admission import Admission, Overloaded
from .errors import EngineOverloaded, InvalidRequest
from .sessions import Session, SessionTable
from .span import validate_rule, validate_tokens

# Called with (token_id, entropy) of each committed token, as soon as the engine chose it (streaming).
OnToken = Callable[[int, float], None]


def _ignore(token_id: int, entropy: float) -> None:
    pass


# Callers name sessions with short ids (the orchestrator uses 32 hex digits); a longer one is a mistake.
MAX_SESSION_ID_CHARS = 256


class Engine(ABC):
    backend: str

    def __init__(self, *, role: str, vocab_size: int, max_context: int, kv_capacity_tokens: int,
                 max_sessions: int = 0, max_calls: int = 64):
        self.role = role
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.sessions = SessionTable(kv_capacity_tokens, max_sessions)
        # Calls beyond max_calls would only wait for the model behind the others: turn them away early.
        self.admission = Admission(max_calls, 0, f"the {role} engine")

    @contextmanager
    def _admitted(self):
        try:
            with self.admission.slot():
                yield
        except Overloaded as e:
            raise EngineOverloaded(f"{e} (--max-calls {self.admission.limit})") from None

    # --- the contract -------------------------------------------------------------------------

    def prefill(self, req: pb.PrefillRequest, on_token: OnToken | None = None) -> pb.PrefillResponse:
        """on_token(token_id, entropy) is called with each committed token as soon as it is chosen."""
        validate_session_id(req.session_id)
        tokens = list(req.token_ids)
        validate_tokens(tokens, self.vocab_size)
        validate_rule(req.rule, self.vocab_size, self.max_context)
        if req.base_len + len(tokens) > self.max_context:
            raise InvalidRequest(
                f"prefill would hold {req.base_len + len(tokens)} tokens; the model's context is {self.max_context}"
            )
        if req.verify and not tokens:
            raise InvalidRequest("verify needs tokens to verify")
        if not tokens and req.base_len == 0:
            raise InvalidRequest("token_ids is empty: a session's first Prefill needs at least one token")
        create = req.base_len == 0
        with self._admitted(), self.sessions.checkout(req.session_id, req.base_len, create=create) as session:
            span, greedy = self._span(session, tokens, req.rule, req.verify, on_token or _ignore)
        return pb.PrefillResponse(span=span, greedy_token_ids=greedy[0], greedy_entropies=greedy[1])

    def stream_span(self, req: pb.StreamSpanRequest) -> Iterator[pb.StreamSpanResponse]:
        """Prefill whose committed tokens are yielded as they are chosen, then the whole response.
        The span runs on a thread of its own, so that a slow reader never holds the model up."""
        events: queue.SimpleQueue = queue.SimpleQueue()

        def committed(token_id: int, entropy: float) -> None:
            events.put(pb.StreamSpanResponse(token=pb.CommittedToken(token_id=token_id, entropy=entropy)))

        def run() -> None:
            try:
                events.put(pb.StreamSpanResponse(done=self.prefill(req.prefill, committed)))
            except BaseException as e:  # noqa: BLE001 - handed to the reader, who raises it
                events.put(e)

        # In the caller's context (contextvars), so that the span's trace spans stay under the call's.
        threading.Thread(target=contextvars.copy_context().run, args=(run,), name=f"{self.role}-stream",
                         daemon=True).start()
        while True:
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.HasField("done"):
                return

    def decode(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        validate_session_id(req.session_id)
        validate_rule(req.rule, self.vocab_size, self.max_context)
        with self._admitted(), self.sessions.checkout(req.session_id, req.base_len) as session:
            span, _ = self._span(session, [], req.rule, False, _ignore)
        return pb.DecodeResponse(span=span)

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

    # --- what a backend provides --------------------------------------------------------------

    @abstractmethod
    def _span(self, session: Session, tokens: list[int], rule: pb.SpanRule, verify: bool, on_token: OnToken
              ) -> tuple[pb.Span, tuple[list[int], list[float]]]:
        """Append tokens to the cache, then decode a span under rule (see engine.proto), calling
        on_token with each committed token as it is chosen. With verify, also the greedy choice and
        its entropy after every appended token."""

    @abstractmethod
    def _truncate(self, session: Session, length: int) -> None:
        """Cut the session's cache to its first `length` tokens."""

    @abstractmethod
    def info(self) -> pb.InfoResponse: ...

    @abstractmethod
    def tokenizer_files(self) -> pb.GetTokenizerResponse: ...


def validate_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidRequest("session_id is empty")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidRequest(f"session_id has {len(session_id)} characters; at most {MAX_SESSION_ID_CHARS}")
