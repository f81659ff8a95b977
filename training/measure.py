"""Per-token decode cost, size and parameters of trained checkpoints, as the engine runs them.

    python -m training.measure models/rstitch-slm models/rstitch-llm

float32, batch 1, KV cache, 200 tokens decoded after a held-out prompt, best of 5; the ratio is
each model's cost over the first one's.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .decode import decode_ms_per_token
from .task import heldout
from .train import prompt_ids


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.measure", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    first = None
    for path in map(Path, args.models):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompt = prompt_ids(AutoTokenizer.from_pretrained(path), heldout(1)[0].question)
        ms = decode_ms_per_token(model, prompt, args.tokens, args.repeats)
        first = first or ms
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        record = path / "training.json"
        accuracy = json.loads(record.read_text())["runs"][-1]["heldout_accuracy"] if record.exists() else None
        accuracy = f"{accuracy:.1%}" if accuracy is not None else "unknown"
        print(f"{path}: {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M parameters, "
              f"{model.config.num_hidden_layers} layers x {model.config.hidden_size}, {size / 2**20:.1f} MiB, "
              f"{ms:.2f} ms/token ({ms / first:.2f}x), held-out accuracy {accuracy}")


if __name__ == "__main__":
    main()
