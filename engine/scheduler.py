"""Batched steps: one thread runs one forward per step over the pending work of every session.

The loop follows nano-vllm's schedule -> run -> postprocess, with one difference that the engine
contract asks for: a step mixes prefill chunks and decode tokens of different sessions, because a
span's next token must not wait behind another session's long prefill.

Callers (one thread per engine call) submit a work item, a run of tokens to feed into a slot of the
pool, and block on its Future; the span loop in the engine stays per session (feed, read the last
logits, apply the rule, feed the chosen token), while the forwards it waits on are shared.
"""

import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .kv_pool import BATCH_KWARG, KVPool, PackedBatch, PackedCache, Segment, cache_kwarg, install_packed_attention

# Tokens per forward: bounds a step's latency (and its activations) when long prefills arrive;
# a longer prefill is fed in chunks over several steps.
DEFAULT_STEP_TOKENS = 512
# A caller that got its result in the last step is usually back within microseconds with its next
# token; starting the next forward without it halves the batch. Wait for such callers, but at most
# this share of a forward (and this long), since one whose span ended never comes back.
LINGER_FRACTION = 0.25
MAX_LINGER_S = 0.005


class ForwardResult(NamedTuple):
    logits: torch.Tensor  # [n, V] for all_logits, else [1, V]: the distribution after the last token
    hidden: torch.Tensor | None  # [hidden_size], the last token's final hidden state, when asked
    queued_s: float = 0.0  # from submit to the start of the first step that took its tokens in


@dataclass(eq=False)
class _Work:
    slot: int
    start: int
    tokens: list[int]
    all_logits: bool
    hidden: bool
    future: Future = field(default_factory=Future)
    fed: int = 0  # tokens already written into the pool by earlier steps
    submitted: float = field(default_factory=time.perf_counter)
    first_step: float | None = None  # when the first step that took some of its tokens began
    logits_parts: list = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.fed


@dataclass
class RunnerStats:
    steps: int = 0
    tokens: int = 0
    items: int = 0
    forward_s: float = 0.0
    linger_s: float = 0.0


class BatchedRunner:
    """Owns the model's forwards: `forward()` from any thread, batched with other threads' calls.

    One item in flight per slot (the span loop of a session waits for its forward before the next);
    different slots' items share forwards.
    """

    def __init__(self, model, pool: KVPool, *, max_step_tokens: int = DEFAULT_STEP_TOKENS):
        if max_step_tokens < 1:
            raise ValueError("max_step_tokens must be at least 1")
        install_packed_attention(model)
        self.model, self.pool, self.max_step_tokens = model, pool, max_step_tokens
        self.device = next(model.parameters()).device
        self.stats = RunnerStats()
        self._cache_kwarg = cache_kwarg(model)
        self._pending: deque[_Work] = deque()
        self._in_flight: set[int] = set()
        self._returning: set[int] = set()  # slots whose item finished in the last step
        self._last_forward_s = 0.0
        self._wakeup = threading.Condition()
        self._closed = False
        self._paused = 0
        self._thread = threading.Thread(target=self._loop, name="batched-runner", daemon=True)
        self._thread.start()

    # --- callers --------------------------------------------------------------------------------

    def submit(self, slot: int, start: int, tokens: list[int], *, all_logits: bool = False,
               hidden: bool = False) -> Future:
        """Feed `tokens` at positions start.. of `slot`; what the slot held past `start` is dropped.
        The Future's result is a ForwardResult; the slot's length is start + len(tokens) afterwards."""
        self._check(slot, start, tokens)
        item = _Work(slot, start, list(tokens), all_logits, hidden)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the batched runner is closed")
            if slot in self._in_flight:
                raise ValueError(f"slot {slot} already has a forward in flight")
            self._in_flight.add(slot)
            self.pool.lengths[slot] = start  # feeding from `start` is also the rollback to it
            self._pending.append(item)
            self._wakeup.notify()
        return item.future

    def forward(self, slot: int, start: int, tokens: list[int], *, all_logits: bool = False,
                hidden: bool = False) -> ForwardResult:
        """submit() and wait: blocks the calling thread while its tokens ride in a shared forward."""
        return self.submit(slot, start, tokens, all_logits=all_logits, hidden=hidden).result()

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
        for item in self._pending:
            item.future.set_exception(RuntimeError("the batched runner was closed"))
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, slot: int, start: int, tokens: list[int]) -> None:
        if not tokens:
            raise ValueError("a forward needs at least one token")
        if not self.pool.is_allocated(slot):
            raise ValueError(f"KV slot {slot} is not allocated")
        if not 0 <= start <= self.pool.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.pool.lengths[slot]} tokens; cannot feed from position {start}")
        if start + len(tokens) > self.pool.max_context:
            raise ValueError(f"{start + len(tokens)} tokens exceed the pool's context of {self.pool.max_context}")

    # --- the step loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            step = self._schedule()
            if step is None:
                return
            try:
                self._postprocess(step, self._run(step))
            except BaseException as e:  # a failed step fails its items, never the loop
                self._fail(step, e)

    def _schedule(self) -> list[tuple[_Work, int]] | None:
        """Wait for work, then pick this step's items and how many tokens of each (None: closed).

        Decode tokens first (one each, latency-bound), then prefill chunks in arrival order fill the
        rest of the token budget; a prefill that does not fit is cut, and continues next step.
        """
        with self._wakeup:
            while True:
                while (self._paused or not self._pending) and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return None
                self._await_returning_callers()
                if self._closed:
                    return None
                if not self._paused:  # paused while lingering: hold the step after all
                    break
            budget, step = self.max_step_tokens, []
            for item in sorted(self._pending, key=lambda w: w.remaining > 1):  # stable: FIFO within each kind
                if budget == 0:
                    break
                count = min(item.remaining, budget)
                step.append((item, count))
                budget -= count
            return step

    def _await_returning_callers(self) -> None:
        """Hold the step (under the lock, briefly) until last step's callers have resubmitted."""
        began = time.perf_counter()
        deadline = began + min(MAX_LINGER_S, LINGER_FRACTION * self._last_forward_s)
        while self._returning - self._in_flight and not self._closed and not self._paused:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wakeup.wait(left)
        self._returning.clear()
        self.stats.linger_s += time.perf_counter() - began

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
        output = packed_forward(self.model, self.pool, segments, ids, rows, hidden=want_hidden,
                                cache_arg=self._cache_kwarg)
        self._last_forward_s = time.perf_counter() - began
        self.stats.forward_s += self._last_forward_s
        return output

    def _postprocess(self, step, output) -> None:
        """Advance each item; hand a finished one its logits (and last hidden state) and free its slot."""
        logits, hidden = output
        logit_row = token_row = 0
        self.stats.steps += 1
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
            if finishes:
                last_hidden = hidden[token_row - 1].clone() if item.hidden else None
                self._finish(item, result=ForwardResult(torch.cat(item.logits_parts), last_hidden,
                                                        item.first_step - item.submitted))

    def _fail(self, step, error: BaseException) -> None:
        for item, _ in step:
            if not item.future.done():
                self._finish(item, error=error)

    def _finish(self, item: _Work, *, result=None, error=None) -> None:
        with self._wakeup:
            self._pending.remove(item)
            self._in_flight.discard(item.slot)
            if error is None:
                self._returning.add(item.slot)
            self.stats.items += 1
        if error is None:
            item.future.set_result(result)
        else:
            item.future.set_exception(error)


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
