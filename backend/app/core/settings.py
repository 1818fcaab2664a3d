"""Settings of the API, worker and UI processes (environment variables, `.env`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.app.engines.names import DEFAULT_ENGINE, ENGINE_HELP, EngineChoice
from training.config import REPO_ROOT

VAR_DIR = REPO_ROOT / "var"

#: Values that only stand in for a real admin token (templates, old defaults): never accepted.
ADMIN_TOKEN_PLACEHOLDERS = frozenset({"", "change-me", "changeme", "change-me-to-a-long-random-string"})


def is_placeholder_token(value: str | None) -> bool:
    """Whether ``value`` is no admin token at all: unset, empty or a template's placeholder."""
    if value is None:
        return True
    text = value.strip().lower()
    return text in ADMIN_TOKEN_PLACEHOLDERS or text.startswith("change-me")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = Field(
        f"sqlite:///{VAR_DIR / 'ultrarefiner.sqlite'}",
        description="SQLAlchemy URL of the run store (SQLite by default, PostgreSQL in deployment).",
    )
    redis_url: str | None = Field(None, description="Celery broker; unset → embedded broker (no server).")
    embedded_broker_dir: Path = Field(VAR_DIR / "broker", description="Folder of the embedded broker.")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the admin routes. Unset (or a placeholder such as 'change-me'): "
        "the admin routes answer 503 saying how to set one; `ultrarefiner serve` and `start` generate "
        "one and print it once.",
    )
    api_key: SecretStr | None = Field(None, description="If set, /segment requires header X-API-Key.")
    model_path: Path | None = Field(None, description="Bundle to serve; unset → active model or default.")
    models_dir: Path = Field(VAR_DIR / "models", description="Shared folder of exported model bundles.")
    runs_dir: Path = Field(VAR_DIR / "runs", description="Shared folder of run checkpoints.")
    cache_dir: Path = Field(VAR_DIR / "cache", description="Shared embedding cache of training.")
    corrections_dir: Path = Field(
        VAR_DIR / "corrections",
        description="Where saved corrections (image + mask pairs) are kept: the root of the "
        "'corrections' dataset.",
    )
    corrections_keep_dicom: bool = Field(
        False,
        description="Also keep the original DICOM file of a saved correction (default: pixels only, "
        "de-identified; the SOPInstanceUID kept as a hash).",
    )
    datasets_root: Path | None = Field(None, description="Root that dataset paths of runs must lie under.")
    max_upload_mb: float = Field(32.0, gt=0, description="Largest accepted upload (MiB).")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Decompression-bomb guard.")
    max_concurrency: int = Field(2, ge=1, description="Segmentations computed at once.")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a slot before 503.")
    embedding_cache_items: int = Field(64, ge=0, description="Server LRU of image embeddings.")
    max_batch_files: int = Field(16, ge=1, description="Most files in one /segment/batch request.")
    max_batch_upload_mb: float = Field(128.0, gt=0, description="Largest accepted /segment/batch body (MiB).")
    max_points: int = Field(64, ge=1, description="Most clinician points in one /segment request.")
    inference_engine: EngineChoice = Field(
        DEFAULT_ENGINE, description=f"Inference engine of the three networks: {ENGINE_HELP}."
    )
    onnx_cache_dir: Path = Field(
        VAR_DIR / "cache" / "onnx", description="Where the exported (and quantised) ONNX graphs are kept."
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After (seconds) of a 503 when the queue is full.")
    device: str = Field("cpu", description="Serving device: cpu, cuda or auto.")
    api_url: str = Field("http://127.0.0.1:8000", description="Backend URL the UI talks to.")
    run_lost_after_s: float = Field(
        60.0, gt=0, description="A running run without heartbeat this long is lost."
    )
    worker_queue: str = Field("gpu", description="Celery queue of the training worker.")
    active_model_poll_s: float = Field(
        10.0,
        ge=0,
        description="How often an API replica checks the store's active model and loads it when it "
        "changed (activation through another replica); 0 turns the check off.",
    )

    @field_validator("admin_token", mode="after")
    @classmethod
    def _no_placeholder_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or is_placeholder_token(value.get_secret_value()):
            return None
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
