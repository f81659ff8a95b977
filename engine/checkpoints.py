"""Loading a checkpoint (a local transformers directory or .gguf file), and the vocabulary it serves."""

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# What a Hugging Face hub model name looks like ("owner/name"), as opposed to a local path.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Normalized entropy divides by log V: a vocabulary needs at least two ids.
MIN_VOCAB = 2


def _from_pretrained_args(path: str | Path) -> tuple[str, dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing_model_message(str(path)))
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {path} holds no config.json: point it at a checkpoint directory "
                                "(config.json, weights and tokenizer files) or a .gguf file")
    return str(path), {}


def missing_model_message(path: str) -> str:
    """Why a model path that does not exist cannot be served, and what to do instead."""
    if not HUB_NAME.fullmatch(path):
        return f"model path {path} does not exist"
    cache_name = "models--" + path.replace("/", "--")
    return (f"model path {path} does not exist; only local checkpoints are served (nothing is downloaded from "
            f"the Hugging Face hub): download it where there is network access, e.g. `hf download {path} "
            f"--local-dir DIR`, and point at DIR, or at a downloaded snapshot in a hub cache "
            f"(~/.cache/huggingface/hub/{cache_name}/snapshots/REVISION)")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    where, kwargs = _from_pretrained_args(path)
    return AutoTokenizer.from_pretrained(where, **kwargs)


def load_model(path: str | Path, dtype, device: str):
    from transformers import AutoModelForCausalLM

    where, kwargs = _from_pretrained_args(path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    return model.to(device).eval()


@dataclass(frozen=True)
class Vocabulary:
    """The token ids an engine serves: those both the tokenizer and the model's output layer cover."""

    size: int
    eos_token_ids: list[int]


def served_vocabulary(tokenizer, generation_config, output_rows: int, where: str) -> Vocabulary:
    """Ids 0..size-1 with size = min(tokenizer ids, output rows), and the EOS ids among them.

    Output rows past the tokenizer are padding (masked out of every choice and entropy); tokenizer ids
    past the output layer (e.g. a special token added on load) can never be produced, so prompts holding
    them are refused. Every adjustment is logged at start-up.
    """
    tokenizer_ids = max(tokenizer.get_vocab().values(), default=-1) + 1
    size = min(tokenizer_ids, output_rows)
    if size < MIN_VOCAB:
        raise ValueError(f"{where}: the tokenizer ({tokenizer_ids} ids) and the output layer ({output_rows} rows) "
                         f"share {size} token ids; at least {MIN_VOCAB} are needed")
    if tokenizer_ids > output_rows:
        log.warning("%s: the tokenizer has %d ids but the output layer only %d rows; serving ids 0..%d (ids from "
                    "%d on can never be generated and are refused in prompts)", where, tokenizer_ids, output_rows,
                    size - 1, size)
    elif output_rows > tokenizer_ids:
        # The usual padding of an embedding matrix to a round size: expected, so not a warning.
        log.info("%s: the output layer's %d rows past the tokenizer's %d ids are padding, masked out", where,
                 output_rows - tokenizer_ids, tokenizer_ids)
    return Vocabulary(size, _eos_token_ids(tokenizer, generation_config, size, where))


def _eos_token_ids(tokenizer, generation_config, vocab_size: int, where: str) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    named = {"the generation config": eos if isinstance(eos, list) else [] if eos is None else [eos],
             "the tokenizer": [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]}
    ids = set()
    for source, candidates in named.items():
        for token in candidates:
            if 0 <= token < vocab_size:
                ids.add(token)
            else:
                log.warning("%s: EOS id %d from %s lies outside the served vocabulary of %d ids; dropped",
                            where, token, source, vocab_size)
    if not ids:
        log.warning("%s: no EOS id; generations end only at max tokens, stop ids or a full context", where)
    return sorted(ids)


def tokenizer_fingerprint(tokenizer, vocab_size: int) -> str:
    """Two models can be stitched only if every id either may produce maps to the same token string in
    both: a hash of the served vocabulary (two engines with one tokenizer but output layers of different
    sizes get different fingerprints, since one would produce ids the other refuses)."""
    vocab = sorted(((token, i) for token, i in tokenizer.get_vocab().items() if i < vocab_size), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(config, dtype) -> int:
    """Bytes one token's keys and values take in every layer (the KV budget's unit)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim(config) * dtype.itemsize
