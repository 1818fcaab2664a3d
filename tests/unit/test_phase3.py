"""Phase 3 (end-to-end) and the run mechanics: schedule, freeze/unfreeze, cancel and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training.callbacks import EventRecorder, TrainingCallback, TrainingCancelled
from training.checkpoints import load_checkpoint
from training.phases.context import StepSchedule
from training.pipeline import run_training


def _parameter() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2))]


def test_schedule_warmup_cosine_and_a_group_added_later_follows_it():
    optimizer = torch.optim.AdamW([{"params": _parameter(), "lr": 1e-3, "name": "refiner"}])
    schedule = StepSchedule(optimizer, total_steps=10, kind="cosine", warmup_steps=2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)  # linear warm-up from step 0
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 3)
    for _ in range(4):
        schedule.step()
    assert schedule.factor(2) == pytest.approx(1.0) and schedule.factor(10) == pytest.approx(0.0)

    optimizer.add_param_group({"params": _parameter(), "lr": 1e-2, "name": "coarse"})  # unfreeze
    assert schedule.get_last_lr()[1] == pytest.approx(1e-2 * schedule.factor(5))
    for step in range(6, 9):
        schedule.step()
        refiner_lr, coarse_lr = (group["lr"] for group in optimizer.param_groups)
        assert refiner_lr == pytest.approx(1e-3 * schedule.factor(step))
        assert coarse_lr == pytest.approx(1e-2 * schedule.factor(step))

    restored = StepSchedule(optimizer, total_steps=10, kind="cosine", warmup_steps=2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.get_last_lr() == pytest.approx(schedule.get_last_lr())


def test_poly_schedule():
    optimizer = torch.optim.SGD(_parameter(), lr=0.01)
    schedule = StepSchedule(optimizer, total_steps=4, kind="poly", power=0.9)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[2] == pytest.approx(0.01 * 0.5**0.9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def phase1_run(tmp_path_factory, make_tiny_config, fake_refiner_encode):
    """One phase-1 run shared by the phase-3 tests (each copies it)."""
    from training.modeling.refiner import Refiner

    run = tmp_path_factory.mktemp("phase1") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Refiner, "encode", fake_refiner_encode)
        run_training(make_tiny_config(run, phases=["coarse"]))
    return run


def _phase3_config(phase1_run, tmp_path, make_tiny_config, **end_to_end):
    run = tmp_path / "run"
    shutil.copytree(phase1_run, run)
    return make_tiny_config(run, phases=["end-to-end"], end_to_end=end_to_end)


def _training_steps(recorder: EventRecorder, phase: str):
    return [e for e in recorder.of_kind("step") if e.phase == phase and e.epoch is not None and e.steps]


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
def test_frozen_coarse_model_stays_bit_identical(
    phase1_run, tmp_path, make_tiny_config, fast_refiner_encoder
):
    cfg = _phase3_config(phase1_run, tmp_path, make_tiny_config, freeze_coarse=True)
    recorder = EventRecorder()
    summary = run_training(cfg, recorder)
    run = cfg.output_dir
    phase1 = load_checkpoint(run / "coarse" / "final.pt")["model"]
    joint = load_checkpoint(run / "end_to_end" / "last.pt")
    assert phase1.keys() == joint["coarse"].keys()
    assert all(torch.equal(phase1[key], joint["coarse"][key]) for key in phase1)
    assert not joint["coarse_in_optimizer"]
    start = load_checkpoint(run / "end_to_end" / "best.pt")  # baseline or trained: TransUNet unchanged
    assert all(torch.equal(phase1[key], start["coarse"][key]) for key in phase1)

    # the baseline evaluation came first, then training; the bundle exists
    phase_events = [e for e in recorder.events if e.phase == "end-to-end"]
    first_evaluation = next(i for i, e in enumerate(phase_events) if e.kind == "evaluation")
    first_training_step = next(
        i for i, e in enumerate(phase_events) if e.kind == "step" and e.epoch is not None
    )
    assert first_evaluation < first_training_step
    assert phase_events[first_evaluation].extra["stage"] == "baseline"
    assert summary["bundle_path"] and (run / "bundle.pt").is_file()


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
def test_unfrozen_coarse_group_follows_the_schedule(
    phase1_run, tmp_path, make_tiny_config, fast_refiner_encoder
):
    cfg = _phase3_config(
        phase1_run,
        tmp_path,
        make_tiny_config,
        freeze_coarse=True,
        unfreeze_epoch=1,
        epochs=2,
        warmup_steps=1,
        lr_coarse=1e-3,
        lr_refiner=1e-4,
    )
    recorder = EventRecorder()
    run_training(cfg, recorder)
    steps = _training_steps(recorder, "end-to-end")
    assert {e.epoch for e in steps} == {0, 1}
    per_epoch = steps[0].steps
    probe = StepSchedule(
        torch.optim.SGD(_parameter(), lr=1.0), total_steps=2 * per_epoch, kind="cosine", warmup_steps=1
    )
    for event in steps:
        global_step = event.epoch * per_epoch + event.step + 1  # lr read after schedule.step()
        assert event.lr == pytest.approx(1e-4 * probe.factor(global_step))
        if event.epoch == 0:
            assert event.extra["lr_coarse"] is None
        else:  # the new param group is scheduled exactly like the refiner group
            assert event.extra["lr_coarse"] == pytest.approx(1e-3 * probe.factor(global_step))

    phase1 = load_checkpoint(cfg.output_dir / "coarse" / "final.pt")["model"]
    joint = load_checkpoint(cfg.output_dir / "end_to_end" / "last.pt")
    assert joint["coarse_in_optimizer"]
    assert any(not torch.equal(phase1[key], joint["coarse"][key]) for key in phase1)
    names = [group["name"] for group in joint["optimizer"]["param_groups"]]
    assert names == ["refiner", "coarse"]


class StopAfterSteps(TrainingCallback):
    def __init__(self, phase: str, steps: int) -> None:
        self.phase, self.remaining, self.recorder = phase, steps, EventRecorder()

    def on_event(self, event) -> None:
        self.recorder.on_event(event)
        # training steps only (an embedding pass also reports steps, with no epoch)
        if event.kind == "step" and event.phase == self.phase and event.steps and event.epoch is not None:
            self.remaining -= 1

    def should_stop(self) -> bool:
        return self.remaining <= 0


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
def test_cancel_saves_and_resume_continues(tiny_training_config, fast_refiner_encoder, tmp_path):
    overrides = {"phases": ["coarse"], "coarse": {"epochs": 2, "batch_size": 1, "folds_to_run": [0]}}
    cfg = tiny_training_config(**overrides)
    stopper = StopAfterSteps("coarse", 2)
    with pytest.raises(TrainingCancelled):
        run_training(cfg, stopper)
    last = load_checkpoint(cfg.output_dir / "coarse" / "fold0" / "last.pt")
    assert (last["epoch"], last["step"]) == (0, 2)
    assert stopper.recorder.events[-1].kind == "run_end"
    assert stopper.recorder.events[-1].extra["status"] == "cancelled"
    assert not (cfg.output_dir / "bundle.pt").exists()

    recorder = EventRecorder()
    summary = run_training(cfg, recorder, resume=True)
    first = next(e for e in recorder.of_kind("step") if e.phase == "coarse")
    assert (first.fold, first.epoch, first.step) == (0, 0, 2)  # continued, not restarted
    state = json.loads((cfg.output_dir / "state.json").read_text())
    assert {"coarse", "coarse/fold0"} == set(state["completed"])
    assert summary["bundle_path"]

    # resuming a completed run skips its folds
    again = EventRecorder()
    run_training(cfg, again, resume=True)
    assert not [e for e in again.of_kind("step") if e.phase == "coarse"]

    # and the resumed weights equal those of an uninterrupted run
    straight = tiny_training_config(**overrides, output_dir=tmp_path / "straight")
    run_training(straight)
    resumed_weights = load_checkpoint(cfg.output_dir / "coarse" / "fold0" / "last.pt")["model"]
    straight_weights = load_checkpoint(straight.output_dir / "coarse" / "fold0" / "last.pt")["model"]
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=1e-5, atol=1e-6)

    # resuming with every fold trains only the new ones, then chooses the final fold among all
    all_folds = tiny_training_config(phases=["coarse"], coarse={"epochs": 2, "batch_size": 1})
    wider = EventRecorder()
    run_training(all_folds, wider, resume=True)
    n_folds = all_folds.data.folds
    assert {e.fold for e in wider.of_kind("step") if e.phase == "coarse"} == set(range(1, n_folds))
    state = json.loads((cfg.output_dir / "state.json").read_text())
    assert {"coarse"} | {f"coarse/fold{k}" for k in range(n_folds)} == set(state["completed"])
    summary = json.loads((cfg.output_dir / "coarse" / "summary.json").read_text())
    assert [fold["fold"] for fold in summary["folds"]] == list(range(n_folds))
    best = max(summary["folds"], key=lambda fold: (fold["best_dice"] or -1.0, -fold["fold"]))
    assert summary["final_fold"] == best["fold"]


@pytest.mark.parametrize("native", [False, True])
def test_refined_loss_in_refiner_space_or_at_native_resolution(make_tiny_config, tmp_path, native):
    from training.data.datasets import list_samples
    from training.phases.context import RunContext, SampleStore
    from training.phases.end_to_end import refined_loss

    cfg = make_tiny_config(tmp_path / "run", end_to_end={"native_resolution_loss": native})
    samples = [s for s in list_samples("busi", cfg.data.root) if s.label != "normal"][:2]
    store = SampleStore(samples, cfg)
    items = store.many([s.id for s in samples])
    ctx = RunContext(cfg=cfg, device=torch.device("cpu"), split=None, store=store)
    side = items[0].geometry.size
    refined_logits = torch.zeros(2, 1, side, side, requires_grad=True)
    outputs = {
        "refined_logits": refined_logits,
        "refiner_coarse_probs": torch.full((2, 1, side, side), 0.5),
        "valid": torch.cat([item.geometry.valid_mask() for item in items]),
    }
    losses = refined_loss(outputs, items, ctx)
    assert set(losses) >= {"total", "bce", "dice"} and torch.isfinite(losses["total"])
    assert losses["bce"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-4)  # p = 0.5
    losses["total"].backward()
    assert refined_logits.grad is not None and refined_logits.grad.abs().sum() > 0


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
@pytest.mark.parametrize(
    ("phase", "folder", "section"),
    [("refiner", "refiner", "refiner_train"), ("end-to-end", "end_to_end", "end_to_end")],
)
def test_phases_2b_and_3_resume_where_they_were_cancelled(
    phase1_run, tmp_path, make_tiny_config, fast_refiner_encoder, phase, folder, section
):
    def config(name: str):
        run = tmp_path / name
        shutil.copytree(phase1_run, run)
        return make_tiny_config(
            run, phases=["augment", "refiner", "end-to-end"], **{section: {"epochs": 2, "batch_size": 1}}
        )

    cfg = config("cancelled")
    stopper = StopAfterSteps(phase, 2)
    with pytest.raises(TrainingCancelled):
        run_training(cfg, stopper)
    # Phase 3's baseline competes as epoch -1 (the training loop records it); phase 2b's only
    # when fine-tuning a bundle (init_from).
    start = [-1] if phase == "end-to-end" else []
    last = load_checkpoint(cfg.output_dir / folder / "last.pt")
    assert (last["epoch"], last["step"]) == (0, 2) and [h["epoch"] for h in last["history"]] == start

    recorder = EventRecorder()
    run_training(cfg, recorder, resume=True)
    steps = _training_steps(recorder, phase)
    assert (steps[0].epoch, steps[0].step) == (0, 2)  # continued, not restarted
    assert not [e for e in recorder.events if e.phase == phase and e.kind == "evaluation" and e.epoch is None]

    straight = config("straight")
    run_training(straight)
    resumed = load_checkpoint(cfg.output_dir / folder / "last.pt")
    uninterrupted = load_checkpoint(straight.output_dir / folder / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (uninterrupted["epoch"], uninterrupted["step"]) == (2, 0)
    assert [h["epoch"] for h in resumed["history"]] == [*start, 0, 1]
    assert resumed["best"]["epoch"] == uninterrupted["best"]["epoch"]
    for key, value in uninterrupted["refiner"].items():
        torch.testing.assert_close(resumed["refiner"][key], value, rtol=1e-5, atol=1e-6)
    assert resumed["elapsed_s"] > 0


@pytest.mark.slow  # runs training phases (tens of seconds on 2 CPU cores)
@pytest.mark.parametrize("folds_to_run", [[0], None])
def test_refiner_warns_when_no_training_image_has_an_out_of_fold_mask(
    tiny_training_config, fast_refiner_encoder, folds_to_run
):
    # The refiner trains on the final fold's training images, whose out-of-fold masks come from
    # the other folds: with only fold 0 trained it must say the hybrid data became augmented-only.
    cfg = tiny_training_config(
        phases=["coarse", "augment", "refiner"],
        coarse={"folds_to_run": folds_to_run},
        refiner_train={"real_ratio": 0.5},
    )
    recorder = EventRecorder()
    run_training(cfg, recorder)
    warnings = [e.message for e in recorder.of_kind("warning") if e.phase == "refiner"]
    sources = json.loads((cfg.output_dir / "refiner" / "summary.json").read_text())["history"][0]["sources"]
    if folds_to_run == [0]:
        assert any("augmented masks only" in m and "folds_to_run" in m for m in warnings), warnings
        assert sources["real"] == 0 and sources["augmented"] > 0
    else:
        assert not any("augmented masks only" in m for m in warnings), warnings
        assert sources["real"] > 0
