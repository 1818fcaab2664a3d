import numpy as np
import pytest

from training.config import SHARED_DATA_ROOT, AugmentConfig
from training.data.datasets import list_samples, load_mask
from training.data.mask_augment import (
    CORRUPTION_NAMES,
    CORRUPTIONS,
    augment_mask,
    choose_kinds,
    corrupt,
    corrupt_with_dice,
    dice,
    soft_mask,
    to_mask_space,
)

BUSI_ROOT = SHARED_DATA_ROOT / "BUSI"


def _ellipse(size=256, centre=(120, 110), axes=(30, 45)) -> np.ndarray:
    rows, cols = np.indices((size, size))
    return ((rows - centre[0]) / axes[0]) ** 2 + ((cols - centre[1]) / axes[1]) ** 2 <= 1


def test_twelve_corruptions_with_bands():
    assert len(CORRUPTIONS) == 12 and CORRUPTION_NAMES == tuple(CORRUPTIONS)
    for low, high in CORRUPTIONS.values():
        assert 0.0 <= low <= high <= 1.0
    assert CORRUPTIONS["empty_prediction"] == (0.0, 0.0)


@pytest.fixture(scope="module")
def busi_lesions():
    if not BUSI_ROOT.is_dir():
        pytest.skip("shared BUSI data not present")
    lesions = [s for s in list_samples("busi", BUSI_ROOT) if s.label != "normal"]
    picked = np.random.default_rng(0).choice(len(lesions), 20, replace=False)
    return [to_mask_space(load_mask(lesions[k]), AugmentConfig().mask_size) for k in picked]


@pytest.mark.parametrize("kind", CORRUPTION_NAMES)
def test_each_corruption_lands_in_its_band_on_busi(kind, busi_lesions, record_property):
    low, high = CORRUPTIONS[kind]
    values = []
    for index, (mask, valid) in enumerate(busi_lesions):
        for repeat in range(2):
            corrupted, value = corrupt_with_dice(
                mask, kind, np.random.default_rng(100 * index + repeat), valid
            )
            assert corrupted.shape == mask.shape and corrupted.dtype == bool
            assert value == pytest.approx(dice(corrupted, mask))
            assert not (corrupted & ~valid).any(), "foreground placed in the padding"
            values.append(value)
    rate = float(np.mean([low <= v <= high for v in values]))
    record_property(f"band_hit_rate_{kind}", rate)
    print(f"{kind}: {rate:.2f} in [{low}, {high}], Dice mean {np.mean(values):.3f}")
    assert rate >= 0.9


def test_determinism_and_seed_dependence():
    mask = _ellipse()
    first = augment_mask(mask, 7, np.random.default_rng(3))
    again = augment_mask(mask, 7, np.random.default_rng(3))
    assert [a.kind for a in first] == [b.kind for b in again]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.soft, b.soft) and a.dice == b.dice and a.temperature == b.temperature
    other = augment_mask(mask, 7, np.random.default_rng(4))
    assert any(not np.array_equal(a.soft, b.soft) for a, b in zip(first, other, strict=True))
    for kind in CORRUPTION_NAMES:
        assert np.array_equal(
            corrupt(mask, kind, np.random.default_rng(9)), corrupt(mask, kind, np.random.default_rng(9))
        )


def test_soft_mask_is_a_probability_map_with_the_hard_boundary():
    mask = _ellipse()
    for temperature in (2.0, 5.0, 8.0):
        soft = soft_mask(mask, temperature)
        assert soft.dtype == np.float32 and soft.shape == mask.shape
        assert soft.min() > 0 and soft.max() < 1
        assert np.array_equal(soft > 0.5, mask)
    # Higher temperature → softer transition.
    assert soft_mask(mask, 8.0)[mask].min() < soft_mask(mask, 2.0)[mask].min()
    for degenerate in (np.zeros((32, 32), bool), np.ones((32, 32), bool)):
        soft = soft_mask(degenerate, 4.0)
        assert 0 < soft.min() <= soft.max() < 1 and np.array_equal(soft > 0.5, degenerate)
    with pytest.raises(ValueError):
        soft_mask(mask, 0)


def test_augment_mask_native_input_and_coverage():
    cfg = AugmentConfig(mask_size=64, temperature_min=2.0, temperature_max=3.0)
    native = np.zeros((90, 160), bool)
    native[30:60, 50:100] = True
    samples = augment_mask(native, 24, np.random.default_rng(0), cfg)
    assert len(samples) == 24 and {s.kind for s in samples} == set(CORRUPTION_NAMES)
    square, valid = to_mask_space(native, 64)
    assert square.shape == (64, 64) and not valid[40:].any() and valid[:36].all()
    for sample in samples:
        assert sample.soft.shape == (64, 64) and 2.0 <= sample.temperature <= 3.0
        hard = sample.soft > 0.5
        assert not (hard & ~valid).any()
        assert sample.dice == pytest.approx(dice(hard, square))
    assert sorted(choose_kinds(12, np.random.default_rng(1))) == sorted(CORRUPTION_NAMES)


def test_empty_ground_truth():
    empty = np.zeros((64, 64), bool)
    results = augment_mask(empty, 12, np.random.default_rng(0), AugmentConfig(mask_size=64))
    for result in results:
        hard = result.soft > 0.5
        if result.kind == "empty_prediction":
            assert not hard.any() and result.dice == 1.0
        else:
            assert hard.any() and result.dice == 0.0
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(_ellipse(), "blur", np.random.default_rng(0))
