"""Averaged coarse segmenters (``training.modeling.coarse_ensemble``), as the ensemble benchmark
uses them."""

from __future__ import annotations

import pytest
import torch

from training.config import TrainingConfig
from training.modeling.coarse_ensemble import MeanLogits
from training.modeling.coarse_registry import build_coarse


class _Constant(torch.nn.Module):
    def __init__(self, lesion: float) -> None:
        super().__init__()
        self.lesion = lesion

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lesion = torch.full((images.shape[0], *images.shape[-2:]), self.lesion)
        return torch.stack([-lesion, lesion], dim=1)


def test_mean_logits_is_the_mean_of_the_members_logits():
    ensemble = MeanLogits([_Constant(3.0), _Constant(-1.0), _Constant(1.0)])
    logits = ensemble(torch.zeros(2, 1, 8, 8))
    assert logits.shape == (2, 2, 8, 8)
    torch.testing.assert_close(logits[:, 1], torch.ones(2, 8, 8))  # (3 − 1 + 1) / 3
    torch.testing.assert_close(logits[:, 0], -torch.ones(2, 8, 8))
    # One confident lesion vote (+3) against two weaker "no" votes (−2): the mean (−1/3) says no.
    outvoted = MeanLogits([_Constant(3.0), _Constant(-2.0), _Constant(-2.0)])(torch.zeros(1, 1, 4, 4))
    assert not (outvoted[:, 1] > 0).any()


def test_mean_of_real_coarse_models_keeps_the_coarse_contract():
    cfg = TrainingConfig()
    torch.manual_seed(0)
    first, second = build_coarse(cfg).eval(), build_coarse(cfg).eval()
    size = cfg.transunet.img_size
    images = torch.rand(1, cfg.transunet.in_channels, size, size)
    with torch.inference_mode():
        mean = MeanLogits([first, second]).eval()(images)
        expected = (first(images) + second(images)) / 2
    assert mean.shape == (1, 2, size, size)
    torch.testing.assert_close(mean, expected)


def test_an_empty_ensemble_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        MeanLogits([])


def test_benchmark_names_a_missing_member_in_one_line(tmp_path):
    """A wrong ``--members`` path stops the benchmark with a message naming it, not a traceback."""
    import importlib.util
    from pathlib import Path

    from training.config import SHARED_DATA_ROOT

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "coarse_ensemble.py"
    spec = importlib.util.spec_from_file_location("coarse_ensemble_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = tmp_path / "nope" / "best.pt"
    not_a_checkpoint = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_checkpoint)
    for member, expected in (
        (missing, "checkpoint not found"),
        (not_a_checkpoint, "not a training checkpoint"),
    ):
        with pytest.raises(SystemExit) as stopped:
            module.main(
                [
                    "--dataset",
                    "busbra",
                    "--root",
                    str(SHARED_DATA_ROOT / "BUSBRA-sample"),
                    "--members",
                    str(member),
                ]
            )
        message = str(stopped.value)
        assert message.startswith("--members / --run-dir: ") and str(member) in message
        assert expected in message and "\n" not in message
