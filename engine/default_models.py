"""The project's default model pair, and the tiny pair built in code that the tests use.

The default is the pair trained by `training/` and committed under models/ (RSTITCH_MODELS
overrides the folder); without it, the tiny pair. The tiny models are random-weight causal LMs
built from fixed seeds, sharing one character-level tokenizer with a chat template, so every path a
real checkpoint takes (save_pretrained / from_pretrained, chat template, EOS) is exercised. They are
built once into a cache directory (RSTITCH_HOME, default ~/.cache/rstitch) and loaded from there.
"""

import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Layer count sets the per-token cost on a CPU; the LLM is deeper and wider than the SLM.
SHAPES = {
    "slm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, seed=1),
    "llm": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, seed=2),
}
# A larger initializer than the usual 0.02 gives peaked, varied next-token distributions, so the
# untrained pair has both confident and uncertain tokens and the demo shows switches.
INIT_RANGE = 0.5
VERSION = 1


def home() -> Path:
    return Path(os.environ.get("RSTITCH_HOME", Path.home() / ".cache" / "rstitch"))


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(role: str, out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    shape = dict(SHAPES[role])
    torch.manual_seed(shape.pop("seed"))
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=INIT_RANGE, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, **shape,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def trained_models_dir() -> Path:
    return Path(os.environ.get("RSTITCH_MODELS", Path(__file__).resolve().parents[1] / "models"))


def default_model_path(role: str) -> Path:
    """The trained `role` model when the trained pair is there, else the tiny one."""
    trained = {r: trained_models_dir() / f"rstitch-{r}" for r in SHAPES}
    if all((path / "config.json").exists() for path in trained.values()):
        return trained[role]
    return tiny_model_path(role)


def default_router_path() -> Path:
    """The R-Stitch+ router trained for the trained pair (`python -m training.dapo`)."""
    return trained_models_dir() / "rstitch-router.safetensors"


def tiny_model_path(role: str) -> Path:
    """The directory of the tiny `role` model, building it on first use (atomically)."""
    tag = hashlib.sha256(json.dumps([VERSION, INIT_RANGE, SHAPES[role], CHAT_TEMPLATE]).encode()).hexdigest()[:10]
    path = home() / "models" / f"tiny-{role}-{tag}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tiny-{role}-"))
        try:
            build(role, tmp)
            os.replace(tmp, path)
        except OSError:
            if not path.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
