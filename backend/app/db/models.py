"""The run store: SQLAlchemy 2 typed models of runs, folds, epoch metrics, evaluations and models.

Every timestamp is timezone-aware UTC (SQLite stores naive text; :class:`UTCDateTime` restores
the zone). The schema is created and upgraded only by Alembic (``migrations/versions``); keep
the two in step (``alembic revision --autogenerate`` from ``backend/app/db``).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes (SQLite included)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class RunStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    lost = "lost"


#: The largest id a row can have: ids are ``INTEGER`` columns, 32-bit signed in PostgreSQL
#: (64-bit in SQLite). The API refuses larger ids with a 422 instead of overflowing the query.
MAX_ID = 2**31 - 1

#: States a run never leaves by itself (resume re-queues failed/cancelled/lost ones).
TERMINAL_STATUSES = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled})
#: States that may be resumed from their last checkpoint.
RESUMABLE_STATUSES = frozenset({RunStatus.failed, RunStatus.cancelled, RunStatus.lost})

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Run(Base):
    """One training run: its request, where it stands, and which worker process holds it."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, doc="TrainingConfig.model_dump(mode='json').")
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.queued, index=True)
    phases: Mapped[list[Any]] = mapped_column(JSON, default=list)
    phase: Mapped[str | None] = mapped_column(String(32))
    fold: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int | None] = mapped_column(Integer, doc="0-based epoch of the current phase/fold.")
    epochs: Mapped[int | None] = mapped_column(Integer)
    progress: Mapped[float] = mapped_column(Float, default=0.0, doc="0..1 over the whole run.")
    eta_s: Mapped[float | None] = mapped_column(Float)
    device: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text, doc="Readable one-line cause; tracebacks go to logs.")
    output_dir: Mapped[str | None] = mapped_column(String(1024))
    bundle_path: Mapped[str | None] = mapped_column(String(1024))
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=1, doc="Bumped by every resume.")
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    worker_hostname: Mapped[str | None] = mapped_column(String(255))
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    log_tail: Mapped[str | None] = mapped_column(Text, doc="Last lines of the run's log.")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    folds: Mapped[list[FoldResult]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="FoldResult.id"
    )
    epoch_metrics: Mapped[list[EpochMetric]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="EpochMetric.id"
    )
    evaluations: Mapped[list[Evaluation]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="Evaluation.id"
    )

    def __repr__(self) -> str:
        return f"Run(id={self.id}, status={self.status}, phase={self.phase}, progress={self.progress:.2f})"


class FoldResult(Base):
    """Best epoch of one fold of one phase (phase 1 trains K folds; single-model phases use fold 0)."""

    __tablename__ = "folds"
    __table_args__ = (UniqueConstraint("run_id", "phase", "fold", name="uq_folds_run_phase_fold"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(32))
    fold: Mapped[int] = mapped_column(Integer)
    best_epoch: Mapped[int | None] = mapped_column(Integer)
    checkpoint: Mapped[str | None] = mapped_column(String(1024))
    val_dice: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[Run] = relationship(back_populates="folds")


class EpochMetric(Base):
    """Losses, validation Dice and learning rate at the end of one epoch."""

    __tablename__ = "epoch_metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "phase", "fold", "epoch", name="uq_epoch_metrics_run_phase_fold_epoch"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(32))
    fold: Mapped[int] = mapped_column(Integer, doc="-1 for phases without folds.")
    epoch: Mapped[int] = mapped_column(Integer)
    losses: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dice: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    elapsed_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[Run] = relationship(back_populates="epoch_metrics")


class Evaluation(Base):
    """Baseline (coarse) versus refined Dice on one split of one dataset."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint(
            "run_id",
            "phase",
            "stage",
            "dataset",
            "split",
            name="uq_evaluations_run_phase_stage_dataset_split",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(32), default="", doc="Phase that reported it ('test' = final).")
    stage: Mapped[str] = mapped_column(
        String(32), default="final", doc="'baseline' (before training) or 'final'."
    )
    dataset: Mapped[str] = mapped_column(String(32))
    split: Mapped[str] = mapped_column(String(32))
    n_images: Mapped[int | None] = mapped_column(Integer)
    dice_coarse: Mapped[float | None] = mapped_column(Float, doc="Baseline: the coarse segmenter alone.")
    dice_refined: Mapped[float | None] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float, doc="dice_refined − dice_coarse.")
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    run: Mapped[Run] = relationship(back_populates="evaluations")


class ModelVersion(Base):
    """A registered model bundle. At most one row is active (partial unique index + transaction)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        Index(
            "uq_model_versions_one_active",
            "active",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    bundle_path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column()


class Correction(Base):
    """A mask a user accepted or corrected, saved (on request only) as ground truth for training.

    The image and the mask are files under ``settings.corrections_dir`` (``images/<key>.png``,
    ``masks/<key>.png``, ``meta/<key>.json``); the row indexes them. ``image_key`` is the hash of
    the decoded pixels, so the same image (frame) is saved once. DICOM headers are not kept: only
    a hash of the source's SOPInstanceUID (unless ``corrections_keep_dicom`` is set).
    """

    __tablename__ = "corrections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_key: Mapped[str] = mapped_column(String(64), unique=True)
    source_kind: Mapped[str] = mapped_column(String(16), doc="png, jpeg, bmp, tiff or dicom.")
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frame: Mapped[int] = mapped_column(Integer, default=0)
    lesion_px: Mapped[int] = mapped_column(Integer, default=0)
    mask_source: Mapped[str] = mapped_column(String(16), doc="'refined' (accepted) or 'corrected'.")
    model_version: Mapped[str | None] = mapped_column(String(255))
    prompts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sop_instance_uid_sha256: Mapped[str | None] = mapped_column(String(64))
    deidentified: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
