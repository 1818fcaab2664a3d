"""What the three phases share: run context, progress, state, schedules, RNG and the sample store.

* :class:`RunContext` carries the config, device, callback, split and output folders of one run,
  emits :class:`ProgressEvent` s with the overall ``progress`` (0..1) and turns
  ``callback.should_stop()`` into :class:`TrainingCancelled` after saving.
* :class:`RunState` (``state.json``) records completed phases and folds for ``resume`` (the
  ``last.pt`` of one phase or fold, and the loop around it, are in :mod:`training.phases.loop`).
* :class:`StepSchedule` sets every param group's lr from its ``initial_lr`` at each step, reading
  the optimizer's param groups at step time, so a group added later (phase 3 unfreeze) follows
  the schedule too.
* :class:`SampleStore` loads each image once and caches its native image/mask and its
  coarse-space and refiner-space tensors (always through :mod:`training.data.transforms`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.callbacks import ProgressEvent, TrainingCallback, TrainingCancelled
from training.config import TrainingConfig
from training.data.datasets import Sample, load_image, load_mask
from training.data.transforms import REFINER_INPUT_SIZE, Geometry, coarse_input, coarse_target, mask_to_tensor
from training.modeling.coarse_registry import coarse_input_size

log = logging.getLogger("training")

#: Folder names inside ``output_dir``.
COARSE_DIR, AUGMENT_DIR, REFINER_DIR, END_TO_END_DIR = "coarse", "augment", "refiner", "end_to_end"


# --------------------------------------------------------------------------------------------
# Files


def write_json(path: Path, payload) -> Path:
    """Atomic JSON write (temporary sibling + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=1, default=_json_default)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Randomness


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states in a ``weights_only``-loadable form."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(seed: int, tag: int, epoch: int, count: int) -> np.ndarray:
    """Seeded permutation of ``count`` items for one epoch (reproducible, so resume can skip steps)."""
    return np.random.default_rng([seed, tag, epoch]).permutation(count)


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A torch generator seeded from ``(seed, *keys)`` (augmentation of one step)."""
    mixed = np.random.default_rng([seed, *keys]).integers(0, 2**62)
    return torch.Generator().manual_seed(int(mixed))


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------
# Learning-rate schedule


class StepSchedule:
    """Per-step multiplicative schedule: ``group['lr'] = group['initial_lr'] · factor(step)``.

    The param groups are read at every step (not captured at construction), so a group added by
    ``optimizer.add_param_group`` later — with its own base ``lr`` — enters the schedule at the
    current step. ``kind``: ``"poly"`` ((1 − t)^power), ``"cosine"`` (½(1 + cos πt)); both after
    ``warmup_steps`` of linear warm-up. Only the step count is state (``state_dict``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        kind: str = "cosine",
        warmup_steps: int = 0,
        power: float = 0.9,
        min_factor: float = 0.0,
    ) -> None:
        if kind not in ("poly", "cosine", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.optimizer = optimizer
        self.total_steps = max(1, int(total_steps))
        self.kind = kind
        self.warmup_steps = max(0, int(warmup_steps))
        self.power = power
        self.min_factor = min_factor
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.kind == "poly":
            value = (1.0 - progress) ** self.power
        elif self.kind == "cosine":
            value = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            value = 1.0
        return self.min_factor + (1.0 - self.min_factor) * value

    def _apply(self) -> None:
        factor = self.factor(self.step_count)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        self._apply()  # groups added since the last step get their scheduled lr now
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


# --------------------------------------------------------------------------------------------
# Progress and state


class ProgressPlan:
    """Overall progress 0..1 as a weighted sum of named work units (weights ~ epochs)."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self.done: dict[str, float] = {}

    def add(self, key: str, weight: float) -> None:
        self.weights[key] = float(max(weight, 1e-6))
        self.done.setdefault(key, 0.0)

    def set(self, key: str, fraction: float) -> None:
        if key in self.weights:
            self.done[key] = float(min(1.0, max(0.0, fraction)))

    @property
    def value(self) -> float:
        total = sum(self.weights.values())
        if not total:
            return 0.0
        return sum(self.weights[k] * self.done.get(k, 0.0) for k in self.weights) / total


class RunState:
    """``state.json``: which phases/folds are complete, for ``resume``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data: dict = {"completed": {}}
        if self.path.is_file():
            self.data = read_json(self.path)
            self.data.setdefault("completed", {})

    def reset(self) -> None:
        self.data = {"completed": {}}
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def _key(self, phase: str, fold: int | None) -> str:
        return phase if fold is None else f"{phase}/fold{fold}"

    def is_done(self, phase: str, fold: int | None = None) -> bool:
        return self._key(phase, fold) in self.data["completed"]

    def summary(self, phase: str, fold: int | None = None) -> dict:
        return self.data["completed"].get(self._key(phase, fold), {})

    def mark_done(self, phase: str, fold: int | None = None, summary: dict | None = None) -> None:
        self.data["completed"][self._key(phase, fold)] = summary or {}
        self.save()

    def forget(self, phase: str) -> None:
        """Drop a phase (and its folds) before re-running it."""
        completed = self.data["completed"]
        for key in [k for k in completed if k == phase or k.startswith(phase + "/")]:
            del completed[key]
        self.save()


# --------------------------------------------------------------------------------------------
# Samples


@dataclass
class LoadedSample:
    """One image with its ground truth, read once, in every space the phases need."""

    sample: Sample
    image: np.ndarray  # native, as stored
    mask: np.ndarray  # H×W bool (native)
    coarse_image: torch.Tensor  # 1×S×S float32 in [0, 1]
    coarse_target: torch.Tensor  # S×S uint8 {0, 1}
    geometry: Geometry  # refiner frame
    refiner_target: torch.Tensor  # 1×L×L bool (refiner space)

    @property
    def id(self) -> str:
        return self.sample.id

    @property
    def lesion(self) -> bool:
        return bool(self.mask.any())


class SampleStore:
    """Samples by id, loaded lazily once (images, masks, coarse and refiner-space tensors)."""

    def __init__(self, samples: Sequence[Sample], cfg: TrainingConfig) -> None:
        self.samples = {sample.id: sample for sample in samples}
        self.coarse_size = coarse_input_size(cfg)
        self.refiner_size = REFINER_INPUT_SIZE[cfg.refiner.backbone]
        self.image_side = cfg.refiner.image_side
        self._loaded: dict[str, LoadedSample] = {}

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.samples

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, sample_id: str) -> LoadedSample:
        if sample_id not in self._loaded:
            sample = self.samples[sample_id]
            image = load_image(sample.image_path)
            mask = load_mask(sample)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask of {sample.id} is {mask.shape}, its image {image.shape[:2]}")
            geometry = Geometry(
                height=mask.shape[0], width=mask.shape[1], size=self.refiner_size, image_side=self.image_side
            )
            refiner_target = geometry.to_refiner(mask_to_tensor(mask))[0] >= 0.5
            self._loaded[sample_id] = LoadedSample(
                sample=sample,
                image=image,
                mask=mask,
                coarse_image=coarse_input(image, self.coarse_size),
                coarse_target=coarse_target(mask, self.coarse_size).to(torch.uint8),
                geometry=geometry,
                refiner_target=refiner_target,
            )
        return self._loaded[sample_id]

    def many(self, sample_ids: Sequence[str]) -> list[LoadedSample]:
        return [self.get(sample_id) for sample_id in sample_ids]


