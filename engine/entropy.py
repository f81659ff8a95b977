"""Normalized entropy of next-token distributions, and the greedy choice: the one definition every
backend uses."""

import math

import torch


def normalized_entropy(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """H = -sum p log p / log V for each row of logits [..., V_padded], as a float32 tensor [N].

    V is the served vocabulary (engine.checkpoints.served_vocabulary); columns past it (padding of the
    output layer) are masked out, so that a padded model and an unpadded one agree. H is clamped to
    [0, 1] so that rounding cannot put a uniform distribution above tau = 1.
    """
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} columns, fewer than the vocabulary of {vocab_size} "
                         "ids: the served vocabulary must not exceed the output layer")
    logp = torch.log_softmax(logits[..., :vocab_size].float().reshape(-1, vocab_size), dim=-1)
    # xlogy-style: a probability that underflows to 0 contributes 0, not NaN.
    plogp = torch.where(logp.isinf(), torch.zeros_like(logp), logp.exp() * logp)
    return (-plogp.sum(-1) / math.log(vocab_size)).clamp_(0.0, 1.0)


def greedy_with_entropy(logits: torch.Tensor, vocab_size: int) -> tuple[list[int], list[float]]:
    """For each row of logits [..., V_padded]: the argmax among the served ids, and its entropy."""
    entropy = normalized_entropy(logits, vocab_size)
    return logits[..., :vocab_size].reshape(-1, vocab_size).argmax(-1).tolist(), entropy.tolist()
