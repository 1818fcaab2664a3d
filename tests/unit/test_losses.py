import math

import numpy as np
import pytest
import torch

from training.modeling.losses import (
    change_penalty,
    coarse_loss,
    dice_loss_multiclass,
    dice_score,
    quality_aware_loss,
    soft_dice_loss,
)


def row(*values) -> torch.Tensor:
    """``1×1×1×N`` tensor."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_dice_score_known_values():
    assert dice_score(np.array([[1, 1, 0, 0]], bool), np.array([[1, 0, 0, 0]], bool)) == pytest.approx(2 / 3)
    assert dice_score(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert dice_score(np.zeros((3, 3), bool), np.ones((3, 3), bool)) == 0.0
    with pytest.raises(ValueError):
        dice_score(np.zeros((2, 2), bool), np.zeros((3, 3), bool))


def test_soft_dice_loss_known_value():
    # p = 0.5 everywhere, target 2 of 4 pixels: Dice = 2·1 / (2 + 2) = 0.5.
    logits = torch.zeros(1, 1, 1, 4)
    assert soft_dice_loss(logits, row(1, 1, 0, 0)).item() == pytest.approx(0.5, abs=1e-5)
    # Confident and right: loss ≈ 0.
    assert soft_dice_loss(row(20, 20, -20, -20), row(1, 1, 0, 0)).item() == pytest.approx(0, abs=1e-5)


def test_coarse_loss_known_value():
    logits = torch.zeros(1, 2, 1, 4)
    target = torch.tensor([[[1, 1, 0, 0]]])
    # CE = ln 2; each class: p = 0.5, 2 of 4 pixels → Dice 0.5 → loss 0.5.
    assert dice_loss_multiclass(logits, target).item() == pytest.approx(0.5, abs=1e-5)
    expected = 0.5 * math.log(2) + 0.5 * 0.5
    assert coarse_loss(logits, target, 0.5, 0.5).item() == pytest.approx(expected, abs=1e-5)
    assert coarse_loss(logits, target, 1.0, 0.0).item() == pytest.approx(math.log(2), abs=1e-5)


def test_quality_aware_loss_known_value():
    coarse_probs = row(0.9, 0.9, 0.1, 0.1)  # hard coarse [1, 1, 0, 0]
    target = row(1, 0, 0, 0)
    refined_logits = torch.zeros(1, 1, 1, 4)  # p = 0.5
    # Coarse Dice = 2/3; correct pixels 0, 2, 3 each changed by 0.5 → change = 2/3 · 0.5 = 1/3.
    # BCE = ln 2; soft Dice = 1 − 2·0.5 / (2 + 1) = 2/3.
    terms = quality_aware_loss(refined_logits, target, coarse_probs, 1.0, 1.0, 0.5)
    assert terms["bce"].item() == pytest.approx(math.log(2), abs=1e-5)
    assert terms["dice"].item() == pytest.approx(2 / 3, abs=1e-5)
    assert terms["change"].item() == pytest.approx(1 / 3, abs=1e-5)
    assert terms["total"].item() == pytest.approx(math.log(2) + 2 / 3 + 0.5 / 3, abs=1e-5)


def test_change_penalty_weight_changes_the_loss():
    coarse_probs = row(0.9, 0.9, 0.1, 0.1)
    target = row(1, 0, 0, 0)
    refined_logits = row(2.0, -1.0, 1.0, -3.0)
    without = quality_aware_loss(refined_logits, target, coarse_probs, 1.0, 1.0, 0.0)["total"]
    with_penalty = quality_aware_loss(refined_logits, target, coarse_probs, 1.0, 1.0, 2.0)["total"]
    assert with_penalty > without


def test_change_penalty_is_zero_for_no_change_and_scaled_by_quality():
    target = row(1, 1, 0, 0)
    coarse = row(1, 1, 0, 0)
    assert change_penalty(coarse, target, coarse).item() == pytest.approx(0)
    refined = row(0.5, 0.5, 0.5, 0.5)
    perfect = change_penalty(refined, target, coarse)
    poor = change_penalty(refined, target, row(1, 0, 0, 0))  # Dice 2/3, correct pixels 0, 2, 3
    assert perfect.item() == pytest.approx(0.5)
    assert poor.item() == pytest.approx(2 / 3 * 0.5)
    # The penalty only pushes the refined mask, never the (detached) coarse mask.
    coarse_grad = row(0.9, 0.2, 0.1, 0.1).requires_grad_()
    refined_grad = refined.clone().requires_grad_()
    change_penalty(refined_grad, target, coarse_grad).backward()
    assert coarse_grad.grad is None and refined_grad.grad.abs().sum() > 0


def test_valid_mask_excludes_padding():
    target = row(1, 0, 0, 0)
    coarse = row(0.9, 0.1, 0.1, 0.1)
    valid = row(1, 1, 1, 0)
    a = quality_aware_loss(row(3, -3, -3, 50), target, coarse, 1, 1, 0.5, valid)
    b = quality_aware_loss(row(3, -3, -3, -50), target, coarse, 1, 1, 0.5, valid)
    for key in ("total", "bce", "dice", "change"):
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-6)
    logits = torch.zeros(1, 2, 1, 4)
    labels = torch.tensor([[[1, 0, 0, 1]]])
    padded_logits = logits.clone()
    padded_logits[..., 3] = torch.tensor([-9.0, 9.0]).view(1, 2, 1)
    assert coarse_loss(logits, labels, 0.5, 0.5, valid[:, 0]).item() == pytest.approx(
        coarse_loss(padded_logits, labels, 0.5, 0.5, valid[:, 0]).item(), abs=1e-6
    )


def test_losses_backpropagate():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    quality_aware_loss(logits, target, torch.rand(2, 1, 8, 8), 1, 1, 0.5)["total"].backward()
    assert logits.grad.abs().sum() > 0
