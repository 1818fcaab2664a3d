"""Checkpoints and model bundles: atomic writes, validated reads.

Two kinds of files are written here:

* **training checkpoints** (:func:`save_checkpoint` / :func:`load_checkpoint`): whatever a phase
  needs to resume (model, optimizer, scheduler, epoch, RNG states, config), one file per phase/fold;
* **bundles** (:func:`save_bundle` / :func:`load_bundle`): everything needed to rebuild a served
  model, as a ``torch.save`` dict::

      {format: "ultrarefiner-bundle", format_version: 1, model_version: str, untrained: bool,
       config: TrainingConfig.model_dump(mode="json"), preprocessing_version: str,
       coarse_state_dict: TransUNet state dict, refiner_state_dict: Refiner.trainable_state_dict(),
       metrics: dict, created_at: ISO-8601 UTC}

  The frozen refiner image encoder is not in the bundle: it is rebuilt from the backbone's
  pretrained weights named by ``config.refiner`` (packaged for ``litemedsam``).

Every file is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint, and every file is read with ``torch.load(weights_only=True)``: a bundle
uploaded by a user cannot execute code.
"""

from __future__ import annotations

import functools
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from training.config import PREPROCESSING_VERSION, REPO_ROOT, TrainingConfig

BUNDLE_FORMAT = "ultrarefiner-bundle"
BUNDLE_FORMAT_VERSION = 1
#: The bundle served when none is configured (absent until someone ships one).
DEFAULT_BUNDLE_PATH = REPO_ROOT / "models" / "default.pt"
UNTRAINED_SUFFIX = "-untrained"

_BUNDLE_KEYS = (
    "format",
    "format_version",
    "model_version",
    "untrained",
    "config",
    "preprocessing_version",
    "coarse_state_dict",
    "refiner_state_dict",
    "metrics",
    "created_at",
)


class BundleError(ValueError):
    """A file is not a usable UltraRefiner bundle; the message says why and names the file."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """The bundle file does not exist."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def save_checkpoint(path: str | Path, **payload: Any) -> Path:
    """Atomically ``torch.save`` ``payload`` (a dict of tensors, state dicts and plain values) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a file written by :func:`save_checkpoint` (no code execution: ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a training checkpoint (a {type(payload).__name__}, not a dict)")
    return payload


def default_model_version(cfg: TrainingConfig, untrained: bool = False) -> str:
    """``<config>-<backbone>-<UTC timestamp>`` or ``<config>-<backbone>-untrained``."""
    stem = f"{cfg.config_name}-{cfg.refiner.backbone}"
    if untrained:
        return stem + UNTRAINED_SUFFIX
    return f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def make_bundle(
    *,
    config: TrainingConfig,
    coarse_state_dict: dict[str, torch.Tensor],
    refiner_state_dict: dict[str, torch.Tensor],
    metrics: dict | None = None,
    model_version: str | None = None,
    untrained: bool = False,
) -> dict:
    """The in-memory bundle dict (tensors detached and moved to the CPU)."""
    version = model_version or default_model_version(config, untrained=untrained)
    if untrained and not version.endswith(UNTRAINED_SUFFIX):
        version += UNTRAINED_SUFFIX
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_version": version,
        "untrained": bool(untrained),
        "config": config.model_dump(mode="json"),
        "preprocessing_version": PREPROCESSING_VERSION,
        "coarse_state_dict": {k: v.detach().cpu() for k, v in coarse_state_dict.items()},
        "refiner_state_dict": {k: v.detach().cpu() for k, v in refiner_state_dict.items()},
        "metrics": dict(metrics or {}),
        "created_at": utc_now(),
    }


def save_bundle(path: str | Path, bundle: dict | None = None, **fields: Any) -> Path:
    """Write a bundle atomically: a ready ``bundle`` dict, or the keyword arguments of :func:`make_bundle`."""
    if bundle is None:
        bundle = make_bundle(**fields)
    elif fields:
        raise TypeError("pass either a bundle dict or the fields of make_bundle, not both")
    validate_bundle(bundle, source="<bundle to save>")
    return save_checkpoint(path, **bundle)


def validate_bundle(bundle: Any, source: str = "<bundle>") -> dict:
    """Check the format of a bundle dict; raise :class:`BundleError` naming ``source`` if wrong."""
    if not isinstance(bundle, dict):
        raise BundleError(f"{source} is not an UltraRefiner bundle (it holds a {type(bundle).__name__})")
    if bundle.get("format") != BUNDLE_FORMAT:
        found = bundle.get("format")
        hint = "a plain state dict or a foreign checkpoint" if found is None else f"format {found!r}"
        raise BundleError(f"{source} is not an UltraRefiner bundle ({hint})")
    version = bundle.get("format_version")
    if not isinstance(version, int) or version < 1 or version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{source} has bundle format version {version!r}; "
            f"this code reads versions 1..{BUNDLE_FORMAT_VERSION}"
        )
    missing = [key for key in _BUNDLE_KEYS if key not in bundle]
    if missing:
        raise BundleError(f"{source} is an incomplete bundle: missing {', '.join(missing)}")
    if bundle["preprocessing_version"] != PREPROCESSING_VERSION:
        raise BundleError(
            f"{source} was made with preprocessing version {bundle['preprocessing_version']!r} but this code "
            f"uses {PREPROCESSING_VERSION!r}; retrain or export it again with this version"
        )
    for key in ("coarse_state_dict", "refiner_state_dict"):
        state = bundle[key]
        if (
            not isinstance(state, dict)
            or not state
            or not all(isinstance(v, torch.Tensor) for v in state.values())
        ):
            raise BundleError(f"{source}: {key} is not a non-empty dict of tensors")
    try:
        bundle_config(bundle)
    except ValidationError as error:
        raise BundleError(f"{source} holds an invalid training config: {error}") from None
    return bundle


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a bundle; :class:`BundleError` (clear message) if missing, corrupt or foreign."""
    path = Path(path)
    if not path.exists():
        raise BundleNotFoundError(f"model bundle not found: {path}")
    if not path.is_file():
        raise BundleError(f"model bundle path is not a file: {path}")
    try:
        bundle = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle with foreign classes, random bytes, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BundleError(
            f"{path} is not a readable UltraRefiner bundle (corrupt or foreign file: {reason})"
        ) from None
    return validate_bundle(bundle, source=str(path))


