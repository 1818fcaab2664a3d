"""Differentiable SAM prompts derived from a soft coarse mask.

All coordinates are refiner pixel indices (``0 … L-1``, x = column, y = row) of the square
``L×L`` refiner input, which is what ``segment_anything.modeling.PromptEncoder`` expects
(it adds the half-pixel shift itself). Every prompt is a differentiable function of the coarse
probabilities, so a loss on the refined mask sends gradients back into the coarse segmenter
through each prompt type separately:

* positive point: soft-argmax of ``probs / τ`` (τ = ``softargmax_temperature``);
* box: mean ± ``box_sigma``·σ of the mask's spatial distribution, clamped to the image;
* negative point: background soft-argmax among four locations just outside the box edges, scored
  by the background probability there (straight-through: the forward pass takes the best location,
  never an average of opposite sides, while gradients flow through the soft weights and the box);
* dense mask prompt: probabilities → logits in ``[-scale, scale]`` (``(2p−1)·scale``), either
  directly or after a Gaussian blur, resized to the mask-prompt side ``4·E`` (256 for E = 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from training.config import RefinerConfig

#: Mask-prompt side of both registered backbones: 4 × the 64×64 image-embedding side.
MASK_PROMPT_SIZE = 256
#: Spatial distribution of the mask: an almost-zero mass everywhere keeps an empty mask defined
#: (its box becomes the whole image) without moving the box of a real lesion.
_MASS_EPS = 1e-8


@dataclass
class Prompts:
    """SAM prompts of a batch, in refiner pixel coordinates; any field may be ``None``.

    ``points``: ``B×N×2`` (x, y); ``point_labels``: ``B×N`` (1 positive, 0 negative);
    ``boxes``: ``B×4`` (x0, y0, x1, y1); ``mask_logits``: ``B×1×M×M`` with ``M = 4·E``.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.points is None) != (self.point_labels is None):
            raise ValueError("points and point_labels must be given together")

    @property
    def batch_size(self) -> int | None:
        for value in (self.points, self.boxes, self.mask_logits):
            if value is not None:
                return value.shape[0]
        return None

    def is_empty(self) -> bool:
        return self.points is None and self.boxes is None and self.mask_logits is None

    def detach(self) -> Prompts:
        return Prompts(*(None if v is None else v.detach() for v in self._values()))

    def to(self, device: torch.device | str) -> Prompts:
        return Prompts(*(None if v is None else v.to(device) for v in self._values()))

    def select(self, index: int) -> Prompts:
        """The prompts of one sample as a batch of one."""
        return Prompts(*(None if v is None else v[index : index + 1] for v in self._values()))

    def replace(self, **changes) -> Prompts:
        return replace(self, **changes)

    def _values(self) -> tuple:
        return self.points, self.point_labels, self.boxes, self.mask_logits


