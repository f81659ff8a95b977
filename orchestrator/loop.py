"""Algorithm 1 of the R-Stitch paper, span by span, over any two engine clients."""

import math
import random
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from common.errors import CacheMismatch, EngineError, SessionNotFound
from engine.span import judge
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .policies import LLM, ROLE_NAMES, SLM, Policy
from .stops import StopStrings

REPAIRS_PER_SPAN = 3


@dataclass
class Switch:
    """A change of the writing model, reported once the incoming model has answered."""

    source: int  # the model that gave up control
    target: int
    position: int  # the answer token the incoming model writes first
    entropy: float | None  # the gated token's entropy (SLM -> LLM), or the last LLM token's (LLM -> SLM)
    prefill_tokens: int = 0  # tokens the incoming model prefilled
    latency_s: float = 0.0  # from the gate decision to the incoming model's first token
    decided: float = 0.0  # time.perf_counter() of the gate decision

    @property
    def direction(self) -> str:
        return f"{ROLE_NAMES[self.source]}->{ROLE_NAMES[self.target]}"

    @classmethod
    def decided_after(cls, span: epb.Span, source: int, target: int, position: int, now: float) -> "Switch":
        entropy = span.candidate.entropy if span.HasField("candidate") else \
            span.entropies[-1] if span.entropies else None
        return cls(source, target, position, entropy, decided=now)

    def landed(self, span: epb.Span, now: float, prefill_tokens: int) -> "Switch":
        """Completed by the incoming model's first span; the engine says when within its call it
        chose its first token, and the rest of the call came after."""
        after_first_ms = span.timings.queue_ms + span.timings.forward_ms - span.timings.first_token_ms
        self.latency_s = now - self.decided - after_first_ms / 1e3
        self.prefill_tokens = prefill_tokens
        return self


@dataclass
class Streamed:
    """An answer token an engine committed and streamed before its span ended (the log gets it with
    the span). A retried or re-prefilled span streams its tokens again, at the same positions and
    equal, since decoding is deterministic: readers keep the first of each position."""

    position: int
    source: int
    token_id: int
    entropy: float
    logprobs: epb.TokenLogprobs | None = None


class Observer:
    """What the loop reports as it goes, where the session's stats count it (tracing and metrics
    listen here). This one ignores it."""

    def committed(self, role: int, tokens: int) -> None:
        """`role` wrote a span of `tokens` answer tokens (may be 0)."""

    def prefilled(self, role: int, tokens: int) -> None:
        """`role` was sent `tokens` tokens it had not seen."""

    def switched(self, switch: Switch) -> None:
        """The policy handed control to the other model."""


IGNORED = Observer()


