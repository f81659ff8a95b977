"""The hf backend: transformers + PyTorch, batched steps over one KV pool, exact rollback.

Every session owns a slot of the engine's KV pool (engine/kv_pool.py). A span runs in the
BatchedRunner's step loop (engine/scheduler.py): its prefill and each of its decode tokens ride in
the same forwards as every other session's, and all the tokens chosen in a step are chosen in one
batched call; the calling thread only waits for the span's end (or reads its streamed tokens).
"""

import logging
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from common import telemetry
from rstitch.v1 import engine_pb2 as pb

from . import checkpoints, sampling
from .backend import Engine, ModelFacts, SpanCall, row_request
from .kv_pool import KVPool, cache_kwarg
from .scheduler import BatchedRunner, SpanRun
from .sessions import Session
from .span import SpanBuilder

log = logging.getLogger(__name__)


@dataclass
class CacheState:
    slot: int  # the session's slot of the KV pool
    # The next-token distribution at the cache's end, kept while nothing after it was chosen
    # (a gated stop, or a prefill with max_tokens = 0), so that Decode can continue from it.
    next_logits: torch.Tensor | None = None
    next_hidden: torch.Tensor | None = None


class HFEngine(Engine):
    backend = "hf"

    def __init__(self, model_path, *, max_sessions: int = 0, threads: int | None = None, **kwargs):
        """threads: torch intra-op threads of the runner's thread (None: torch's choice)."""
        super().__init__(model_path, max_sessions=max_sessions, **kwargs)
        self.pool = KVPool.for_model(self.model, budget_tokens=self.sessions.capacity, max_context=self.max_context)
        self.runner = BatchedRunner(self.model, self.pool, choose=self._choose, threads=threads)
        # One slot per session: past the pool's slots the least recently used idle session is evicted.
        self.sessions.max_sessions = min(max_sessions or self.pool.slots, self.pool.slots)
        self.sessions.on_remove = self._free_slot
        log.info("%s engine: %s on %s/%s, vocab %d, context %d, KV budget %d tokens (%d B/token) in %d slots",
                 self.role, self.model_id, self.device, self.dtype, self.vocab_size, self.max_context,
                 self.sessions.capacity, self.kv_bytes_per_token, self.pool.slots)

    def _load(self, model_path) -> ModelFacts:
        self.model = checkpoints.load_model(model_path, checkpoints.torch_dtype(self.dtype), self.device)
        _check_rollback_support(self.model, str(model_path))
        return ModelFacts(self.model.config.get_text_config(), self.model.generation_config,
                          _output_rows(self.model, self.device))

    def _choose(self, logits: torch.Tensor, runs: list[SpanRun]) -> sampling.Choice:
        return sampling.choose(logits, self.vocab_size, [row_request(run.builder) for run in runs])

    def _begin(self, call: SpanCall) -> None:
        session, tokens = call.session, call.tokens
        if not tokens and (session.state is None or session.state.next_logits is None):
            raise self.nothing_to_decode(session)
        if tokens:
            self.sessions.grow(session, len(tokens))
            if session.state is None:
                session.state = CacheState(self.pool.allocate())
        state: CacheState = session.state
        run = SpanRun(SpanBuilder(call.rule, session.length, self.max_context, call.on_token),
                      reserve=lambda: self.sessions.grow(session, 1), return_hidden=call.rule.return_hidden,
                      cancelled=call.cancelled)
        if not tokens:
            run.logits, run.hidden = state.next_logits, state.next_hidden
        state.next_logits = state.next_hidden = None  # the span owns the cache's end now
        future = self.runner.submit_span(state.slot, session.length - len(tokens), tokens, run,
                                         all_logits=call.verify)
        future.add_done_callback(lambda done: self._ended(call, done))

    def _ended(self, call: SpanCall, done) -> None:
        """On the runner's thread, when the span has ended: the call's response (or error)."""
        try:
            call.future.set_result(self._response(call, done.result()))
        except BaseException as e:  # noqa: BLE001 - the caller raises it; nothing may leave it waiting
            call.future.set_exception(e)

    def _response(self, call: SpanCall, run: SpanRun) -> pb.PrefillResponse:
        """The response, and what the session keeps."""
        span, state = run.builder.span, call.session.state
        if run.builder.fresh:
            state.next_logits, state.next_hidden = run.logits, run.hidden
        span.cache_len = call.session.length
        span.timings.CopyFrom(_timings(run))
        response = pb.PrefillResponse(span=span)
        if call.verify:
            sampling.fill_verification(response, run.prefill_logits, call.tokens, call.drafts, call.rule,
                                       self.vocab_size)
        _trace(run, len(call.tokens), span, call.trace_context)
        return response

    def load(self) -> dict:
        stats = self.runner.stats
        return dict(steps=stats.steps, step_tokens=stats.tokens, busy_seconds=stats.busy_s,
                    forward_seconds=stats.forward_s)

    def _free_slot(self, session: Session) -> None:
        if session.state is not None:
            self.pool.free(session.state.slot)

    def _truncate(self, session, length):
        if length == 0:
            self._free_slot(session)
            session.state = None
            return
        self.pool.truncate(session.state.slot, length)  # exact: later writes overwrite what lay past it
        session.state.next_logits = session.state.next_hidden = None


def _timings(run: SpanRun) -> pb.Timings:
    end = time.perf_counter()
    queued = (run.first_step or end) - run.submitted  # waiting for a step to take its tokens in
    return pb.Timings(queue_ms=queued * 1e3, forward_ms=(end - run.submitted - queued) * 1e3, forwards=run.steps,
                      first_token_ms=(run.first_token - run.submitted) * 1e3 if run.first_token else 0.0)


def _trace(run: SpanRun, prefilled: int, span: pb.Span, parent) -> None:
    """The span's wait for a step, its prefill and its decode, as trace spans under the call's (parent)."""
    if not telemetry.tracing_enabled():
        return
    to_ns = time.time_ns() - time.perf_counter_ns()
    ns = lambda t: int(t * 1e9) + to_ns  # noqa: E731
    end = time.perf_counter()
    first_step = run.first_step or run.submitted
    telemetry.record_span("engine.queue", ns(run.submitted), ns(first_step), parent)
    if prefilled:
        telemetry.record_span("engine.prefill", ns(first_step), ns(run.prefilled or end), parent,
                              **{"rstitch.tokens": prefilled})
    telemetry.record_span("engine.decode", ns(run.prefilled or first_step), ns(end), parent, **{
        "rstitch.tokens": len(span.token_ids), "rstitch.forwards": run.steps,
        "rstitch.stop_reason": pb.StopReason.Name(span.stop_reason).removeprefix("STOP_REASON_").lower(),
        "rstitch.queue_ms": span.timings.queue_ms})


# --- start-up checks ---------------------------------------------------------------------------

def _check_rollback_support(model, where: str) -> None:
    """Refuse at start-up a model whose cache holds more than attention keys and values (recurrent or
    convolutional state cannot be cut back to an earlier length)."""
    kinds = {type(layer) for layer in DynamicCache(config=model.config).layers}
    others = sorted(kind.__name__ for kind in kinds - {DynamicLayer, DynamicSlidingWindowLayer})
    if others:
        raise ValueError(f"{where}: {model.config.model_type} keeps state in {', '.join(others)} cache layers, "
                         "which cannot be rolled back to an earlier length; the hf backend serves attention-only "
                         "models")


def _output_rows(model, device: str) -> int:
    """The width of the model's logits (its output layer's rows), from one plain forward of one token."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[0]], device=device), use_cache=True,
                    **{cache_kwarg(model): DynamicCache()})
    return out.logits.shape[-1]