def _pixel_grid(side: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column (x) and row (y) pixel indices, each ``side×side``."""
    coords = torch.arange(side, device=like.device, dtype=like.dtype)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return xs, ys


def valid_or_ones(coarse_probs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(coarse_probs)
    return valid.to(coarse_probs.dtype).expand_as(coarse_probs)


def _valid_extent(valid: torch.Tensor) -> torch.Tensor:
    """``B×1×L×L`` validity → ``B×4`` (x_max, y_max, …) pixel extent of the valid region (no grad)."""
    with torch.no_grad():
        side = valid.shape[-1]
        cols = (valid > 0.5).any(dim=-2).flatten(1)  # B×L: valid columns
        rows = (valid > 0.5).any(dim=-1).flatten(1)
        index = torch.arange(side, device=valid.device, dtype=valid.dtype)
        x_max = torch.where(cols, index, torch.zeros_like(index)).amax(dim=1)
        y_max = torch.where(rows, index, torch.zeros_like(index)).amax(dim=1)
        return torch.stack([x_max, y_max], dim=1)


def positive_point(coarse_probs: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-argmax of ``B×1×L×L`` probabilities (valid pixels only) → ``B×2`` (x, y)."""
    batch, _, side, _ = coarse_probs.shape
    xs, ys = _pixel_grid(side, coarse_probs)
    scores = (coarse_probs / temperature).masked_fill(valid < 0.5, float("-inf")).flatten(1)
    weights = torch.softmax(scores, dim=1)
    return torch.stack([(weights * xs.flatten()).sum(1), (weights * ys.flatten()).sum(1)], dim=1)


def box_from_mask(
    coarse_probs: torch.Tensor, valid: torch.Tensor, box_sigma: float, temperature: float
) -> torch.Tensor:
    """``B×1×L×L`` probabilities → ``B×4`` box (x0, y0, x1, y1): mean ± ``box_sigma``·σ.

    The spatial distribution is the mask softly thresholded at 0.5 (``sigmoid((p−0.5)/τ)``), so
    the low background probabilities of a real network do not inflate σ; gradients concentrate on
    the uncertain boundary pixels, which are the ones that move the box.
    """
    side = coarse_probs.shape[-1]
    xs, ys = _pixel_grid(side, coarse_probs)
    mass = (torch.sigmoid((coarse_probs - 0.5) / temperature) + _MASS_EPS) * valid
    weights = (mass / mass.sum(dim=(-2, -1), keepdim=True)).flatten(1)
    mean_x = (weights * xs.flatten()).sum(1)
    mean_y = (weights * ys.flatten()).sum(1)
    var_x = (weights * (xs.flatten() - mean_x[:, None]) ** 2).sum(1)
    var_y = (weights * (ys.flatten() - mean_y[:, None]) ** 2).sum(1)
    half_x = box_sigma * torch.sqrt(var_x + 1e-6)
    half_y = box_sigma * torch.sqrt(var_y + 1e-6)
    extent = _valid_extent(valid)
    zero = torch.zeros_like(mean_x)
    x0 = torch.maximum(mean_x - half_x, zero)
    y0 = torch.maximum(mean_y - half_y, zero)
    x1 = torch.minimum(mean_x + half_x, extent[:, 0])
    y1 = torch.minimum(mean_y + half_y, extent[:, 1])
    return torch.stack([x0, y0, x1, y1], dim=1)


def _sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``B×1×L×L`` maps at ``B×K×2`` pixel coordinates → ``B×K``."""
    side = maps.shape[-1]
    grid = (points + 0.5) / side * 2 - 1
    return F.grid_sample(maps, grid[:, :, None, :], mode="bilinear", align_corners=False)[:, 0, :, 0]


def negative_point(
    coarse_probs: torch.Tensor, valid: torch.Tensor, boxes: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Background soft-argmax just outside the box → ``B×2`` (x, y).

    Candidates: the midpoints of the four box edges pushed outwards by a gap (10% of the box side,
    at least 4 px), clamped to the valid image. Each scores ``(1−p)·valid`` at its location times
    how far it lies outside the box (a candidate clamped back into the box scores ~0). The forward
    pass takes the best candidate (ties go to the first: left, right, top, bottom); the backward
    pass uses the softmax(score/τ) weights (straight-through), so gradients reach the coarse
    probabilities through the scores and through the box.
    """
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    gap_x = torch.clamp(0.1 * (x1 - x0), min=4.0)
    gap_y = torch.clamp(0.1 * (y1 - y0), min=4.0)
    extent = _valid_extent(valid)
    zero = torch.zeros_like(cx)
    cand_x = torch.stack([x0 - gap_x, x1 + gap_x, cx, cx], dim=1)
    cand_y = torch.stack([cy, cy, y0 - gap_y, y1 + gap_y], dim=1)
    cand_x = torch.minimum(torch.maximum(cand_x, zero[:, None]), extent[:, :1])
    cand_y = torch.minimum(torch.maximum(cand_y, zero[:, None]), extent[:, 1:])
    candidates = torch.stack([cand_x, cand_y], dim=2)  # B×4×2
    outside = torch.stack(
        [x0 - cand_x[:, 0], cand_x[:, 1] - x1, y0 - cand_y[:, 2], cand_y[:, 3] - y1], dim=1
    )  # pixels beyond the box edge
    background = _sample((1 - coarse_probs) * valid, candidates)
    scores = background * torch.sigmoid(outside - 1.0)
    soft = torch.softmax(scores / temperature, dim=1)
    hard = F.one_hot(scores.argmax(dim=1), num_classes=4).to(soft.dtype)
    weights = hard + soft - soft.detach()
    return (weights[:, :, None] * candidates).sum(dim=1)


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


def mask_prompt(
    coarse_probs: torch.Tensor,
    mode: str,
    scale: float,
    size: int = MASK_PROMPT_SIZE,
    valid: torch.Tensor | None = None,
    sigma: float = RefinerConfig.model_fields["mask_prompt_sigma"].default,
) -> torch.Tensor:
    """``B×1×L×L`` probabilities → ``B×1×size×size`` mask-prompt logits in ``[-scale, scale]``.

    ``direct``: ``(2p−1)·scale``; ``gaussian``: the same of the probabilities blurred with σ =
    ``sigma`` mask-prompt pixels.
    The padding (``valid`` = 0) becomes ``-scale``.
    """
    probs = coarse_probs if valid is None else coarse_probs * valid
    if probs.shape[-1] != size:
        probs = F.interpolate(probs, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if mode == "gaussian":
        probs = _gaussian_blur(probs, sigma)
    elif mode != "direct":
        raise ValueError(f"unknown mask_prompt_mode {mode!r}; expected 'direct' or 'gaussian'")
    return (2 * probs.clamp(0, 1) - 1) * scale


def prompts_from_mask(
    coarse_probs: torch.Tensor,
    cfg: RefinerConfig,
    valid: torch.Tensor | None = None,
    mask_prompt_size: int = MASK_PROMPT_SIZE,
) -> Prompts:
    """Prompts enabled in ``cfg`` from ``B×1×L×L`` coarse probabilities (refiner space).

    ``valid`` (``B×1×L×L``, 1 = image, 0 = padding) keeps points and boxes inside the image.
    Points are ordered positive then negative. Everything is differentiable w.r.t. ``coarse_probs``.
    """
    if coarse_probs.dim() != 4 or coarse_probs.shape[1] != 1:
        raise ValueError(f"coarse_probs must be B×1×L×L, got {tuple(coarse_probs.shape)}")
    coarse_probs = coarse_probs.float()  # pixel coordinates and softmax sums need float32 (AMP)
    valid_map = valid_or_ones(coarse_probs, valid)
    batch = coarse_probs.shape[0]
    tau = cfg.softargmax_temperature
    points: list[torch.Tensor] = []
    labels: list[float] = []
    boxes = None
    if cfg.use_box or cfg.use_negative_point:
        boxes = box_from_mask(coarse_probs, valid_map, cfg.box_sigma, tau)
    if cfg.use_point:
        points.append(positive_point(coarse_probs, valid_map, tau))
        labels.append(1.0)
    if cfg.use_negative_point:
        points.append(negative_point(coarse_probs, valid_map, boxes, tau))
        labels.append(0.0)
    prompts = Prompts(boxes=boxes if cfg.use_box else None)
    if points:
        prompts.points = torch.stack(points, dim=1)
        prompts.point_labels = torch.tensor(labels, device=coarse_probs.device).expand(batch, -1).clone()
    if cfg.use_mask_prompt:
        prompts.mask_logits = mask_prompt(
            coarse_probs,
            cfg.mask_prompt_mode,
            cfg.mask_prompt_scale,
            mask_prompt_size,
            valid,
            cfg.mask_prompt_sigma,
        )
    return prompts
