import math

import pytest
import torch

from engine.entropy import greedy_with_entropy


def test_uniform_is_one_and_peaked_is_near_zero():
    [_, _], [uniform, peaked] = greedy_with_entropy(torch.stack([torch.zeros(50), torch.tensor([80.0] + [0.0] * 49)]), 50)
    assert math.isclose(uniform, 1.0, abs_tol=1e-6)
    assert 0.0 <= peaked < 1e-20


def test_padded_rows_are_masked_out():
    real = torch.randn(3, 40)
    padded = torch.cat([real, torch.full((3, 24), 50.0)], dim=-1)  # padding rows that would win argmax
    assert greedy_with_entropy(padded, 40) == greedy_with_entropy(real, 40)
    tokens, _ = greedy_with_entropy(padded, 40)
    assert all(t < 40 for t in tokens)


def test_underflowing_probabilities_give_no_nan():
    logits = torch.tensor([1000.0, -1000.0, 0.0, -float("inf")])
    [token], [entropy] = greedy_with_entropy(logits, 4)
    assert token == 0 and entropy == 0.0


def test_entropy_matches_the_definition():
    logits = torch.randn(64)
    p = torch.softmax(logits.double(), -1)
    expected = float(-(p * p.log()).sum() / math.log(64))
    _, [h] = greedy_with_entropy(logits, 64)
    assert math.isclose(h, expected, rel_tol=1e-5)


def test_a_vocabulary_wider_than_the_logits_is_refused():
    """The served vocabulary never exceeds the output layer (engine.checkpoints.served_vocabulary)."""
    with pytest.raises(ValueError, match="fewer than the vocabulary"):
        greedy_with_entropy(torch.randn(2, 40), 41)
