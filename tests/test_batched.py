"""The batched model runner (engine.kv_pool + engine.scheduler) against plain transformers forwards.

Every check compares a packed step over the KV pool with an unbatched reference on a separate copy
of the same weights (default attention, DynamicCache): logits within float32 tolerance with the same
argmax, greedy tokens exactly equal to generate(), exact rollback, the hidden state the router reads.

Float tolerance: atol 1e-4, or three times the float32 reference's own error against the same forward
in float64 where that is larger. The tiny random pair (initializer range 0.5, so that it has confident
and uncertain tokens) amplifies rounding: transformers' own float32 forwards differ from float64 by up
to ~7e-4 in its logits, and from each other (full vs incremental prefill) by ~2e-4. The trained pair and
the other models here stay near 1e-5, so for them the bound is the plain 1e-4.
"""

import threading

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from engine.default_models import build_tokenizer, default_model_path, tiny_model_path, trained_models_dir
from engine.kv_pool import KVPool, UnsupportedModel
from engine.scheduler import BatchedRunner

ATOL, RTOL = 1e-4, 1e-5
SMALL = dict(vocab_size=103, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=None,
             initializer_range=0.2)


def _built(config_class, **extra):
    def make():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config_class(**SMALL, **extra)).eval()
    return make


def _loaded(path):
    return lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


