"""The served tiny-mask rule (``training.modeling.lesion_filter``, ``refiner.min_lesion_fraction``):
which masks are emptied, that logits and probabilities agree, and that serving applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import TrainingConfig
from training.modeling.lesion_filter import (
    drop_tiny_masks_from_logits,
    drop_tiny_masks_from_probs,
    tiny_masks,
)


def _probs(side: int, boxes) -> torch.Tensor:
    """``side×side`` probabilities: 0.9 inside the (y0, y1, x0, x1) boxes, 0.1 elsewhere."""
    probs = torch.full((side, side), 0.1)
    for y0, y1, x0, x1 in boxes:
        probs[y0:y1, x0:x1] = 0.9
    return probs


def test_only_a_mask_tiny_as_a_whole_is_emptied():
    specks = _probs(100, [(0, 2, 0, 2), (90, 92, 90, 92)])  # 8 px in all: 0.08 %
    lesion_and_speck = _probs(100, [(10, 30, 10, 30), (90, 91, 5, 6)])  # 400 + 1 px
    empty = _probs(100, [])
    flags = tiny_masks(torch.stack([specks, lesion_and_speck, empty]), 0.001)
    assert flags.tolist() == [True, False, False]  # an empty mask is not "tiny": nothing to empty
    assert tiny_masks(specks[None], 0.0).tolist() == [False]  # off
    assert tiny_masks(specks[None], 0.0008).tolist() == [False]  # exactly at the fraction: kept


def test_logits_and_probabilities_empty_the_same_masks_and_keep_the_rest():
    probs = torch.stack([_probs(64, [(0, 2, 0, 2)]), _probs(64, [(8, 24, 8, 24), (60, 61, 60, 61)])])
    logits = torch.stack([torch.zeros_like(probs), torch.logit(probs)], dim=1)  # 2×2×64×64
    kept_logits = drop_tiny_masks_from_logits(logits, 0.002)  # 4 px = 0.1 %: tiny; 257 px: not
    kept_probs = drop_tiny_masks_from_probs(probs[:, None], 0.002)  # 2×1×64×64
    served = kept_logits.softmax(dim=1)[:, 1]
    assert served[0].max() < 1e-4 and kept_probs[0].max() == 0
    torch.testing.assert_close(served[1], probs[1])  # the large mask stays whole, its speck too
    torch.testing.assert_close(kept_probs[1, 0], probs[1])
    # Idempotent, and nothing to empty (or the rule off) gives back the same tensor.
    assert drop_tiny_masks_from_probs(kept_probs, 0.002) is kept_probs
    assert drop_tiny_masks_from_logits(logits, 0.0) is logits


def test_the_default_is_below_every_busi_training_lesion():
    fraction = TrainingConfig.model_validate({}).refiner.min_lesion_fraction
    assert 0 < fraction < 0.003  # the smallest BUSI training lesion covers 0.3 % of its image
    with pytest.raises(ValueError):
        TrainingConfig.model_validate({"refiner": {"min_lesion_fraction": 1.0}})


class _FixedCoarse(torch.nn.Module):
    """Coarse logits +6 inside fractional (y0, y1, x0, x1) boxes of the S×S grid, −6 elsewhere."""

    def __init__(self, boxes) -> None:
        super().__init__()
        self.boxes = boxes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = images.shape[-1]
        lesion = torch.full((images.shape[0], side, side), -6.0)
        for y0, y1, x0, x1 in self.boxes:
            lesion[:, int(y0 * side) : int(y1 * side), int(x0 * side) : int(x1 * side)] = 6.0
        return torch.stack([torch.zeros_like(lesion), lesion], dim=1)


def _predictor(boxes):
    from training.checkpoints import build_seeded_refiner
    from training.inference import Predictor

    cfg = TrainingConfig.model_validate({"refiner": {"pretrained": False}})
    return Predictor(_FixedCoarse(boxes), build_seeded_refiner(cfg), cfg, model_version="tiny-mask-test")


def test_a_tiny_coarse_mask_is_served_empty_and_the_encoder_never_runs():
    predictor = _predictor([(0.02, 0.04, 0.02, 0.04)])  # ≈ 0.04 % of the frame
    image = (np.random.default_rng(1).random((90, 120)) * 255).astype(np.uint8)
    prediction = predictor.predict(image)
    assert not prediction.coarse_mask().any() and not prediction.refined_mask().any()
    assert prediction.embedding is None  # nothing to refine: the image encoder was skipped
    predictor.refiner.cfg = predictor.refiner.cfg.model_copy(update={"min_lesion_fraction": 0.0})
    assert predictor.predict(image).coarse_mask().any()  # rule off: the few pixels are served


def test_a_lesion_mask_is_served_whole_with_its_fragments():
    predictor = _predictor([(0.25, 0.5, 0.25, 0.5), (0.9, 0.92, 0.9, 0.92)])
    image = (np.random.default_rng(2).random((120, 160)) * 255).astype(np.uint8)
    coarse = predictor.predict(image).coarse_mask()
    assert coarse[35:55, 45:75].all() and coarse[100:, 135:].any()  # lesion and fragment
