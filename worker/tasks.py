"""The training task: parse the stored run → call the training pipeline → record to the store.

:func:`execute_run` is a plain function (tests call it without a broker, with a fake training
function); :func:`train_run` is its thin Celery wrapper. Everything the admin sees comes from
:class:`StoreCallback`, the worker's :class:`~training.callbacks.TrainingCallback`:

* ``epoch_end`` → an epoch-metrics row and the run's phase/fold/epoch/progress/ETA;
* ``step`` → progress and heartbeat, throttled; every ``should_stop`` reads the cancel flag;
* ``fold_end`` → a fold row (best epoch, checkpoint, validation Dice);
* ``evaluation`` → a baseline-vs-refined Dice row;
* a background thread refreshes the heartbeat while the process lives, so a killed worker is
  detectable (``lost``) even during long stretches without steps (embedding caches).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backend.app.core.settings import Settings, get_settings
from backend.app.db import crud
from backend.app.db.models import TERMINAL_STATUSES, Run, RunStatus, utcnow
from backend.app.db.session import init_db, session_scope
from training.callbacks import ProgressEvent, TrainingCallback, TrainingCancelled
from training.config import TrainingConfig
from worker.celery_app import TRAIN_TASK, app
from worker.eta import EtaEstimator

log = logging.getLogger(__name__)

TrainFn = Callable[..., dict]

#: Seconds between two step-level progress writes.
STEP_WRITE_INTERVAL_S = 2.0
#: Seconds between two heartbeats of the background thread (capped by lost_after_s / 4).
HEARTBEAT_INTERVAL_S = 10.0
#: Phases of the run's final evaluation (on the held-out test split).
FINAL_EVALUATION_PHASES = frozenset({None, "test", "evaluation"})
#: Longest readable error stored on a run (the traceback goes to the logs).
MAX_ERROR_CHARS = 500


def readable_error(exc: BaseException) -> str:
    """One line naming the exception, without a traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def mark_lost_at_start(settings: Settings, *, hostname: str | None) -> list[int]:
    """Worker start: report as lost the runs this worker name held, and every stale one."""
    init_db(settings)
    with session_scope(settings) as session:
        lost = crud.mark_lost_runs(session, lost_after_s=settings.run_lost_after_s, hostname=hostname)
    if lost:
        log.warning("runs %s were left running by a dead worker: now 'lost' (resume them)", lost)
    return lost


class _Heartbeat(threading.Thread):
    """Refreshes ``heartbeat_at`` while the process lives; notices when the run is taken away."""

    def __init__(self, settings: Settings, run_id: int, *, pid: int, hostname: str, interval_s: float):
        super().__init__(name=f"heartbeat-run-{run_id}", daemon=True)
        self.settings, self.run_id, self.pid, self.hostname = settings, run_id, pid, hostname
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.owned = True

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                with session_scope(self.settings) as session:
                    self.owned = crud.heartbeat(session, self.run_id, pid=self.pid, hostname=self.hostname)
            except Exception:  # noqa: BLE001 - keep beating through a store hiccup
                log.warning("heartbeat of run %s failed", self.run_id, exc_info=True)
            if not self.owned:
                log.warning("run %s is no longer held by this worker; stopping it", self.run_id)
                return

    def stop(self) -> None:
        self.stopped.set()