@dataclass
class Progress:
    """A session as the loop drives it: the shared token sequence and what each engine has seen."""

    session_id: str
    prompt: list[int]
    max_new_tokens: int
    stop_token_ids: list[int]  # the models' EOS ids and the request's own stop ids
    eos_token_ids: list[int] = field(default_factory=list)  # those of the models (FINISH_REASON_EOS)
    max_context: int = 2**31  # of the smaller model: the sequence never grows past it
    tokens: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    synced: dict[int, int] = field(default_factory=lambda: {SLM: 0, LLM: 0})
    role: int = SLM  # the model that writes next
    replicas: dict[int, str] = field(default_factory=dict)  # the engine replica of each role
    logged: int = 0  # spans in the session's log
    stats: opb.Stats = field(default_factory=opb.Stats)
    finish_reason: int = opb.FINISH_REASON_UNSPECIFIED
    observer: Observer = field(default=IGNORED, repr=False, compare=False)
    sampling: epb.Sampling = field(default_factory=epb.Sampling)  # of every span; temperature 0: greedy
    top_logprobs: int = -1  # -1: no logprobs; else each token's and this many alternatives'
    stops: StopStrings | None = None  # the request's stop strings

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def room(self) -> int:
        """Answer tokens that may still be written: the length asked for, within the context."""
        return min(self.max_new_tokens - len(self.tokens), self.max_context - len(self.prompt) - len(self.tokens))

    def ruled(self, rule: epb.SpanRule) -> epb.SpanRule:
        """`rule` with what every span of the session shares: its sampling, the position of the span's
        first token, logprobs."""
        rule.sampling.CopyFrom(self.sampling)
        rule.position = len(self.tokens)
        if self.top_logprobs >= 0:
            rule.logprobs, rule.top_logprobs = True, self.top_logprobs
        return rule

    def stopped(self, position: int, token_id: int) -> bool:
        """Whether the answer ends at token `position` by a stop string (tokens arrive in order)."""
        return self.stops is not None and self.stops.push(position, token_id)

    def called(self, role: int, unseen: int, timings: epb.Timings, wall_s: float) -> None:
        """An engine call of `role` answered after wall_s, having been sent `unseen` tokens (the time a
        caller spent reading a stream it stopped early counts as the engine's)."""
        stats = self.stats
        if role == SLM:
            stats.slm_prefill_tokens += unseen
            stats.slm_queue_ms += timings.queue_ms
        else:
            stats.llm_prefill_tokens += unseen
            stats.llm_queue_ms += timings.queue_ms
        if timings.forward_ms or timings.queue_ms:
            stats.rpc_ms += max(0.0, wall_s * 1e3 - timings.queue_ms - timings.forward_ms)
        self.observer.prefilled(role, unseen)

    def prefill_tokens(self, role: int) -> int:
        return self.stats.slm_prefill_tokens if role == SLM else self.stats.llm_prefill_tokens

    def commit(self, role: int, span: epb.Span) -> opb.SpanRecord:
        for i, token in enumerate(span.token_ids):  # a stop string cuts the answer after the token ending it
            if self.stopped(len(self.tokens) + i, token):
                del span.token_ids[i + 1:], span.entropies[i + 1:], span.logprobs[i + 1:]
                break
        self.tokens += span.token_ids
        self.sources += [role] * len(span.token_ids)
        self.entropies += span.entropies
        self.stats.spans += 1
        self.observer.committed(role, len(span.token_ids))
        if role == SLM:
            self.stats.slm_tokens += len(span.token_ids)
            self.stats.slm_forward_ms += span.timings.forward_ms
            self.stats.gated_tokens += span.HasField("candidate")
        else:
            self.stats.llm_tokens += len(span.token_ids)
            self.stats.llm_forward_ms += span.timings.forward_ms
        return opb.SpanRecord(source=role, token_ids=span.token_ids, entropies=span.entropies, logprobs=span.logprobs)


def stitch(progress: Progress, policy: Policy, engines: dict, journal, budget: "Budget"
           ) -> Iterator[Streamed | opb.SpanRecord]:
    """Ask the active engine for a span, log it, pick the next engine; until EOS, length or cancel.
    Yields each token as the engine streams it, and each span once it is logged."""
    switch = None  # the switch decided by the last span, reported after the incoming model's first call
    while True:
        role = progress.role
        remaining = progress.room
        rule = progress.ruled(policy.rule(role, len(progress.tokens), remaining))
        rule.max_tokens = min(rule.max_tokens or remaining, remaining)
        rule.stop_token_ids.extend(progress.stop_token_ids)
        prefilled = progress.prefill_tokens(role)
        span = (yield from advance_streaming(engines[role], progress, role, rule, budget)).span
        if span.HasField("candidate") and policy.keeps(span, len(progress.tokens) + len(span.token_ids)):
            span = with_candidate_kept(span, rule)
            progress.stats.router_kept_tokens += 1
        answered = time.perf_counter()
        if switch is not None:
            progress.observer.switched(switch.landed(span, answered, progress.prefill_tokens(role) - prefilled))
            progress.stats.switch_ms += switch.latency_s * 1e3
            switch = None
        record = progress.commit(role, span)
        progress.finish_reason = finish_reason(progress, span.stop_reason == epb.STOP_REASON_CONTEXT_FULL)
        if progress.finish_reason == opb.FINISH_REASON_UNSPECIFIED:
            progress.role = policy.next(role, span, len(progress.tokens))
            if progress.role != role:
                progress.stats.switches += 1
                switch = Switch.decided_after(span, role, progress.role, len(progress.tokens), answered)
        cancel_requested = journal.log(progress, record)
        yield record
        if progress.finish_reason == opb.FINISH_REASON_UNSPECIFIED and cancel_requested:
            progress.finish_reason = opb.FINISH_REASON_CANCELLED
        if progress.finish_reason != opb.FINISH_REASON_UNSPECIFIED:
            return


