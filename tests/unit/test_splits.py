import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import SHARED_DATA_ROOT, TrainingConfig
from training.data.datasets import Sample, list_samples
from training.data.splits import (
    Split,
    duplicates_of,
    find_duplicates,
    group_duplicates,
    make_split,
    split_for,
)

BUSI_ROOT = SHARED_DATA_ROOT / "BUSI"


def _texture(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A smooth random image: distinct textures give distant perceptual hashes."""
    coarse = rng.random((6, 6))
    return np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))


def _synthetic(tmp_path: Path, n_unique: int = 40, seed: int = 0) -> list[Sample]:
    """``n_unique`` distinct images, plus exact copies, noisy copies and a shared patient id."""
    rng = np.random.default_rng(seed)
    samples = []
    labels = ["benign", "malignant", "normal"]
    for k in range(n_unique):
        path = tmp_path / f"img{k:03d}.png"
        Image.fromarray(_texture(rng)).save(path)
        samples.append(Sample(f"img{k:03d}", path, [], labels[k % 3], None, "synthetic"))
    base = np.asarray(Image.open(samples[0].image_path))
    Image.fromarray(base).save(tmp_path / "copy.png")  # exact duplicate, other label (label leak)
    samples.append(Sample("copy", tmp_path / "copy.png", [], "malignant", None, "synthetic"))
    noisy = np.clip(
        np.asarray(Image.open(samples[1].image_path)).astype(int) + rng.integers(-3, 4, base.shape), 0, 255
    )
    Image.fromarray(noisy.astype(np.uint8)).save(tmp_path / "noisy.png")  # near duplicate
    samples.append(Sample("noisy", tmp_path / "noisy.png", [], "malignant", None, "synthetic"))
    samples[2].group = samples[3].group = "patient-7"
    return samples


def test_grouping_exact_near_and_patient(tmp_path):
    samples = _synthetic(tmp_path)
    report = find_duplicates(samples, threshold=6)
    groups = report.groups
    index = {s.id: k for k, s in enumerate(samples)}
    assert groups[index["copy"]] == groups[index["img000"]]
    assert groups[index["noisy"]] == groups[index["img001"]]
    assert groups[index["img002"]] == groups[index["img003"]]
    assert report.exact_pairs == [(0, index["copy"])]
    assert len(set(groups)) == len(samples) - 3
    assert group_duplicates(samples, 6) == groups


def test_duplicates_of_finds_copies_across_lists_and_ignores_patients(tmp_path):
    samples = _synthetic(tmp_path)
    by_id = {s.id: s for s in samples}
    # "copy" and "noisy" are a re-saved and a noisy copy of img000 and img001; img002 and img003
    # share a patient, which across two lists (two datasets) means nothing.
    guard = [by_id[i] for i in ("img000", "img001", "img002", "img004", "img005")]
    run = [by_id[i] for i in ("copy", "noisy", "img003", "img010")]
    assert duplicates_of(guard, run, threshold=6) == [True, True, False, False, False]
    # The largest threshold calls any two images duplicates.
    assert duplicates_of(guard, run, threshold=64) == [True] * 5
    assert duplicates_of(guard, [], threshold=6) == [False] * 5
    assert duplicates_of([], run, threshold=6) == []


def _check_split(split: Split, samples: list[Sample], groups: list[int], test_fraction: float, folds: int):
    ids = [s.id for s in samples]
    test = set(split.test_ids)
    fold_sets = [set(f) for f in split.folds]
    # A partition of the ids.
    assert sorted(split.test_ids + [i for f in split.folds for i in f]) == sorted(ids)
    assert len(split.folds) == folds
    # No group straddles test/train or two folds.
    place: dict[int, set] = {}
    for sample_id, group in zip(ids, groups, strict=True):
        where = "test" if sample_id in test else next(k for k, f in enumerate(fold_sets) if sample_id in f)
        place.setdefault(group, set()).add(where)
    assert all(len(where) == 1 for where in place.values())
    # Proportions: test ≈ test_fraction overall and per label; folds of equal size and mix.
    labels = Counter(s.label for s in samples)
    assert abs(len(test) / len(ids) - test_fraction) < 0.02
    test_labels = Counter(split.labels[i] for i in split.test_ids)
    for label, total in labels.items():
        assert abs(test_labels[label] - test_fraction * total) <= max(2, 0.03 * total)
    trainval = len(ids) - len(test)
    for fold in split.folds:
        assert abs(len(fold) - trainval / folds) <= max(2, 0.03 * trainval)
        fold_labels = Counter(split.labels[i] for i in fold)
        for label in labels:
            share = sum(split.labels[i] == label for i in split.trainval_ids) / folds
            assert abs(fold_labels[label] - share) <= max(2, 0.05 * share)
    for k in range(folds):
        assert set(split.train_ids(k)).isdisjoint(split.val_ids(k))
        assert set(split.train_ids(k)) | set(split.val_ids(k)) == set(split.trainval_ids)


def test_synthetic_split_and_roundtrip(tmp_path):
    samples = _synthetic(tmp_path, n_unique=60)
    groups = group_duplicates(samples, 6)
    split = make_split(samples, 0.2, 3, seed=1, threshold=6, groups=groups)
    assert split.dataset == "synthetic" and split.params["folds"] == 3
    index = {s.id: k for k, s in enumerate(samples)}
    where = {i: ("test" if i in split.test_ids else "trainval") for i in split.ids}
    assert where["copy"] == where["img000"] and where["noisy"] == where["img001"]
    path = split.save(tmp_path / "out" / "split.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["seed"] == 1 and data["counts"]["total"] == len(samples)
    assert {"dataset", "params", "ids", "groups", "test_ids", "folds", "labels"} <= set(data)
    loaded = Split.load(path)
    assert loaded == split
    assert loaded.groups["copy"] == loaded.groups["img000"] == groups[index["img000"]]
    # Deterministic under the seed; another seed gives another split.
    assert make_split(samples, 0.2, 3, seed=1, threshold=6, groups=groups) == split
    assert make_split(samples, 0.2, 3, seed=2, threshold=6, groups=groups).test_ids != split.test_ids

    # The test samples, in dataset order; a dataset that lacks some of them is named as the cause.
    test = split.test_samples(samples)
    assert [s.id for s in test] == [s.id for s in samples if s.id in set(split.test_ids)]
    assert len(test) == len(split.test_ids) > 0
    lacking = [s for s in samples if s.id != split.test_ids[0]]
    with pytest.raises(ValueError, match=r"names 1 test images not in /data/other \(e\.g\. '"):
        split.test_samples(lacking, source="/data/other")
    fold_one = set(split.val_ids(1))
    assert [s.id for s in split.val_samples(1, samples)] == [s.id for s in samples if s.id in fold_one]
    with pytest.raises(ValueError, match="fold-1 validation images not in"):
        split.val_samples(1, [s for s in samples if s.id not in fold_one])


def test_split_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Split.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="bad.json"):
        Split.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not an UltraRefiner split"):
        Split.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="groups"):
        make_split(_synthetic(tmp_path)[:3], 0.2, 5, 0, 6, groups=[0, 1, 2])


def test_split_for_reuses_or_remakes(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    samples = _synthetic(tmp_path / "imgs", n_unique=45)
    cfg = TrainingConfig(output_dir=tmp_path / "run", data={"dataset": "busi", "folds": 3, "seed": 5})
    first = split_for(cfg, samples)
    assert cfg.split_path.is_file() and first.dataset == "busi"
    stamp = cfg.split_path.stat().st_mtime_ns
    assert split_for(cfg, samples) == first and cfg.split_path.stat().st_mtime_ns == stamp
    # Other ids or other params → a new split replaces the default file.
    fewer = split_for(cfg, samples[:-5])
    assert len(fewer.ids) == len(samples) - 5 and Split.load(cfg.split_path) == fewer
    cfg4 = TrainingConfig(output_dir=tmp_path / "run", data={"dataset": "busi", "folds": 4, "seed": 5})
    assert len(split_for(cfg4, samples[:-5]).folds) == 4
    # An explicit split file is honoured as given, and never overwritten with other ids.
    explicit = TrainingConfig(
        output_dir=tmp_path / "run2", data={"dataset": "busi", "folds": 3, "split_file": cfg.split_path}
    )
    assert len(split_for(explicit, samples[:-5]).folds) == 4
    with pytest.raises(ValueError, match="other images"):
        split_for(explicit, samples)


@pytest.fixture(scope="module")
def busi():
    if not BUSI_ROOT.is_dir():
        pytest.skip("shared BUSI data not present")
    samples = list_samples("busi", BUSI_ROOT)
    return samples, find_duplicates(samples, TrainingConfig().data.dedup_threshold)


def test_busi_duplicates_grouped(busi):
    samples, report = busi
    index = {s.id: k for k, s in enumerate(samples)}
    assert report.groups[index["benign (433)"]] == report.groups[index["malignant (145)"]]
    assert (index["benign (433)"], index["malignant (145)"]) in report.exact_pairs
    summary = report.summary()
    # Measured at the default threshold (6): 607 groups, 207 near pairs, 315 images in shared groups.
    assert 560 <= summary["n_groups"] <= 650 and summary["near_pairs"] >= 150
    assert summary["largest_group"] <= 10  # no runaway chaining of unrelated images


def test_busi_split(busi):
    samples, report = busi
    split = make_split(samples, 0.2, 5, seed=42, threshold=6, groups=report.groups)
    _check_split(split, samples, report.groups, 0.2, 5)
    test = set(split.test_ids)
    assert ("benign (433)" in test) == ("malignant (145)" in test)
    assert make_split(samples, 0.2, 5, seed=42, threshold=6, groups=report.groups) == split
