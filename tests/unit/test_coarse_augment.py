"""Phase-1 training augmentation: ranges from the config, geometry shared by image and label."""

import pytest
import torch
from pydantic import ValidationError

from training.config import CoarseTrainConfig
from training.phases.coarse import _gaussian_blur, augment_coarse_batch

#: Every augmentation switched off: the batch must come back unchanged.
IDENTITY = dict(
    aug_flip_probability=0.0,
    aug_rotation_deg=0.0,
    aug_scale=(1.0, 1.0),
    aug_translation=0.0,
    aug_gamma=(1.0, 1.0),
    aug_contrast=(1.0, 1.0),
    aug_brightness=0.0,
    aug_noise_probability=0.0,
    aug_blur_probability=0.0,
    aug_low_resolution_probability=0.0,
)


def _batch(size: int = 32, batch: int = 4):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=generator)
    targets = torch.zeros(batch, size, size, dtype=torch.long)
    targets[:, 8:20, 4:14] = 1  # off-centre rectangle: a flip moves it
    return images, targets


def test_all_switched_off_is_the_identity():
    images, targets = _batch()
    out_images, out_targets = augment_coarse_batch(
        images.clone(), targets.clone(), torch.Generator().manual_seed(1), CoarseTrainConfig(**IDENTITY)
    )
    assert torch.allclose(out_images, images, atol=1e-5)
    assert torch.equal(out_targets, targets)


def test_a_certain_flip_mirrors_image_and_label_alike():
    images, targets = _batch()
    cfg = CoarseTrainConfig(**{**IDENTITY, "aug_flip_probability": 1.0})
    out_images, out_targets = augment_coarse_batch(images, targets, torch.Generator().manual_seed(1), cfg)
    assert torch.allclose(out_images, images.flip(-1), atol=1e-5)
    assert torch.equal(out_targets, targets.flip(-1))


def test_geometry_moves_the_label_with_the_image():
    # The image *is* the label: after any affine the thresholded image must match the label.
    _, targets = _batch(size=64, batch=8)
    targets[:, 30:50, 20:44] = 1
    images = targets[:, None].float()
    cfg = CoarseTrainConfig(**{**IDENTITY, "aug_flip_probability": 0.5, "aug_rotation_deg": 15.0,
                               "aug_scale": (0.75, 1.25), "aug_translation": 0.1})  # fmt: skip
    out_images, out_targets = augment_coarse_batch(images, targets, torch.Generator().manual_seed(2), cfg)
    agreement = ((out_images[:, 0] > 0.5).long() == out_targets).float().mean()
    assert agreement > 0.99
    assert not torch.equal(out_targets, targets)  # something did move


def test_same_seed_same_batch_and_values_stay_in_range():
    images, targets = _batch()
    cfg = CoarseTrainConfig(
        aug_noise_probability=1.0, aug_blur_probability=1.0, aug_low_resolution_probability=1.0
    )
    first = augment_coarse_batch(images.clone(), targets.clone(), torch.Generator().manual_seed(5), cfg)
    second = augment_coarse_batch(images.clone(), targets.clone(), torch.Generator().manual_seed(5), cfg)
    other = augment_coarse_batch(images.clone(), targets.clone(), torch.Generator().manual_seed(6), cfg)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    assert float(first[0].min()) >= 0.0 and float(first[0].max()) <= 1.0
    assert set(first[1].unique().tolist()) <= {0, 1}


def test_low_resolution_and_blur_remove_fine_detail():
    # A one-pixel checkerboard: a coarser scanner or a blur must flatten it towards its mean.
    board = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2
    images = board.float().expand(2, 1, 32, 32).clone()
    targets = torch.zeros(2, 32, 32, dtype=torch.long)
    for field in ("aug_low_resolution_probability", "aug_blur_probability"):
        cfg = CoarseTrainConfig(**{**IDENTITY, field: 1.0})
        out_images, _ = augment_coarse_batch(images.clone(), targets, torch.Generator().manual_seed(3), cfg)
        assert float(out_images.std()) < 0.5 * float(images.std()), field
        assert abs(float(out_images.mean()) - 0.5) < 0.05, field


def test_blur_keeps_a_constant_image_and_its_sigma_is_per_image():
    flat = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(_gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat, atol=1e-6)
    spike = torch.zeros(2, 1, 17, 17)
    spike[:, 0, 8, 8] = 1.0
    out = _gaussian_blur(spike, torch.tensor([0.5, 2.0]))
    assert float(out[0, 0, 8, 8]) > float(out[1, 0, 8, 8])  # the wider σ spreads the spike more
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {"aug_scale": (1.2, 0.8)},
        {"aug_gamma": (0.0, 1.0)},
        {"aug_low_resolution_zoom": (0.5, 1.5)},
        {"aug_blur_sigma": (1.0, 50.0)},
        {"aug_flip_probability": 1.5},
    ],
)
def test_bad_ranges_are_refused_by_name(overrides):
    with pytest.raises(ValidationError, match=next(iter(overrides))):
        CoarseTrainConfig(**overrides)


def test_aspect_stretch_changes_width_against_height_within_its_range():
    # A centred square label: a stretch s makes it √s times wider and √s times lower (or the
    # reverse), so the width/height ratio of every augmented label lies in [1/a, a], and the batch
    # holds both wider and taller ones.
    size, batch, a = 96, 16, 2.0
    targets = torch.zeros(batch, size, size, dtype=torch.long)
    targets[:, 36:60, 36:60] = 1
    images = targets[:, None].float()
    cfg = CoarseTrainConfig(**{**IDENTITY, "aug_aspect": a})
    out_images, out_targets = augment_coarse_batch(images, targets, torch.Generator().manual_seed(3), cfg)
    ratios = []
    for label in out_targets:
        width = int(label.any(dim=0).sum())
        height = int(label.any(dim=1).sum())
        ratios.append(width / height)
    ratios = torch.tensor(ratios)
    assert ratios.min() < 0.95 and ratios.max() > 1.05
    assert ratios.min() >= 1 / a - 0.1 and ratios.max() <= a + 0.1
    agreement = ((out_images[:, 0] > 0.5).long() == out_targets).float().mean()
    assert agreement > 0.99


def test_aspect_below_one_is_refused():
    with pytest.raises(ValidationError, match="aug_aspect"):
        CoarseTrainConfig(aug_aspect=0.5)
