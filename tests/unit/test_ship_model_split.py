"""`scripts/ship_model.py` finds a run's split: its own split.json, else the --split-file it used."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from training.config import TrainingConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ship_model.py"


@pytest.fixture(scope="module")
def ship():
    spec = importlib.util.spec_from_file_location("ship_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_runs_own_split_comes_first(ship, tmp_path):
    given = tmp_path / "given.json"
    given.write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "split.json").write_text("{}")
    cfg = TrainingConfig.model_validate({"data": {"split_file": str(given)}})
    assert ship._split_path(tmp_path / "run", cfg) == tmp_path / "run" / "split.json"


def test_a_run_given_a_split_file_ships_that_file(ship, tmp_path):
    given = tmp_path / "given.json"
    given.write_text("{}")
    (tmp_path / "run").mkdir()
    cfg = TrainingConfig.model_validate({"data": {"split_file": str(given)}})
    assert ship._split_path(tmp_path / "run", cfg) == given


def test_no_split_at_all_is_a_clear_refusal(ship, tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="has no split"):
        ship._split_path(tmp_path / "run", TrainingConfig.model_validate({}))
    cfg = TrainingConfig.model_validate({"data": {"split_file": str(tmp_path / "gone.json")}})
    with pytest.raises(SystemExit, match="has no split"):
        ship._split_path(tmp_path / "run", cfg)
