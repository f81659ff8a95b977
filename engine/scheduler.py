"""Batched steps: one thread runs one forward per step over the pending work of every session, and
decodes every running span in that same loop.

The loop is nano-vllm's schedule -> run -> postprocess, with one difference the engine contract asks
for: a step mixes prefill chunks and decode tokens of different sessions, because a span's next token
must not wait behind another session's long prefill.

A work item feeds a run of tokens into a slot of the pool. A plain item (`submit`, `forward`) then
hands back its logits. A span item (`submit_span`) carries a SpanBuilder: after its tokens are fed,
the loop chooses the next token (all choices of a step in one batched call), offers it to the
builder, and, while the span goes on, feeds that token in the next step. Nothing of a span's decode
leaves this thread until the span ends, except each committed token to its on_token callback.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .kv_pool import BATCH_KWARG, KVPool, PackedBatch, PackedCache, Segment, cache_kwarg, install_packed_attention
from .sampling import Choice
from .span import SpanBuilder, float_bytes

# Tokens per forward: bounds a step's latency (and its activations) when long prefills arrive;
# a longer prefill is fed in chunks over several steps.
DEFAULT_STEP_TOKENS = 512


class ForwardResult(NamedTuple):
    logits: torch.Tensor  # [n, V] for all_logits, else [1, V]: the distribution after the last token
    hidden: torch.Tensor | None  # [hidden_size], the last token's final hidden state, when asked
    queued_s: float = 0.0  # from submit to the start of the first step that took its tokens in


# (logits [R, V], the spans choosing) -> the engine's choice of each row's token (engine.sampling.Choice).
Choose = Callable[[torch.Tensor, list["SpanRun"]], Choice]


@dataclass(eq=False)
class SpanRun:
    """A span decoding in the loop. The runner feeds what the builder commits until the span ends, a
    cancel arrives, or `reserve` (room in the session table for one more token) raises."""

    builder: SpanBuilder
    reserve: Callable[[], None]
    return_hidden: bool = False
    logits: torch.Tensor | None = None  # [V]: the distribution the next choice reads
    hidden: torch.Tensor | None = None  # [hidden_size]: the final hidden state at the same position
    prefill_logits: torch.Tensor | None = None  # [n, V]: after each token of the first feed (all_logits)
    cancelled: threading.Event = field(default_factory=threading.Event)
    opened: bool = False  # the builder was asked whether the span chooses at all
    # perf_counter times: submitted, the first step that fed it, its first feed done, its first choice
    submitted: float = field(default_factory=time.perf_counter)
    first_step: float = 0.0
    prefilled: float = 0.0
    first_token: float = 0.0
    steps: int = 0  # forwards that fed some of its tokens


@dataclass(eq=False)
class _Work:
    slot: int
    start: int
    tokens: list[int]
    all_logits: bool
    hidden: bool
    span: SpanRun | None = None
    future: Future = field(default_factory=Future)
    fed: int = 0  # tokens already written into the pool by earlier steps
    steps: int = 0  # forwards that took some of its tokens
    submitted: float = field(default_factory=time.perf_counter)
    first_step: float | None = None  # when the first step that took some of its tokens began
    logits_parts: list = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.fed


@dataclass
class RunnerStats:
    steps: int = 0
    tokens: int = 0  # tokens fed
    forward_s: float = 0.0  # in forwards
    busy_s: float = 0.0  # in steps: forwards, choices and bookkeeping


class BatchedRunner:
    """Owns the model's forwards; `submit()`/`submit_span()` from any thread, batched with the others.

    One item in flight per slot (a session has one call at a time); different slots share forwards.
    """

    def __init__(self, model, pool: KVPool, *, choose: Choose | None = None,
                 max_step_tokens: int = DEFAULT_STEP_TOKENS, threads: int | None = None):
        if max_step_tokens < 1:
            raise ValueError("max_step_tokens must be at least 1")
        install_packed_attention(model)
        self.model, self.pool, self.choose, self.max_step_tokens = model, pool, choose, max_step_tokens
        self.device = next(model.parameters()).device
        self.stats = RunnerStats()
        self._cache_kwarg = cache_kwarg(model)
        self._pending: dict[_Work, None] = {}  # items with tokens to feed, in arrival order
        self._choosing: list[_Work] = []  # span items whose next choice reads logits they already hold
        self._in_flight: set[int] = set()
        self._wakeup = threading.Condition()
        self._closed = False
        self._paused = 0
        self._threads = threads
        self._thread = threading.Thread(target=self._loop, name="batched-runner", daemon=True)
        self._thread.start()

    # --- callers --------------------------------------------------------------------------------

    def submit(self, slot: int, start: int, tokens: list[int], *, all_logits: bool = False,
               hidden: bool = False) -> Future:
        """Feed `tokens` at positions start.. of `slot`; what the slot held past `start` is dropped.
        The Future's result is a ForwardResult; the slot's length is start + len(tokens) afterwards."""
        if not tokens:
            raise ValueError("a forward needs at least one token")
        return self._enqueue(_Work(slot, start, list(tokens), all_logits, hidden))

    def forward(self, slot: int, start: int, tokens: list[int], *, all_logits: bool = False,
                hidden: bool = False) -> ForwardResult:
        """submit() and wait: blocks the calling thread while its tokens ride in a shared forward."""
        return self.submit(slot, start, tokens, all_logits=all_logits, hidden=hidden).result()

    def submit_span(self, slot: int, start: int, tokens: list[int], run: SpanRun, *, all_logits: bool = False
                    ) -> Future:
        """Feed `tokens` (none: choose from run.logits, which the slot's end produced), then decode the
        span in the loop. The Future's result is the SpanRun, its builder's span ended."""
        if not self.choose:
            raise ValueError("this runner has no choose function: it runs plain forwards only")
        if not tokens and run.logits is None:
            raise ValueError("a span with no tokens to feed needs the logits of the slot's end")
        return self._enqueue(_Work(slot, start, list(tokens), all_logits, run.return_hidden, span=run))

    @contextmanager
    def paused(self):
        """Hold the loop (after its current step) so that items submitted meanwhile share the next step."""
        with self._wakeup:
            self._paused += 1
        try:
            yield
        finally:
            with self._wakeup:
                self._paused -= 1
                self._wakeup.notify()

    def close(self) -> None:
        """Stop the loop; items not yet run fail with RuntimeError."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join()
        for item in [*self._pending, *self._choosing]:
            item.future.set_exception(RuntimeError("the batched runner was closed"))
        self._pending.clear()
        self._choosing.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _enqueue(self, item: _Work) -> Future:
        self._check(item.slot, item.start, item.tokens)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the batched runner is closed")
            if item.slot in self._in_flight:
                raise ValueError(f"slot {item.slot} already has a forward in flight")
            self._in_flight.add(item.slot)
            self.pool.lengths[item.slot] = item.start  # feeding from `start` is also the rollback to it
            if item.tokens:
                self._pending[item] = None
            else:
                self._choosing.append(item)
            self._wakeup.notify()
        return item.future

    def _check(self, slot: int, start: int, tokens: list[int]) -> None:
        if not self.pool.is_allocated(slot):
            raise ValueError(f"KV slot {slot} is not allocated")
        if not 0 <= start <= self.pool.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.pool.lengths[slot]} tokens; cannot feed from position {start}")
        if start + len(tokens) > self.pool.max_context:
            raise ValueError(f"{start + len(tokens)} tokens exceed the pool's context of {self.pool.max_context}")

    # --- the step loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        if self._threads:  # per thread: the forwards run here (a thread's OpenMP team is its own)
            torch.set_num_threads(self._threads)
        while True:
            step, choosing = self._schedule()
            if step is None:
                return
            began = time.perf_counter()
            try:
                output = self._run(step) if step else None
                self._postprocess(step, output, choosing)
            except BaseException as e:  # a failed step fails its items, never the loop
                self._fail([item for item, _ in step] + choosing, e)
            self.stats.busy_s += time.perf_counter() - began

    def _schedule(self) -> tuple[list[tuple[_Work, int]] | None, list[_Work]]:
        """Wait for work, then pick this step's items and how many tokens of each (None: closed), and
        the span items that choose from logits they hold.

        Decode tokens first (one each, latency-bound), then prefill chunks in arrival order fill the
        rest of the token budget; a prefill that does not fit is cut, and continues next step.
        """
        with self._wakeup:
            while (self._paused or not (self._pending or self._choosing)) and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None, []
            budget, step = self.max_step_tokens, []
            for item in sorted(self._pending, key=lambda w: w.remaining > 1):  # stable: FIFO within each kind
                if budget == 0:
                    break
                count = min(item.remaining, budget)
                step.append((item, count))
                budget -= count
            choosing, self._choosing = self._choosing, []
            return step, choosing

    def _run(self, step: list[tuple[_Work, int]]):
        """ONE forward of the packed batch; logits only for the rows somebody reads."""
        segments, ids, rows, offset = [], [], [], 0
        # Single tokens first and in slot order: neighbouring slots then sit at consecutive rows, and
        # their attention reads the query as a view.
        step.sort(key=lambda pair: (pair[1] > 1, pair[0].slot if pair[1] == 1 else 0))
        for item, count in step:
            segments.append(Segment(item.slot, item.start + item.fed, count, offset))
            ids.extend(item.tokens[item.fed:item.fed + count])
            if item.all_logits:
                rows.extend(range(offset, offset + count))
            elif count == item.remaining:
                rows.append(offset + count - 1)
            offset += count
        want_hidden = any(item.hidden and count == item.remaining for item, count in step)
        began = time.perf_counter()
        for item, _ in step:
            item.first_step = item.first_step or began
            item.steps += 1
            if item.span is not None:
                item.span.first_step = item.span.first_step or began
                item.span.steps += 1
        output = packed_forward(self.model, self.pool, segments, ids, rows, hidden=want_hidden,
                                cache_arg=self._cache_kwarg)
        self.stats.forward_s += time.perf_counter() - began
        return output

    def _postprocess(self, step, output, choosing: list[_Work]) -> None:
        """Advance each item; a plain item that is done gets its logits, a span item that is done
        feeding chooses its next token (with the items in `choosing`, in one call)."""
        if step:
            logits, hidden = output
            self.stats.steps += 1
        logit_row = token_row = 0
        for item, count in step:
            self.stats.tokens += count
            token_row += count
            finishes = count == item.remaining
            kept = count if item.all_logits else int(finishes)
            if kept:
                item.logits_parts.append(logits[logit_row:logit_row + kept])
            logit_row += kept
            item.fed += count
            self.pool.lengths[item.slot] = item.start + item.fed
            if not finishes:
                continue
            last_hidden = hidden[token_row - 1] if item.hidden else None
            if item.span is None:
                self._finish(item, result=ForwardResult(torch.cat(item.logits_parts), _copy(last_hidden),
                                                        item.first_step - item.submitted))
            else:
                self._fed(item, last_hidden)
                choosing.append(item)
                with self._wakeup:
                    del self._pending[item]
        self._decode(choosing)

    def _fed(self, item: _Work, last_hidden) -> None:
        """A span item's tokens are in the cache: its next choice reads the logits after the last one."""
        run = item.span
        run.logits, run.hidden = item.logits_parts[-1][-1], last_hidden
        if not run.prefilled:
            run.prefilled = time.perf_counter()
            if item.all_logits:
                run.prefill_logits = torch.cat(item.logits_parts)
        item.logits_parts.clear()

    def _decode(self, items: list[_Work]) -> None:
        """One choice for each span item, chosen together; each span goes on (its token is fed next
        step) or ends."""
        live = []
        for item in items:
            run = item.span
            if not run.opened:
                run.opened = True
                if not run.builder.open():
                    self._end(item)
                    continue
            if run.cancelled.is_set():
                self._end(item)
            else:
                live.append(item)
        if not live:
            return
        now = time.perf_counter()
        choice = self.choose(torch.stack([item.span.logits for item in live]), [i.span for i in live])
        requeue = []
        for n, item in enumerate(live):
            run, token = item.span, choice.tokens[n]
            run.first_token = run.first_token or now
            hidden = (lambda h=run.hidden: float_bytes(h)) if run.return_hidden else None
            if not run.builder.offer(token, choice.entropies[n], hidden, choice.logprobs[n], choice.distributions[n]):
                self._end(item)
                continue
            try:
                run.reserve()
            except Exception as e:  # noqa: BLE001 - no room left for the token: the caller hears why
                self._finish(item, error=e)
                continue
            item.start, item.tokens, item.fed = item.start + item.fed, [token], 0
            requeue.append(item)
        if requeue:
            with self._wakeup:
                self._pending.update(dict.fromkeys(requeue))

    def _end(self, item: _Work) -> None:
        run = item.span
        if run.cancelled.is_set():
            run.builder.fresh = False  # the logits it holds may not be the cache end's
        if run.builder.fresh and run.logits is not None:  # kept by the session: not a view of a whole step
            run.logits = run.logits.clone()
            run.hidden = _copy(run.hidden)
        self._finish(item, result=run)

    def _fail(self, items: list[_Work], error: BaseException) -> None:
        for item in items:
            if not item.future.done():
                self._finish(item, error=error)

    def _finish(self, item: _Work, *, result=None, error=None) -> None:
        with self._wakeup:
            self._pending.pop(item, None)
            self._in_flight.discard(item.slot)
        if error is None:
            item.future.set_result(result)
        else:
            item.future.set_exception(error)


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


