"""The one training loop every phase plugs into.

:func:`run_epochs` owns what phases 1, 2b and 3 (and any new phase) share: restoring ``last.pt``
when a run resumes (position, history, best epoch, RNG state, training time), the evaluation of
the starting weights on a fresh start and — when the phase says so — keeping them as the epoch −1
candidate, epochs of seeded batches (:func:`~training.phases.context.epoch_order`, so a resumed
epoch skips exactly the steps already taken), progress and ``step`` / ``epoch_end`` events,
cancellation between steps (``last.pt`` saved first), validation after every epoch, the best
epoch by validation Dice (ties keep the earlier) and ``last.pt`` after every epoch.

A phase describes only what is its own, as a :class:`LoopPhase`: how to restore and save its
modules and optimizer, one training step, one validation pass and what the best epoch saves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.checkpoints import load_checkpoint, save_checkpoint
from training.config import TrainingConfig
from training.phases.context import batches, epoch_order, rng_state, set_rng_state

if TYPE_CHECKING:
    from training.phases.context import RunContext

log = logging.getLogger("training.loop")


class TrainingDiverged(RuntimeError):
    """A training step's loss is NaN or infinite: the weights are lost to overflow, and every
    later step would only spend time. The run ends failed with this message; the last finished
    epoch's ``last.pt`` and best weights are left as they were."""


class TrainState:
    """Where one phase (or one fold) stands, saved to and restored from its ``last.pt``.

    It owns the bookkeeping every phase shares: the position to continue from (``epoch``,
    ``step``), the per-epoch ``history``, the ``best`` epoch, the RNG state and the training time
    spent before an interruption. The phase itself saves and restores its modules, optimizer,
    schedule and scaler (each in its own way: a refiner stores its trainable tensors only).
    """

    def __init__(self, path: Path, best: dict) -> None:
        self.path = Path(path)
        self.epoch, self.step = 0, 0
        self.history: list[dict] = []
        self.best = dict(best)
        self.elapsed_before = 0.0
        self.started = time.monotonic()

    @classmethod
    def restore(cls, path: Path, ctx: RunContext, best: dict) -> tuple[TrainState, dict | None]:
        """A fresh state, or — when the run resumes and ``path`` exists — the saved one (RNG
        state restored), with the whole checkpoint for the phase to restore its own states from."""
        state = cls(path, best)
        if not (ctx.resume and state.path.is_file()):
            return state, None
        checkpoint = load_checkpoint(state.path, map_location=ctx.device)
        state.epoch, state.step = checkpoint["epoch"], checkpoint["step"]
        state.history, state.best = checkpoint["history"], checkpoint["best"]
        state.elapsed_before = checkpoint.get("elapsed_s", 0.0)
        set_rng_state(checkpoint.get("rng"))
        return state, checkpoint

    def start_clock(self) -> None:
        """Count training time from now on (e.g. after a baseline evaluation)."""
        self.started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def save(self, epoch: int, step: int, cfg: TrainingConfig, **states) -> None:
        """Write ``last.pt``: the position ``(epoch, step)`` to continue from, this bookkeeping,
        the config and the phase's own ``states`` (state dicts and phase-specific fields)."""
        save_checkpoint(
            self.path,
            **states,
            epoch=epoch,
            step=step,
            history=self.history,
            best=self.best,
            rng=rng_state(),
            elapsed_s=self.elapsed_s,
            config=cfg.model_dump(mode="json"),
        )


@dataclass
class Validation:
    """What one validation pass tells the loop.

    ``dice`` chooses the best epoch (``None``: no lesion image to score, ranks below any Dice);
    ``entry`` goes into the epoch's history entry; ``best`` is kept beside ``epoch``/``dice`` in
    the ``best`` record when the epoch is the best; ``event`` is added to the ``epoch_end`` event's
    ``extra``; ``losses`` to its ``losses`` (e.g. the validation loss); ``summary`` ends the log line.
    """

    dice: float | None
    entry: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    event: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    summary: str = ""

    @property
    def score(self) -> float:
        return -1.0 if self.dice is None else float(self.dice)


