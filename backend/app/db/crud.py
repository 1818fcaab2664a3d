"""Create/read/update functions of the run store, shared by the API routes and the worker.

Functions take a :class:`~sqlalchemy.orm.Session` and flush, never commit: the caller owns the
transaction (``session_scope`` in the worker, the request-scoped session in the API). The few
state transitions that race between processes (claiming a run, heartbeats, activating a model)
are single conditional ``UPDATE`` statements, so they are atomic on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, or_, select, text, update
from sqlalchemy.orm import Session

from backend.app.db.models import (
    RESUMABLE_STATUSES,
    EpochMetric,
    Evaluation,
    FoldResult,
    ModelVersion,
    Run,
    RunStatus,
    utcnow,
)

#: A running run whose worker has not sent a heartbeat for this long is reported ``lost``.
DEFAULT_LOST_AFTER_S = 60.0
#: Lines of worker log kept on the run row.
LOG_TAIL_LINES = 200
#: PostgreSQL advisory lock key serialising model activations.
_ACTIVATION_LOCK_KEY = 7_215_430_119
#: ``fold`` stored for phases that do not train folds (unique constraints ignore NULLs).
NO_FOLD = -1


class StateError(ValueError):
    """The run or model is not in a state that allows the requested transition."""


# --------------------------------------------------------------------------- runs


def create_run(session: Session, config: dict[str, Any], runs_dir: Path | None = None) -> Run:
    """Store a queued run. With ``runs_dir`` its ``output_dir`` becomes ``runs_dir/run-<id>``."""
    run = Run(
        config=dict(config),
        status=RunStatus.queued,
        phases=list(config.get("phases") or []),
        progress=0.0,
        attempt=1,
    )
    session.add(run)
    session.flush()
    if runs_dir is not None:
        output_dir = Path(runs_dir) / f"run-{run.id:06d}"
        run.output_dir = str(output_dir)
        run.config = {**run.config, "output_dir": str(output_dir)}
    elif config.get("output_dir"):
        run.output_dir = str(config["output_dir"])
    session.flush()
    return run


def get_run(session: Session, run_id: int) -> Run | None:
    return session.get(Run, run_id)


def list_runs(
    session: Session, *, status: str | None = None, limit: int = 100, offset: int = 0
) -> Sequence[Run]:
    query = select(Run).order_by(Run.id.desc()).limit(limit).offset(offset)
    if status is not None:
        query = query.where(Run.status == status)
    return session.scalars(query).all()


def count_runs(session: Session, *, status: str | None = None) -> int:
    query = select(func.count(Run.id))
    if status is not None:
        query = query.where(Run.status == status)
    return int(session.scalar(query) or 0)


def set_task_id(session: Session, run_id: int, task_id: str) -> None:
    session.execute(update(Run).where(Run.id == run_id).values(celery_task_id=task_id, updated_at=utcnow()))


def request_cancel(session: Session, run: Run) -> Run:
    """Cancel a run: queued/lost runs stop at once, a running one at its worker's next step."""
    if run.status in (RunStatus.queued, RunStatus.lost):
        run.status = RunStatus.cancelled
        run.cancel_requested = True
        run.finished_at = utcnow()
        run.eta_s = None
    elif run.status == RunStatus.running:
        run.cancel_requested = True
    else:
        raise StateError(f"run {run.id} is {run.status}; only queued, running or lost runs can be cancelled")
    session.flush()
    return run


def is_cancel_requested(session: Session, run_id: int) -> bool:
    return bool(session.scalar(select(Run.cancel_requested).where(Run.id == run_id)))


def prepare_resume(session: Session, run: Run) -> Run:
    """Re-queue a failed, cancelled or lost run; its next attempt resumes from its checkpoints."""
    if run.status not in RESUMABLE_STATUSES:
        raise StateError(
            f"run {run.id} is {run.status}; only "
            + ", ".join(sorted(s.value for s in RESUMABLE_STATUSES))
            + " runs can be resumed"
        )
    run.status = RunStatus.queued
    run.attempt = (run.attempt or 1) + 1
    run.cancel_requested = False
    run.error = None
    run.finished_at = None
    run.eta_s = None
    run.worker_pid = None
    session.flush()
    return run


