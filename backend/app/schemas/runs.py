"""Schemas of the runs and models API.

:class:`RunCreate` is the run request. It is generated from :mod:`training.config` — the same
section models, constraints, defaults and descriptions — so the admin UI's form
(``GET /api/config/schema``) and the worker can never disagree with the CLI:

* top-level shortcuts: ``dataset``, ``root``, ``folds`` (→ ``data``), ``epochs`` (→ the
  ``epochs`` of every training phase that does not set its own), ``config_name``, ``phases``,
  ``device``;
* one optional section per :class:`~training.config.TrainingConfig` section (``data``,
  ``transunet``, ``tinyvit``, ``refiner``, ``coarse``, ``augment``, ``refiner_train``, ``end_to_end``,
  ``finetune``).
  Only the fields a client sends are applied; the rest keep their defaults. ``transunet``
  fields override the architecture named by ``config_name`` (compact or full), not the class
  defaults.

Paths the server controls (``output_dir``, ``cache_dir``) are not part of the request.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from backend.app.db.models import MAX_ID
from training.config import (
    ALL_PHASES,
    MAX_EPOCHS,
    AugmentConfig,
    CoarseModel,
    CoarseTrainConfig,
    ConfigName,
    DataConfig,
    DatasetName,
    Device,
    EndToEndConfig,
    FinetuneConfig,
    Phase,
    RefinerConfig,
    RefinerTrainConfig,
    TinyViTCoarseConfig,
    TrainingConfig,
    TransUNetConfig,
)

_TOP = TrainingConfig.model_fields
_DATA = DataConfig.model_fields
#: Sections whose ``epochs`` the top-level ``epochs`` shortcut sets.
EPOCH_SECTIONS = ("coarse", "refiner_train", "end_to_end")
SECTIONS = ("data", "tinyvit", "refiner", "coarse", "augment", "refiner_train", "end_to_end", "finetune")


class TransUNetOverrides(TransUNetConfig):
    """TransUNet fields overriding the architecture named by ``config_name``.

    The cross-field check (``hidden_size`` divisible by ``num_heads``) runs on the merged
    architecture, not on these partial values against the class defaults.
    """

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransUNetOverrides:
        return self


def _named_architectures() -> dict[str, dict[str, Any]]:
    return {name: TransUNetConfig.named(name).model_dump(mode="json") for name in ("compact", "full")}


class RunCreate(BaseModel):
    """A training run request: a validated subset of :class:`training.config.TrainingConfig`."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "x-transunet-presets": _named_architectures(),
            "examples": [
                {
                    "config_name": "compact",
                    "phases": ["coarse", "augment", "refiner", "end-to-end"],
                    "dataset": "busi",
                    "folds": 5,
                    "epochs": 2,
                    "data": {"limit": 40},
                    "coarse": {"lr": 0.01},
                }
            ],
        },
    )

    config_name: ConfigName = Field(_TOP["config_name"].default, description=_TOP["config_name"].description)
    coarse_model: CoarseModel = Field(
        _TOP["coarse_model"].default, description=_TOP["coarse_model"].description
    )
    phases: list[Phase] = Field(
        default_factory=lambda: list(ALL_PHASES), min_length=1, description=_TOP["phases"].description
    )
    dataset: DatasetName | None = Field(None, description="Shortcut for data.dataset.")
    root: Path | None = Field(
        None, description="Shortcut for data.root: the dataset's root folder on the training machine."
    )
    folds: int | None = Field(None, ge=2, le=20, description="Shortcut for data.folds.")
    epochs: int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="Epochs of every training phase whose section does not set its own.",
    )
    device: Device = Field(_TOP["device"].default, description=_TOP["device"].description)
    init_model_id: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        description="Fine-tune: start from this registered model version's weights (see /api/models) "
        "instead of from scratch; the run evaluates it on its test split too, for before/after.",
    )
    with_corrections: bool = Field(
        False,
        description="Also train on the corrections saved on this server (POST /api/corrections), "
        "pooled with the dataset: data.pool_dataset = corrections, data.pool_root = the server's "
        "corrections folder. Each is split on its own; the test report gives Dice per dataset.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, split and folds.")
    transunet: TransUNetOverrides | None = Field(
        None,
        description="Overrides of the TransUNet architecture named by config_name "
        "(see x-transunet-presets); omitted fields follow the named architecture.",
    )
    tinyvit: TinyViTCoarseConfig = Field(
        default_factory=TinyViTCoarseConfig,
        description="Architecture of the tinyvit coarse segmenter (used when coarse_model is tinyvit).",
    )
    refiner: RefinerConfig = Field(default_factory=RefinerConfig, description="Refiner and prompts.")
    coarse: CoarseTrainConfig = Field(default_factory=CoarseTrainConfig, description="Phase 1.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Phase 2a.")
    refiner_train: RefinerTrainConfig = Field(default_factory=RefinerTrainConfig, description="Phase 2b.")
    end_to_end: EndToEndConfig = Field(default_factory=EndToEndConfig, description="Phase 3.")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="Fine-tuning from init_model_id: the blend with the starting weights, guarded.",
    )

    @field_validator("phases")
    @classmethod
    def _distinct_phases(cls, phases: list[str]) -> list[str]:
        if len(set(phases)) != len(phases):
            raise ValueError("phases must not repeat")
        return phases

    def training_values(
        self,
        *,
        output_dir: Path,
        cache_dir: Path,
        init_from: Path | None = None,
        corrections_dir: Path | None = None,
    ) -> dict[str, Any]:
        """The ``TrainingConfig`` input this request stands for (validate it with ``model_validate``);
        ``init_from`` is the bundle of ``init_model_id``, resolved by the caller, and
        ``corrections_dir`` the server's corrections folder (for ``with_corrections``)."""
        given = self.model_dump(mode="json", exclude_unset=True)
        values: dict[str, Any] = {
            "config_name": self.config_name,
            "coarse_model": self.coarse_model,
            "phases": list(self.phases),
            "device": self.device,
            "output_dir": str(output_dir),
            "cache_dir": str(cache_dir),
        }
        if init_from is not None:
            values["init_from"] = str(init_from)
        for section in SECTIONS:
            values[section] = dict(given.get(section) or {})
        data = values["data"]
        if self.dataset is not None:
            data["dataset"] = self.dataset
        if self.root is not None:
            data["root"] = str(self.root)
        if self.folds is not None:
            data["folds"] = self.folds
        if self.with_corrections:
            if corrections_dir is None:
                raise ValueError("with_corrections needs the server's corrections folder")
            data["pool_dataset"] = "corrections"
            data["pool_root"] = str(corrections_dir)
        if self.epochs is not None:
            for section in EPOCH_SECTIONS:
                values[section].setdefault("epochs", self.epochs)
        architecture = TransUNetConfig.named(self.config_name).model_dump(mode="json")
        architecture.update(given.get("transunet") or {})
        values["transunet"] = architecture
        return values

    def to_training_config(
        self,
        *,
        output_dir: Path,
        cache_dir: Path,
        init_from: Path | None = None,
        corrections_dir: Path | None = None,
    ) -> TrainingConfig:
        """Merge into a full :class:`TrainingConfig` (raises ``pydantic.ValidationError``).

        ``model_validate`` (not the constructor) so that no ``ULTRAREFINER_*`` environment
        variable of the API process leaks into a stored run.
        """
        return TrainingConfig.model_validate(
            self.training_values(
                output_dir=output_dir,
                cache_dir=cache_dir,
                init_from=init_from,
                corrections_dir=corrections_dir,
            )
        )


