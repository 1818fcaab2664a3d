"""``init_from``: a run that starts from a bundle's weights (fine-tuning, e.g. on corrections)."""

from __future__ import annotations

import json

import pytest
import torch

from training.checkpoints import build_untrained_bundle, load_bundle, save_bundle
from training.config import TransUNetConfig
from training.pipeline import run_training


@pytest.fixture
def start_bundle(tmp_path, tiny_training_config):
    """An untrained bundle of a tiny architecture (img_size 64) with seeded weights."""
    cfg = tiny_training_config()
    path = tmp_path / "start.pt"
    save_bundle(path, build_untrained_bundle(cfg, seed=7))
    return path


def test_a_run_starts_from_the_bundle_and_reports_before_and_after(
    tmp_path, tiny_training_config, start_bundle, fast_refiner_encoder
):
    # The request names the 224-pixel compact architecture; the bundle's (64) is what its weights fit.
    cfg = tiny_training_config(
        phases=["coarse"],
        init_from=start_bundle,
        transunet=TransUNetConfig.named("compact").model_dump(),
        coarse={"epochs": 1, "lr": 1e-12},  # a no-op step: the weights stay the bundle's
    )
    summary = run_training(cfg)
    start = load_bundle(start_bundle)
    tuned = load_bundle(summary["bundle_path"])
    assert tuned["config"]["transunet"]["img_size"] == 64
    for name, tensor in start["coarse_state_dict"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # batch-norm statistics follow the new images even without a step
        assert torch.allclose(tuned["coarse_state_dict"][name].float(), tensor.float(), atol=1e-6), name
    # No refiner phase ran: the refiner is the starting bundle's, not a fresh seeded one.
    for name, tensor in start["refiner_state_dict"].items():
        assert torch.equal(tuned["refiner_state_dict"][name], tensor), name

    before, after = summary["init_test"], summary["test"]
    assert (
        before["model_version"] == start["model_version"] and after["model_version"] == tuned["model_version"]
    )
    assert before["n_images"] == after["n_images"] > 0
    assert tuned["metrics"]["init_from"]["model_version"] == start["model_version"]
    assert (tmp_path / "run" / "evaluation_test_baseline.json").is_file()
    # The starting weights are the fold's first candidate (epoch -1): an epoch that validates no
    # better (here: a no-op step) never replaces them.
    fold = json.loads((tmp_path / "run" / "coarse" / "fold0" / "summary.json").read_text())
    assert fold["history"][0]["epoch"] == -1 and fold["history"][0]["start"] is True
    assert fold["best_epoch"] == -1
    assert [entry["epoch"] for entry in fold["history"]] == [-1, 0]


def test_a_missing_init_bundle_is_a_clear_error(tiny_training_config, tmp_path):
    cfg = tiny_training_config(phases=["coarse"], init_from=tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="init_from: no bundle at"):
        run_training(cfg)


def test_a_fine_tuned_refiner_that_validates_no_better_keeps_the_starting_weights(
    tmp_path, tiny_training_config, start_bundle, fast_refiner_encoder
):
    cfg = tiny_training_config(
        phases=["coarse", "augment", "refiner"],
        init_from=start_bundle,
        coarse={"epochs": 1, "lr": 1e-12},
        refiner_train={"epochs": 1, "lr": 1e-12},
    )
    summary = run_training(cfg)
    refiner = json.loads((tmp_path / "run" / "refiner" / "summary.json").read_text())
    assert refiner["best_epoch"] == -1
    start, tuned = load_bundle(start_bundle), load_bundle(summary["bundle_path"])
    for name, tensor in start["refiner_state_dict"].items():
        assert torch.equal(tuned["refiner_state_dict"][name], tensor), name


def test_fine_tuning_only_the_refiner_ships_a_bundle_with_the_starting_coarse_model(
    tmp_path, tiny_training_config, start_bundle, fast_refiner_encoder
):
    cfg = tiny_training_config(
        phases=["augment", "refiner"], init_from=start_bundle, refiner_train={"epochs": 1, "lr": 1e-3}
    )
    summary = run_training(cfg)
    assert summary["bundle_path"] is not None and summary["test"]["n_images"] > 0
    start, tuned = load_bundle(start_bundle), load_bundle(summary["bundle_path"])
    assert tuned["model_version"] != start["model_version"]
    assert set(tuned["coarse_state_dict"]) == set(start["coarse_state_dict"])
    for name, tensor in start["coarse_state_dict"].items():
        assert torch.equal(tuned["coarse_state_dict"][name], tensor), name
    assert tuned["metrics"]["init_from"]["model_version"] == start["model_version"]


def test_a_refiner_only_run_from_scratch_still_has_no_bundle(tiny_training_config, fast_refiner_encoder):
    summary = run_training(tiny_training_config(phases=["augment", "refiner"]))
    assert summary["bundle_path"] is None and summary["test"] is None
