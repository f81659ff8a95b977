"""Checkpoints users bring: a matrix of tiny random checkpoints, each of which either serves exactly or is
refused at start-up with one clear line.

Serving means: Info reports the served vocabulary (what both the tokenizer and the output layer cover)
and the EOS ids inside it; LLM-only and SLM-only equal transformers' own greedy `generate` token for
token (padding rows suppressed, EOS alike); tau = 0 is the LLM, tau = 1 the SLM, speculative decoding
the LLM (which rolls both caches back); and a rollback past a sliding window is exact. Each row is a
pair (an SLM of one layer, an LLM of two, different seeds) sharing one tokenizer.
"""

import subprocess
import sys
from dataclasses import dataclass, field, replace

import grpc
import pytest
import torch

from common.errors import InvalidRequest
from engine.default_models import build_tokenizer
from engine.hf import HFEngine
from orchestrator.engine_client import LocalEngineClient
from orchestrator.policies import LLM, SLM
from orchestrator.service import Orchestrator, RequestError
from orchestrator.store import MemorySessionStore
from rstitch.v1 import engine_pb2 as epb
from rstitch.v1 import orchestrator_pb2 as opb

from .conftest import make_engine
from .test_stitching import MAX_NEW, run

PROMPT = "The sky is blue because"  # longer than the sliding windows below
TOKENIZER_IDS = len(build_tokenizer())  # 103
EOS = build_tokenizer().eos_token_id
ATTENTION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


@dataclass(frozen=True)
class Row:
    """How to build one tiny checkpoint pair of the matrix."""

    model_type: str
    shape: dict = field(default_factory=lambda: dict(ATTENTION))
    tied: bool = True
    output_rows: int = TOKENIZER_IDS  # rows of the output layer
    extra_tokens: tuple[str, ...] = ()  # special tokens added to the tokenizer (past the output layer)
    chat_template: bool = True
    eos: bool = True  # the tokenizer's and the config's EOS; False: none anywhere
    config_eos: tuple[int, ...] = (EOS,)  # the config's and generation config's EOS ids
    weights_dtype: torch.dtype = torch.float32
    engine_dtype: str = "float32"
    # Large weights give peaked, varied distributions (confident and uncertain tokens alike).
    init_range: float = 0.5


GPT2 = dict(n_embd=32, n_inner=64, n_head=2)
SLIDING = dict(ATTENTION, sliding_window=6)  # prompts are longer: the window drops tokens
SERVED = {
    "llama-untied": Row("llama", tied=False),
    "qwen2-tied": Row("qwen2"),
    "qwen2-sliding": Row("qwen2", shape=dict(SLIDING, use_sliding_window=True, max_window_layers=0)),
    "qwen3-untied": Row("qwen3", shape=dict(ATTENTION, head_dim=16), tied=False),
    "mistral-sliding": Row("mistral", shape=SLIDING, tied=False),
    "gemma": Row("gemma", shape=dict(ATTENTION, head_dim=16)),
    "gpt2": Row("gpt2", shape=GPT2),
    "phi": Row("phi", shape=dict(ATTENTION, num_key_value_heads=2), tied=False),
    "phi3": Row("phi3", shape=ATTENTION, tied=False),
    "no-chat-template": Row("llama", chat_template=False),
    "no-eos": Row("qwen2", eos=False, config_eos=()),
    "bf16-weights": Row("llama", weights_dtype=torch.bfloat16),
    "bf16-served": Row("qwen2", weights_dtype=torch.bfloat16, engine_dtype="bfloat16"),
    "tokenizer-larger": Row("qwen2", extra_tokens=("<|tool|>",)),
    "tokenizer-smaller": Row("llama", tied=False, output_rows=128),
    "eos-outside-vocab": Row("qwen2", config_eos=(EOS, 200)),
}
# Every row serves the base tokenizer's 103 ids (tokenizer-larger: not its added 104th; tokenizer-smaller:
# not the output layer's 25 padding rows) with EOS [1] (eos-outside-vocab: not 200), except these.
EXPECTED_INFO = {"no-eos": (TOKENIZER_IDS, [])}


