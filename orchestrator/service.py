"""The orchestrator's core, independent of transport: validate, tokenize, run the loop, keep the store."""

import logging
import math
import os
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from jinja2 import TemplateError  # what a chat template raises on a conversation it refuses

from common.admission import Admission, Overloaded, QueueTimeout
from common.errors import EngineError, validate_session_id
from rstitch.client import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .delivery import Delivery
from .leases import LeaseKeeper
from .loop import Budget, CallerGone, OutOfTime, Progress, Streamed, finish_reason, stitch
from .policies import LLM, ROLE_NAMES, SLM, make_policy
from .replicas import EnginePool, PinnedEngine
from .router import Router
from .speculative import speculate
from .stops import StopStrings
from .store import Fenced, Journal, Lease, LeaseHeld, NotResumable, SessionExists, SessionStore, StoreUnavailable
from .telemetry import GenerationTelemetry
from .text import encode_prompt, load_tokenizer

log = logging.getLogger(__name__)


PASSED_THROUGH = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.CANCELLED}
FOLLOW_POLL_S = 0.1  # how often Resume re-reads the log of a session another replica drives
# gRPC reports a call without a deadline as an effectively infinite time remaining, not as None.
NO_DEADLINE_S = 10 * 365 * 24 * 3600


class RequestError(Exception):
    """A request refused or ended with a gRPC status. `retryable` False: the same request will never
    pass here (a size limit), unlike a full replica's RESOURCE_EXHAUSTED."""

    def __init__(self, code: grpc.StatusCode, message: str, retryable: bool = True):
        super().__init__(message)
        self.code, self.retryable = code, retryable


@dataclass
class Settings:
    # On the trained pair, tau = 0.05 keeps LLM-only accuracy at a third of its latency (docs/tradeoff.md).
    tau: float = 0.05
    max_new_tokens: int = 128
    max_new_tokens_limit: int = 4096
    max_prompt_tokens: int = 0  # 0: whatever the models' context holds
    max_sessions: int = 64  # generations driven at once by this replica
    max_queue: int = 64  # generations waiting for one of those slots
    engine_timeout_s: float = 600  # a request without a deadline gets this one
    engine_retry_s: float = 30  # how long a call waits for a lost engine to come back
    router: bytes = b""  # the router of POLICY_ROUTER requests that send none (a safetensors file's bytes)


