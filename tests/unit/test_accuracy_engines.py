"""Image selection of ``benchmarks/accuracy_engines.py``: test split, or one validation fold."""

from __future__ import annotations

import importlib.util
import json

import pytest

from training.config import REPO_ROOT, SHARED_DATA_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "accuracy_engines.py"
SPLIT = REPO_ROOT / "models" / "default_split.json"
BUSI = SHARED_DATA_ROOT / "BUSI"


def _module():
    spec = importlib.util.spec_from_file_location("accuracy_engines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.skipif(not BUSI.is_dir(), reason="BUSI is not under ../shared/data")


def test_fold_selects_that_validation_folds_lesion_images_and_test_stays_default():
    module = _module()
    split = json.loads(SPLIT.read_text())
    labels = split["labels"]
    for fold in range(len(split["folds"])):
        chosen = module.lesion_samples(BUSI, 0, SPLIT, fold)
        want = {i for i in split["folds"][fold] if labels[i] != "normal"}
        assert {s.id for s in chosen} == want and len(chosen) == len(want)
    test = {s.id for s in module.lesion_samples(BUSI, 0, SPLIT)}
    assert test == {i for i in split["test_ids"] if labels[i] != "normal"}
    assert not test & {s.id for s in module.lesion_samples(BUSI, 0, SPLIT, 0)}


def test_a_fold_outside_the_split_or_without_a_split_file_is_a_one_line_error():
    module = _module()
    with pytest.raises(SystemExit, match=r"--fold 3: the split has folds 0\.\.2"):
        module.lesion_samples(BUSI, 0, SPLIT, 3)
    with pytest.raises(SystemExit, match="--fold needs --split-file"):
        module.lesion_samples(BUSI, 5, None, 0)


def test_an_encoder_crop_outside_the_config_bounds_is_a_one_line_error():
    module = _module()
    with pytest.raises(
        SystemExit, match=r"--encoder-crop-multiple must be 0 or a positive multiple of 4 \(got 30\)"
    ):
        module.main(["--n", "1", "--engines", "torch", "--encoder-crop-multiple", "30"])