MODELS = {
    "tiny-slm": _loaded(tiny_model_path("slm")),
    "tiny-llm": _loaded(tiny_model_path("llm")),
    "llama": _built(transformers.LlamaConfig),
    # Sliding windows shorter than the sequences below, so the window really cuts keys off.
    "qwen2-sliding": _built(transformers.Qwen2Config, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "mistral-sliding": _built(transformers.MistralConfig, sliding_window=6),
}
if (trained_models_dir() / "rstitch-llm" / "config.json").exists():
    MODELS["trained-llm"] = _loaded(default_model_path("llm"))
    MODELS["trained-slm"] = _loaded(default_model_path("slm"))


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """(runner model, reference model, float64 reference): the same weights three times, so the
    references keep transformers' own attention and never see the packed one."""
    make = MODELS[request.param]
    return make(), make(), make().double()


@pytest.fixture
def runner(pair):
    pool = KVPool.for_model(pair[0], budget_tokens=16 * 128, max_context=128)
    with BatchedRunner(pair[0], pool, max_step_tokens=64) as r:
        yield r


def _tokens(n, seed):
    return torch.randint(5, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _plain(model, prefix, new):
    """Logits [len(new), V] and final hidden states of `new` fed after `prefix` into a DynamicCache."""
    cache = DynamicCache(config=model.config)
    if prefix:
        model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
    out = model(input_ids=torch.tensor([new]), cache=cache, use_cache=True, output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


def _assert_logits_match(got, pair, prefix, new, *, rows=slice(None)):
    """got [n, V] against the plain forward of `new` after `prefix`; returns the reference hidden states."""
    want, want_hidden = _plain(pair[1], prefix, new)
    exact = _plain(pair[2], prefix, new)[0][rows]
    want = want[rows]
    tolerance = max(ATOL, 3 * (want.double() - exact).abs().max().item())
    assert (got - want).abs().max().item() <= tolerance
    assert (got.double() - exact).abs().max().item() <= tolerance
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    return want_hidden


def _fill(runner, slot, tokens):
    if tokens:
        runner.forward(slot, 0, tokens)


# (prefix length, new tokens): prefill chunks, decode tokens, a fresh session, one past the step budget.
MIXED_STEP = [(0, 9), (7, 1), (30, 5), (11, 1), (0, 1), (20, 1), (3, 70)]
# Their slots: the decodes sit at 0, 2, 6 (one shared attention call with idle rows between) and 15
# (too far: a call of its own), as sessions come and go.
MIXED_SLOTS = [1, 0, 4, 2, 15, 6, 5]


def test_mixed_step_matches_unbatched_forwards(pair, runner):
    """(a) + (d): sessions at different lengths, prefill chunks and decode tokens in the same
    forwards (a 70-token prefill is chunked across steps), against one plain forward each."""
    assert [runner.pool.allocate() for _ in range(runner.pool.slots)] == list(range(runner.pool.slots))
    for slot in set(range(runner.pool.slots)) - set(MIXED_SLOTS):
        runner.pool.free(slot)
    slots = MIXED_SLOTS
    cases = [(_tokens(p, 10 + i), _tokens(n, 50 + i)) for i, (p, n) in enumerate(MIXED_STEP)]
    for slot, (prefix, _) in zip(slots, cases):
        _fill(runner, slot, prefix)
    steps = runner.stats.steps
    with runner.paused():
        futures = [runner.submit(slot, len(prefix), new, all_logits=True, hidden=True)
                   for slot, (prefix, new) in zip(slots, cases)]
    results = [f.result() for f in futures]
    # 64 tokens a step: everything but the long prefill's tail fits in the first.
    assert runner.stats.steps - steps == 2
    for slot, (prefix, new), result in zip(slots, cases, results):
        want_hidden = _assert_logits_match(result.logits, pair, prefix, new)
        torch.testing.assert_close(result.hidden, want_hidden[-1], atol=ATOL, rtol=RTOL)
        assert runner.pool.lengths[slot] == len(prefix) + len(new)


def test_last_logits_only_by_default(pair, runner):
    slot = runner.pool.allocate()
    prompt = _tokens(12, 3)
    result = runner.forward(slot, 0, prompt)
    assert result.logits.shape[0] == 1 and result.hidden is None
    _assert_logits_match(result.logits, pair, [], prompt, rows=slice(-1, None))


def test_chunked_prefill_and_unbatched_calls_on_the_same_model(pair):
    """A prefill over several steps (some with no logits to compute at all); and the runner's model
    still answers plain DynamicCache forwards exactly as transformers' sdpa does."""
    model = pair[0]
    prompt = _tokens(23, 5)
    with BatchedRunner(model, KVPool.for_model(model, budget_tokens=128, max_context=128), max_step_tokens=5) as r:
        result = r.forward(r.pool.allocate(), 0, prompt, hidden=True)
        assert r.stats.steps == 5
    want_hidden = _assert_logits_match(result.logits, pair, [], prompt, rows=slice(-1, None))
    torch.testing.assert_close(result.hidden, want_hidden[-1], atol=ATOL, rtol=RTOL)
    assert torch.equal(_plain(model, prompt[:9], prompt[9:])[0], _plain(pair[1], prompt[:9], prompt[9:])[0])


def _greedy(runner, slot, prompt, steps, eos):
    logits = runner.forward(slot, 0, prompt).logits
    out = []
    for _ in range(steps):
        token = int(logits[-1].argmax())
        out.append(token)
        if token == eos:
            break
        logits = runner.forward(slot, len(prompt) + len(out) - 1, [token]).logits
    return out


def test_concurrent_greedy_equals_generate(pair, runner):
    """(b) 8 threads decode 8 prompts through one runner; each gets exactly generate()'s tokens alone."""
    reference = pair[1]
    tokenizer = build_tokenizer()
    texts = ["(69*4-13)*3", "12+7", "x", "(5+5)*9-1", "hello there", "99-98", "7*8", "3*(4+5)-2"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for t in texts]
    eos = tokenizer.eos_token_id
    results: dict[int, list[int]] = {}

    def decode(i):
        slot = runner.pool.allocate()
        results[i] = _greedy(runner, slot, prompts[i], 24, eos)

    steps = runner.stats.steps
    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            want = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                                      eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
        assert results[i] == want, f"prompt {texts[i]!r}"
    fed = sum(len(prompt) + len(results[i]) - 1 for i, prompt in enumerate(prompts))
    assert runner.stats.steps - steps < fed / 2, "the threads' forwards were not batched"


def test_rollback_is_exact(pair, runner):
    """(c) Feeding from an earlier position (or after pool.truncate) equals never having fed the rest."""
    prompt, dropped, fresh = _tokens(15, 1), _tokens(10, 2), _tokens(4, 3)
    slot = runner.pool.allocate()
    runner.forward(slot, 0, prompt + dropped)
    keep = len(prompt) + 3
    got = runner.forward(slot, keep, fresh, all_logits=True)
    _assert_logits_match(got.logits, pair, prompt + dropped[:3], fresh)

    runner.pool.truncate(slot, len(prompt))
    got = runner.forward(slot, runner.pool.lengths[slot], fresh[:1], hidden=True)
    want_hidden = _assert_logits_match(got.logits, pair, prompt, fresh[:1])
    torch.testing.assert_close(got.hidden, want_hidden[-1], atol=ATOL, rtol=RTOL)


def test_sliding_window_cuts_keys():
    """The sliding-window models above would pass vacuously if the window never mattered."""
    windowed, full = MODELS["mistral-sliding"](), _built(transformers.MistralConfig, sliding_window=None)()
    full.load_state_dict(windowed.state_dict())
    tokens = _tokens(20, 4)
    assert not torch.allclose(_plain(windowed, [], tokens)[0][-1], _plain(full, [], tokens)[0][-1], atol=1e-3)


def test_bad_calls_are_refused():
    model = MODELS["tiny-slm"]()
    pool = KVPool.for_model(model, budget_tokens=2 * 64, max_context=64)
    with BatchedRunner(model, pool) as runner:
        slot = pool.allocate()
        with pytest.raises(ValueError, match="not allocated"):
            runner.forward(1, 0, [5])
        with pytest.raises(ValueError, match="cannot feed from position 3"):
            runner.forward(slot, 3, [5])
        with pytest.raises(ValueError, match="exceed the pool's context"):
            runner.forward(slot, 0, [5] * 65)
        with runner.paused():
            runner.submit(slot, 0, [5, 6])
            with pytest.raises(ValueError, match="already has a forward in flight"):
                runner.submit(slot, 0, [7])
        pool.allocate()
        with pytest.raises(Exception, match="all 2 KV slots"):
            pool.allocate()


def test_softcapping_model_is_refused():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**{**SMALL, "num_hidden_layers": 2}, head_dim=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedModel, match="softcapping"):
        BatchedRunner(model, KVPool.for_model(model, budget_tokens=128))