def run_request_schema() -> dict[str, Any]:
    """JSON schema of :class:`RunCreate` for the admin UI's form; ``x-default-root-exists`` says
    whether the default dataset root is a folder on this server (else the form leaves it empty,
    with a hint, rather than offer a path that a launch would refuse)."""
    schema = RunCreate.model_json_schema()
    schema["x-default-root-exists"] = Path(DataConfig.model_fields["root"].default).expanduser().is_dir()
    return schema


class _ORM(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class RunSummary(_ORM):
    """A run in lists: where it stands."""

    id: int
    status: str = Field(description="queued, running, succeeded, failed, cancelled or lost.")
    phases: list[str] = Field(default_factory=list)
    phase: str | None = None
    fold: int | None = None
    epoch: int | None = Field(None, description="0-based epoch of the current phase/fold.")
    epochs: int | None = None
    progress: float = Field(0.0, description="0..1 over the whole run.")
    eta_s: float | None = Field(None, description="Estimated seconds left.")
    device: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    attempt: int = 1
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None

    @computed_field(description="Progress in percent (0..100).")  # type: ignore[prop-decorator]
    @property
    def progress_pct(self) -> float:
        return round(100.0 * (self.progress or 0.0), 1)


class RunRead(RunSummary):
    """One run in full: its stored config, worker, outputs and log tail."""

    config: dict[str, Any]
    output_dir: str | None = None
    bundle_path: str | None = None
    summary: dict[str, Any] | None = None
    celery_task_id: str | None = None
    worker_hostname: str | None = None
    worker_pid: int | None = None
    log_tail: str | None = None
    updated_at: datetime | None = None


class RunList(BaseModel):
    items: list[RunSummary]
    total: int


class EpochMetricRead(_ORM):
    phase: str
    fold: int | None = Field(None, description="None for phases without folds.")
    epoch: int
    losses: dict[str, float] = Field(default_factory=dict)
    dice: float | None = Field(None, description="Validation Dice at the end of the epoch.")
    lr: float | None = None
    elapsed_s: float | None = None
    created_at: datetime

    @field_validator("fold", mode="before")
    @classmethod
    def _no_fold(cls, fold: int | None) -> int | None:
        return None if fold is None or fold < 0 else fold


class FoldRead(_ORM):
    phase: str
    fold: int | None = None
    best_epoch: int | None = None
    checkpoint: str | None = None
    val_dice: float | None = None
    created_at: datetime

    _no_fold = field_validator("fold", mode="before")(EpochMetricRead._no_fold.__func__)


class EvaluationRead(_ORM):
    phase: str | None = Field(None, description="Phase that evaluated ('test': the final held-out test).")
    stage: str = Field("final", description="'baseline' (before the phase trained) or 'final'.")
    dataset: str
    split: str
    n_images: int | None = None
    dice_coarse: float | None = Field(None, description="Baseline: the coarse segmenter alone.")
    dice_refined: float | None = None
    delta: float | None = Field(None, description="dice_refined − dice_coarse.")
    extra: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class RunMetrics(BaseModel):
    run_id: int
    status: str
    epochs: list[EpochMetricRead]
    folds: list[FoldRead]
    evaluations: list[EvaluationRead]


class ModelVersionRead(_ORM):
    id: int
    run_id: int | None = None
    bundle_path: str
    sha256: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    active: bool
    created_at: datetime
    activated_at: datetime | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def name(self) -> str:
        """The model's one name: the version its bundle serves under (``/ready``, ``/segment``'s
        ``model_version``), else the bundle file's stem."""
        version = self.metrics.get("model_version") if isinstance(self.metrics, dict) else None
        return str(version) if version else Path(self.bundle_path).stem

    @computed_field  # type: ignore[prop-decorator]
    @property
    def shipped(self) -> bool:
        """Whether this is the model shipped with the project (``models/default.pt``)."""
        return bool(isinstance(self.metrics, dict) and self.metrics.get("shipped"))


class ModelList(BaseModel):
    items: list[ModelVersionRead]
    active_id: int | None = None
    serving_id: int | None = Field(
        None, description="The version this API replica serves now (the shipped one when none is active)."
    )
