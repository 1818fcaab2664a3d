"""``torch``: the networks run in eager PyTorch, as trained (CPU or CUDA)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from backend.app.engines.base import Engine, register


@register
class TorchEngine(Engine):
    name = "torch"
    runs_on_cuda = True

    def prepare_coarse(
        self, coarse: nn.Module, in_channels: int, img_size: int, cache_dir: Path
    ) -> nn.Module:
        return coarse

    def refiner_parts(self, refiner, cache_dir: Path) -> tuple[nn.Module, nn.Module]:
        return refiner.image_encoder, refiner.mask_decoder

    def prepare_refiner(self, refiner, cache_dir: Path):
        return refiner

    def prepare_predictor(self, predictor, cache_dir: Path):
        return predictor