class LoopPhase:
    """A phase as :func:`run_epochs` drives it. Subclasses set the attributes and the hooks."""

    #: Event/progress name of the phase (``coarse``, ``refiner``, ``end-to-end``).
    phase: str
    #: Fold the phase trains (events carry it), or ``None``.
    fold: int | None = None
    epochs: int
    batch_size: int
    #: Tag of :func:`epoch_order` (the batch order of each epoch is seeded by it and the epoch).
    order_tag: int
    #: Checkpoint to resume from, written after every epoch and on cancellation.
    last_path: Path
    #: Key of the run's :class:`~training.phases.context.ProgressPlan` this phase advances.
    progress_key: str
    #: Which of the step's losses is the epoch's ``train`` loss.
    main_loss: str = "total"
    #: Whether the starting weights are a candidate for the best epoch (epoch −1).
    start_is_candidate: bool = False

    @property
    def label(self) -> str:
        return self.phase if self.fold is None else f"{self.phase} fold {self.fold}"

    def n_items(self) -> int:
        raise NotImplementedError

    def load(self, checkpoint: dict) -> None:
        """Restore modules, optimizer, schedule, … from a ``last.pt`` checkpoint."""
        raise NotImplementedError

    def state(self) -> dict:
        """What ``last.pt`` keeps of this phase besides the loop's bookkeeping."""
        raise NotImplementedError

    def start(self) -> Validation | None:
        """On a fresh start (nothing to resume): evaluate the starting weights (``None``: don't)."""
        return None

    def begin_epoch(self, epoch: int) -> None:
        """Before each epoch's first step (train mode, freezing, per-epoch counters)."""

    def train_step(self, epoch: int, step: int, indices: list[int]) -> dict[str, float]:
        """One optimisation step on the items at ``indices``; returns its losses by name."""
        raise NotImplementedError

    def step_extra(self) -> dict:
        """Extra fields of each ``step`` event."""
        return {}

    def lr(self) -> float | None:
        raise NotImplementedError

    def validate(self, epoch: int, train_losses: dict[str, float]) -> Validation:
        """After each epoch; ``train_losses``: the epoch's mean training losses by name."""
        raise NotImplementedError

    def save_best(self, epoch: int, validation: Validation) -> None:
        """Save the weights of a new best epoch (``epoch`` −1: the starting weights)."""
        raise NotImplementedError


def fmt_dice(value: float | None) -> str:
    """A Dice (or loss) for a log line: four decimals, ``n/a`` when there is none."""
    return "n/a" if value is None else f"{value:.4f}"


def baseline_validation(
    ctx: RunContext, phase: str, report: dict, *, message: str | None = None, best: dict | None = None
) -> Validation:
    """The starting weights' evaluation (a refined-vs-coarse report of ``summarize``) as the
    ``evaluation`` event of stage ``baseline`` and as the :class:`Validation` the loop ranks."""
    coarse, refined = report["dice_coarse"], report["dice_refined"]
    ctx.emit(
        "evaluation",
        phase=phase,
        dice=refined,
        message=message or f"baseline: coarse Dice {fmt_dice(coarse)}, refined {fmt_dice(refined)}",
        extra={
            "stage": "baseline",
            "split": "val",
            "n_images": report["n_images"],
            "dice_coarse": coarse,
            "dice_refined": refined,
        },
    )
    return Validation(
        dice=refined,
        entry={"val_dice_coarse": coarse, "val_dice_refined": refined},
        best=dict(best or {}),
    )


