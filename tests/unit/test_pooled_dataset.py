"""A pooled run: a public dataset and saved corrections trained on together (``data.pool_*``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from training.config import DataConfig
from training.data.datasets import list_pool_samples, list_samples
from training.data.splits import Split, make_split, pool_splits, seeded_split
from training.pipeline import load_run_samples, run_training


@pytest.fixture
def corrections_root(tmp_path):
    """A corrections folder as the server writes it: 8 saved pairs (6 with a lesion)."""
    root = tmp_path / "corrections"
    for folder in ("images", "masks", "meta"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(3)
    for index in range(8):
        key = f"{index:02d}" + "ab" * 15
        height, width = 70, 90
        rows, cols = np.mgrid[0:height, 0:width]
        image = rng.normal(120, 25, (height, width))
        mask = np.zeros((height, width), bool)
        if index < 6:
            mask = ((rows - 35) / (8 + index)) ** 2 + ((cols - 20 - 6 * index) / 12) ** 2 <= 1
            image[mask] -= 60
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{key}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"{key}.png")
        meta = {"lesion_px": int(mask.sum()), "sop_instance_uid_sha256": None}
        (root / "meta" / f"{key}.json").write_text(json.dumps(meta))
    return root


def _pooled(busi_root, corrections_root, **extra) -> dict:
    """The data section of a run on the synthetic BUSI root pooled with the saved corrections."""
    return {
        "root": busi_root,
        "folds": 2,
        "pool_dataset": "corrections",
        "pool_root": corrections_root,
        **extra,
    }


def test_pool_fields_go_together_and_name_other_data(synthetic_busi_root, corrections_root):
    with pytest.raises(ValidationError, match="give both or neither"):
        DataConfig(pool_dataset="corrections")
    with pytest.raises(ValidationError, match="same data"):
        DataConfig(root=synthetic_busi_root, pool_dataset="busi", pool_root=synthetic_busi_root)
    data = DataConfig(root=synthetic_busi_root, pool_dataset="corrections", pool_root=corrections_root)
    assert data.pooled and data.name == "busi+corrections"
    assert not DataConfig().pooled and DataConfig().name == "busi"
    two_roots = DataConfig(root=synthetic_busi_root, pool_dataset="busi", pool_root=corrections_root)
    assert two_roots.pool_name == "busi-pooled" and two_roots.name == "busi+busi-pooled"


def test_pooled_samples_are_prefixed_and_marked(corrections_root):
    plain = list_samples("corrections", corrections_root)
    pooled = list_pool_samples("corrections", corrections_root)
    assert [s.id for s in pooled] == [f"corrections:{s.id}" for s in plain]
    assert all(s.extra["pool"] for s in pooled) and not any(s.extra.get("pool") for s in plain)
    assert [s.image_path for s in pooled] == [s.image_path for s in plain]


def test_pool_splits_keeps_each_part_and_rejects_mismatches(synthetic_busi_root, corrections_root):
    busi = seeded_split(list_samples("busi", synthetic_busi_root), DataConfig(folds=2))
    corrections = make_split(list_pool_samples("corrections", corrections_root), 0.2, 2, 42, 10)
    pooled = pool_splits(busi, corrections, "busi+corrections")
    assert pooled.test_ids == busi.test_ids + corrections.test_ids
    assert pooled.folds == [a + b for a, b in zip(busi.folds, corrections.folds, strict=True)]
    assert set(pooled.groups[i] for i in busi.ids).isdisjoint(pooled.groups[i] for i in corrections.ids)
    three = make_split(list_pool_samples("corrections", corrections_root), 0.2, 3, 42, 10)
    with pytest.raises(ValueError, match="2-fold split with a 3-fold"):
        pool_splits(busi, three, "x")
    with pytest.raises(ValueError, match="share"):
        pool_splits(busi, busi, "x")


def test_a_pooled_run_keeps_the_given_split_and_reports_each_dataset(
    tmp_path, tiny_training_config, corrections_root, synthetic_busi_root, fast_refiner_encoder
):
    # The first dataset's protocol: a split file made with another seed than the run's.
    busi_split = seeded_split(list_samples("busi", synthetic_busi_root), DataConfig(folds=2, seed=5))
    split_file = busi_split.save(tmp_path / "busi_split.json")
    cfg = tiny_training_config(
        phases=["coarse"],
        data=_pooled(synthetic_busi_root, corrections_root, split_file=split_file),
    )
    samples = load_run_samples(cfg)
    assert len(samples) == 10 + 8
    summary = run_training(cfg)

    split = Split.load(tmp_path / "run" / "split.json")  # the pooled split, beside the run
    assert cfg.split_path == tmp_path / "run" / "split.json" and summary["split_file"] == str(cfg.split_path)
    assert split.dataset == "busi+corrections"
    busi_ids = set(busi_split.ids)
    assert [i for i in split.test_ids if i in busi_ids] == busi_split.test_ids  # kept exactly
    for fold, kept in enumerate(busi_split.folds):
        assert [i for i in split.folds[fold] if i in busi_ids] == kept
    pooled_test = [i for i in split.test_ids if i.startswith("corrections:")]
    assert pooled_test, "the corrections have a held-out part of their own"
    for fold in range(2):  # the test images of both datasets are never trained on
        assert set(split.train_ids(fold)).isdisjoint(split.test_ids)
        assert any(i.startswith("corrections:") for i in split.train_ids(fold))

    by_dataset = summary["test"]["by_dataset"]
    assert set(by_dataset) == {"busi", "corrections"}
    busi_lesions = sum(busi_split.labels[i] != "normal" for i in busi_split.test_ids)
    assert by_dataset["busi"]["n_images"] == busi_lesions
    assert (
        by_dataset["busi"]["n_images"] + by_dataset["corrections"]["n_images"] == summary["test"]["n_images"]
    )
    assert all("per_image" not in part for part in by_dataset.values())


def test_a_pooled_dataset_too_small_to_split_is_a_clear_error(
    tmp_path, tiny_training_config, corrections_root, synthetic_busi_root
):
    for meta in sorted((corrections_root / "meta").glob("*.json"))[2:]:
        meta.unlink()  # two saved pairs cannot fill a test split and two folds
    cfg = tiny_training_config(
        phases=["coarse"],
        data=_pooled(synthetic_busi_root, corrections_root),
    )
    with pytest.raises(ValueError, match=r"pooled corrections data at .* \(2 images\) cannot be split"):
        run_training(cfg)


def test_pool_weight_repeats_only_the_pooled_training_images(
    tiny_training_config, corrections_root, synthetic_busi_root
):
    import torch

    from training.data.splits import split_for
    from training.phases.context import RunContext, SampleStore

    data = _pooled(synthetic_busi_root, corrections_root)
    contexts = {}
    for weight in (1, 4):
        cfg = tiny_training_config(phases=["coarse"], data={**data, "pool_weight": weight})
        samples = load_run_samples(cfg)
        split = split_for(cfg, samples)
        contexts[weight] = RunContext(
            cfg=cfg, device=torch.device("cpu"), split=split, store=SampleStore(samples, cfg)
        )
    once, four = contexts[1].train_ids(0), contexts[4].train_ids(0)
    assert once == contexts[1].split.train_ids(0)
    pooled = [i for i in once if i.startswith("corrections:")]
    public = [i for i in once if not i.startswith("corrections:")]
    assert pooled and public
    assert sorted(four) == sorted(public + pooled * 4)
    assert set(contexts[4].split.val_ids(0)) == set(contexts[1].split.val_ids(0))  # validation: once


def test_a_model_trained_pooled_is_guarded_by_its_pooled_validation_images(
    tmp_path, tiny_training_config, corrections_root, synthetic_busi_root, fast_refiner_encoder
):
    from training.checkpoints import load_bundle
    from training.weight_blend import guard_samples

    first = tiny_training_config(
        output_dir=tmp_path / "first",
        phases=["coarse"],
        data=_pooled(synthetic_busi_root, corrections_root),
    )
    start_path = run_training(first)["bundle_path"]
    starting = load_bundle(start_path)
    fold = starting["metrics"]["final_fold"]["fold"]
    split = Split.load(tmp_path / "first" / "split.json")
    # A later fine-tuning run from that model, on the corrections alone.
    cfg = tiny_training_config(
        output_dir=tmp_path / "tuned",
        init_from=start_path,
        data={"dataset": "corrections", "root": corrections_root, "folds": 2},
    )
    guard, reason = guard_samples(cfg, starting, set())
    assert reason is None
    assert sorted(s.id for s in guard) == sorted(split.val_ids(fold))
    assert any(s.id.startswith("corrections:") for s in guard) and any(":" not in s.id for s in guard)
    # Ids this run trains on are left out.
    dropped = {next(s.id for s in guard if s.id.startswith("corrections:"))}
    again, _ = guard_samples(cfg, starting, dropped)
    assert {s.id for s in again} == {s.id for s in guard} - dropped
    # Without the pooled split beside the bundle, no guard is made up: a reason instead.
    (tmp_path / "first" / "split.json").unlink()
    guard, reason = guard_samples(cfg, starting, set())
    assert guard == [] and "pooled split" in reason
