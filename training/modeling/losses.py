"""Losses of the three phases and the evaluation Dice.

* phase 1: :func:`coarse_loss` = ``ce_weight``·CE + ``dice_weight``·multiclass soft Dice;
* phases 2b/3: :func:`quality_aware_loss` = BCE + Dice + λ·change penalty on the refined mask;
* evaluation: :func:`dice_score` on boolean masks at native resolution.

Soft Dice losses aggregate over the whole batch (as in TransUNet), so an image without a lesion
contributes through its false-positive mass without making the loss undefined. ``valid``
(``B×1×H×W`` or ``B×H×W``, 1 = image, 0 = padding) excludes padded pixels everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Smoothing of the soft Dice losses (both sums zero → loss 0).
DICE_SMOOTH = 1e-5


def _as_map(tensor: torch.Tensor) -> torch.Tensor:
    """``B×H×W`` or ``B×1×H×W`` → ``B×1×H×W`` float."""
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    return tensor.float()


def _valid_map(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(like)
    return _as_map(valid).to(like.dtype).expand_as(like)


def _soft_dice(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 − 2·Σ(p·t) / (Σp + Σt) over all valid pixels of the batch."""
    intersection = (probs * target * valid).sum()
    total = (probs * valid).sum() + (target * valid).sum()
    return 1 - (2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)


def dice_loss_multiclass(
    coarse_logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over classes of the soft Dice loss of ``softmax(B×C×H×W logits)`` vs ``B×H×W`` labels."""
    probs = torch.softmax(coarse_logits, dim=1)
    one_hot = F.one_hot(target.long(), coarse_logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    valid_map = _valid_map(valid, probs[:, :1])
    losses = [
        _soft_dice(probs[:, c : c + 1], one_hot[:, c : c + 1], valid_map) for c in range(probs.shape[1])
    ]
    return torch.stack(losses).mean()


def coarse_loss(
    coarse_logits: torch.Tensor,
    target: torch.Tensor,
    ce_weight: float,
    dice_weight: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ce_weight``·CE + ``dice_weight``·Dice of ``B×2×H×W`` logits vs ``B×H×W`` long labels."""
    target = target.long()
    if target.dim() == 4:
        target = target[:, 0]
    if valid is None:
        ce = F.cross_entropy(coarse_logits, target)
    else:
        valid_map = _as_map(valid)[:, 0].to(coarse_logits.dtype)
        per_pixel = F.cross_entropy(coarse_logits, target, reduction="none")
        ce = (per_pixel * valid_map).sum() / valid_map.sum().clamp(min=1)
    return ce_weight * ce + dice_weight * dice_loss_multiclass(coarse_logits, target, valid)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft Dice loss of ``sigmoid(B×1×H×W logits)`` vs a ``B×1×H×W`` (or ``B×H×W``) {0,1} target."""
    probs = torch.sigmoid(logits)
    return _soft_dice(probs, _as_map(target), _valid_map(valid, probs))


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy of ``B×1×H×W`` logits over the valid pixels."""
    target = _as_map(target)
    valid_map = _valid_map(valid, logits)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_pixel * valid_map).sum() / valid_map.sum().clamp(min=1)


def hard_dice_per_sample(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Dice of ``B×1×H×W`` {0,1} masks per sample → ``B`` (both empty → 1)."""
    valid_map = _valid_map(valid, pred.float())
    pred, target = pred.float() * valid_map, _as_map(target) * valid_map
    intersection = (pred * target).flatten(1).sum(1)
    total = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1e-12), torch.ones_like(total))


def change_penalty(
    refined_probs: torch.Tensor,
    target: torch.Tensor,
    coarse_probs: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalty for changing what the coarse mask got right, weighted by the coarse mask's quality.

    Per sample: mean of ``|refined_probs − coarse_mask|`` over the valid pixels where the hard
    coarse mask (``coarse_probs > 0.5``) equals the target, times the (detached) Dice of the coarse
    mask with the target; then the batch mean. A good coarse mask makes every change costly; a
    poor one lets the refiner rewrite it.
    """
    target = _as_map(target)
    valid_map = _valid_map(valid, refined_probs)
    coarse_mask = (coarse_probs.detach() > 0.5).to(refined_probs.dtype)
    correct = (coarse_mask == target).to(refined_probs.dtype) * valid_map
    changed = (refined_probs - coarse_mask).abs() * correct
    per_sample = changed.flatten(1).sum(1) / correct.flatten(1).sum(1).clamp(min=1)
    quality = hard_dice_per_sample(coarse_mask, target, valid).detach()
    return (quality * per_sample).mean()


def quality_aware_loss(
    refined_logits: torch.Tensor,
    target: torch.Tensor,
    coarse_probs: torch.Tensor,
    bce_weight: float,
    dice_weight: float,
    change_penalty_weight: float,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """BCE + Dice + λ·change penalty of the refined mask.

    ``refined_logits``: ``B×1×H×W``; ``target``: ``B×1×H×W`` {0,1}; ``coarse_probs``: ``B×1×H×W``
    lesion probabilities of the coarse mask (same space). Returns ``total``, ``bce``, ``dice``,
    ``change`` (unweighted terms; ``total`` is the weighted sum).
    """
    target = _as_map(target)
    bce = masked_bce(refined_logits, target, valid)
    dice = soft_dice_loss(refined_logits, target, valid)
    change = change_penalty(torch.sigmoid(refined_logits), target, coarse_probs, valid)
    total = bce_weight * bce + dice_weight * dice + change_penalty_weight * change
    return {"total": total, "bce": bce, "dice": dice, "change": change}


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean ``H×W`` masks (both empty → 1.0, one empty → 0.0)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total