def with_candidate_kept(span: epb.Span, rule: epb.SpanRule) -> epb.Span:
    """The span as if the gate had let its candidate through: the token is committed (the SLM's cache
    gets it with the next call, like any last token) and the span ends as the engine's own rule,
    without the gate, says of that token."""
    kept = epb.Span()
    kept.CopyFrom(span)
    kept.ClearField("candidate")
    ungated = epb.SpanRule()
    ungated.CopyFrom(rule)
    ungated.gate = epb.GATE_UNSPECIFIED
    _, reason = judge(ungated, len(span.token_ids), span.candidate.token_id, span.candidate.entropy)
    kept.token_ids.append(span.candidate.token_id)
    kept.entropies.append(span.candidate.entropy)
    if rule.logprobs:
        kept.logprobs.append(span.candidate.logprobs)
    kept.stop_reason = reason or epb.STOP_REASON_UNSPECIFIED
    return kept


class CallerGone(Exception):
    pass


class OutOfTime(Exception):
    pass


@dataclass
class Budget:
    """What one request's engine calls may take; checked before every call, so that a deadline or a
    caller that went away stops engine work within one span, for streamed and unary requests alike."""

    deadline: float | None = None  # time.monotonic() by which the request must be done
    retry_s: float = 30.0  # how long one call keeps retrying an unreachable or overloaded engine
    caller_alive: Callable[[], bool] = lambda: True

    def timeout(self) -> float | None:
        if not self.caller_alive():
            raise CallerGone("the caller cancelled or disconnected")
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfTime("the request's deadline passed")
        return left


def retrying(call, budget: Budget):
    """call(timeout), tried again with jittered exponential backoff while the engine is down or
    overloaded (a restarting engine answers again within seconds), within budget. A generator: a
    call may return a stream (a generator itself), whose events it passes on and whose return value
    is the result; a stream retried from its start yields its first events again (see Streamed)."""
    pause, give_up = 0.05, None
    while True:
        try:
            result = call(budget.timeout())
            if isinstance(result, Generator):
                result = yield from result
            return result
        except EngineError as e:
            if not e.retryable:
                raise
            give_up = give_up or min(time.monotonic() + budget.retry_s, budget.deadline or math.inf)
            if time.monotonic() + pause > give_up:
                raise
        time.sleep(pause * random.uniform(0.5, 1.0))
        pause = min(pause * 2, 1.0)