def bundle_config(bundle: dict) -> TrainingConfig:
    """The :class:`TrainingConfig` stored in a bundle or checkpoint (environment variables ignored)."""
    return TrainingConfig.from_stored(bundle["config"])


def bundle_metadata(bundle: dict) -> dict:
    """Everything but the weights (for listings, the API and reports)."""
    return {k: v for k, v in bundle.items() if not k.endswith("state_dict")}


def build_untrained_bundle(cfg: TrainingConfig | None = None, seed: int | None = None) -> dict:
    """A bundle of a randomly initialised TransUNet and the backbone's pretrained refiner.

    Its ``model_version`` ends in ``-untrained``. Seeded (``cfg.data.seed`` by default) without
    touching the global RNG, so two calls give identical weights.
    """
    from training.modeling.coarse_registry import build_coarse

    cfg = cfg or TrainingConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.data.seed if seed is None else seed)
        coarse = build_coarse(cfg)
    refiner = build_seeded_refiner(cfg)
    return make_bundle(
        config=cfg,
        coarse_state_dict=coarse.state_dict(),
        refiner_state_dict=refiner.trainable_state_dict(),
        metrics={},
        untrained=True,
    )


@functools.lru_cache(maxsize=2)
def _init_bundle_cached(path: str, mtime_ns: int) -> dict:
    return load_bundle(path)


def init_bundle(cfg: TrainingConfig) -> dict | None:
    """The bundle ``cfg.init_from`` names (loaded once per file version), or None."""
    if cfg.init_from is None:
        return None
    path = Path(cfg.init_from).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no bundle at {path}")
    return _init_bundle_cached(str(path.resolve()), path.stat().st_mtime_ns)


def adopt_init_architecture(cfg: TrainingConfig) -> TrainingConfig:
    """With ``init_from``, the run's coarse-segmenter and refiner settings are the bundle's (its weights
    only fit its architecture); without, ``cfg`` as it is. ``refiner.image_side`` is not
    architecture: set in ``cfg``, it stays (fine-tuning the decoder at another image side)."""
    bundle = init_bundle(cfg)
    if bundle is None:
        return cfg
    source = bundle_config(bundle)
    refiner = source.refiner
    if "image_side" in cfg.refiner.model_fields_set:
        refiner = refiner.model_copy(update={"image_side": cfg.refiner.image_side})
    return cfg.model_copy(
        update={
            "coarse_model": source.coarse_model,
            "transunet": source.transunet,
            "tinyvit": source.tinyvit,
            "refiner": refiner,
        }
    )


def initial_refiner(cfg: TrainingConfig):
    """The refiner a run starts from: the bundle's trainable weights with ``init_from``, else the
    seeded pretrained backbone (:func:`build_seeded_refiner`)."""
    refiner = build_seeded_refiner(cfg)
    bundle = init_bundle(cfg)
    if bundle is not None:
        refiner.load_trainable_state_dict(bundle["refiner_state_dict"])
    return refiner


def initial_coarse_state(cfg: TrainingConfig) -> dict | None:
    """The coarse weights a run starts from with ``init_from`` (None: from scratch / npz)."""
    bundle = init_bundle(cfg)
    return None if bundle is None else bundle["coarse_state_dict"]


def build_seeded_refiner(cfg: TrainingConfig):
    """``build_refiner(cfg.refiner)`` under the seed ``cfg.data.seed`` (global RNG untouched).

    The bundle holds only the trainable refiner weights; the frozen image encoder comes from the
    backbone's pretrained weights, or — without them (tests) — from this seeded initialisation, so
    training, evaluation and serving always see the same encoder.
    """
    from training.modeling.refiner import build_refiner

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.data.seed)
        return build_refiner(cfg.refiner)