def claim_run(
    session: Session,
    run_id: int,
    *,
    attempt: int,
    hostname: str,
    pid: int,
    device: str | None = None,
    task_id: str | None = None,
    lost_after_s: float = DEFAULT_LOST_AFTER_S,
) -> bool:
    """Atomically move a run to ``running`` for this worker process.

    Succeeds for the current ``attempt`` of a queued or lost run, or of a running run whose
    heartbeat is stale (its worker died and the broker redelivered the message). Fails for
    stale messages (an older attempt), terminal runs and runs another worker is alive on.
    """
    now = utcnow()
    stale = now - timedelta(seconds=lost_after_s)
    values: dict[str, Any] = {
        "status": RunStatus.running,
        "worker_hostname": hostname,
        "worker_pid": pid,
        "heartbeat_at": now,
        "started_at": now,
        "finished_at": None,
        "error": None,
        "eta_s": None,
        "updated_at": now,
    }
    if device is not None:
        values["device"] = device
    if task_id is not None:
        values["celery_task_id"] = task_id
    result = session.execute(
        update(Run)
        .where(
            Run.id == run_id,
            Run.attempt == attempt,
            Run.cancel_requested.is_(False),
            or_(
                Run.status.in_([RunStatus.queued, RunStatus.lost]),
                (Run.status == RunStatus.running) & (Run.heartbeat_at < stale),
            ),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def heartbeat(session: Session, run_id: int, *, pid: int, hostname: str) -> bool:
    """Refresh the heartbeat; False when this process no longer owns the run (lost/re-claimed)."""
    now = utcnow()
    result = session.execute(
        update(Run)
        .where(
            Run.id == run_id,
            Run.status == RunStatus.running,
            Run.worker_pid == pid,
            Run.worker_hostname == hostname,
        )
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def record_progress(
    session: Session,
    run_id: int,
    *,
    phase: str | None = None,
    fold: int | None = None,
    epoch: int | None = None,
    epochs: int | None = None,
    progress: float | None = None,
    eta_s: float | None = None,
    heartbeat_at: datetime | None = None,
    reset_epoch: bool = False,
) -> None:
    """Where the run stands. ``progress`` never decreases (a resumed run re-plans from 0)."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    for name, value in (
        ("phase", phase),
        ("epochs", epochs),
        ("eta_s", eta_s),
        ("heartbeat_at", heartbeat_at),
    ):
        if value is not None:
            values[name] = value
    if phase is not None or fold is not None:
        values["fold"] = fold
    if reset_epoch:
        values["epoch"] = values["epochs"] = None
    if epoch is not None:
        values["epoch"] = epoch
    if progress is not None:
        fraction = min(1.0, max(0.0, float(progress)))
        values["progress"] = case((Run.progress > fraction, Run.progress), else_=fraction)
    session.execute(
        update(Run).where(Run.id == run_id).values(**values).execution_options(synchronize_session=False)
    )


def _fold_key(fold: int | None) -> int:
    return NO_FOLD if fold is None else int(fold)


def record_epoch(
    session: Session,
    run_id: int,
    *,
    phase: str,
    fold: int | None,
    epoch: int,
    losses: dict[str, float] | None = None,
    dice: float | None = None,
    lr: float | None = None,
    elapsed_s: float | None = None,
) -> EpochMetric:
    """Insert or (on a resumed run repeating an epoch) update one epoch's metrics."""
    fold_key = _fold_key(fold)
    row = session.scalar(
        select(EpochMetric).where(
            EpochMetric.run_id == run_id,
            EpochMetric.phase == phase,
            EpochMetric.fold == fold_key,
            EpochMetric.epoch == epoch,
        )
    )
    if row is None:
        row = EpochMetric(run_id=run_id, phase=phase, fold=fold_key, epoch=epoch)
        session.add(row)
    row.losses = {k: float(v) for k, v in (losses or {}).items()}
    row.dice = dice
    row.lr = lr
    row.elapsed_s = elapsed_s
    session.flush()
    return row


def record_fold(
    session: Session,
    run_id: int,
    *,
    phase: str,
    fold: int | None,
    best_epoch: int | None = None,
    checkpoint: str | None = None,
    val_dice: float | None = None,
) -> FoldResult:
    fold_key = _fold_key(fold)
    row = session.scalar(
        select(FoldResult).where(
            FoldResult.run_id == run_id, FoldResult.phase == phase, FoldResult.fold == fold_key
        )
    )
    if row is None:
        row = FoldResult(run_id=run_id, phase=phase, fold=fold_key)
        session.add(row)
    row.best_epoch = best_epoch
    row.checkpoint = checkpoint
    row.val_dice = val_dice
    session.flush()
    return row


def record_evaluation(
    session: Session,
    run_id: int,
    *,
    dataset: str,
    split: str,
    phase: str | None = None,
    stage: str = "final",
    n_images: int | None = None,
    dice_coarse: float | None = None,
    dice_refined: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Evaluation:
    """Baseline (coarse) versus refined Dice; ``delta`` is derived here, once.

    One row per (phase, stage, dataset, split): a resumed run repeating an evaluation updates it.
    """
    phase_key = phase or ""
    row = session.scalar(
        select(Evaluation).where(
            Evaluation.run_id == run_id,
            Evaluation.phase == phase_key,
            Evaluation.stage == stage,
            Evaluation.dataset == dataset,
            Evaluation.split == split,
        )
    )
    if row is None:
        row = Evaluation(run_id=run_id, dataset=dataset, split=split, phase=phase_key, stage=stage)
        session.add(row)
    row.n_images = n_images
    row.dice_coarse = dice_coarse
    row.dice_refined = dice_refined
    row.delta = dice_refined - dice_coarse if dice_refined is not None and dice_coarse is not None else None
    row.extra = dict(extra or {})
    session.flush()
    return row


def append_log(
    session: Session, run_id: int, lines: str | Iterable[str], *, keep: int = LOG_TAIL_LINES
) -> None:
    new = [lines] if isinstance(lines, str) else list(lines)
    current = session.scalar(select(Run.log_tail).where(Run.id == run_id)) or ""
    kept = (current.splitlines() + [line.rstrip("\n") for line in new])[-keep:]
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(log_tail="\n".join(kept))
        .execution_options(synchronize_session=False)
    )


def finish_run(
    session: Session,
    run_id: int,
    status: RunStatus,
    *,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
    bundle_path: str | None = None,
    pid: int | None = None,
) -> bool:
    """Move a running run to a final state; with ``pid``, only if that process still owns it."""
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now, "eta_s": None}
    if error is not None:
        values["error"] = error
    if summary is not None:
        values["summary"] = summary
    if bundle_path is not None:
        values["bundle_path"] = bundle_path
    if status == RunStatus.succeeded:
        values["progress"] = 1.0
    query = update(Run).where(Run.id == run_id)
    if pid is not None:
        query = query.where(Run.worker_pid == pid, Run.status == RunStatus.running)
    result = session.execute(query.values(**values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def _lost_message(heartbeat_at: datetime | None) -> str:
    when = heartbeat_at.isoformat(timespec="seconds") if heartbeat_at else "never"
    return f"the worker stopped (no heartbeat since {when}); resume the run to continue from its checkpoint"


def mark_lost_runs(
    session: Session,
    *,
    lost_after_s: float = DEFAULT_LOST_AFTER_S,
    hostname: str | None = None,
    run_ids: Iterable[int] | None = None,
) -> list[int]:
    """Mark ``running`` runs as ``lost`` when their heartbeat is stale.

    With ``hostname`` (a worker starting), runs held by that worker name are lost at once,
    whatever their heartbeat: a worker that is starting runs nothing yet.
    """
    stale = utcnow() - timedelta(seconds=lost_after_s)
    condition = or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < stale)
    if hostname is not None:
        condition = or_(condition, Run.worker_hostname == hostname)
    query = select(Run).where(Run.status == RunStatus.running, condition).with_for_update()
    if run_ids is not None:
        query = query.where(Run.id.in_(list(run_ids)))
    lost = []
    for run in session.scalars(query):
        run.status = RunStatus.lost
        run.error = _lost_message(run.heartbeat_at)
        run.eta_s = None
        lost.append(run.id)
    session.flush()
    return lost


def refresh_lost(session: Session, run: Run, *, lost_after_s: float = DEFAULT_LOST_AFTER_S) -> Run:
    """Report ``run`` as lost if its worker went silent (checked on every GET)."""
    if run.status == RunStatus.running:
        if mark_lost_runs(session, lost_after_s=lost_after_s, run_ids=[run.id]):
            session.refresh(run)
    return run


def epoch_metrics(session: Session, run_id: int) -> Sequence[EpochMetric]:
    return session.scalars(
        select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.id)
    ).all()


def fold_results(session: Session, run_id: int) -> Sequence[FoldResult]:
    return session.scalars(
        select(FoldResult).where(FoldResult.run_id == run_id).order_by(FoldResult.id)
    ).all()


def evaluations(session: Session, run_id: int) -> Sequence[Evaluation]:
    return session.scalars(
        select(Evaluation).where(Evaluation.run_id == run_id).order_by(Evaluation.id)
    ).all()


# --------------------------------------------------------------------------- model versions


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def register_model_version(
    session: Session,
    *,
    bundle_path: Path | str,
    sha256: str,
    run_id: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Register a bundle (inactive). Registering the same bytes again returns the existing row."""
    existing = session.scalar(select(ModelVersion).where(ModelVersion.sha256 == sha256))
    if existing is not None:
        return existing
    version = ModelVersion(
        run_id=run_id, bundle_path=str(bundle_path), sha256=sha256, metrics=dict(metrics or {}), active=False
    )
    session.add(version)
    session.flush()
    return version


def ensure_shipped_model(session: Session, bundle_path: Path, metrics: dict[str, Any]) -> ModelVersion:
    """The row of the model shipped with the project (registered once, by content): listed beside
    trained models, so that it can be re-activated (rolled back to) like any of them."""
    version = register_model_version(
        session,
        bundle_path=bundle_path,
        sha256=file_sha256(bundle_path),
        metrics={**metrics, "shipped": True},
    )
    if Path(version.bundle_path) != Path(bundle_path):  # the same bytes moved: follow them
        version.bundle_path = str(bundle_path)
    return version


def list_model_versions(session: Session) -> Sequence[ModelVersion]:
    return session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all()


def get_model_version(session: Session, version_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, version_id)


def activate_model_version(session: Session, version_id: int) -> ModelVersion:
    """Make ``version_id`` the one active model (in the caller's transaction).

    The previous active row is cleared first and flushed, so the partial unique index on
    ``active`` never sees two active rows. Concurrent activations are serialised (PostgreSQL
    transaction-level advisory lock; SQLite has a single writer): the last one wins.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Serialise activations: a second one then sees the first's row as active and clears it.
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ACTIVATION_LOCK_KEY})
    version = session.get(ModelVersion, version_id, populate_existing=True)
    if version is None:
        raise LookupError(f"model version {version_id} does not exist")
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.active.is_(True), ModelVersion.id != version_id)
        .values(active=False)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    if not version.active:
        version.active = True
        version.activated_at = utcnow()
    session.flush()
    return version


def get_active_model_version(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))


def get_active_model_path(session: Session) -> Path | None:
    """Bundle path of the active model version, or None when none is active."""
    version = get_active_model_version(session)
    return Path(version.bundle_path) if version is not None else None
