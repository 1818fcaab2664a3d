"""The served rule for tiny coarse masks: a mask too small, as a whole, to be a lesion is empty.

A segmenter trained on a few hundred images marks a few scattered pixels on many lesion-free
images. When the whole thresholded coarse mask (probability ≥ 0.5) covers less than
``min_fraction`` of the frame, the image is answered as lesion-free: the mask is emptied before any
prompt is derived from it, so nothing is refined. A mask at least that large stays whole, its small
fragments included — removing small components one by one was measured too, and it cut a real
lesion that the coarse model had split into fragments (MODEL_CARD.md). Area is measured on the
square coarse grid: the resize to the square scales both axes, so a mask keeps its share of the
frame.

One rule for serving and validation: :class:`training.inference.Predictor`, phase-1 validation
(and so the out-of-fold masks phase 2b learns from) and phase-3 validation all call it, with
``refiner.min_lesion_fraction`` of the run's or bundle's config. It is not differentiable and is
never applied where gradients flow.
"""

from __future__ import annotations

import torch

from training.evaluate import THRESHOLD

#: An emptied mask's lesion logit is at most the background logit minus this: probability ≤ 4.5e-5.
EMPTY_LOGIT_MARGIN = 10.0


def tiny_masks(lesion_probs: torch.Tensor, min_fraction: float, threshold: float = THRESHOLD) -> torch.Tensor:
    """``B×H×W`` lesion probabilities → ``B`` booleans: the mask has lesion pixels (≥ ``threshold``),
    but fewer than ``min_fraction`` of the map. Off (all false) when ``min_fraction`` is 0."""
    lesion_share = (lesion_probs >= threshold).flatten(1).float().mean(dim=1)
    return (lesion_share > 0) & (lesion_share < min_fraction)


def drop_tiny_masks_from_logits(coarse_logits: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """``B×2×S×S`` coarse logits with every tiny mask emptied (a new tensor, or the same one when
    nothing is emptied or the rule is off)."""
    if min_fraction <= 0:
        return coarse_logits
    tiny = tiny_masks(coarse_logits.detach().float().softmax(dim=1)[:, 1], min_fraction)
    if not bool(tiny.any()):
        return coarse_logits
    kept = coarse_logits.clone()
    emptied = torch.minimum(kept[:, 1], kept[:, 0] - EMPTY_LOGIT_MARGIN)
    kept[:, 1] = torch.where(tiny[:, None, None], emptied, kept[:, 1])
    return kept


def drop_tiny_masks_from_probs(lesion_probs: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """``…×S×S`` lesion probabilities (e.g. ``1×S×S`` out-of-fold masks) with tiny masks set to 0."""
    if min_fraction <= 0:
        return lesion_probs
    flat = lesion_probs.reshape(-1, *lesion_probs.shape[-2:])
    tiny = tiny_masks(flat.detach().float(), min_fraction)
    if not bool(tiny.any()):
        return lesion_probs
    kept = torch.where(tiny[:, None, None], torch.zeros_like(flat), flat)
    return kept.reshape(lesion_probs.shape)
