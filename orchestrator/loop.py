"""Algorithm 1 of the R-Stitch paper, span by span, over any two engine clients."""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.errors import CacheMismatch, SessionNotFound
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .policies import LLM, SLM, Policy

REPAIRS_PER_SPAN = 3


@dataclass
class Progress:
    """A session as the loop drives it: the shared token sequence and what each engine has seen."""

    session_id: str
    prompt: list[int]
    max_new_tokens: int
    stop_token_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    synced: dict[int, int] = field(default_factory=lambda: {SLM: 0, LLM: 0})
    stats: opb.Stats = field(default_factory=opb.Stats)
    finish_reason: int = opb.FINISH_REASON_UNSPECIFIED

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.tokens

    def commit(self, role: int, span: epb.Span) -> opb.SpanRecord:
        self.tokens += span.token_ids
        self.sources += [role] * len(span.token_ids)
        self.entropies += span.entropies
        self.stats.spans += 1
        if role == SLM:
            self.stats.slm_tokens += len(span.token_ids)
            self.stats.slm_forward_ms += span.timings.forward_ms
            self.stats.gated_tokens += span.HasField("candidate")
        else:
            self.stats.llm_tokens += len(span.token_ids)
            self.stats.llm_forward_ms += span.timings.forward_ms
        return opb.SpanRecord(source=role, token_ids=span.token_ids, entropies=span.entropies)


def stitch(progress: Progress, policy: Policy, engines: dict, store, deadline: float | None = None
           ) -> Iterator[opb.SpanRecord]:
    """Ask the active engine for a span, log it, pick the next engine; until EOS, length or cancel.

    deadline (time.monotonic()) bounds every engine call, so a request's deadline reaches the engines.
    """
    role = policy.first
    while True:
        rule = policy.rule(role)
        remaining = progress.max_new_tokens - len(progress.tokens)
        rule.max_tokens = min(rule.max_tokens or remaining, remaining)
        rule.stop_token_ids.extend(progress.stop_token_ids)
        span = advance(engines[role], progress, role, rule, deadline).span
        record = progress.commit(role, span)
        cancel_requested = store.append(progress.session_id, record, progress.synced, progress.stats)
        yield record
        progress.finish_reason = finish_reason(progress, span)
        if progress.finish_reason == opb.FINISH_REASON_UNSPECIFIED and cancel_requested:
            progress.finish_reason = opb.FINISH_REASON_CANCELLED
        if progress.finish_reason != opb.FINISH_REASON_UNSPECIFIED:
            return
        next_role = policy.next(role, span)
        progress.stats.switches += next_role != role
        role = next_role


def advance(engine, progress: Progress, role: int, rule: epb.SpanRule, deadline: float | None = None,
            draft: list[int] = ()) -> epb.PrefillResponse:
    """One call to `engine`, sending it exactly the tokens it has not seen (partial prefill), then
    `draft` tokens to verify, if any (their greedy choices come back in the response).

    A lost or evicted session (NOT_FOUND) is prefilled again from the log; a cache of another
    length than ours (FAILED_PRECONDITION) is rolled back to what the sequence keeps.
    """
    for _ in range(REPAIRS_PER_SPAN):
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        base = progress.synced[role]
        unseen = progress.sequence[base:] + list(draft)
        try:
            if unseen:
                req = epb.PrefillRequest(session_id=progress.session_id, base_len=base, token_ids=unseen, rule=rule,
                                         verify=bool(draft))
                out = engine.prefill(req, timeout=timeout)
            else:
                req = epb.DecodeRequest(session_id=progress.session_id, base_len=base, rule=rule)
                out = epb.PrefillResponse(span=engine.decode(req, timeout=timeout).span)
        except SessionNotFound:
            progress.synced[role] = 0
            continue
        except CacheMismatch as e:
            progress.synced[role] = _resync(engine, progress, e.cache_len, timeout)
            continue
        if role == SLM:
            progress.stats.slm_prefill_tokens += len(unseen)
        else:
            progress.stats.llm_prefill_tokens += len(unseen)
        progress.synced[role] = out.span.cache_len
        return out
    raise CacheMismatch(f"{engine.address}: session {progress.session_id} could not be brought in sync "
                        f"after {REPAIRS_PER_SPAN} tries")


def roll_back(engine, progress: Progress, role: int, length: int, timeout=None) -> None:
    """Cut the engine's cache to `length` tokens if it holds more."""
    if progress.synced[role] > length:
        engine.rollback(epb.RollbackRequest(session_id=progress.session_id, length=length), timeout=timeout)
        progress.synced[role] = length


def _resync(engine, progress: Progress, engine_len: int, timeout) -> int:
    # Keep at least one token to send, so the next call has a distribution to decode from.
    keep = min(engine_len, len(progress.sequence) - 1)
    if keep < engine_len:
        engine.rollback(epb.RollbackRequest(session_id=progress.session_id, length=keep), timeout=timeout)
    return keep


def finish_reason(progress: Progress, span: epb.Span) -> int:
    if span.stop_reason == epb.STOP_REASON_STOP_TOKEN:
        return opb.FINISH_REASON_EOS
    if span.stop_reason == epb.STOP_REASON_CONTEXT_FULL:
        return opb.FINISH_REASON_CONTEXT_FULL
    if len(progress.tokens) >= progress.max_new_tokens:
        return opb.FINISH_REASON_MAX_NEW_TOKENS
    return opb.FINISH_REASON_UNSPECIFIED