def build(row: Row, out, *, layers: int, seed: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(list(row.extra_tokens), special_tokens=True)
    if not row.chat_template:
        tokenizer.chat_template = None
    if not row.eos:
        tokenizer.eos_token = None
    eos = list(row.config_eos) or None
    names = {"n_layer": layers, "n_positions": 256} if row.model_type == "gpt2" else {
        "num_hidden_layers": layers, "max_position_embeddings": 256}
    config = AutoConfig.for_model(row.model_type, **row.shape, **names, vocab_size=row.output_rows,
                                  tie_word_embeddings=row.tied, initializer_range=row.init_range, eos_token_id=eos,
                                  bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Padding rows that would win the argmax if they were not masked out.
        model.get_output_embeddings().weight[TOKENIZER_IDS:] *= 8
    model.generation_config.eos_token_id = eos
    model.to(row.weights_dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Built lazily: {(row name, role): path}."""
    paths = {}

    def path(name: str, role: str, row: Row | None = None):
        if (name, role) not in paths:
            out = tmp_path_factory.mktemp(f"{name}-{role}")
            build(row or SERVED[name], out, layers=1 if role == "slm" else 2, seed=1 if role == "slm" else 2)
            paths[name, role] = out
        return paths[name, role]

    return path


def start(path, role: str, row: Row) -> HFEngine:
    return HFEngine(path, role=role, dtype=row.engine_dtype)


def generate(engine: HFEngine, prompt_ids: list[int], *, mask_padding: bool = True) -> list[int]:
    """transformers' own greedy generation over the served vocabulary (padding rows suppressed)."""
    rows = engine.model.config.get_text_config().vocab_size
    padding = list(range(engine.vocab_size, rows)) if mask_padding else []
    with torch.inference_mode():
        out = engine.model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                    eos_token_id=engine.eos_token_ids or None, pad_token_id=0,
                                    suppress_tokens=padding or None)
    return out[0, len(prompt_ids):].tolist()


def is_greedy(engine: HFEngine, prompt_ids: list[int], answer: list[int], row: Row) -> bool:
    """The answer is transformers' own greedy generation. In bfloat16 the batched attention sums in
    another order than transformers' and near-ties may fall the other way: there, each token must be
    the argmax of transformers' own logits over the answer so far, up to bfloat16 rounding."""
    if row.engine_dtype != "bfloat16":
        return answer == generate(engine, prompt_ids)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt_ids + answer])).logits[0, len(prompt_ids) - 1:-1]
    logits = logits[:, :engine.vocab_size].float()
    chosen = logits.gather(1, torch.tensor(answer)[:, None])[:, 0]
    return len(answer) > 0 and bool((logits.max(-1).values - chosen <= 0.1).all())


@pytest.mark.parametrize("name", SERVED)
def test_checkpoint_serves_with_the_invariants(checkpoints, name):
    row = SERVED[name]
    engines = {role: start(checkpoints(name, role), role, row) for role in ("slm", "llm")}
    vocab, eos = EXPECTED_INFO.get(name, (TOKENIZER_IDS, [EOS]))
    for served in engines.values():
        info = served.info()
        assert (info.vocab_size, list(info.eos_token_ids)) == (vocab, eos)
    orchestrator = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                                MemorySessionStore())
    session, llm_only, sources, _ = run(orchestrator, PROMPT, opb.POLICY_LLM)
    prompt_ids = list(session.prompt_token_ids)
    assert set(sources) == {LLM} and is_greedy(engines["llm"], prompt_ids, llm_only, row)
    session, slm_only, sources, _ = run(orchestrator, PROMPT, opb.POLICY_SLM)
    assert set(sources) == {SLM} and is_greedy(engines["slm"], prompt_ids, slm_only, row)

    _, stitched, sources, entropies = run(orchestrator, PROMPT, opb.POLICY_ENTROPY, tau=0.0)
    kept_by_slm = [i for i, s in enumerate(sources) if s == SLM]
    assert all(entropies[i] == 0.0 for i in kept_by_slm)  # the paper's rule keeps those even at tau = 0
    if not kept_by_slm:
        assert stitched == llm_only
    _, stitched, sources, _ = run(orchestrator, PROMPT, opb.POLICY_ENTROPY, tau=1.0)
    assert stitched == slm_only and set(sources) == {SLM}
    _, speculated, _, _ = run(orchestrator, PROMPT, opb.POLICY_SPEC)
    # Verifying k drafted tokens in one prefill rounds otherwise than k single-token decodes: in
    # bfloat16 a near-tie may then fall the other way.
    assert speculated == llm_only if row.engine_dtype != "bfloat16" else is_greedy(
        engines["llm"], prompt_ids, speculated, row)