class Orchestrator:
    def __init__(self, slm, llm, store: SessionStore, settings: Settings = Settings()):
        self.pools = {SLM: EnginePool.of(slm), LLM: EnginePool.of(llm)}
        self.store = store
        self.settings = settings
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.admission = Admission(settings.max_sessions, settings.max_queue, f"orchestrator {self.replica}")
        self.leases = LeaseKeeper(store)
        infos = {(role, address): client.info() for role, pool in self.pools.items()
                 for address, client in pool.clients.items()}
        if len({info.tokenizer_fingerprint for info in infos.values()}) > 1:
            engines = ", ".join(f"{ROLE_NAMES[role].upper()} {info.model_id} at {address} has fingerprint "
                                f"{info.tokenizer_fingerprint[:12]}" for (role, address), info in infos.items())
            raise ValueError(f"the engines do not share a tokenizer: {engines}; R-Stitch needs both models "
                             "(and every replica) to use one tokenizer")
        slm_info, llm_info = (next(info for (r, _), info in infos.items() if r == role) for role in (SLM, LLM))
        self.infos = {SLM: slm_info, LLM: llm_info}
        self.vocab_size = slm_info.vocab_size
        self.max_context = min(slm_info.max_context, llm_info.max_context)
        self.eos_token_ids = sorted(set(slm_info.eos_token_ids) | set(llm_info.eos_token_ids))
        self.tokenizer = load_tokenizer(self.pools[SLM].any().tokenizer_files().files)
        self._longest_token = max(map(len, self.tokenizer.get_vocab()))
        self.router = b""
        if settings.router:
            try:
                self.router = self._checked_router(settings.router)
            except RequestError as e:
                log.warning("no default router: %s", e)
        log.info("replica %s paired SLM %s (%s) with LLM %s (%s); tokenizer %s, context %d; sessions in %s",
                 self.replica, slm_info.model_id, ", ".join(self.pools[SLM].clients), llm_info.model_id,
                 ", ".join(self.pools[LLM].clients), slm_info.tokenizer_fingerprint[:12], self.max_context,
                 store.describe())

    # --- requests -----------------------------------------------------------------------------

    def generate(self, spec: opb.GenerationSpec, timeout_s: float | None = None, caller_alive=None,
                 session_id: str = ""):
        """Yields GenerateResponse events: Started, one Delta per answer token as the engines decode it, Finished.
        caller_alive() turning False (a cancelled or disconnected caller) ends it within one span. session_id:
        the client's choice (empty: a new one); a session that exists under it is not started again."""
        started = time.perf_counter()  # latency includes validation, tokenization and store writes
        budget = self._budget(timeout_s, caller_alive)
        header = self._resolve(spec, session_id)
        with self._admitted(budget):
            first = SLM if header.spec.policy == opb.POLICY_SPEC else make_policy(header).first
            try:
                lease = self._store(lambda: self.store.create(header, self.replica, first))
            except SessionExists:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"session {header.session_id} exists already "
                                   "(a repeated Generate): attach to it with Resume") from None
            progress = self._new_progress(header, role=first)
            opening = [opb.GenerateResponse(started=opb.Started(session_id=header.session_id,
                                                                prompt_token_ids=header.prompt_token_ids))]
            yield from self._drive(header, progress, lease, budget, Delivery(self.tokenizer, stops=header.spec.stop),
                                   started, opening)

    def resume(self, session_id: str, received_tokens: int = 0, timeout_s: float | None = None, caller_alive=None):
        """Attach to a session by id: the events a client that has `received_tokens` of its answer has
        not seen, then the rest of the generation. A session another replica drives is followed from
        its log until it ends or that replica's lease lapses; then this replica takes it over."""
        started = time.perf_counter()
        budget = self._budget(timeout_s, caller_alive)
        session = self.session(session_id)
        # Streamed tokens reach clients before their span is logged: a client may hold more than the log.
        logged = sum(len(span.token_ids) for span in session.spans)
        going_on = session.status in (opb.STATUS_RUNNING, opb.STATUS_FAILED)
        if received_tokens > (session.max_new_tokens if going_on else logged):
            raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                               f"received_tokens is {received_tokens} but session {session_id} has "
                               + (f"at most {session.max_new_tokens} tokens" if going_on else f"{logged} tokens"))
        with self._admitted(budget):
            yield opb.GenerateResponse(started=opb.Started(session_id=session_id,
                                                           prompt_token_ids=session.prompt_token_ids))
            delivery = Delivery(self.tokenizer, received_tokens, session.spec.stop)
            while True:
                yield from _replay(session, delivery)
                if session.status not in (opb.STATUS_RUNNING, opb.STATUS_FAILED):
                    yield from delivery.closing()
                    yield opb.GenerateResponse(finished=opb.Finished(
                        finish_reason=session.finish_reason, stats=session.stats, text=delivery.final_text()))
                    return
                try:
                    lease = self._store(lambda: self.store.acquire(session_id, self.replica))
                except (LeaseHeld, NotResumable) as e:
                    if budget.deadline is not None and time.monotonic() + FOLLOW_POLL_S > budget.deadline:
                        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"while following: {e}") from None
                    time.sleep(FOLLOW_POLL_S)
                    session = self.session(session_id)
                    continue
                log.info("replica %s took over session %s at epoch %d", self.replica, session_id, lease.epoch)
                session = self.session(session_id)  # final now: the previous owner is fenced
                yield from self._drive(session, self._progress(session), lease, budget, delivery, started,
                                       _replay(session, delivery))
                return

    def complete(self, spec: opb.GenerationSpec, timeout_s: float | None = None, caller_alive=None) -> opb.Session:
        return self.run_to_end(self.generate(spec, timeout_s, caller_alive))

    def run_to_end(self, events: Iterator[opb.GenerateResponse]) -> opb.Session:
        """Runs a generation's events (generate's, or a wrapper of them) to their end: the session as stored."""
        session_id = None
        for event in events:
            if event.HasField("started"):
                session_id = event.started.session_id
        return self.session(session_id)

    def session(self, session_id: str) -> opb.Session:
        return self._existing(session_id, self.store.get)

    def cancel(self, session_id: str) -> int:
        return self._existing(session_id, self.store.request_cancel)

    # --- helpers ------------------------------------------------------------------------------

    def _drive(self, header: opb.Session, progress: Progress, lease: Lease, budget: Budget, delivery: Delivery,
               started: float, opening=()):
        """Send the `opening` events, then run the session's policy from where `progress` stands to
        the end, under `lease`."""
        journal = Journal(self.store, lease)
        progress.observer = GenerationTelemetry.start(header)
        self.leases.hold(lease)
        engines = self._pin(progress)
        status, error = opb.STATUS_FINISHED, ""
        try:
            yield from opening
            yield from _answer(header, progress, engines, journal, budget, delivery)
            if progress.finish_reason == opb.FINISH_REASON_CANCELLED:
                status = opb.STATUS_CANCELLED
        except GeneratorExit:  # the caller went away: stop engine work at this span boundary
            status, progress.finish_reason = opb.STATUS_CANCELLED, opb.FINISH_REASON_CANCELLED
            raise
        except (CallerGone, OutOfTime, Fenced, EngineError, StoreUnavailable) as e:
            status, error, reason, raised = _outcome(e, progress.session_id)
            progress.finish_reason = reason or progress.finish_reason
            raise raised from None
        finally:
            self.leases.drop(lease)
            progress.stats.latency_ms = (time.perf_counter() - started) * 1e3
            if status is not None:
                self._finish(progress, engines, journal, status, error)
            _log_request(progress, header, status, error)
            for role, engine in engines.items():
                self.pools[role].count(engine.address, -1)
        yield from delivery.closing()
        yield opb.GenerateResponse(finished=opb.Finished(finish_reason=progress.finish_reason,
                                                         stats=progress.stats, text=delivery.final_text()))

    def _progress(self, session: opb.Session) -> Progress:
        """The loop's state of a session, rebuilt from its log."""
        cursor = self._store(lambda: self.store.cursor(session.session_id))
        progress = self._new_progress(session, synced=cursor["synced"], role=cursor["next_role"],
                                      replicas=cursor["replicas"], logged=len(session.spans), stats=session.stats)
        for span in session.spans:
            progress.tokens += span.token_ids
            progress.sources += [span.source] * len(span.token_ids)
            progress.entropies += span.entropies
        for position, token in enumerate(progress.tokens):
            progress.stopped(position, token)
        return progress

    def _new_progress(self, header: opb.Session, **state) -> Progress:
        spec = header.spec
        sampling = epb.Sampling(temperature=spec.temperature, top_p=spec.top_p if spec.HasField("top_p") else 1.0,
                                top_k=spec.top_k, min_p=spec.min_p, seed=spec.seed)
        return Progress(header.session_id, list(header.prompt_token_ids), header.max_new_tokens,
                        sorted(set(self.eos_token_ids) | set(spec.stop_token_ids)),
                        eos_token_ids=self.eos_token_ids, max_context=self.max_context, sampling=sampling,
                        top_logprobs=spec.top_logprobs if spec.logprobs else -1,
                        stops=StopStrings(self.tokenizer, spec.stop) if spec.stop else None, **state)

    def _budget(self, timeout_s: float | None, caller_alive=None) -> Budget:
        if timeout_s is None or not timeout_s < NO_DEADLINE_S:
            timeout_s = self.settings.engine_timeout_s
        return Budget(time.monotonic() + timeout_s, self.settings.engine_retry_s, caller_alive or (lambda: True))

    @contextmanager
    def _admitted(self, budget: Budget):
        try:
            with self.admission.slot(budget.timeout()):
                yield
        except Overloaded as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{e} (--max-sessions {self.settings.max_sessions}, "
                               f"--max-queue {self.settings.max_queue})") from None
        except QueueTimeout as e:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None

    def _resolve(self, spec: opb.GenerationSpec, session_id: str = "") -> opb.Session:
        """Validate the request and apply defaults; the result is what the store keeps."""
        if session_id:
            validate_session_id(session_id)
        invalid = lambda msg: RequestError(grpc.StatusCode.INVALID_ARGUMENT, msg)  # noqa: E731
        policy = spec.policy or opb.POLICY_ENTROPY
        if policy not in opb.Policy.values() or policy == opb.POLICY_UNSPECIFIED:
            names = [n for n in opb.Policy.keys() if n != "POLICY_UNSPECIFIED"]
            raise invalid(f"unknown policy {spec.policy}; use {', '.join(names[:-1])} or {names[-1]}")
        tau = spec.tau if spec.HasField("tau") else self.settings.tau
        if not math.isfinite(tau) or not 0.0 <= tau <= 1.0:
            raise invalid(f"tau must be in [0, 1] (normalized entropy), got {tau}")
        slm_probability = spec.slm_probability if spec.HasField("slm_probability") else 0.5
        if not math.isfinite(slm_probability) or not 0.0 <= slm_probability <= 1.0:
            raise invalid(f"slm_probability must be in [0, 1], got {slm_probability}")
        draft_tokens = spec.draft_tokens or 4
        if draft_tokens > 64:
            raise invalid(f"draft_tokens {draft_tokens} is too many: the SLM drafts at most 64 tokens per verification")
        _check_sampling(spec)
        max_new = spec.max_new_tokens or self.settings.max_new_tokens
        if max_new > self.settings.max_new_tokens_limit:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"max_new_tokens {max_new} is above this server's limit of "
                               f"{self.settings.max_new_tokens_limit} (--max-new-tokens-limit)", retryable=False)
        if len(spec.stop_token_ids) > 256:  # the engines take 1024, the EOS ids included
            raise invalid(f"stop_token_ids has {len(spec.stop_token_ids)} entries; at most 256")
        bad = [t for t in spec.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise invalid(f"stop_token_ids {bad[:5]} are outside the vocabulary of {self.vocab_size} tokens")
        prompt = self._prompt(spec)
        resolved = opb.GenerationSpec()
        resolved.CopyFrom(spec)
        resolved.policy = policy
        if not spec.HasField("seed"):  # kept with the session: a resumed one draws the same numbers
            resolved.seed = secrets.randbits(63)
        if policy == opb.POLICY_ROUTER:  # kept with the session, so that any replica resumes it alike
            resolved.router = self._checked_router(spec.router or self.router)
        return opb.Session(session_id=session_id or uuid.uuid4().hex, status=opb.STATUS_RUNNING, spec=resolved,
                           prompt_token_ids=prompt, tau=tau, max_new_tokens=max_new, slm_probability=slm_probability,
                           draft_tokens=draft_tokens)

    def _checked_router(self, data: bytes) -> bytes:
        slm = self.infos[SLM]
        if not data:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the router policy needs a router: send one (GenerationSpec.router) or start the "
                               "orchestrator with --router")
        try:
            router = Router.from_bytes(data)
        except ValueError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if router.hidden_size != slm.hidden_size:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the router reads hidden states of size {router.hidden_size}, but the SLM "
                               f"{slm.model_id} has hidden size {slm.hidden_size}: it was trained for another SLM")
        return data

    def _prompt(self, spec: opb.GenerationSpec) -> list[int]:
        """The prompt's token ids, refused when empty, too long or outside the vocabulary."""
        invalid = lambda msg: RequestError(grpc.StatusCode.INVALID_ARGUMENT, msg)  # noqa: E731
        kind, messages = spec.WhichOneof("prompt"), spec.messages.messages
        if kind is None:
            raise invalid("the request has no prompt: set text, messages or token_ids")
        if kind == "text" and not spec.text:
            raise invalid("the prompt is empty: text is an empty string")
        if kind == "messages" and not messages:
            raise invalid("messages is empty: send at least one ChatMessage")
        if kind in ("text", "messages"):
            # Refuse text that cannot fit before spending seconds tokenizing it: no token covers more
            # characters than the longest string in the vocabulary.
            chars = len(spec.text) if kind == "text" else sum(len(m.role) + len(m.content) for m in messages)
            if chars > self._longest_token * self.max_context or len(messages) > self.max_context:
                what = f"{chars} characters" if kind == "text" else f"{len(messages)} messages of {chars} characters"
                raise invalid(f"the prompt has {what}: more than the models' context of {self.max_context} tokens "
                              "can hold")
        try:
            prompt = encode_prompt(self.tokenizer, spec)
        except (ValueError, TemplateError) as e:
            raise invalid(f"cannot build the prompt: {e}") from None
        if not prompt:
            raise invalid("the prompt is empty")
        bad = [t for t in prompt if t >= self.vocab_size]
        if bad:
            raise invalid(f"prompt token ids {bad[:5]} are outside the vocabulary of {self.vocab_size} tokens")
        if self.settings.max_prompt_tokens and len(prompt) > self.settings.max_prompt_tokens:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the prompt has {len(prompt)} tokens, above this server's limit of "
                               f"{self.settings.max_prompt_tokens} (--max-prompt-tokens)", retryable=False)
        if len(prompt) >= self.max_context:
            raise invalid(f"the prompt has {len(prompt)} tokens; the models' context holds {self.max_context} "
                          "including the answer")
        return prompt

    def _pin(self, progress: Progress) -> dict:
        """The session's engines: the replicas that hold its caches, or the least busy ones for a new one."""
        engines = {}
        for role, pool in self.pools.items():
            pool.count(progress.replicas.setdefault(role, pool.pick()), +1)
            engines[role] = PinnedEngine(pool, progress, role)
        return engines

    def _finish(self, progress: Progress, engines: dict, journal: Journal, status: int, error: str) -> None:
        for engine in engines.values():  # behind the answer: nothing waits for the caches to be freed
            _RELEASES.submit(_release, engine, progress.session_id)
        try:
            journal.close()
            journal.store.finish(journal.lease, status, progress.finish_reason, progress.stats,
                                 answer_text(self.tokenizer, progress), error)
        except (StoreUnavailable, Fenced) as e:
            log.error("session %s ended (%s) but could not be recorded: %s", progress.session_id,
                      opb.Status.Name(status), e)

    def _existing(self, session_id: str, op):
        validate_session_id(session_id)
        found = self._store(lambda: op(session_id))
        if found is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r} (never created, or expired)")
        return found

    @staticmethod
    def _store(op):
        try:
            return op()
        except StoreUnavailable as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None


