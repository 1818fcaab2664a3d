"""UltraRefiner: the coarse segmenter and the refiner joined end to end (phase 3, inference).

``B×1×S×S`` images → TransUNet ``B×2×S×S`` logits → lesion probabilities (softmax channel 1)
→ each sample mapped into its ``L×L`` refiner frame by :meth:`Geometry.to_refiner` → refiner.
Gradients of the refined-mask loss reach TransUNet through the prompts, scaled by
``coarse_grad_scale`` with :class:`GradScale` (an autograd function: the scale is an argument
of each call, never a closure over a loop variable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from training.config import TrainingConfig
from training.data.transforms import Geometry
from training.modeling.lesion_filter import drop_tiny_masks_from_logits
from training.modeling.prompts import Prompts
from training.modeling.refiner import Refiner


class GradScale(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = float(scale)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` unchanged, its gradient multiplied by ``scale`` (no-op for 1)."""
    if scale == 1.0:
        return tensor
    return GradScale.apply(tensor, scale)


def coarse_probs_to_refiner(coarse_probs: torch.Tensor, geometries: Sequence[Geometry]) -> torch.Tensor:
    """``B×1×S×S`` lesion probabilities → ``B×1×L×L`` in each sample's refiner frame (padded)."""
    if len(geometries) != coarse_probs.shape[0]:
        raise ValueError(f"{len(geometries)} geometries for a batch of {coarse_probs.shape[0]}")
    return torch.cat([g.to_refiner(coarse_probs[i : i + 1]) for i, g in enumerate(geometries)])


def valid_masks(geometries: Sequence[Geometry], device: torch.device | str = "cpu") -> torch.Tensor:
    """``B×1×L×L`` masks: 1 on each sample's image, 0 on its padding."""
    return torch.cat([g.valid_mask() for g in geometries]).to(device)


class UltraRefiner(nn.Module):
    """Coarse segmenter (any of :mod:`training.modeling.coarse_registry`) + Refiner.
    ``cfg.end_to_end.coarse_grad_scale`` is the default gradient scale."""

    def __init__(self, coarse: nn.Module, refiner: Refiner, cfg: TrainingConfig) -> None:
        super().__init__()
        self.coarse = coarse
        self.refiner = refiner
        self.cfg = cfg

    def forward(
        self,
        coarse_images: torch.Tensor,
        image_embeddings: torch.Tensor | None,
        geometries: Sequence[Geometry],
        coarse_grad_scale: float | None = None,
        prompts_override: Prompts | None = None,
        refiner_images: torch.Tensor | None = None,
        min_lesion_fraction: float = 0.0,
    ) -> dict:
        """Run both stages.

        ``coarse_images``: ``B×1×S×S``; ``image_embeddings``: ``B×256×E×E`` of the refiner inputs
        (``refiner_images``, ``B×3×L×L``, needed only in ROI mode); ``geometries``: one per sample.
        Returns ``coarse_logits`` (``B×2×S×S``), ``coarse_probs`` (``B×1×S×S``),
        ``refiner_coarse_probs`` (``B×1×L×L``), ``valid`` (``B×1×L×L``), ``refined_logits``
        (``B×1×L×L``), ``masks_logits`` (``B×3×L×L``), ``iou_pred`` (``B×3``), ``selected_iou``
        (``B``), ``prompts``, ``gate``. ``min_lesion_fraction`` > 0 (validation, no gradients)
        empties a tiny coarse mask first, as :class:`training.inference.Predictor` does.
        """
        scale = self.cfg.end_to_end.coarse_grad_scale if coarse_grad_scale is None else coarse_grad_scale
        coarse_logits = self.coarse(coarse_images)
        if min_lesion_fraction > 0:
            # Validation only (not differentiable): score what is served, tiny masks emptied.
            coarse_logits = drop_tiny_masks_from_logits(coarse_logits, min_lesion_fraction)
        coarse_probs = torch.softmax(coarse_logits, dim=1)[:, 1:2]
        refiner_coarse_probs = coarse_probs_to_refiner(scale_gradient(coarse_probs, scale), geometries)
        valid = valid_masks(geometries, coarse_images.device)
        output = self.refiner(
            image_embeddings,
            refiner_coarse_probs,
            valid=valid,
            prompts_override=prompts_override,
            images=refiner_images,
        )
        return {
            "coarse_logits": coarse_logits,
            "coarse_probs": coarse_probs,
            "refiner_coarse_probs": refiner_coarse_probs,
            "valid": valid,
            "refined_logits": output.refined_logits,
            "masks_logits": output.masks_logits,
            "iou_pred": output.iou_pred,
            "selected_iou": output.selected_iou,
            "prompts": output.prompts,
            "gate": output.gate,
        }