@torch.inference_mode()
def packed_forward(model, pool: KVPool, segments: list[Segment], token_ids: list[int], logits_rows: list[int], *,
                   hidden: bool = False, cache_arg: str | None = None):
    """One forward of a packed batch (the model must have install_packed_attention() applied).

    Writes every token's keys/values into the pool at (segment slot, position); returns the logits
    of `logits_rows` of the packed sequence [len(logits_rows), V], and with `hidden` the final hidden
    state of every packed row [T, hidden_size] (else None). The pool's lengths are left to the caller.
    """
    device = next(model.parameters()).device
    batch = PackedBatch(segments, device)
    if batch.total != len(token_ids):
        raise ValueError(f"segments cover {batch.total} tokens, {len(token_ids)} given")
    out = model(input_ids=torch.tensor([token_ids], device=device), position_ids=batch.position_ids,
                attention_mask=batch.mask_placeholder, use_cache=True,
                logits_to_keep=torch.tensor(logits_rows, dtype=torch.long, device=device),
                output_hidden_states=hidden,
                **{cache_arg or cache_kwarg(model): PackedCache(pool, batch), BATCH_KWARG: batch})
    if batch.layers_written != len(pool.keys):
        raise RuntimeError(f"the model wrote {batch.layers_written} of {len(pool.keys)} layers into the pool: "
                           "it does not call cache.update() on every layer")
    return out.logits[0], out.hidden_states[-1][0] if hidden else None
