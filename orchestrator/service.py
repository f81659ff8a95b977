"""The orchestrator's core, independent of transport: validate, tokenize, run the loop, keep the store."""

import logging
import math
import time
import uuid
from dataclasses import dataclass

import grpc

from engine.errors import EngineError
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .loop import Progress, stitch
from .speculative import speculate
from .policies import LLM, SLM, make_policy
from .store import SessionStore, StoreUnavailable
from .text import IncrementalText, encode_prompt, load_tokenizer

log = logging.getLogger(__name__)


PASSED_THROUGH = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.CANCELLED}


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Defaults:
    # On the trained pair, tau = 0.05 keeps LLM-only accuracy at a third of its latency (docs/tradeoff.md).
    tau: float = 0.05
    max_new_tokens: int = 128
    max_new_tokens_limit: int = 4096


class Orchestrator:
    def __init__(self, slm, llm, store: SessionStore, defaults: Defaults = Defaults(), engine_timeout_s: float = 600):
        self.engines = {SLM: slm, LLM: llm}
        self.store = store
        self.defaults = defaults
        self.engine_timeout_s = engine_timeout_s
        slm_info, llm_info = slm.info(), llm.info()
        if slm_info.tokenizer_fingerprint != llm_info.tokenizer_fingerprint:
            raise ValueError(
                f"the engines do not share a tokenizer: SLM {slm_info.model_id} at {slm.address} has fingerprint "
                f"{slm_info.tokenizer_fingerprint[:12]}, LLM {llm_info.model_id} at {llm.address} has "
                f"{llm_info.tokenizer_fingerprint[:12]}; R-Stitch needs both models to use one tokenizer"
            )
        self.infos = {SLM: slm_info, LLM: llm_info}
        self.vocab_size = slm_info.vocab_size
        self.max_context = min(slm_info.max_context, llm_info.max_context)
        self.eos_token_ids = sorted(set(slm_info.eos_token_ids) | set(llm_info.eos_token_ids))
        self.tokenizer = load_tokenizer(slm.tokenizer_files().files)
        log.info("paired SLM %s with LLM %s (tokenizer %s, context %d); sessions in %s", slm_info.model_id,
                 llm_info.model_id, slm_info.tokenizer_fingerprint[:12], self.max_context, store.describe())

    # --- requests -----------------------------------------------------------------------------

    def generate(self, spec: opb.GenerationSpec, timeout_s: float | None = None):
        """Yields GenerateResponse events: Started, one Delta per non-empty span, Finished."""
        started = time.perf_counter()  # latency includes validation, tokenization and store writes
        header = self._resolve(spec)
        progress = Progress(header.session_id, list(header.prompt_token_ids), header.max_new_tokens,
                            sorted(set(self.eos_token_ids) | set(spec.stop_token_ids)))
        self._store(lambda: self.store.create(header))
        text = IncrementalText(self.tokenizer)
        status, error = opb.STATUS_FINISHED, ""
        try:
            yield opb.GenerateResponse(started=opb.Started(session_id=header.session_id,
                                                           prompt_token_ids=header.prompt_token_ids))
            deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.engine_timeout_s)
            if header.spec.policy == opb.POLICY_SPEC:
                records = speculate(progress, self.engines, self.store, header.draft_tokens, deadline)
            else:
                records = stitch(progress, make_policy(header), self.engines, self.store, deadline)
            for record in records:
                if record.token_ids:
                    yield opb.GenerateResponse(delta=opb.Delta(span=record, text=text.push(record.token_ids)))
            if progress.finish_reason == opb.FINISH_REASON_CANCELLED:
                status = opb.STATUS_CANCELLED
        except GeneratorExit:  # the caller went away: stop engine work at this span boundary
            status, progress.finish_reason = opb.STATUS_CANCELLED, opb.FINISH_REASON_CANCELLED
            raise
        except EngineError as e:
            status, error, progress.finish_reason = opb.STATUS_FAILED, str(e), opb.FINISH_REASON_ERROR
            # The engine protocol's own states (NOT_FOUND, FAILED_PRECONDITION...) mean nothing to the
            # application: they surface as INTERNAL; transport and capacity troubles keep their code.
            code = e.code if e.code in PASSED_THROUGH else grpc.StatusCode.INTERNAL
            raise RequestError(code, f"engine failed: {e}") from None
        except StoreUnavailable as e:
            status, error, progress.finish_reason = opb.STATUS_FAILED, str(e), opb.FINISH_REASON_ERROR
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        finally:
            progress.stats.latency_ms = (time.perf_counter() - started) * 1e3
            self._finish(progress, status, error)
        yield opb.GenerateResponse(finished=opb.Finished(finish_reason=progress.finish_reason,
                                                         stats=progress.stats, text=text.text))

    def complete(self, spec: opb.GenerationSpec, timeout_s: float | None = None) -> opb.Session:
        session_id = None
        for event in self.generate(spec, timeout_s):
            if event.HasField("started"):
                session_id = event.started.session_id
        return self.session(session_id)

    def session(self, session_id: str) -> opb.Session:
        return self._existing(session_id, self.store.get)

    def cancel(self, session_id: str) -> int:
        return self._existing(session_id, self.store.request_cancel)

    # --- helpers ------------------------------------------------------------------------------

    def _resolve(self, spec: opb.GenerationSpec) -> opb.Session:
        """Validate the request and apply defaults; the result is what the store keeps."""
        invalid = lambda msg: RequestError(grpc.StatusCode.INVALID_ARGUMENT, msg)  # noqa: E731
        policy = spec.policy or opb.POLICY_ENTROPY
        if policy not in opb.Policy.values() or policy == opb.POLICY_UNSPECIFIED:
            raise invalid(f"unknown policy {spec.policy}; use entropy, llm, slm or random")
        tau = spec.tau if spec.HasField("tau") else self.defaults.tau
        if not math.isfinite(tau) or not 0.0 <= tau <= 1.0:
            raise invalid(f"tau must be in [0, 1] (normalized entropy), got {tau}")
        slm_probability = spec.slm_probability if spec.HasField("slm_probability") else 0.5
        if not math.isfinite(slm_probability) or not 0.0 <= slm_probability <= 1.0:
            raise invalid(f"slm_probability must be in [0, 1], got {slm_probability}")
        draft_tokens = spec.draft_tokens or 4
        if draft_tokens > 64:
            raise invalid(f"draft_tokens {draft_tokens} is too many: the SLM drafts at most 64 tokens per verification")
        max_new = spec.max_new_tokens or self.defaults.max_new_tokens
        if max_new > self.defaults.max_new_tokens_limit:
            raise invalid(f"max_new_tokens {max_new} is above this server's limit of {self.defaults.max_new_tokens_limit}")
        if spec.WhichOneof("prompt") is None:
            raise invalid("the request has no prompt: set text, messages or token_ids")
        try:
            prompt = encode_prompt(self.tokenizer, spec)
        except ValueError as e:
            raise invalid(str(e)) from None
        if not prompt:
            raise invalid("the prompt is empty")
        bad = [t for t in list(prompt) + list(spec.stop_token_ids) if t >= self.vocab_size]
        if bad:
            raise invalid(f"token ids {bad[:5]} are outside the vocabulary of {self.vocab_size} tokens")
        if len(prompt) >= self.max_context:
            raise invalid(f"the prompt has {len(prompt)} tokens; the models' context holds {self.max_context} "
                          "including the answer")
        resolved = opb.GenerationSpec()
        resolved.CopyFrom(spec)
        resolved.policy = policy
        return opb.Session(session_id=uuid.uuid4().hex, status=opb.STATUS_RUNNING, spec=resolved,
                           prompt_token_ids=prompt, tau=tau, max_new_tokens=max_new, slm_probability=slm_probability,
                           draft_tokens=draft_tokens)

    def _finish(self, progress: Progress, status: int, error: str) -> None:
        for engine in self.engines.values():
            try:
                engine.release(epb.ReleaseRequest(session_id=progress.session_id), timeout=5)
            except EngineError as e:  # the cache is freed later by eviction; the result stands
                log.warning("could not release session %s on %s: %s", progress.session_id, engine.address, e)
        try:
            self.store.finish(progress.session_id, status, progress.finish_reason, progress.stats,
                              self.tokenizer.decode(progress.tokens, skip_special_tokens=True), error)
        except StoreUnavailable as e:
            log.error("session %s finished but could not be recorded: %s", progress.session_id, e)

    def _existing(self, session_id: str, op):
        if not session_id:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
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
