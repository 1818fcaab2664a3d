"""One training run: the configured phases in order, a test evaluation and the exported bundle.

:func:`run_training` is what the CLI (``ultrarefiner train``) and the worker call. Layout of
``cfg.output_dir``::

    config.json           the TrainingConfig of the run
    state.json            completed phases / folds (resume skips them)
    split.json            the split (unless data.split_file names another)
    train.log             log of the run
    coarse/ augment/ refiner/ end_to_end/   per-phase checkpoints and summaries (see each phase)
    evaluation_test.json  the evaluation protocol on the held-out test split (coarse vs refined)
    bundle.pt             the exported model bundle (training.checkpoints format)
    summary.json          what run_training returns

**Final model.** Coarse: the phase-3 best weights if phase 3 ran, else the phase-1 fold with the
best validation Dice (``coarse/final.pt``), else — a run that fine-tunes only the refiner from a
bundle (``init_from``) — that bundle's coarse model. Refiner: phase-3 best, else phase-2b best, else
the pretrained backbone (or the ``init_from`` bundle's). A phase-3 checkpoint older than the
phase-1/2 results it started from is ignored (stale).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from training.callbacks import CallbackList, TrainingCallback, TrainingCancelled
from training.checkpoints import load_checkpoint, make_bundle, save_bundle
from training.config import TrainingConfig
from training.phases.context import (
    AUGMENT_DIR,
    COARSE_DIR,
    END_TO_END_DIR,
    REFINER_DIR,
    RunContext,
    RunState,
    SampleStore,
    limit_samples,
    read_json,
    seed_everything,
    write_json,
)
from training.weight_blend import PHASE as BLEND
from training.weight_blend import choose_blend

log = logging.getLogger("training")

PHASE_DIRS = {
    "coarse": COARSE_DIR,
    "augment": AUGMENT_DIR,
    "refiner": REFINER_DIR,
    "end-to-end": END_TO_END_DIR,
}
EVALUATION = "evaluation"


def load_run_samples(cfg: TrainingConfig):
    """The dataset's samples, limited to ``data.limit`` (round-robin over labels), followed by
    those of the pooled dataset when there is one (limited the same way, on their own)."""
    return load_data_samples(cfg.data)


def load_data_samples(data):
    """:func:`load_run_samples` of a ``DataConfig`` (e.g. a starting bundle's)."""
    from training.data.datasets import list_pool_samples, list_samples

    samples = limit_samples(list_samples(data.dataset, data.root), data.limit)
    if data.pooled:
        samples += limit_samples(list_pool_samples(data.pool_dataset, data.pool_root), data.limit)
    return samples


def _phase_runners():
    from training.phases import coarse, end_to_end, refiner_finetune

    return {
        "coarse": (coarse.plan, coarse.run_coarse_phase),
        "augment": (lambda ctx: ctx.progress.add("augment", 1.0), refiner_finetune.run_augment_phase),
        "refiner": (refiner_finetune.plan, refiner_finetune.run_refiner_phase),
        "end-to-end": (end_to_end.plan, end_to_end.run_end_to_end_phase),
    }


def run_training(cfg: TrainingConfig, callback: TrainingCallback | None = None, resume: bool = False) -> dict:
    """Run ``cfg.phases`` in order, evaluate on the test split and export ``output_dir/bundle.pt``.

    ``resume=True`` skips completed phases/folds (``state.json``) and continues an interrupted
    phase from its last checkpoint. Raises :class:`TrainingCancelled` when the callback asks to
    stop (after saving). Returns the run summary (also in ``summary.json``).
    """
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    callback = CallbackList([callback]) if callback is not None else TrainingCallback()
    handler = _attach_log_file(output_dir / "train.log")
    try:
        return _run(cfg, callback, resume, output_dir)
    finally:
        logging.getLogger("training").removeHandler(handler)
        handler.close()


def _run(cfg: TrainingConfig, callback: TrainingCallback, resume: bool, output_dir: Path) -> dict:
    from training.checkpoints import adopt_init_architecture, init_bundle
    from training.data.splits import split_for

    started = time.monotonic()
    cfg = adopt_init_architecture(cfg)
    state = RunState(output_dir / "state.json")
    config_path = output_dir / "config.json"
    if resume and config_path.is_file():
        _check_resumable(read_json(config_path), cfg)
    write_json(config_path, cfg.model_dump(mode="json"))
    seed_everything(cfg.data.seed)
    device = torch.device(cfg.resolved_device())

    samples = load_run_samples(cfg)
    split = split_for(cfg, samples)
    ctx = RunContext(
        cfg=cfg,
        device=device,
        split=split,
        store=SampleStore(samples, cfg),
        callback=callback,
        resume=resume,
        state=state,
    )
    runners = _phase_runners()
    skipped = _phases_to_skip(ctx) if resume else set()
    for phase in cfg.phases:
        runners[phase][0](ctx)
        if phase in skipped:
            for key in list(ctx.progress.weights):
                if key == phase or key.startswith(phase + "/"):
                    ctx.progress.set(key, 1.0)
    ctx.progress.add(EVALUATION, 0.5)
    if cfg.init_from is not None and cfg.finetune.blend_guard != "none":
        ctx.progress.add(BLEND, 0.5)
    log.info(
        "run %s: phases %s on %s (%d images) with %s",
        output_dir,
        cfg.phases,
        cfg.data.name,
        len(samples),
        device,
    )
    ctx.emit(
        "run_start",
        message=f"training {', '.join(cfg.phases)} on {cfg.data.name} ({len(samples)} images, {device})",
        extra={
            "phases": list(cfg.phases),
            "output_dir": str(output_dir),
            "device": str(device),
            "n_images": len(samples),
            "split": split.counts(),
            "split_file": str(cfg.split_path),
            "resume": resume,
        },
    )

    phase_summaries: dict[str, dict] = {}
    try:
        for phase in cfg.phases:
            phase_dir = output_dir / PHASE_DIRS[phase]
            if phase in skipped:
                log.info("phase %s already complete: skipped", phase)
                phase_summaries[phase] = _read_summary(phase_dir)
                continue
            if not resume or (state.is_done(phase) and phase != "coarse"):
                # A fresh run, or a resumed run whose earlier phase is being (re)run: this phase's
                # old results were built on what is changing, so it starts over. Phase 1 keeps
                # its completed folds (they do not depend on one another).
                state.forget(phase)
                shutil.rmtree(phase_dir, ignore_errors=True)
            summary = runners[phase][1](ctx)
            state.mark_done(phase, summary={"best_dice": summary.get("best_dice", summary.get("mean_dice"))})
            phase_summaries[phase] = summary

        test_report, bundle_path, init_report = None, None, None
        starting = init_bundle(cfg)
        bundle = assemble_bundle(output_dir, cfg)
        if bundle is not None and starting is not None:
            # before/after: the model the run started from, on the same test split
            init_report = evaluate_test_split(ctx, starting, stage="baseline")
        if bundle is None:
            ctx.warn(
                "no coarse model in this run yet (no phase 1, no --init-from): no test evaluation "
                "and no bundle",
                EVALUATION,
            )
        else:
            blend_report = None
            if starting is not None:  # as far from the start as the starting model's validation allows
                bundle, blend_report = choose_blend(ctx, starting, bundle, _blend_exclusions(ctx))
                write_json(output_dir / "blend.json", blend_report)
            test_report = evaluate_test_split(ctx, bundle)
            bundle["metrics"] = bundle_metrics(output_dir, test_report)
            if blend_report is not None:
                bundle["metrics"]["blend"] = blend_report
            if init_report is not None:
                bundle["metrics"]["init_test"] = _without_images(init_report)
                bundle["metrics"]["init_from"] = {
                    "path": str(cfg.init_from),
                    "model_version": starting["model_version"],
                }
            bundle_path = save_bundle(output_dir / "bundle.pt", bundle)
        ctx.progress.set(EVALUATION, 1.0)
    except TrainingCancelled as cancelled:
        ctx.emit(
            "run_end", message=str(cancelled), extra={"status": "cancelled", "output_dir": str(output_dir)}
        )
        raise
    except Exception as error:
        ctx.emit(
            "run_end", message=f"failed: {error}", extra={"status": "failed", "output_dir": str(output_dir)}
        )
        raise

    summary = {
        "status": "completed",
        "output_dir": str(output_dir),
        "phases": list(cfg.phases),
        "split_file": str(cfg.split_path),
        "split": split.counts(),
        "coarse_folds": _fold_dice(output_dir),
        "phase_summaries": {phase: _brief(s) for phase, s in phase_summaries.items()},
        "test": None if test_report is None else _without_images(test_report),
        "init_test": None if init_report is None else _without_images(init_report),
        "bundle_path": None if bundle_path is None else str(bundle_path),
        "model_version": None if bundle is None else bundle["model_version"],
        "metrics": None if bundle is None else bundle["metrics"],
        "elapsed_s": time.monotonic() - started,
    }
    write_json(output_dir / "summary.json", summary)
    ctx.emit(
        "run_end",
        dice=None if test_report is None else test_report["dice_refined"],
        message=f"done in {summary['elapsed_s']:.0f} s; bundle: {summary['bundle_path']}",
        extra={"status": "completed", **{k: summary[k] for k in ("bundle_path", "test", "coarse_folds")}},
    )
    return summary


def _blend_exclusions(ctx: RunContext) -> set[str]:
    """Image ids the blend's guard must not use: this run's test split and its training images."""
    excluded = set(ctx.split.test_ids) | set(ctx.split.trainval_ids)
    final = ctx.output_dir / COARSE_DIR / "final.json"
    if final.is_file():  # the final fold's validation images: never trained on by this run
        excluded -= set(ctx.split.val_ids(int(read_json(final)["fold"])))
    return excluded


def _without_images(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "per_image"}


def evaluate_test_split(ctx: RunContext, bundle: dict, *, stage: str = "final") -> dict:
    """The evaluation protocol on the held-out test split with the exact serving path (Predictor);
    ``stage="baseline"`` for the model a fine-tuning run started from."""
    from training.data.datasets import is_pool_sample
    from training.evaluate import by_dataset, evaluate, format_report
    from training.inference import Predictor
    from training.phases.refiner_finetune import embedding_cache_for

    predictor = Predictor.from_bundle_dict(bundle, device=ctx.device)
    samples = [ctx.store.samples[sample_id] for sample_id in ctx.split.test_ids]
    cache = embedding_cache_for(predictor.refiner, ctx.cfg.cache_dir)

    def on_image(index: int, total: int, record: dict) -> None:
        ctx.progress.set(EVALUATION, (index + 1) / total)
        ctx.emit("step", phase=EVALUATION, step=index, steps=total, extra={"id": record["id"]})

    report = evaluate(
        predictor,
        samples,
        embedding_cache=cache,
        callback=_ContextEvents(ctx),
        on_image=on_image,
        phase="test",
        stage=stage,
    )
    report["split"] = "test"
    data = ctx.cfg.data
    if data.pooled:  # the two datasets' Dice apart: what a fine-tuning run gains and what it keeps
        pooled = {
            sample_id for sample_id in ctx.split.test_ids if is_pool_sample(ctx.store.samples[sample_id])
        }
        report["by_dataset"] = by_dataset(
            report, lambda sample_id: data.pool_name if sample_id in pooled else data.dataset
        )
        for name, part in report["by_dataset"].items():
            log.info("test split, %s: %s", name, format_report(part))
            ctx.emit(  # one store row per dataset, beside the pooled one
                "evaluation",
                phase="test",
                dice=part["dice_refined"],
                message=f"{name}: {format_report(part)}",
                extra={**part, "dataset": name, "split": "test", "stage": stage},
            )
    name = "evaluation_test.json" if stage == "final" else f"evaluation_test_{stage}.json"
    write_json(Path(ctx.cfg.output_dir) / name, report)
    log.info("test split: %s", format_report(report))
    return report


class _ContextEvents(TrainingCallback):
    """Forwards events to the run's callback with the run's progress and elapsed time filled in."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def on_event(self, event) -> None:
        event.progress = self.ctx.progress.value if event.progress is None else event.progress
        event.elapsed_s = self.ctx.elapsed_s
        self.ctx.callback.on_event(event)

    def should_stop(self) -> bool:
        return self.ctx.callback.should_stop()


# --------------------------------------------------------------------------------------------
# Bundle assembly (also `ultrarefiner export`)


def _newer_or_equal(path: Path, *others: Path) -> bool:
    mtime = path.stat().st_mtime
    return all(not other.is_file() or mtime >= other.stat().st_mtime for other in others)


def final_model_sources(run_dir: Path) -> dict:
    """Which checkpoint provides the final coarse and refiner weights (see the module docstring)."""
    run_dir = Path(run_dir)
    coarse_final = run_dir / COARSE_DIR / "final.pt"
    refiner_best = run_dir / REFINER_DIR / "best.pt"
    joint_best = run_dir / END_TO_END_DIR / "best.pt"
    sources: dict = {"coarse": None, "refiner": None}
    if joint_best.is_file() and _newer_or_equal(joint_best, coarse_final, refiner_best):
        sources = {"coarse": joint_best, "refiner": joint_best}
    else:
        if coarse_final.is_file():
            sources["coarse"] = coarse_final
        if refiner_best.is_file():
            sources["refiner"] = refiner_best
    return sources


def assemble_bundle(run_dir: Path, cfg: TrainingConfig | None = None) -> dict | None:
    """The bundle dict of a run's final models (``None`` without a coarse model). A run that
    fine-tunes only the refiner from a bundle (``init_from``) keeps that bundle's coarse model; a
    run that trained neither (phase 2a alone) has nothing to export."""
    run_dir = Path(run_dir)
    if cfg is None:
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a training run directory (no config.json)")
        cfg = TrainingConfig.from_stored(read_json(config_path))
    sources = final_model_sources(run_dir)
    if sources["coarse"] is not None:
        coarse_checkpoint = load_checkpoint(sources["coarse"])
        coarse_state = coarse_checkpoint.get("coarse", coarse_checkpoint.get("model"))
    else:
        from training.checkpoints import initial_coarse_state

        coarse_state = initial_coarse_state(cfg) if sources["refiner"] is not None else None
        if coarse_state is None:
            return None
    if sources["refiner"] is not None:
        refiner_state = load_checkpoint(sources["refiner"])["refiner"]
    else:
        from training.checkpoints import initial_refiner

        refiner_state = initial_refiner(cfg).trainable_state_dict()
    return make_bundle(
        config=cfg,
        coarse_state_dict=coarse_state,
        refiner_state_dict=refiner_state,
        metrics={
            "sources": {k: None if v is None else str(v.relative_to(run_dir)) for k, v in sources.items()}
        },
        untrained=False,
    )


def bundle_metrics(run_dir: Path, test_report: dict | None) -> dict:
    run_dir = Path(run_dir)
    sources = final_model_sources(run_dir)
    metrics = {
        "sources": {k: None if v is None else str(v.relative_to(run_dir)) for k, v in sources.items()},
        "coarse_folds": _fold_dice(run_dir),
    }
    final = run_dir / COARSE_DIR / "final.json"
    if final.is_file():
        metrics["final_fold"] = read_json(final)
    for phase, folder in (("refiner", REFINER_DIR), ("end-to-end", END_TO_END_DIR)):
        summary = _read_summary(run_dir / folder)
        if summary:
            metrics[phase] = _brief(summary)
    if test_report is not None:
        metrics["test"] = {k: v for k, v in test_report.items() if k != "per_image"}
    return metrics


def export_bundle(run_dir: Path | str, output: Path | str) -> Path:
    """Write the bundle of a run directory's final models to ``output`` (metrics from its reports)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    bundle = assemble_bundle(run_dir)
    if bundle is None:
        raise ValueError(f"{run_dir} has no trained coarse model (coarse/final.pt): nothing to export")
    test_path = run_dir / "evaluation_test.json"
    bundle["metrics"] = bundle_metrics(run_dir, read_json(test_path) if test_path.is_file() else None)
    return save_bundle(output, bundle)


# --------------------------------------------------------------------------------------------
# Helpers


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("training")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def _phases_to_skip(ctx: RunContext) -> set[str]:
    """Phases a resumed run skips: the complete ones *before* the first phase that still has work.

    Phase 1 is complete when every fold now asked for is (a run that trained ``folds_to_run=[0]``
    and resumes with all folds trains the others, then chooses the final fold among all of them);
    every phase after one that runs again is rerun too, since it was built on the earlier result.
    """
    from training.phases.coarse import folds_to_run

    skipped: set[str] = set()
    for phase in ctx.cfg.phases:
        complete = ctx.state.is_done(phase)
        if complete and phase == "coarse":
            complete = all(ctx.state.is_done(phase, fold) for fold in folds_to_run(ctx))
        if not complete:
            break
        skipped.add(phase)
    return skipped


def _check_resumable(previous: dict, cfg: TrainingConfig) -> None:
    """Resuming with another dataset/split/architecture would mix incompatible checkpoints."""
    current = cfg.model_dump(mode="json")
    for section in ("data", "transunet"):
        if previous.get(section) != current.get(section):
            raise ValueError(
                f"cannot resume: the {section} settings differ from those of the run in {cfg.output_dir} "
                "(start a new output directory or drop --resume)"
            )
    if previous.get("refiner", {}).get("backbone") != current["refiner"]["backbone"]:
        raise ValueError(f"cannot resume: the refiner backbone differs from the run in {cfg.output_dir}")


def _read_summary(phase_dir: Path) -> dict:
    path = Path(phase_dir) / "summary.json"
    return read_json(path) if path.is_file() else {}


def _brief(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("history", "folds")} | (
        {"folds": [{k: v for k, v in f.items() if k != "history"} for f in summary["folds"]]}
        if "folds" in summary
        else {}
    )


def _fold_dice(run_dir: Path) -> list[dict]:
    folds = []
    for path in sorted((Path(run_dir) / COARSE_DIR).glob("fold*/summary.json")):
        summary = read_json(path)
        folds.append(
            {"fold": summary["fold"], "dice": summary["best_dice"], "best_epoch": summary["best_epoch"]}
        )
    return sorted(folds, key=lambda f: f["fold"])
