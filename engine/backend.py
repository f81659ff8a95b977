"""The one interface every engine backend implements, and the contract checks they share.

Requests and responses are the proto messages themselves: the proto is the only contract, and an
engine called in-process answers exactly what its gRPC service would.
"""

from abc import ABC, abstractmethod

from rstitch.v1 import engine_pb2 as pb

from .errors import InvalidRequest
from .sessions import Session, SessionTable
from .span import validate_rule, validate_tokens


class Engine(ABC):
    backend: str

    def __init__(self, *, role: str, vocab_size: int, max_context: int, kv_capacity_tokens: int):
        self.role = role
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.sessions = SessionTable(kv_capacity_tokens)

    # --- the contract -------------------------------------------------------------------------

    def prefill(self, req: pb.PrefillRequest) -> pb.PrefillResponse:
        tokens = list(req.token_ids)
        validate_tokens(tokens, self.vocab_size)
        validate_rule(req.rule, self.vocab_size, self.max_context)
        if req.base_len + len(tokens) > self.max_context:
            raise InvalidRequest(
                f"prefill would hold {req.base_len + len(tokens)} tokens; the model's context is {self.max_context}"
            )
        if req.verify and not tokens:
            raise InvalidRequest("verify needs tokens to verify")
        with self.sessions.checkout(req.session_id, req.base_len, create=req.base_len == 0) as session:
            span, greedy = self._span(session, tokens, req.rule, req.verify)
        return pb.PrefillResponse(span=span, greedy_token_ids=greedy[0], greedy_entropies=greedy[1])

    def decode(self, req: pb.DecodeRequest) -> pb.DecodeResponse:
        validate_rule(req.rule, self.vocab_size, self.max_context)
        with self.sessions.checkout(req.session_id, req.base_len) as session:
            span, _ = self._span(session, [], req.rule, False)
        return pb.DecodeResponse(span=span)

    def rollback(self, req: pb.RollbackRequest) -> pb.RollbackResponse:
        with self.sessions.checkout(req.session_id, None) as session:
            if req.length > session.length:
                raise InvalidRequest(f"cannot roll forward: the cache holds {session.length} tokens, asked {req.length}")
            if req.length < session.length:
                self._truncate(session, req.length)
                self.sessions.shrink(session, req.length)
            return pb.RollbackResponse(cache_len=session.length)

    def release(self, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
        if not req.session_id:
            raise InvalidRequest("session_id is empty")
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