def run_epochs(ctx: RunContext, phase: LoopPhase) -> TrainState:
    """Train ``phase`` for its epochs (resuming where its ``last.pt`` stopped); returns the state
    (history, best epoch, training time) for the phase's summary."""
    cfg = ctx.cfg
    state, checkpoint = TrainState.restore(
        phase.last_path, ctx, {"epoch": None, "dice": None, "dice_score": None}
    )
    if checkpoint is not None:
        phase.load(checkpoint)
        log.info("%s: resuming at epoch %d step %d", phase.label, state.epoch, state.step)
    else:
        start = phase.start()
        if start is not None and phase.start_is_candidate:
            # The weights the phase starts from compete with its epochs (epoch -1), so it never
            # keeps a model that validates worse than the one it was given.
            state.history.append({"epoch": -1, **start.entry, "start": True})
            state.best = {"epoch": -1, "dice": start.dice, "dice_score": start.score, **start.best}
            phase.save_best(-1, start)
            log.info("%s: the starting weights validate at %s", phase.label, fmt_dice(start.dice))
    state.start_clock()

    def save_last(epoch: int, step: int) -> None:
        state.save(epoch, step, cfg, phase=phase.phase, fold=phase.fold, **phase.state())

    n_items = phase.n_items()
    for epoch in range(state.epoch, phase.epochs):
        phase.begin_epoch(epoch)
        order = epoch_order(cfg.data.seed, phase.order_tag, epoch, n_items)
        epoch_batches = batches(order, phase.batch_size)
        first_step = state.step if epoch == state.epoch else 0
        running: dict[str, list[float]] = {}
        for step in range(first_step, len(epoch_batches)):
            losses = phase.train_step(epoch, step, [int(i) for i in epoch_batches[step]])
            _check_finite(phase, losses, epoch, step)
            for name, value in losses.items():
                running.setdefault(name, []).append(value)
            ctx.progress.set(phase.progress_key, (epoch + (step + 1) / len(epoch_batches)) / phase.epochs)
            ctx.emit(
                "step",
                phase=phase.phase,
                fold=phase.fold,
                epoch=epoch,
                epochs=phase.epochs,
                step=step,
                steps=len(epoch_batches),
                losses=losses,
                lr=phase.lr(),
                extra=phase.step_extra(),
            )
            ctx.check_stop(lambda e=epoch, s=step + 1: save_last(e, s), phase.phase)

        means = {name: float(np.mean(values)) for name, values in running.items()}
        validation = phase.validate(epoch, means)
        state.history.append({"epoch": epoch, **validation.entry})
        if state.best["epoch"] is None or validation.score > state.best["dice_score"]:
            state.best = {
                "epoch": epoch,
                "dice": validation.dice,
                "dice_score": validation.score,
                **validation.best,
            }
            phase.save_best(epoch, validation)
        ctx.progress.set(phase.progress_key, (epoch + 1) / phase.epochs)
        train_loss = means.get(phase.main_loss)
        ctx.emit(
            "epoch_end",
            phase=phase.phase,
            fold=phase.fold,
            epoch=epoch,
            epochs=phase.epochs,
            losses={**({"train": train_loss} if train_loss is not None else {}), **validation.losses},
            dice=validation.dice,
            lr=phase.lr(),
            extra={"best_epoch": state.best["epoch"], "best_dice": state.best["dice"], **validation.event},
        )
        # Only once the epoch's record has gone out (the worker stores it) does last.pt say it is
        # done: a process killed in between redoes the epoch on resume (the same batches; the
        # store upserts its row) instead of resuming after an epoch whose metrics were never stored.
        save_last(epoch + 1, 0)
        log.info(
            "%s epoch %d/%d: train loss %s, %s",
            phase.label,
            epoch + 1,
            phase.epochs,
            fmt_dice(train_loss),
            validation.summary or f"val Dice {fmt_dice(validation.dice)}",
        )
    return state


def _check_finite(phase: LoopPhase, losses: dict[str, float], epoch: int, step: int) -> None:
    """Stop at the first step whose losses are not all finite, naming where and the learning rate."""
    bad = sorted(name for name, value in losses.items() if not math.isfinite(value))
    if not bad:
        return
    lr = phase.lr()
    raise TrainingDiverged(
        f"{phase.label}: the training loss ({', '.join(bad)}) is not finite at epoch {epoch + 1}, "
        f"step {step + 1}"
        + (f", learning rate {lr:.3g}" if lr is not None else "")
        + ": training diverged; start a new run with a lower learning rate"
    )
