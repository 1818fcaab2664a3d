"""Phase 1 with a moving average of the weights (``coarse.ema_decay``): what is validated and kept
is the average, it survives a cancel and resume exactly, and off (the default) nothing changes."""

from __future__ import annotations

import json

import pytest
import torch

from training.callbacks import TrainingCallback, TrainingCancelled
from training.checkpoints import load_checkpoint
from training.pipeline import run_training

pytestmark = pytest.mark.slow  # runs phase 1 on the synthetic tree (seconds each)


class StopAfterSteps(TrainingCallback):
    def __init__(self, steps: int) -> None:
        self.remaining = steps

    def on_event(self, event) -> None:
        if event.kind == "step" and event.phase == "coarse" and event.epoch is not None:
            self.remaining -= 1

    def should_stop(self) -> bool:
        return self.remaining <= 0


def _fold0(cfg) -> tuple[dict, dict]:
    fold = cfg.output_dir / "coarse" / "fold0"
    return load_checkpoint(fold / "last.pt"), load_checkpoint(fold / "best.pt")


def _averaged_weights(last: dict) -> dict[str, torch.Tensor]:
    """The averaged model's own weights from the ``AveragedModel`` state in ``last.pt``."""
    return {key.removeprefix("module."): value for key, value in last["ema"].items() if key != "n_averaged"}


def _coarse(ema_decay: float, epochs: int = 1) -> dict:
    return {
        "phases": ["coarse"],
        "coarse": {"epochs": epochs, "batch_size": 1, "folds_to_run": [0], "ema_decay": ema_decay},
    }


def test_the_average_is_validated_and_kept(tiny_training_config, fast_refiner_encoder):
    cfg = tiny_training_config(**_coarse(0.8))
    run_training(cfg)
    last, best = _fold0(cfg)
    averaged = _averaged_weights(last)
    n_train = json.loads((cfg.output_dir / "coarse" / "fold0" / "summary.json").read_text())["n_train"]
    assert int(last["ema"]["n_averaged"]) == n_train  # one update a step: batch 1, one epoch
    assert set(averaged) == set(last["model"]) == set(best["model"])
    # One epoch: best.pt is that epoch, and it holds the average, not the raw weights.
    moved = [key for key, value in last["model"].items() if value.is_floating_point()]
    differs = [key for key in moved if not torch.equal(averaged[key], last["model"][key])]
    assert differs, "after several steps the average differs from the raw weights"
    for key, value in averaged.items():
        torch.testing.assert_close(best["model"][key], value)


def test_off_by_default_keeps_the_raw_weights(tiny_training_config, fast_refiner_encoder):
    cfg = tiny_training_config(**_coarse(0.0))
    assert tiny_training_config().coarse.ema_decay == 0.0
    run_training(cfg)
    last, best = _fold0(cfg)
    assert "ema" not in last
    for key, value in last["model"].items():
        torch.testing.assert_close(best["model"][key], value)


def test_cancel_and_resume_continue_the_same_average(tiny_training_config, fast_refiner_encoder, tmp_path):
    cfg = tiny_training_config(**_coarse(0.8, epochs=2))
    with pytest.raises(TrainingCancelled):
        run_training(cfg, StopAfterSteps(3))
    run_training(cfg, resume=True)
    straight = tiny_training_config(**_coarse(0.8, epochs=2), output_dir=tmp_path / "straight")
    run_training(straight)
    resumed, _ = _fold0(cfg)
    uninterrupted, _ = _fold0(straight)
    assert resumed["ema"]["n_averaged"] == uninterrupted["ema"]["n_averaged"]
    for key, value in _averaged_weights(uninterrupted).items():
        torch.testing.assert_close(_averaged_weights(resumed)[key], value, rtol=1e-5, atol=1e-6)


def test_resuming_a_run_without_the_average_says_so(tiny_training_config, fast_refiner_encoder):
    cfg = tiny_training_config(**_coarse(0.0, epochs=2))
    with pytest.raises(TrainingCancelled):
        run_training(cfg, StopAfterSteps(2))
    with_average = tiny_training_config(**_coarse(0.8, epochs=2))
    with pytest.raises(ValueError, match="ema_decay"):
        run_training(with_average, resume=True)