def _answer(header: opb.Session, progress: Progress, engines: dict, journal: Journal, budget: Budget,
            delivery: Delivery):
    """The session's policy run from where `progress` stands to its end, as the client's events."""
    progress.finish_reason = finish_reason(progress)
    if progress.finish_reason != opb.FINISH_REASON_UNSPECIFIED:
        return  # the previous owner wrote the last token, not the end
    if header.spec.policy == opb.POLICY_SPEC:
        records = speculate(progress, engines, journal, header.draft_tokens, budget)
    else:
        records = stitch(progress, make_policy(header), engines, journal, budget)
    for item in records:
        if isinstance(item, Streamed):
            yield from delivery.streamed(item)
        else:  # a span, as logged: what of it was not streamed
            yield from delivery.logged(item, len(progress.tokens))


def _outcome(e: Exception, session_id: str) -> tuple[int | None, str, int | None, RequestError]:
    """How a generation that raised `e` ends: (status, None when the session is another replica's now;
    error; finish reason, None to keep; what the caller gets)."""
    failed, resumable = opb.STATUS_FAILED, f"(session {session_id} can be resumed)"
    if isinstance(e, CallerGone):
        return opb.STATUS_CANCELLED, "", opb.FINISH_REASON_CANCELLED, RequestError(grpc.StatusCode.CANCELLED, str(e))
    if isinstance(e, OutOfTime):  # failed, hence resumable later
        return failed, str(e), opb.FINISH_REASON_ERROR, RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                                     f"{e} {resumable}")
    if isinstance(e, Fenced):  # leave the session and its engine caches to the replica that took it over
        return None, "", None, RequestError(grpc.StatusCode.ABORTED, f"session {session_id} was taken over by "
                                            "another orchestrator replica; attach to it there with Resume")
    if isinstance(e, EngineError):
        # The engine protocol's own states (NOT_FOUND, FAILED_PRECONDITION...) mean nothing to the
        # application: they surface as INTERNAL; transport and capacity troubles keep their code.
        code = e.code if e.code in PASSED_THROUGH else grpc.StatusCode.INTERNAL
        return failed, str(e), opb.FINISH_REASON_ERROR, RequestError(code, f"engine failed: {e} {resumable}")
    return failed, str(e), opb.FINISH_REASON_ERROR, RequestError(grpc.StatusCode.UNAVAILABLE, str(e))


