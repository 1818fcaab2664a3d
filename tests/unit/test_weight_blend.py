"""Blending a fine-tuned model with its starting model, guarded by the start's validation images."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training.checkpoints import load_bundle
from training.config import FinetuneConfig
from training.pipeline import assemble_bundle, run_training
from training.weight_blend import blend_bundle, blend_state, within_guard


def test_blend_state_interpolates_floats_and_keeps_counters():
    start = {"w": torch.zeros(3), "n": torch.tensor(2)}
    tuned = {"w": torch.tensor([2.0, 4.0, -2.0]), "n": torch.tensor(7)}
    assert torch.equal(blend_state(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(blend_state(start, tuned, 1.0)["w"], tuned["w"])
    half = blend_state(start, tuned, 0.5)
    assert torch.allclose(half["w"], torch.tensor([1.0, 2.0, -1.0]))
    assert int(half["n"]) == 7
    with pytest.raises(ValueError, match="different tensors"):
        blend_state({"w": torch.zeros(3)}, tuned, 0.5)
    with pytest.raises(ValueError, match="shape"):
        blend_state({"w": torch.zeros(2), "n": torch.tensor(1)}, tuned, 0.5)


def test_the_guard_bounds_dice_drop_and_false_positive_rise():
    cfg = FinetuneConfig(blend_max_dice_drop=0.01, blend_max_fp_rise=0.1)
    start = {"dice_refined": 0.70, "fp_rate_refined": 0.30}
    assert within_guard(start, {"dice_refined": 0.695, "fp_rate_refined": 0.35}, cfg)
    assert not within_guard(start, {"dice_refined": 0.68, "fp_rate_refined": 0.30}, cfg)
    assert not within_guard(start, {"dice_refined": 0.75, "fp_rate_refined": 0.50}, cfg)
    # No normal image among the guard images: only Dice counts.
    assert within_guard(
        {"dice_refined": 0.7, "fp_rate_refined": None}, {"dice_refined": 0.7, "fp_rate_refined": None}, cfg
    )


def test_alphas_are_checked_and_tried_largest_first():
    assert FinetuneConfig(blend_alphas=[0.2, 1.0, 0.5, 0.5]).blend_alphas == [1.0, 0.5, 0.2]
    for bad in ([0.0], [1.5], [-0.1]):
        with pytest.raises(ValueError, match="alpha"):
            FinetuneConfig(blend_alphas=bad)


@pytest.fixture
def first_run(tmp_path, tiny_training_config, fast_refiner_encoder):
    """A trained tiny model (phase 1 + 2): the starting bundle of a fine-tuning run."""
    cfg = tiny_training_config(output_dir=tmp_path / "first", phases=["coarse", "augment", "refiner"])
    return run_training(cfg)


def _fine_tune(tiny_training_config, tmp_path, start_path, **finetune):
    # The same final fold as the starting model's: its validation images (the guard) are then
    # images this run never trains on either.
    fold = load_bundle(start_path)["metrics"]["final_fold"]["fold"]
    cfg = tiny_training_config(
        output_dir=tmp_path / "tuned",
        phases=["coarse"],
        init_from=start_path,
        coarse={"epochs": 2, "lr": 0.05, "folds_to_run": [fold]},
        finetune={"blend_alphas": [1.0, 0.5, 0.25], **finetune},
    )
    return run_training(cfg)


def test_a_fine_tuning_run_keeps_the_largest_blend_within_the_guard(
    tmp_path, tiny_training_config, first_run, fast_refiner_encoder
):
    start_path = first_run["bundle_path"]
    summary = _fine_tune(
        tiny_training_config, tmp_path, start_path, blend_max_dice_drop=0.0, blend_max_fp_rise=0.0
    )
    report = json.loads((tmp_path / "tuned" / "blend.json").read_text())
    assert report["status"] == "chosen" and report["guard_images"] > 0
    # The run's split is the starting model's: none of its images is a guard image's copy.
    assert report["guard_duplicates_dropped"] == 0
    tried = [row["alpha"] for row in report["candidates"]]
    assert tried == [1.0, 0.5, 0.25][: len(tried)]
    passing = [row["alpha"] for row in report["candidates"] if row["within_guard"]]
    # Tried largest first, stopping at the first within the guard; α = 0 when none is.
    assert passing == ([tried[-1]] if passing else [])
    assert report["alpha"] == (passing[0] if passing else 0.0)
    for row in report["candidates"]:
        ok = row["dice_refined"] >= report["start"]["dice_refined"] - 1e-12
        if report["start"]["fp_rate_refined"] is not None:
            ok = ok and row["fp_rate_refined"] <= report["start"]["fp_rate_refined"] + 1e-12
        assert row["within_guard"] == ok

    start, shipped = load_bundle(start_path), load_bundle(summary["bundle_path"])
    unblended = assemble_bundle(tmp_path / "tuned")
    expected = blend_bundle(start, unblended, report["alpha"])
    for key in ("coarse_state_dict", "refiner_state_dict"):
        for name, tensor in expected[key].items():
            assert torch.allclose(shipped[key][name].float(), tensor.float(), atol=1e-6), name
    assert shipped["metrics"]["blend"]["alpha"] == report["alpha"]
    assert shipped["metrics"]["test"]["n_images"] > 0


def test_a_loose_guard_keeps_the_fine_tuned_weights(
    tmp_path, tiny_training_config, first_run, fast_refiner_encoder
):
    summary = _fine_tune(
        tiny_training_config,
        tmp_path,
        first_run["bundle_path"],
        blend_max_dice_drop=1.0,
        blend_max_fp_rise=1.0,
    )
    report = summary["metrics"]["blend"]
    assert report["alpha"] == 1.0 and [row["alpha"] for row in report["candidates"]] == [1.0]
    shipped, unblended = load_bundle(summary["bundle_path"]), assemble_bundle(tmp_path / "tuned")
    for name, tensor in unblended["coarse_state_dict"].items():
        assert torch.equal(shipped["coarse_state_dict"][name], tensor), name


def test_guard_images_that_the_run_holds_under_another_name_are_left_out(
    tmp_path, tiny_training_config, first_run, fast_refiner_encoder, synthetic_busi_root
):
    from training.data.datasets import list_samples
    from training.weight_blend import guard_samples, without_run_images

    cfg = tiny_training_config(output_dir=tmp_path / "tuned", init_from=first_run["bundle_path"])
    guard, reason = guard_samples(cfg, load_bundle(first_run["bundle_path"]), set())
    assert reason is None and len(guard) >= 2
    # Two guard images saved again under other names (as corrections would be), and one
    # image that the guard does not hold.
    copies = tmp_path / "copies"
    shutil.copytree(synthetic_busi_root, copies)
    others = {s.id: s for s in list_samples("busi", copies)}
    run = [others[guard[0].id], others[guard[1].id]]
    outsider = next(s for i, s in others.items() if i not in {g.id for g in guard})
    for sample in run:
        sample.id = f"corrections:{sample.id}"
    kept, dropped = without_run_images(guard, [*run, outsider], cfg)
    assert dropped >= 2 and guard[0] not in kept and guard[1] not in kept
    assert all(sample in guard for sample in kept)


def test_without_the_starting_models_images_the_weights_stay_unblended(
    tmp_path, tiny_training_config, first_run, fast_refiner_encoder, synthetic_busi_root
):
    moved = tmp_path / "elsewhere"
    # The run fine-tunes on a copy; the starting model's own data root is gone.
    shutil.copytree(synthetic_busi_root, moved)
    start = load_bundle(first_run["bundle_path"])
    start["config"]["data"]["root"] = str(tmp_path / "gone")
    from training.checkpoints import save_bundle

    start_path = save_bundle(tmp_path / "start.pt", start)
    cfg = tiny_training_config(
        output_dir=tmp_path / "tuned",
        phases=["coarse"],
        init_from=start_path,
        data={"root": moved},
        coarse={"epochs": 1, "lr": 0.05},
    )
    summary = run_training(cfg)
    report = summary["metrics"]["blend"]
    assert report["status"] == "skipped" and report["alpha"] == 1.0
    assert "not readable" in report["reason"]
