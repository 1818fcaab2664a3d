"""Several coarse segmenters as one: the mean of their ``B×2×S×S`` logits.

Averaging logits (not probabilities) keeps the contract of every coarse segmenter in
:mod:`training.modeling.coarse_registry`: images in, ``B×2×S×S`` logits out, so the predictor, the
evaluation and the serving engines' graph export take an ensemble exactly like a single model.
"""

from __future__ import annotations

import torch
from torch import nn


class MeanLogits(nn.Module):
    """``B×C×S×S`` images → the mean ``B×2×S×S`` logits of ``models`` (all of the same input)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one coarse model")
        self.models = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([model(images) for model in self.models]).mean(dim=0)
