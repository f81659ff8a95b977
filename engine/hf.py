"""The hf backend: transformers + PyTorch, batched steps over one KV pool, exact rollback.

Every session owns a slot of the engine's KV pool (engine/kv_pool.py); its span loop runs on the
calling thread, one token at a time, but each forward it needs rides in the step the BatchedRunner
(engine/scheduler.py) runs over all sessions that have work: concurrent spans share forwards.
"""

import logging
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from rstitch.v1 import engine_pb2 as pb

from . import checkpoints, latency, telemetry
from .backend import Engine
from .checkpoints import kv_bytes_per_token, torch_dtype
from .entropy import greedy_with_entropy
from .errors import CacheMismatch
from .kv_pool import KVPool, cache_kwarg
from .scheduler import BatchedRunner
from .sessions import Session
from .span import judge

log = logging.getLogger(__name__)


@dataclass
class CacheState:
    slot: int  # the session's slot of the KV pool
    # The next-token distribution at the cache's end, kept while nothing after it was chosen
    # (a gated stop, or a prefill with max_tokens = 0), so that Decode can continue from it.
    next_logits: torch.Tensor | None = None
    next_hidden: torch.Tensor | None = None


class SpanClock:
    """One call's timings (perf_counter seconds), and its trace spans: the wait for the model before
    the first forward, the prefill forward, the span decode."""

    def __init__(self):
        self.start = time.perf_counter()
        self.queue = 0.0
        self.forwards = 0
        self.first_wait = (self.start, self.start)  # (waiting since, got the model) before the first forward
        self.first_token = 0.0  # seconds into the call when its first token was chosen

    def token_chosen(self) -> None:
        if not self.first_token:
            self.first_token = time.perf_counter() - self.start

    def trace(self, name: str, start: float, end: float, **attributes) -> None:
        if telemetry.tracing_enabled():
            to_ns = time.time_ns() - time.perf_counter_ns()
            telemetry.record_span(name, int(start * 1e9) + to_ns, int(end * 1e9) + to_ns, **attributes)

    def timings(self) -> pb.Timings:
        total = time.perf_counter() - self.start
        return pb.Timings(queue_ms=self.queue * 1e3, forward_ms=(total - self.queue) * 1e3, forwards=self.forwards,
                          first_token_ms=self.first_token * 1e3)