def finished(generator: Generator):
    """Run a generator to its end, dropping what it yields; its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as end:
            return end.value


def advance(engine, progress: Progress, role: int, rule: epb.SpanRule, budget: Budget, draft: list[int] = (),
            draft_distributions=()) -> epb.PrefillResponse:
    """One call to `engine` (see advance_streaming), its tokens returned with the response only."""
    return finished(advance_streaming(engine, progress, role, rule, budget, draft, stream=False,
                                      draft_distributions=draft_distributions))


def advance_streaming(engine, progress: Progress, role: int, rule: epb.SpanRule, budget: Budget,
                      draft: list[int] = (), stream: bool = True, draft_distributions=()):
    """One call to `engine`, sending it exactly the tokens it has not seen (partial prefill), then
    `draft` tokens to verify, if any (their greedy choices, or with the distributions they were
    sampled from the speculative sampling outcome, come back in the response). Yields each committed
    token as a Streamed as the engine decodes it (with stream), and stops reading the span where a stop
    string ends the answer; returns the response.

    A lost or evicted session (NOT_FOUND) is prefilled again from the log; a cache of another
    length than ours (FAILED_PRECONDITION) is rolled back to what the sequence keeps.
    """
    for _ in range(REPAIRS_PER_SPAN):
        base = progress.synced[role]
        unseen = progress.sequence[base:] + list(draft)
        req = epb.PrefillRequest(session_id=progress.session_id, base_len=base, token_ids=unseen, rule=rule,
                                 verify=bool(draft), draft_distributions=draft_distributions)
        called = time.perf_counter()
        try:
            out = yield from retrying(lambda timeout: _call(engine, progress, role, req, timeout, stream), budget)
        except SessionNotFound:
            progress.synced[role] = 0
            continue
        except CacheMismatch as e:
            # Keep at least one token to send, so the next call has a distribution to decode from.
            roll_back(engine, progress, role, min(e.cache_len, len(progress.sequence) - 1), budget,
                      engine_len=e.cache_len)
            continue
        progress.called(role, len(unseen), out.span.timings, time.perf_counter() - called)
        progress.synced[role] = out.span.cache_len
        return out
    raise CacheMismatch(f"{engine.address}: session {progress.session_id} could not be brought in sync "
                        f"after {REPAIRS_PER_SPAN} tries")


def _call(engine, progress: Progress, role: int, req: epb.PrefillRequest, timeout, stream: bool):
    if stream:
        return _positioned(engine.stream_span(req, timeout=timeout), progress, role)
    if req.token_ids:
        return engine.prefill(req, timeout=timeout)
    decode = epb.DecodeRequest(session_id=req.session_id, base_len=req.base_len, rule=req.rule)
    return epb.PrefillResponse(span=engine.decode(decode, timeout=timeout).span)


def _positioned(events, progress: Progress, role: int):
    """An engine's stream of committed tokens as Streamed answer tokens from the progress' end on. A
    stop string that ends the answer ends the stream there (the engine's span is cancelled): the
    response is then the span up to that token, the engine's cache length unknown (0)."""
    span, position = epb.Span(), len(progress.tokens)
    while True:
        try:
            token = next(events)
        except StopIteration as end:
            return end.value
        yield Streamed(position, role, token.token_id, token.entropy,
                       token.logprobs if token.HasField("logprobs") else None)
        span.token_ids.append(token.token_id)
        span.entropies.append(token.entropy)
        if token.HasField("logprobs"):
            span.logprobs.append(token.logprobs)
        if progress.stopped(position, token.token_id):
            events.close()
            span.stop_reason = epb.STOP_REASON_STOP_TOKEN
            return epb.PrefillResponse(span=span)
        position += 1


def roll_back(engine, progress: Progress, role: int, length: int, budget: Budget, engine_len: int | None = None
              ) -> None:
    """Cut the engine's cache to `length` tokens if it holds more (engine_len: what it really holds)."""
    held = progress.synced[role] if engine_len is None else engine_len
    if held > length:
        req = epb.RollbackRequest(session_id=progress.session_id, length=length)
        try:
            finished(retrying(lambda timeout: engine.rollback(req, timeout=timeout), budget))
        except SessionNotFound:  # evicted since its last call: it holds nothing, and is prefilled next time
            held = 0
    progress.synced[role] = min(held, length)


def finish_reason(progress: Progress, context_full: bool = False) -> int:
    """Why the answer ended with its last token (UNSPECIFIED: it goes on). Reads only the log and the
    limits, so that a session whose replica died right after logging its end is settled alike."""
    last = progress.tokens[-1] if progress.tokens else None
    if last is not None and last in progress.stop_token_ids:
        return opb.FINISH_REASON_EOS if last in progress.eos_token_ids else opb.FINISH_REASON_STOP
    if progress.tokens and progress.stopped(len(progress.tokens) - 1, last):
        return opb.FINISH_REASON_STOP
    if len(progress.tokens) >= progress.max_new_tokens:
        return opb.FINISH_REASON_MAX_NEW_TOKENS
    if context_full or progress.room <= 0:
        return opb.FINISH_REASON_CONTEXT_FULL
    return opb.FINISH_REASON_UNSPECIFIED
