"""Progress and cancellation interface between the training phases and whoever runs them.

The phases call :meth:`TrainingCallback.on_event` at phase/fold/epoch/step boundaries and check
:meth:`TrainingCallback.should_stop` between steps; a callback that answers ``True`` makes the
phase raise :class:`TrainingCancelled` after the current step, with its last checkpoint saved.
The terminal progress bar (CLI) and the Celery worker (store + cancel flag) are two callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

EventKind = Literal[
    "run_start",
    "phase_start",
    "fold_start",
    "step",
    "epoch_end",
    "fold_end",
    "phase_end",
    "evaluation",
    "warning",
    "run_end",
]


class TrainingCancelled(Exception):
    """Raised by a phase when its callback asked to stop; the run can be resumed later."""


@dataclass
class ProgressEvent:
    kind: EventKind
    phase: str | None = None
    fold: int | None = None
    epoch: int | None = None  # 0-based
    epochs: int | None = None
    step: int | None = None  # 0-based step within the epoch
    steps: int | None = None  # steps per epoch
    losses: dict[str, float] = field(default_factory=dict)
    dice: float | None = None  # validation Dice (epoch_end / fold_end) or evaluation Dice
    lr: float | None = None
    elapsed_s: float | None = None
    progress: float | None = None  # 0..1 over the whole run
    message: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingCallback:
    """Base callback: does nothing, never stops. Subclass and override what you need."""

    def on_event(self, event: ProgressEvent) -> None:  # noqa: B027 - intentionally empty default
        pass

    def should_stop(self) -> bool:
        return False


class CallbackList(TrainingCallback):
    """Fans events out to several callbacks; stops when any of them asks to."""

    def __init__(self, callbacks: Iterable[TrainingCallback | None] = ()):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_event(self, event: ProgressEvent) -> None:
        for callback in self.callbacks:
            callback.on_event(event)

    def should_stop(self) -> bool:
        return any(c.should_stop() for c in self.callbacks)


class EventRecorder(TrainingCallback):
    """Keeps every event in memory (tests, reports)."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self.started = time.monotonic()

    def on_event(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def of_kind(self, kind: EventKind) -> list[ProgressEvent]:
        return [e for e in self.events if e.kind == kind]