def limit_samples(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """The first ``limit`` samples taken round-robin over labels (each label in listing order).

    A plain head of a sorted listing would be all ``benign`` on BUSI; round-robin keeps every label
    (and thus the stratified split) represented in smoke runs.
    """
    samples = list(samples)
    if limit is None or limit >= len(samples):
        return samples
    by_label: dict[str, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    queues = [list(group) for group in by_label.values()]
    chosen: list[Sample] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    order = {id(sample): index for index, sample in enumerate(samples)}
    return sorted(chosen, key=lambda sample: order[id(sample)])


# --------------------------------------------------------------------------------------------
# Run context


@dataclass
class RunContext:
    """Everything a phase needs from the run that started it."""

    cfg: TrainingConfig
    device: torch.device
    split: object  # training.data.splits.Split
    store: SampleStore
    callback: TrainingCallback = field(default_factory=TrainingCallback)
    resume: bool = False
    progress: ProgressPlan = field(default_factory=ProgressPlan)
    state: RunState | None = None
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = RunState(self.output_dir / "state.json")

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def train_ids(self, fold: int) -> list[str]:
        """The images a phase trains on in ``fold``: the split's training part, each image of a
        pooled dataset ``data.pool_weight`` times (a handful of corrections beside hundreds of
        public images would otherwise barely move the model)."""
        ids = self.split.train_ids(fold)
        weight = self.cfg.data.pool_weight
        if not self.cfg.data.pooled or weight == 1:
            return ids
        pooled = [i for i in ids if self.store.samples[i].extra.get("pool")]
        return ids + pooled * (weight - 1)

    def phase_dir(self, name: str) -> Path:
        path = self.output_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def emit(self, kind: str, **fields) -> ProgressEvent:
        event = ProgressEvent(kind=kind, progress=self.progress.value, elapsed_s=self.elapsed_s, **fields)
        self.callback.on_event(event)
        return event

    def warn(self, message: str, phase: str | None = None, **extra) -> None:
        log.warning(message)
        self.emit("warning", phase=phase, message=message, extra=extra)

    def check_stop(self, save: Callable[[], object], phase: str) -> None:
        """If the callback asks to stop: ``save()`` then raise :class:`TrainingCancelled`."""
        if self.callback.should_stop():
            save()
            message = f"training cancelled during phase {phase}; resume with resume=True"
            log.warning(message)
            raise TrainingCancelled(message)

    @property
    def amp_device_type(self) -> str:
        return self.device.type

    def use_amp(self, enabled: bool) -> bool:
        """Mixed precision only on CUDA."""
        return bool(enabled) and self.device.type == "cuda"


def final_fold_of(ctx: RunContext) -> int:
    """The fold whose model is the final coarse model (best validation Dice; fold 0 without phase 1).

    Phases 2b and 3 train on that fold's training images and validate on its validation images, so
    every number they report is on images the final coarse model never trained on.
    """
    final = ctx.output_dir / COARSE_DIR / "final.json"
    if final.is_file():
        return int(read_json(final)["fold"])
    return 0


def mean_of(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