class StoreCallback(TrainingCallback):
    """Records a run's progress, metrics and evaluations to the store; answers cancellation."""

    def __init__(
        self,
        settings: Settings,
        run_id: int,
        *,
        pid: int,
        hostname: str,
        dataset: str,
        start_progress: float = 0.0,
        heartbeat: _Heartbeat | None = None,
    ):
        self.settings = settings
        self.run_id = run_id
        self.pid = pid
        self.hostname = hostname
        self.dataset = dataset
        self.heartbeat = heartbeat
        self.started = time.monotonic()
        self.start_progress = start_progress
        self.progress = start_progress
        self.eta = EtaEstimator(start_progress)
        self.last_step_write = 0.0
        self.cancel_requested = False
        self.events = 0

    # -- helpers
    def eta_s(self, progress: float | None) -> float | None:
        return self.eta.update(progress)

    def _progress(self, session, event: ProgressEvent, *, heartbeat: bool = True) -> None:
        if event.progress is not None:
            self.progress = max(self.progress, event.progress)
        crud.record_progress(
            session,
            self.run_id,
            phase=event.phase,
            fold=event.fold,
            epoch=event.epoch,
            epochs=event.epochs,
            progress=event.progress,
            eta_s=self.eta_s(self.progress),
            heartbeat_at=utcnow() if heartbeat else None,
            reset_epoch=event.kind in ("phase_start", "fold_start"),
        )

    def log_line(self, session, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        crud.append_log(session, self.run_id, f"{stamp} {line}")

    @staticmethod
    def _where(event: ProgressEvent) -> str:
        parts = [event.phase or "run"]
        if event.fold is not None:
            parts.append(f"fold {event.fold}")
        if event.epoch is not None:
            parts.append(f"epoch {event.epoch + 1}" + (f"/{event.epochs}" if event.epochs else ""))
        return " ".join(parts)

    # -- TrainingCallback
    def on_event(self, event: ProgressEvent) -> None:
        self.events += 1
        try:
            self._record(event)
        except Exception:  # noqa: BLE001 - a store hiccup must not kill hours of training
            log.warning("could not record %s event of run %s", event.kind, self.run_id, exc_info=True)

    def _record(self, event: ProgressEvent) -> None:
        if event.kind == "step":
            now = time.monotonic()
            if now - self.last_step_write < STEP_WRITE_INTERVAL_S:
                return
            self.last_step_write = now
            with session_scope(self.settings) as session:
                self._progress(session, event)
            return
        with session_scope(self.settings) as session:
            if event.kind == "epoch_end":
                crud.record_epoch(
                    session,
                    self.run_id,
                    phase=event.phase or "",
                    fold=event.fold,
                    epoch=int(event.epoch or 0),
                    losses=event.losses,
                    dice=_float(event.dice),
                    lr=_float(event.lr),
                    elapsed_s=_float(event.elapsed_s),
                )
                self._progress(session, event)
                losses = ", ".join(f"{k}={v:.4f}" for k, v in (event.losses or {}).items())
                dice = f", val dice={event.dice:.4f}" if event.dice is not None else ""
                self.log_line(session, f"{self._where(event)}: {losses}{dice}")
            elif event.kind == "fold_end":
                extra = event.extra or {}
                checkpoint = extra.get("checkpoint")
                crud.record_fold(
                    session,
                    self.run_id,
                    phase=event.phase or "",
                    fold=event.fold,
                    best_epoch=extra.get("best_epoch"),
                    checkpoint=str(checkpoint) if checkpoint is not None else None,
                    val_dice=_float(event.dice),
                )
                self._progress(session, event)
                self.log_line(
                    session, f"{event.phase} fold {event.fold} done: best val dice {_fmt(_float(event.dice))}"
                )
            elif event.kind == "evaluation":
                evaluation = crud.record_evaluation(session, self.run_id, **self.evaluation_fields(event))
                self.log_line(
                    session,
                    f"evaluation {evaluation.phase or 'run'} {evaluation.stage} on "
                    f"{evaluation.dataset}/{evaluation.split}: coarse Dice {_fmt(evaluation.dice_coarse)}, "
                    f"refined {_fmt(evaluation.dice_refined)}",
                )
            elif event.kind == "warning":
                self.log_line(session, f"WARNING {event.message or ''}".rstrip())
            else:  # run_start, phase_start, fold_start, phase_end, run_end
                self._progress(session, event)
                if event.kind != "run_end":
                    self.log_line(session, f"{event.kind.replace('_', ' ')}: {self._where(event)}")

    def evaluation_fields(self, event: ProgressEvent) -> dict[str, Any]:
        """Map an ``evaluation`` event to a store row.

        Phase evaluations (a ``stage`` such as ``baseline``) run on the validation split; the
        run's final evaluation (phase ``test``/``evaluation``) on the held-out test split.
        """
        extra = dict(event.extra or {})
        n_images = extra.pop("n_images", None)
        split = extra.pop("split", None) or ("test" if event.phase in FINAL_EVALUATION_PHASES else "val")
        return {
            "dataset": str(extra.pop("dataset", None) or self.dataset),
            "split": str(split),
            "phase": event.phase,
            "stage": str(extra.pop("stage", None) or "final"),
            "n_images": int(n_images) if isinstance(n_images, int | float) else None,
            "dice_coarse": _float(extra.pop("dice_coarse", None)),
            "dice_refined": _float(extra.pop("dice_refined", event.dice)),
            "extra": _json_safe({k: v for k, v in extra.items() if k != "per_image"}),
        }

    def should_stop(self) -> bool:
        if self.heartbeat is not None and not self.heartbeat.owned:
            return True
        try:
            with session_scope(self.settings) as session:
                self.cancel_requested = crud.is_cancel_requested(session, self.run_id)
        except Exception:  # noqa: BLE001
            log.warning("could not read the cancel flag of run %s", self.run_id, exc_info=True)
        return self.cancel_requested


def _register_bundle(settings: Settings, run: Run, bundle: Path, metrics: dict[str, Any]) -> int:
    """Copy the bundle into ``models_dir`` (content-addressed) and register it; returns its id."""
    sha256 = crud.file_sha256(bundle)
    models_dir = Path(settings.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"run-{run.id:06d}-{sha256[:12]}.pt"
    if not target.exists():
        partial = target.with_suffix(".partial")
        try:
            os.link(bundle, partial)
        except OSError:
            shutil.copyfile(bundle, partial)
        os.replace(partial, target)
    with session_scope(settings) as session:
        version = crud.register_model_version(
            session, bundle_path=target, sha256=sha256, run_id=run.id, metrics=_json_safe(metrics)
        )
        return version.id


def _model_metrics(settings: Settings, run_id: int, summary: dict[str, Any]) -> dict[str, Any]:
    """What the models list shows: the test evaluation, per-fold Dice and every evaluation row."""
    metrics: dict[str, Any] = dict(summary.get("metrics") or {})
    for key in ("test", "coarse_folds", "model_version"):
        if summary.get(key) is not None:
            metrics[key] = summary[key]
    with session_scope(settings) as session:
        metrics["evaluations"] = [
            {
                "phase": row.phase,
                "stage": row.stage,
                "dataset": row.dataset,
                "split": row.split,
                "n_images": row.n_images,
                "dice_coarse": row.dice_coarse,
                "dice_refined": row.dice_refined,
                "delta": row.delta,
            }
            for row in crud.evaluations(session, run_id)
        ]
    return metrics


def _find_bundle(summary: dict[str, Any], output_dir: Path) -> Path | None:
    for key in ("bundle", "bundle_path"):
        if summary.get(key):
            return Path(summary[key])
    paths = summary.get("paths")
    if isinstance(paths, dict) and paths.get("bundle"):
        return Path(paths["bundle"])
    candidate = output_dir / "bundle.pt"
    return candidate if candidate.is_file() else None


def _default_train_fn() -> TrainFn:
    from training.pipeline import run_training

    return run_training


def execute_run(
    run_id: int,
    *,
    attempt: int = 1,
    resume: bool = False,
    settings: Settings | None = None,
    train_fn: TrainFn | None = None,
    task_id: str | None = None,
    hostname: str | None = None,
) -> dict[str, Any]:
    """Run one stored training run to a final state; returns ``{"run_id", "status", ...}``.

    Never raises for training errors: they end the run ``failed`` with a one-line ``error``
    (the full traceback is logged). A run that this call cannot claim (a stale message of an
    older attempt, a cancelled or finished run, a run alive on another worker) is skipped.
    """
    settings = settings or get_settings()
    hostname = hostname or f"pid@{socket.gethostname()}"
    pid = os.getpid()
    init_db(settings)

    with session_scope(settings) as session:
        run = crud.get_run(session, run_id)
        if run is None:
            log.error("run %s does not exist; dropping its task", run_id)
            return {"run_id": run_id, "status": "missing"}
        prior_status = run.status
        stored_config = dict(run.config)
        start_progress = float(run.progress or 0.0)

    try:
        cfg = TrainingConfig.from_stored(stored_config)
        device = cfg.resolved_device()
    except (ValidationError, RuntimeError) as exc:
        log.exception("run %s has an unusable config", run_id)
        if prior_status in TERMINAL_STATUSES:  # a stale message of a finished run
            return {"run_id": run_id, "status": "skipped", "prior_status": str(prior_status)}
        with session_scope(settings) as session:
            crud.finish_run(
                session, run_id, RunStatus.failed, error=f"invalid run config: {readable_error(exc)}"
            )
        return {"run_id": run_id, "status": RunStatus.failed.value}

    with session_scope(settings) as session:
        claimed = crud.claim_run(
            session,
            run_id,
            attempt=attempt,
            hostname=hostname,
            pid=pid,
            device=device,
            task_id=task_id,
            lost_after_s=settings.run_lost_after_s,
        )
    if not claimed:
        log.info("run %s (attempt %s) was not claimable (status %s); skipping", run_id, attempt, prior_status)
        return {"run_id": run_id, "status": "skipped", "prior_status": str(prior_status)}

    # A redelivered message of a run that had started continues from its checkpoints.
    resume = resume or prior_status in (RunStatus.lost, RunStatus.running)
    log.info("run %s started on %s (pid %s, device %s, resume=%s)", run_id, hostname, pid, device, resume)
    beat = _Heartbeat(
        settings,
        run_id,
        pid=pid,
        hostname=hostname,
        interval_s=min(HEARTBEAT_INTERVAL_S, settings.run_lost_after_s / 4),
    )
    callback = StoreCallback(
        settings,
        run_id,
        pid=pid,
        hostname=hostname,
        dataset=cfg.data.name,
        start_progress=start_progress,
        heartbeat=beat,
    )
    with session_scope(settings) as session:
        callback.log_line(
            session, f"attempt {attempt} started on {hostname} pid {pid} ({device}, resume={resume})"
        )
    beat.start()
    try:
        train = train_fn or _default_train_fn()
        summary = train(cfg, callback, resume=resume) or {}
        summary = _json_safe(summary)
        bundle = _find_bundle(summary, cfg.output_dir)
        model_id = None
        bundle_path = None
        if bundle is not None and bundle.is_file():
            model_id = _register_bundle(settings, run, bundle, _model_metrics(settings, run_id, summary))
            bundle_path = str(bundle)
            summary["model_version_id"] = model_id
        else:
            log.warning("run %s produced no bundle (%s)", run_id, bundle)
        with session_scope(settings) as session:
            crud.finish_run(
                session, run_id, RunStatus.succeeded, summary=summary, bundle_path=bundle_path, pid=pid
            )
            callback.log_line(session, f"succeeded (model version {model_id})")
        log.info("run %s succeeded (model version %s)", run_id, model_id)
        return {"run_id": run_id, "status": RunStatus.succeeded.value, "model_version_id": model_id}
    except TrainingCancelled:
        if not beat.owned:
            log.warning("run %s was taken from this worker; leaving its state alone", run_id)
            return {"run_id": run_id, "status": "abandoned"}
        with session_scope(settings) as session:
            crud.finish_run(session, run_id, RunStatus.cancelled, error="cancelled by the user", pid=pid)
            callback.log_line(session, "cancelled")
        log.info("run %s cancelled", run_id)
        return {"run_id": run_id, "status": RunStatus.cancelled.value}
    except Exception as exc:  # noqa: BLE001 - every training error ends the run failed
        log.exception("run %s failed", run_id)
        error = readable_error(exc)
        with session_scope(settings) as session:
            crud.finish_run(session, run_id, RunStatus.failed, error=error, pid=pid)
            callback.log_line(session, f"failed: {error}")
        return {"run_id": run_id, "status": RunStatus.failed.value, "error": error}
    finally:
        beat.stop()


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def train_run(self, run_id: int, attempt: int = 1, resume: bool = False) -> dict[str, Any]:
    """Celery entry point: one stored run, on the ``gpu`` queue."""
    return execute_run(
        run_id,
        attempt=attempt,
        resume=resume,
        task_id=self.request.id,
        hostname=self.request.hostname or None,
    )