@pytest.mark.parametrize("name", ["mistral-sliding", "qwen2-sliding", "gpt2", "phi"])
def test_rollback_is_exact_also_past_a_sliding_window(checkpoints, name):
    served = start(checkpoints(name, "llm"), "llm", SERVED[name])
    prompt = list(range(5, 17))  # twice the sliding window

    def prefill(sid, tokens, base=0, max_tokens=20):
        return served.prefill(epb.PrefillRequest(session_id=sid, base_len=base, token_ids=tokens,
                                                 rule=epb.SpanRule(max_tokens=max_tokens))).span

    whole = list(prefill("whole", prompt).token_ids)
    prefill("cut", prompt)
    keep = len(prompt) + 3
    assert served.rollback(epb.RollbackRequest(session_id="cut", length=keep)).cache_len == keep
    again = prefill("cut", [whole[3]], base=keep, max_tokens=10)
    assert list(again.token_ids) == whole[4:14]


def test_padding_rows_would_win_without_the_mask(checkpoints):
    """The tokenizer-smaller row's check has teeth: unmasked, transformers' greedy picks padding ids."""
    served = start(checkpoints("tokenizer-smaller", "llm"), "llm", SERVED["tokenizer-smaller"])
    unmasked = generate(served, list(range(5, 17)), mask_padding=False)
    assert any(t >= TOKENIZER_IDS for t in unmasked)


def test_ids_past_the_output_layer_are_invalid_argument(checkpoints):
    row = SERVED["tokenizer-larger"]
    engines = {role: start(checkpoints("tokenizer-larger", role), role, row) for role in ("slm", "llm")}
    extra = engines["llm"].tokenizer.convert_tokens_to_ids("<|tool|>")
    assert extra == TOKENIZER_IDS and len(engines["llm"].tokenizer) == TOKENIZER_IDS + 1
    with pytest.raises(InvalidRequest, match="outside the vocabulary of 103 tokens"):
        engines["llm"].prefill(epb.PrefillRequest(session_id="s", token_ids=[5, extra]))
    orchestrator = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]),
                                MemorySessionStore())
    for spec in (opb.GenerationSpec(token_ids=opb.TokenIds(token_ids=[5, extra])),
                 opb.GenerationSpec(text="call <|tool|> now", raw=True)):
        with pytest.raises(RequestError, match="outside the vocabulary") as refused:
            orchestrator.complete(spec)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_engines_serving_different_vocabularies_are_not_paired(checkpoints):
    """One tokenizer, output layers of 103 and 104 rows: the SLM could produce an id the LLM refuses."""
    wider = replace(SERVED["tokenizer-larger"], output_rows=TOKENIZER_IDS + 1)
    slm = start(checkpoints("tokenizer-larger-wider", "slm", wider), "slm", wider)
    llm = start(checkpoints("tokenizer-larger", "llm"), "llm", SERVED["tokenizer-larger"])
    assert (slm.vocab_size, llm.vocab_size) == (TOKENIZER_IDS + 1, TOKENIZER_IDS)
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        Orchestrator(LocalEngineClient(slm), LocalEngineClient(llm), MemorySessionStore())


