"""The hf backend: transformers + PyTorch, one private DynamicCache per session, exact rollback."""

import logging
import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rstitch.v1 import engine_pb2 as pb

from . import checkpoints, latency, telemetry
from .backend import Engine
from .entropy import greedy_with_entropy
from .errors import CacheMismatch
from .sessions import Session
from .span import judge

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheState:
    cache: DynamicCache
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
        self.model = checkpoints.load_model(model_path, DTYPES[dtype], device)
        self.device, self.dtype = device, dtype
        self.model_id = model_id or str(model_path)
        config = self.model.config.get_text_config()
        context = config.max_position_embeddings
        if max_context:
            context = min(context, max_context)
        self.kv_bytes_per_token = _kv_bytes_per_token(config, self.model.dtype)
        super().__init__(role=role, vocab_size=len(self.tokenizer), max_context=context,
                         kv_capacity_tokens=int(kv_budget_mb * 2**20 // self.kv_bytes_per_token),
                         max_sessions=max_sessions, max_calls=max_calls)
        self.hidden_size = config.hidden_size
        self.latency_model = latency.stored_proto(model_path, self.backend, device, dtype)
        self.eos_token_ids = checkpoints.eos_token_ids(self.model, self.tokenizer)
        self.fingerprint = checkpoints.tokenizer_fingerprint(self.tokenizer)
        self._tokenizer_files = checkpoints.tokenizer_files(self.tokenizer)
        # One forward at a time: concurrent sessions interleave per forward pass, not per span.
        self._model_lock = threading.Lock()
        log.info("%s engine: %s on %s/%s, vocab %d, context %d, KV budget %d tokens (%d B/token)", role,
                 self.model_id, device, dtype, self.vocab_size, self.max_context, self.sessions.capacity,
                 self.kv_bytes_per_token)

    @torch.inference_mode()
    def _forward(self, session: Session, tokens: list[int], clock: SpanClock, *, all_positions=False, hidden=False):
        self.sessions.grow(session, len(tokens))
        if session.state is None:
            session.state = CacheState(DynamicCache(config=self.model.config))
        ids = torch.tensor([tokens], device=self.device)
        waited = time.perf_counter()
        with self._model_lock:
            got = time.perf_counter()
            out = self.model(input_ids=ids, cache=session.state.cache, use_cache=True,
                             logits_to_keep=0 if all_positions else 1, output_hidden_states=hidden)
        clock.queue += got - waited
        if clock.forwards == 0:
            clock.first_wait = (waited, got)
            clock.trace("engine.queue", waited, got)
        clock.forwards += 1
        last_hidden = out.hidden_states[-1][0, -1] if hidden else None
        return out.logits[0], last_hidden

    def _span(self, session, tokens, rule, verify):
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
        state = session.state
        if length == 0:
            session.state = None
            return
        state.cache.crop(length - session.length)  # transformers 5.24: a negative count removes tokens
        state.next_logits = state.next_hidden = None

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


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize


def _float_bytes(hidden: torch.Tensor | None) -> bytes:
    return b"" if hidden is None else hidden.float().cpu().numpy().astype("<f4").tobytes()
