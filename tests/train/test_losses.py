"""InfoNCE over embeddings against hand-computed values (train/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import info_nce

# users (2, 2) and items (3, 2), all unit-norm; user 0's positive is item 0, user 1's is item 2
USERS = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
TARGETS = torch.tensor([0, 2])


def _ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(z) for z in logits))


def test_info_nce_hand_computed() -> None:
    # scale = exp(log 2) = 2, so logits are 2 * cosine: user 0 -> [2, 0, 1.2], user 1 -> [0, 2, 1.6]
    expected = (_ce([2.0, 0.0, 1.2], 0) + _ce([0.0, 2.0, 1.6], 2)) / 2
    loss = info_nce(USERS, ITEMS, TARGETS, torch.tensor(math.log(2.0), dtype=torch.float64))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # written out: user 0: log(e^2 + 1 + e^1.2) - 2 = log(11.709) - 2 = 0.4604
    #              user 1: log(1 + e^2 + e^1.6) - 1.6 = log(13.342) - 1.6 = 0.9909
    assert expected == pytest.approx((0.4604 + 0.9909) / 2, abs=1e-4)


def test_info_nce_scale_is_clamped() -> None:
    # logit_scale = log(1000) exceeds max_scale = 3: logits are 3 * cosine
    expected = (_ce([3.0, 0.0, 1.8], 0) + _ce([0.0, 3.0, 2.4], 2)) / 2
    loss = info_nce(USERS, ITEMS, TARGETS, torch.tensor(math.log(1000.0), dtype=torch.float64), max_scale=3.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_info_nce_logq_correction() -> None:
    logq = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    # logits minus logq per candidate: user 0 -> [1.5, 1, 1.2], user 1 -> [-0.5, 3, 1.6]
    expected = (_ce([1.5, 1.0, 1.2], 0) + _ce([-0.5, 3.0, 1.6], 2)) / 2
    loss = info_nce(USERS, ITEMS, TARGETS, torch.tensor(math.log(2.0), dtype=torch.float64), logq=logq)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_info_nce_gradient_reaches_logit_scale_until_clamped() -> None:
    scale = torch.tensor(math.log(2.0), dtype=torch.float64, requires_grad=True)
    info_nce(USERS, ITEMS, TARGETS, scale).backward()
    assert scale.grad is not None and scale.grad.item() != 0.0
    clamped = torch.tensor(math.log(1000.0), dtype=torch.float64, requires_grad=True)
    info_nce(USERS, ITEMS, TARGETS, clamped, max_scale=100.0).backward()
    assert clamped.grad.item() == 0.0


@pytest.mark.parametrize("users, items, targets, message", [
    (torch.zeros(2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), "must be"),
    (torch.zeros(2, 2), torch.zeros(3), torch.zeros(2, dtype=torch.long), "must be"),
    (torch.zeros(2, 2), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), r"\(2, 2\) and items \(3, 4\)"),
    (torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), r"targets \(3,\) must be \(2,\)"),
    (torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2, 1, dtype=torch.long), r"targets \(2, 1\)"),
])
def test_info_nce_shape_errors(users, items, targets, message) -> None:
    with pytest.raises(ValueError, match=message):
        info_nce(users, items, targets, torch.tensor(0.0))
