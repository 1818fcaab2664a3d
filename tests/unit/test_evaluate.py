"""The evaluation protocol's per-image records, their summary, and the clinician's box."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import image_record, summarize, truth_box


def _disc(shape=(40, 60), centre=(20, 30), radius=8) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_truth_box_is_tight_with_an_exclusive_end():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:9, 10:21] = True
    assert truth_box(mask) == [10.0, 5.0, 21.0, 9.0]
    mask[29, 39] = True
    assert truth_box(mask) == [10.0, 5.0, 40.0, 30.0]
    with pytest.raises(ValueError, match="empty"):
        truth_box(np.zeros((4, 4), dtype=bool))


def test_lesion_images_give_dice_and_normal_images_false_positives():
    truth = _disc()
    half = truth.copy()
    half[:, :30] = False  # the right half of the lesion
    empty = np.zeros_like(truth)
    records = [
        image_record("perfect", "benign", truth, truth.astype(float), truth.astype(float)),
        image_record("half", "malignant", truth, half.astype(float), empty.astype(float)),
        image_record("quiet", "normal", empty, empty.astype(float), empty.astype(float)),
        image_record("fires", "normal", empty, truth.astype(float) * 0.6, truth.astype(float) * 0.4),
    ]
    half_dice = 2 * half.sum() / (half.sum() + truth.sum())
    assert records[1]["dice_coarse"] == pytest.approx(half_dice)
    assert records[1]["dice_refined"] == pytest.approx(0.0, abs=1e-6)
    # At the threshold 0.5: 0.6 fires, 0.4 does not.
    assert records[3]["fp_coarse"] is True and records[3]["fp_refined"] is False
    report = summarize(records)
    assert report["n_images"] == 2
    assert report["dice_coarse"] == pytest.approx((1.0 + half_dice) / 2)
    assert report["dice_refined"] == pytest.approx(0.5, abs=1e-6)
    assert report["normal"]["n_images"] == 2
    assert report["normal"]["fp_rate_coarse"] == pytest.approx(0.5)
    assert report["normal"]["fp_rate_refined"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="ground truth"):
        image_record("bad", "benign", truth, np.zeros((3, 3)), None)