class HFEngine(Engine):
    backend = "hf"

    def __init__(self, model_path, *, role: str, device: str = "cpu", dtype: str = "float32",
                 kv_budget_mb: float = 1024, max_context: int | None = None, model_id: str | None = None,
                 max_sessions: int = 0, max_calls: int = 64):
        self.tokenizer = checkpoints.load_tokenizer(model_path)
        self.model = checkpoints.load_model(model_path, torch_dtype(dtype), device)
        self.device, self.dtype = device, dtype
        self.model_id = model_id or str(model_path)
        _check_rollback_support(self.model, str(model_path))
        vocab = checkpoints.served_vocabulary(self.tokenizer, self.model.generation_config,
                                              _output_rows(self.model, device), str(model_path))
        config = self.model.config.get_text_config()
        context = config.max_position_embeddings
        if max_context:
            context = min(context, max_context)
        self.kv_bytes_per_token = kv_bytes_per_token(config, self.model.dtype)
        super().__init__(role=role, vocab_size=vocab.size, max_context=context,
                         kv_capacity_tokens=int(kv_budget_mb * 2**20 // self.kv_bytes_per_token),
                         max_sessions=max_sessions, max_calls=max_calls)
        self.hidden_size = config.hidden_size
        self.latency_model = latency.stored_proto(model_path, self.backend, device, dtype)
        self.eos_token_ids = vocab.eos_token_ids
        self.fingerprint = checkpoints.tokenizer_fingerprint(self.tokenizer, vocab.size)
        self._tokenizer_files = checkpoints.tokenizer_files(self.tokenizer)
        self.pool = KVPool.for_model(self.model, budget_tokens=self.sessions.capacity, max_context=context)
        self.runner = BatchedRunner(self.model, self.pool)
        # One slot per session: past the pool's slots the least recently used idle session is evicted.
        self.sessions.max_sessions = min(max_sessions or self.pool.slots, self.pool.slots)
        self.sessions.on_remove = self._free_slot
        log.info("%s engine: %s on %s/%s, vocab %d, context %d, KV budget %d tokens (%d B/token) in %d slots",
                 role, self.model_id, device, dtype, self.vocab_size, self.max_context, self.sessions.capacity,
                 self.kv_bytes_per_token, self.pool.slots)

    def _forward(self, session: Session, tokens: list[int], clock: SpanClock, *, all_positions=False, hidden=False):
        """Feed `tokens` at the session's end, in whichever step the runner takes them into; the
        logits after each (all_positions) or after the last, and the last hidden state if asked."""
        self.sessions.grow(session, len(tokens))
        if session.state is None:
            session.state = CacheState(self.pool.allocate())
        submitted = time.perf_counter()
        result = self.runner.forward(session.state.slot, session.length - len(tokens), tokens,
                                     all_logits=all_positions, hidden=hidden)
        clock.queue += result.queued_s  # waiting for a step to take the tokens in (other sessions' forwards)
        if clock.forwards == 0:
            clock.first_wait = (submitted, submitted + result.queued_s)
            clock.trace("engine.queue", *clock.first_wait)
        clock.forwards += 1
        return result.logits, result.hidden

    def _free_slot(self, session: Session) -> None:
        if session.state is not None:
            self.pool.free(session.state.slot)

    def _span(self, session, tokens, rule, verify, on_token):
        clock = SpanClock()
        greedy = ([], [])
        if tokens:
            logits, hidden = self._forward(session, tokens, clock, all_positions=verify, hidden=rule.return_hidden)
            clock.trace("engine.prefill", clock.first_wait[1], time.perf_counter(), **{"rstitch.tokens": len(tokens)})
            if verify:
                greedy = greedy_with_entropy(logits, self.vocab_size)
            logits = logits[-1]
        elif session.length == 0:
            raise CacheMismatch(f"session {session.id!r} holds no tokens (rolled back to 0): Prefill its tokens "
                                "before decoding", cache_len=0)
        elif session.state is None or session.state.next_logits is None:
            raise CacheMismatch(
                f"session {session.id!r}: no next-token distribution is kept at the cache's end "
                f"({session.length} tokens); send the last token again with Prefill",
                cache_len=session.length,
            )
        else:
            logits, hidden = session.state.next_logits, session.state.next_hidden
        span = pb.Span()
        decoding = time.perf_counter()
        fresh = True  # logits belong to the cache's end (no committed token waits to be fed)
        while True:
            if rule.max_tokens == 0:
                span.stop_reason = pb.STOP_REASON_MAX_TOKENS
                break
            if session.length >= self.max_context:
                span.stop_reason = pb.STOP_REASON_CONTEXT_FULL
                break
            [token], [entropy] = greedy_with_entropy(logits, self.vocab_size)
            clock.token_chosen()
            commit, reason = judge(rule, len(span.token_ids), token, entropy)
            if not commit:
                span.candidate.CopyFrom(pb.Candidate(token_id=token, entropy=entropy, hidden=_float_bytes(hidden)))
                span.stop_reason = reason
                break
            span.token_ids.append(token)
            span.entropies.append(entropy)
            on_token(token, entropy)
            fresh = False
            if reason is not None:
                span.stop_reason = reason
                break
            if session.length + 1 >= self.max_context:
                span.stop_reason = pb.STOP_REASON_CONTEXT_FULL
                break
            logits, hidden = self._forward(session, [token], clock, hidden=rule.return_hidden)
            logits = logits[-1]
            fresh = True
        session.state.next_logits, session.state.next_hidden = (logits, hidden) if fresh else (None, None)
        span.cache_len = session.length
        span.timings.CopyFrom(clock.timings())
        clock.trace("engine.decode", decoding, time.perf_counter(), **{
            "rstitch.tokens": len(span.token_ids), "rstitch.forwards": span.timings.forwards,
            "rstitch.stop_reason": pb.StopReason.Name(span.stop_reason).removeprefix("STOP_REASON_").lower(),
            "rstitch.queue_ms": span.timings.queue_ms})
        return span, greedy

    def _truncate(self, session, length):
        if length == 0:
            self._free_slot(session)
            session.state = None
            return
        self.pool.truncate(session.state.slot, length)  # exact: later writes overwrite what lay past it
        session.state.next_logits = session.state.next_hidden = None

    def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            model_id=self.model_id, role=self.role, vocab_size=self.vocab_size,
            tokenizer_fingerprint=self.fingerprint, max_context=self.max_context,
            kv_capacity_tokens=self.sessions.capacity, kv_used_tokens=self.sessions.used,
            sessions=len(self.sessions), kv_evictions=self.sessions.evictions, eos_token_ids=self.eos_token_ids,
            backend=self.backend,
            device=self.device, dtype=self.dtype, hidden_size=self.hidden_size, latency_model=self.latency_model,
        )

    def tokenizer_files(self) -> pb.GetTokenizerResponse:
        return pb.GetTokenizerResponse(files=self._tokenizer_files, fingerprint=self.fingerprint)


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


def _float_bytes(hidden: torch.Tensor | None) -> bytes:
    return b"" if hidden is None else hidden.float().cpu().numpy().astype("<f4").tobytes()
