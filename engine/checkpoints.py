"""Loading a checkpoint (a transformers directory or a .gguf file) and describing its tokenizer."""

import hashlib
import json
import tempfile
from pathlib import Path


def _from_pretrained_args(path: str | Path) -> tuple[str, dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    where, kwargs = _from_pretrained_args(path)
    return AutoTokenizer.from_pretrained(where, **kwargs)


def load_model(path: str | Path, dtype, device: str):
    from transformers import AutoModelForCausalLM

    where, kwargs = _from_pretrained_args(path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    return model.to(device).eval()


def tokenizer_fingerprint(tokenizer) -> str:
    """Two models can be stitched only if every token string maps to the same id in both."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