def test_adjustments_are_logged_at_start_up(checkpoints, caplog):
    with caplog.at_level("WARNING", logger="engine.checkpoints"):
        start(checkpoints("tokenizer-larger", "llm"), "llm", SERVED["tokenizer-larger"])
        start(checkpoints("eos-outside-vocab", "llm"), "llm", SERVED["eos-outside-vocab"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("the tokenizer has 104 ids but the output layer only 103 rows" in m for m in messages)
    assert any("EOS id 200 from the generation config lies outside" in m for m in messages)


# --- refused at start-up ----------------------------------------------------------------------

def build_mamba(out) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    tokenizer = build_tokenizer()
    MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, state_size=4, vocab_size=len(tokenizer),
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    out = tmp_path_factory.mktemp("mamba")
    build_mamba(out)
    return out


def test_a_recurrent_model_is_refused(mamba):
    with pytest.raises(ValueError, match="mamba keeps state in LinearAttentionLayer cache layers, which cannot "
                                         "be rolled back"):
        HFEngine(mamba, role="llm")


def test_a_model_with_attention_softcapping_is_refused(checkpoints):
    """Gemma 2 caps its attention logits, which the batched engine's packed attention does not."""
    gemma2 = Row("gemma2", shape=dict(SLIDING, head_dim=16), init_range=0.02)
    with pytest.raises(ValueError, match="attention logit softcapping"):
        start(checkpoints("gemma2-softcap", "llm", gemma2), "llm", gemma2)


def test_a_hub_name_says_only_local_paths_are_served(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as refused:
        HFEngine("HuggingFaceTB/SmolLM2-135M-Instruct", role="llm")
    message = str(refused.value)
    assert "only local checkpoints are served" in message
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert "models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/" in message


def test_a_directory_without_config_is_refused(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        HFEngine(tmp_path, role="llm")


def test_the_service_refuses_a_recurrent_model_with_one_line(mamba):
    """A real start-up of the service process: exit status 1 and one line that says why, no traceback."""
    done = subprocess.run([sys.executable, "-m", "llm_service", "--model", str(mamba), "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("llm_service: cannot start the engine:") and "cannot be rolled back" in last


# --- the vllm backend -------------------------------------------------------------------------

# head_dim 32: vLLM's CPU attention has no kernel for 16.
VLLM_ATTENTION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("name", ["tokenizer-larger", "tokenizer-smaller"])
def test_vllm_serves_the_vocabulary_as_hf_does(checkpoints, name, monkeypatch):
    row = replace(SERVED[name], shape=VLLM_ATTENTION)
    path = checkpoints(f"vllm-{name}", "llm", row)
    served = make_engine("vllm", path, role="llm", kv_budget_mb=4)
    try:
        hf = HFEngine(path, role="llm")
        assert (served.info().vocab_size, list(served.info().eos_token_ids)) == (TOKENIZER_IDS, [EOS])
        assert served.info().tokenizer_fingerprint == hf.info().tokenizer_fingerprint
        prompt = list(range(5, 17))
        for backend in (served, hf):
            with pytest.raises(InvalidRequest, match="outside the vocabulary"):
                backend.prefill(epb.PrefillRequest(session_id="bad", token_ids=[5, TOKENIZER_IDS]))
        spans = [backend.prefill(epb.PrefillRequest(session_id="s", token_ids=prompt, verify=True,
                                                    rule=epb.SpanRule(max_tokens=MAX_NEW))) for backend in (served, hf)]
        assert list(spans[0].span.token_ids) == list(spans[1].span.token_ids)
        assert list(spans[0].greedy_token_ids) == list(spans[1].greedy_token_ids)
        assert spans[0].greedy_entropies == pytest.approx(list(spans[1].greedy_entropies), abs=1e-4)
        assert all(t < TOKENIZER_IDS for t in spans[0].span.token_ids)
        # As for a vocabulary too large for full prompt distributions: the top ids only, padding among them.
        monkeypatch.setattr("engine.vllm_backend.FULL_PROMPT_LOGPROBS_VOCAB", 0)
        top = served.prefill(epb.PrefillRequest(session_id="top", token_ids=prompt, verify=True))
        assert list(top.greedy_token_ids) == list(spans[1].greedy_token_ids)
    finally:
        served.close()
