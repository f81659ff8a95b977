"""Exact greedy decoding with a KV cache (batch 1, float32), and its per-token cost."""

import time

import torch
from transformers import DynamicCache


@torch.inference_mode()
def greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy continuation of prompt, stopping after eos_id (not included) or max_new_tokens."""
    cache = DynamicCache(config=model.config)
    ids, out = torch.tensor([prompt]), []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        token = int(logits.argmax())
        if token == eos_id:
            break
        out.append(token)
        ids = torch.tensor([[token]])
    return out


@torch.inference_mode()
def decode_ms_per_token(model, prompt: list[int], tokens: int = 200, repeats: int = 3) -> float:
    """Milliseconds per decoded token after prefilling prompt (EOS ignored); best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits
        start = time.perf_counter()
        for _ in range(tokens):
            token = logits[0, -1].argmax().view(1, 1)
            logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
        best = min(best, (time.perf_counter() - start) / tokens * 1e3)
    return best