def _check_sampling(spec: opb.GenerationSpec) -> None:
    """Sampling, stop strings and logprobs as a request gives them, refused naming the field."""
    invalid = lambda msg: RequestError(grpc.StatusCode.INVALID_ARGUMENT, msg)  # noqa: E731
    if spec.HasField("temperature") and not (math.isfinite(spec.temperature) and spec.temperature >= 0):
        raise invalid(f"temperature must be a number >= 0 (0: greedy), got {spec.temperature}")
    if spec.HasField("top_p") and not (math.isfinite(spec.top_p) and 0 < spec.top_p <= 1):
        raise invalid(f"top_p must be in (0, 1], got {spec.top_p}")
    if spec.HasField("min_p") and not (math.isfinite(spec.min_p) and 0 <= spec.min_p <= 1):
        raise invalid(f"min_p must be in [0, 1], got {spec.min_p}")
    if len(spec.stop) > MAX_STOP_STRINGS:
        raise invalid(f"stop has {len(spec.stop)} strings; at most {MAX_STOP_STRINGS}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in spec.stop):
        raise invalid(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    if spec.top_logprobs > MAX_TOP_LOGPROBS:
        raise invalid(f"top_logprobs is {spec.top_logprobs}; at most {MAX_TOP_LOGPROBS}")
    if spec.top_logprobs and not spec.logprobs:
        raise invalid("top_logprobs needs logprobs")


def answer_text(tokenizer, progress: Progress) -> str:
    """The answer's text, up to a stop string that ended it."""
    text = tokenizer.decode(progress.tokens, skip_special_tokens=True)
    return text[:progress.stops.cut] if progress.stops is not None and progress.stops.cut is not None else text


_RELEASES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="release")


def _release(engine, session_id: str) -> None:
    try:
        engine.release(epb.ReleaseRequest(session_id=session_id), timeout=5)
    except EngineError as e:  # the cache is freed later by eviction; the result stands
        log.warning("could not release session %s on %s: %s", session_id, engine.address, e)


def _log_request(progress: Progress, header: opb.Session, status: int | None, error: str) -> None:
    """One line per request that drove a session, whatever its end."""
    s = progress.stats
    ended = opb.Status.Name(status).removeprefix("STATUS_").lower() if status is not None else "taken over"
    log.info("session %s %s: policy %s, %d SLM + %d LLM tokens, %d switches, finish %s, %.0f ms%s",
             progress.session_id, ended, opb.Policy.Name(header.spec.policy).removeprefix("POLICY_").lower(),
             s.slm_tokens, s.llm_tokens, s.switches,
             opb.FinishReason.Name(progress.finish_reason).removeprefix("FINISH_REASON_").lower(), s.latency_ms,
             f" ({error})" if error else "")


def _replay(session: opb.Session, delivery: Delivery):
    """Deltas for the logged answer tokens the client has not received."""
    end = 0
    for span in session.spans:
        end += len(span.token_ids)
        yield from delivery.logged(span, end)
