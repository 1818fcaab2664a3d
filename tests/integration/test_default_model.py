"""The shipped default model: its recorded test-split Dice against a fresh evaluation.

`models/default.pt` is the bundle the API serves by default; `models/default.json` is the
evaluation the training pipeline recorded for it on the BUSI test split (per image). A fixed
subset of that split is evaluated again here with the same protocol and must give the same
numbers, so the model card's figures are reproducible from the repository alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples
from training.evaluate import evaluate
from training.inference import Predictor

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE = REPO_ROOT / "models" / "default.pt"
RECORD = REPO_ROOT / "models" / "default.json"
BUSI = SHARED_DATA_ROOT / "BUSI"
N_LESION, N_NORMAL = 10, 3


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_bundle(None)  # what the API serves when the store has no active model


def test_default_bundle_is_the_shipped_trained_model(predictor, record):
    assert BUNDLE.stat().st_size < 50 * 1024 * 1024
    assert predictor.model_version == record["model_version"]
    assert not predictor.model_version.endswith("-untrained")


def test_recorded_summary_matches_its_per_image_records(record):
    test = record["test"]
    lesion = [r for r in test["per_image"] if r["lesion"]]
    assert test["n_images"] == len(lesion) > 100
    assert test["dice_coarse"] == pytest.approx(np.mean([r["dice_coarse"] for r in lesion]), abs=1e-9)
    assert test["dice_refined"] == pytest.approx(np.mean([r["dice_refined"] for r in lesion]), abs=1e-9)


#: The test-split records and the encoder crop each was computed with: the training pipeline's
#: record (before inference used the crop: the full 256² input), and the evaluation of the served
#: rule (``ultrarefiner evaluate``, crop 56; docs/runs/encoder-crop-avx2-20261207/).
RECORDS = {
    "recorded-full-input": (RECORD, 0, ("test", "per_image")),
    "served-encoder-crop": (
        REPO_ROOT / "docs" / "runs" / "encoder-crop-avx2-20261207" / "evaluate_test_crop56.json",
        56,
        ("per_image",),
    ),
}


@pytest.mark.parametrize("which", sorted(RECORDS))
def test_fresh_evaluation_reproduces_recorded_dice(predictor, which):
    path, crop_multiple, keys = RECORDS[which]
    per_image = json.loads(path.read_text())
    for key in keys:
        per_image = per_image[key]
    recorded = {r["id"]: r for r in per_image}
    lesion_ids = sorted(i for i, r in recorded.items() if r["lesion"])[:N_LESION]
    normal_ids = sorted(i for i, r in recorded.items() if not r["lesion"])[:N_NORMAL]
    by_id = {s.id: s for s in list_samples("busi", BUSI)}
    assert predictor.config.refiner.encoder_crop_multiple == 56  # what the bundle serves
    predictor.use_encoder_crop(crop_multiple)
    try:
        report = evaluate(predictor, [by_id[i] for i in lesion_ids + normal_ids])
    finally:
        predictor.use_encoder_crop(56)

    assert report["n_images"] == N_LESION
    fresh = {r["id"]: r for r in report["per_image"]}

    def close(sample_id: str, key: str) -> bool:
        return fresh[sample_id][key] == pytest.approx(recorded[sample_id][key], abs=2e-3)

    for sample_id in lesion_ids:
        for key in ("dice_coarse", "dice_refined"):
            assert close(sample_id, key), (sample_id, key, fresh[sample_id][key], recorded[sample_id][key])
    for sample_id in normal_ids:
        for key in ("fp_coarse", "fp_refined"):
            assert fresh[sample_id][key] == recorded[sample_id][key], (sample_id, key)
        for key in ("fp_pixels_coarse", "fp_pixels_refined"):
            assert close(sample_id, key), (sample_id, key)
    expected_coarse = np.mean([recorded[i]["dice_coarse"] for i in lesion_ids])
    expected_refined = np.mean([recorded[i]["dice_refined"] for i in lesion_ids])
    assert report["dice_coarse"] == pytest.approx(expected_coarse, abs=1e-3)
    assert report["dice_refined"] == pytest.approx(expected_refined, abs=1e-3)
