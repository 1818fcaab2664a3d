"""The coarse-mask variants measured by ``benchmarks/coarse_postprocessing.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coarse_postprocessing.py"


def _module():
    spec = importlib.util.spec_from_file_location("coarse_postprocessing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FixedLogits(torch.nn.Module):
    """Lesion logit +4 inside the given boxes of a 1×1×16×16 input, −4 elsewhere."""

    def __init__(self, boxes) -> None:
        super().__init__()
        self.boxes = boxes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lesion = torch.full((images.shape[0], 16, 16), -4.0)
        for y0, y1, x0, x1 in self.boxes:
            lesion[:, y0:y1, x0:x1] = 4.0
        return torch.stack([-lesion, lesion], dim=1)


def test_largest_component_keeps_only_the_heaviest_island():
    module = _module()
    coarse = _FixedLogits([(2, 8, 2, 8), (12, 14, 12, 14)])  # 36-pixel lesion + 4-pixel island
    kept = module.LargestComponent(coarse)(torch.zeros(2, 1, 16, 16))
    lesion = kept.softmax(dim=1)[:, 1] >= 0.5
    assert lesion[:, 2:8, 2:8].all() and not lesion[:, 12:14, 12:14].any()
    assert int(lesion.sum()) == 2 * 36
    single = _FixedLogits([(2, 8, 2, 8)])  # one component: unchanged
    images = torch.zeros(1, 1, 16, 16)
    torch.testing.assert_close(module.LargestComponent(single)(images), single(images))


def test_flip_averaging_is_the_mean_of_the_image_and_its_mirror():
    module = _module()
    coarse = _FixedLogits([(0, 16, 0, 4)])  # a band on the left only
    averaged = module.FlipAveraged(coarse)(torch.zeros(1, 1, 16, 16))
    assert torch.allclose(averaged[0, 1, :, :4], torch.zeros(16, 4))  # (+4 + −4) / 2
    assert torch.allclose(averaged, averaged.flip(-1))  # symmetric by construction


def test_minimum_area_drops_only_the_specks_and_keeps_every_lesion_big_enough():
    module = _module()
    # 36 px and 16 px lesions (14 % and 6 % of 256 px) and a 4 px speck (1.6 %)
    coarse = _FixedLogits([(2, 8, 2, 8), (10, 14, 2, 6), (12, 14, 12, 14)])
    kept = module.MinimumArea(coarse, 0.03)(torch.zeros(1, 1, 16, 16))
    lesion = kept.softmax(dim=1)[:, 1] >= 0.5
    assert lesion[:, 2:8, 2:8].all() and lesion[:, 10:14, 2:6].all()  # two lesions: both stay
    assert not lesion[:, 12:14, 12:14].any() and int(lesion.sum()) == 36 + 16
    nothing = _FixedLogits([])  # no lesion at all: unchanged
    images = torch.zeros(1, 1, 16, 16)
    torch.testing.assert_close(module.MinimumArea(nothing, 0.03)(images), nothing(images))


def test_minimum_total_area_clears_only_a_mask_that_is_tiny_as_a_whole():
    module = _module()
    specks = _FixedLogits([(0, 1, 0, 1), (15, 16, 15, 16)])  # 2 px in all: 0.8 % of 256
    lesion_and_speck = _FixedLogits([(2, 8, 2, 8), (12, 13, 12, 13)])  # 36 + 1 px
    images = torch.zeros(1, 1, 16, 16)
    cleared = module.MinimumTotalArea(specks, 0.01)(images).softmax(dim=1)[:, 1] >= 0.5
    assert not cleared.any()
    kept = module.MinimumTotalArea(lesion_and_speck, 0.01)(images)
    torch.testing.assert_close(kept, lesion_and_speck(images))  # a large mask stays whole, speck too
