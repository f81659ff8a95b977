"""The one interface every engine backend implements, and the contract checks they share.

Requests and responses are the proto messages themselves: the proto is the only contract, and an
engine called in-process answers exactly what its gRPC service would.
"""

from abc import ABC, abstractmethod
from contextlib import contextmanager

from rstitch.v1 import engine_pb2 as pb

from .admission import Admission, Overloaded
from .errors import EngineOverloaded, InvalidRequest
from .sessions import Session, SessionTable
from .span import validate_rule, validate_tokens

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

    def prefill(self, req: pb.PrefillRequest) -> pb.PrefillResponse:
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
            span, greedy = self._span(session, tokens, req.rule, req.verify)
        return pb.PrefillResponse(span=span, greedy_token_ids=greedy[0], greedy_entropies=greedy[1])

    def decode(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        validate_session_id(req.session_id)
        validate_rule(req.rule, self.vocab_size, self.max_context)
        with self._admitted(), self.sessions.checkout(req.session_id, req.base_len) as session:
            span, _ = self._span(session, [], req.rule, False)
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
    def _span(self, session: Session, tokens: list[int], rule: pb.SpanRule, verify: bool
              ) -> tuple[pb.Span, tuple[list[int], list[float]]]:
        """Append tokens to the cache, then decode a span under rule (see engine.proto). With verify,
        also the greedy choice and its entropy after every appended token."""

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
