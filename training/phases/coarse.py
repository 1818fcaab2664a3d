"""Phase 1: TransUNet coarse segmenter, K-fold cross-validation inside the training split.

Per fold: SGD (momentum, weight decay) with a per-step poly(``poly_power``) learning rate, loss
``ce_weight``·CE + ``dice_weight``·Dice, random flip / affine / intensity (and, when enabled,
noise / blur / low-resolution) augmentation of training batches on the run's device (ranges: the
``aug_*`` fields of the config); after every epoch the validation Dice (per image, at native
resolution, lesion images, mean — :mod:`training.evaluate`) decides the best epoch. Outputs, under
``<output_dir>/coarse/``:

* ``fold<k>/last.pt`` — resume checkpoint (model, optimizer, schedule, epoch, step, RNG),
  written every epoch and on cancellation;
* ``fold<k>/best.pt`` — weights of the best epoch; ``fold<k>/summary.json`` — per-fold summary;
* ``fold<k>/oof_probs.pt`` — out-of-fold lesion probabilities (``1×S×S`` float16 per validation
  image) of the best epoch: the *real* phase-1 predictions used by phase 2b, each made by the
  fold model that never trained on that image;
* ``final.pt`` / ``final.json`` — the final coarse model: **the fold with the best validation
  Dice** (ties → lower fold index), and ``summary.json`` over all folds.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms.v2.functional import gaussian_blur

from training.checkpoints import initial_coarse_state, load_checkpoint, save_checkpoint
from training.config import CoarseTrainConfig
from training.evaluate import image_record, summarize
from training.modeling.coarse_registry import build_coarse, coarse_param_groups, load_coarse_pretrained
from training.modeling.lesion_filter import drop_tiny_masks_from_logits, drop_tiny_masks_from_probs
from training.modeling.losses import coarse_loss
from training.phases.context import (
    COARSE_DIR,
    LoadedSample,
    RunContext,
    StepSchedule,
    read_json,
    step_generator,
    write_json,
)
from training.phases.loop import LoopPhase, Validation, fmt_dice, run_epochs

log = logging.getLogger("training.coarse")
PHASE = "coarse"


def _gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``B×1×H×W`` images, each blurred with its own σ (pixels; kernel radius ⌈3σ⌉, reflect padding)."""
    blurred = []
    for image, sigma in zip(images, sigmas.tolist(), strict=True):
        size = 2 * max(1, math.ceil(3 * sigma)) + 1
        blurred.append(gaussian_blur(image, [size, size], [sigma, sigma]))
    return torch.stack(blurred)


def augment_coarse_batch(
    images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator, cfg: CoarseTrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, affine (rotation, zoom, stretch, shift), gamma/contrast/brightness, noise, blur,
    low resolution.

    ``images``: ``B×1×S×S`` in [0, 1]; ``targets``: ``B×S×S`` long; ranges from ``cfg`` (the ``aug_*``
    fields). Geometry is applied identically to both (bilinear for images, nearest for labels); the
    rest to images only. Every random number is drawn from ``generator`` (a CPU generator) whatever
    the tensors' device, so a seed gives the same batch on a CPU and on a GPU up to float rounding;
    the image operations run on the tensors' device.
    """
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(batch, generator=generator)).to(device)

    def chosen(probability: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator) < probability).to(device)

    flip = chosen(cfg.aug_flip_probability)
    angle = uniform(-cfg.aug_rotation_deg, cfg.aug_rotation_deg) * math.pi / 180
    scale = uniform(*cfg.aug_scale)
    shift_x = uniform(-cfg.aug_translation, cfg.aug_translation)
    shift_y = uniform(-cfg.aug_translation, cfg.aug_translation)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    cos_x, sin_x, cos_y, sin_y = cos, sin, cos, sin
    if cfg.aug_aspect > 1.0:  # drawn only when enabled: the default recipe's random stream is unchanged
        stretch = torch.exp(uniform(-math.log(cfg.aug_aspect), math.log(cfg.aug_aspect)))
        # Output → input coordinates: the x column shrinks by √stretch, the y column grows by it.
        cos_x, sin_x = cos * torch.rsqrt(stretch), sin * torch.rsqrt(stretch)
        cos_y, sin_y = cos * torch.sqrt(stretch), sin * torch.sqrt(stretch)
    mirror = torch.where(flip, -1.0, 1.0)
    theta = torch.stack(
        [
            torch.stack([cos_x * mirror, -sin_y, 2 * shift_x], dim=1),
            torch.stack([sin_x * mirror, cos_y, 2 * shift_y], dim=1),
        ],
        dim=1,
    ).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    targets = F.grid_sample(targets[:, None].to(images.dtype), grid, mode="nearest", align_corners=False)
    targets = targets[:, 0].round().long()

    gamma = uniform(*cfg.aug_gamma).to(images)[:, None, None, None]
    contrast = uniform(*cfg.aug_contrast).to(images)[:, None, None, None]
    brightness = uniform(-cfg.aug_brightness, cfg.aug_brightness).to(images)[:, None, None, None]
    images = images.clamp(0, 1) ** gamma
    images = ((images - 0.5) * contrast + 0.5 + brightness).clamp(0, 1)

    blur = chosen(cfg.aug_blur_probability)
    blur_sigma = uniform(*cfg.aug_blur_sigma)
    for index in torch.nonzero(blur).flatten().tolist():
        images[index : index + 1] = _gaussian_blur(images[index : index + 1], blur_sigma[index : index + 1])

    low_resolution = chosen(cfg.aug_low_resolution_probability)
    zoom = uniform(*cfg.aug_low_resolution_zoom)
    side = images.shape[-1]
    for index in torch.nonzero(low_resolution).flatten().tolist():
        small = max(8, round(side * float(zoom[index])))
        coarse = F.interpolate(images[index : index + 1], size=(small, small), mode="area")
        images[index : index + 1] = F.interpolate(coarse, size=images.shape[-2:], mode="bilinear",
                                                  align_corners=False)  # fmt: skip

    noisy = chosen(cfg.aug_noise_probability)
    noise_std = uniform(0.0, cfg.aug_noise_std) * noisy
    if bool(noisy.any()):
        noise = torch.randn(images.shape, generator=generator).to(images)
        images = (images + noise * noise_std.to(images)[:, None, None, None]).clamp(0, 1)
    return images, targets


def coarse_batch(items: list[LoadedSample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``B×1×S×S`` images and ``B×S×S`` long targets."""
    images = torch.stack([item.coarse_image for item in items]).to(device)
    targets = torch.stack([item.coarse_target for item in items]).long().to(device)
    return images, targets


@torch.no_grad()
def predict_coarse_logits(model: torch.nn.Module, items: list[LoadedSample], device, batch_size: int):
    """The ``2×S×S`` coarse logits (CPU, float32) of each of ``items``, computed in batches."""
    model.eval()
    logits_list = []
    for start in range(0, len(items), batch_size):
        images, _ = coarse_batch(items[start : start + batch_size], device)
        logits_list.extend(model(images).float().cpu())
    return logits_list


def native_coarse_probs(coarse_logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """``2×S×S`` logits → ``H×W`` float32 lesion probabilities at native resolution."""
    native = F.interpolate(coarse_logits[None], size=(height, width), mode="bilinear", align_corners=False)
    return native.softmax(dim=1)[0, 1].numpy()


def validate_coarse(model, items: list[LoadedSample], ctx: RunContext, batch_size: int):
    """Evaluation-protocol report of the coarse model on ``items`` and their ``1×S×S`` probabilities.

    Masks are scored — and kept for phase 2b — as served: a mask too small as a whole to be a
    lesion is empty (:mod:`training.modeling.lesion_filter`); the loss is the network's own.
    """
    min_fraction = ctx.cfg.refiner.min_lesion_fraction
    logits_list = predict_coarse_logits(model, items, ctx.device, batch_size)
    records, probs = [], {}
    losses = []
    for item, logits in zip(items, logits_list, strict=True):
        height, width = item.mask.shape
        served = drop_tiny_masks_from_logits(logits[None], min_fraction)[0]
        native = native_coarse_probs(served, height, width)
        records.append(image_record(item.id, item.sample.label, item.mask, native))
        probs[item.id] = served.softmax(dim=0)[1:2].half()
        loss = coarse_loss(
            logits[None],
            item.coarse_target[None].long(),
            ctx.cfg.coarse.ce_weight,
            ctx.cfg.coarse.dice_weight,
        )
        losses.append(float(loss))
    report = summarize(records)
    report["loss"] = float(np.mean(losses)) if losses else None
    return report, probs


def _fold_key(fold: int) -> str:
    return f"{PHASE}/fold{fold}"


def folds_to_run(ctx: RunContext) -> list[int]:
    n_folds = len(ctx.split.folds)
    wanted = ctx.cfg.coarse.folds_to_run
    folds = list(range(n_folds)) if wanted is None else sorted(set(wanted))
    bad = [fold for fold in folds if not 0 <= fold < n_folds]
    if bad:
        raise ValueError(f"folds_to_run {bad} out of range: the split has {n_folds} folds (0..{n_folds - 1})")
    return folds


def plan(ctx: RunContext) -> None:
    for fold in folds_to_run(ctx):
        ctx.progress.add(_fold_key(fold), ctx.cfg.coarse.epochs)


class CoarseFold(LoopPhase):
    """One fold of phase 1 as the training loop drives it."""

    phase = PHASE
    main_loss = "train"

    def __init__(self, ctx: RunContext, fold: int) -> None:
        cfg, train_cfg = ctx.cfg, ctx.cfg.coarse
        self.ctx, self.cfg, self.train_cfg = ctx, cfg, train_cfg
        self.fold = fold
        self.fold_dir = ctx.phase_dir(COARSE_DIR) / f"fold{fold}"
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        self.train_items = ctx.store.many(ctx.train_ids(fold))
        self.val_items = ctx.store.many(ctx.split.val_ids(fold))
        if not self.train_items:
            raise ValueError(f"fold {fold} has no training images")
        self.epochs, self.batch_size, self.order_tag = train_cfg.epochs, train_cfg.batch_size, 100 + fold
        self.last_path, self.progress_key = self.fold_dir / "last.pt", _fold_key(fold)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.data.seed + fold)
            self.model = build_coarse(cfg)
        initial = initial_coarse_state(cfg)
        if initial is not None:  # fine-tuning from a bundle (init_from): its weights are epoch -1
            self.model.load_state_dict(initial)
        else:
            load_coarse_pretrained(self.model, cfg)
        self.start_is_candidate = initial is not None
        self.model.to(ctx.device)
        groups = coarse_param_groups(self.model, cfg)
        if train_cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                groups, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay
            )
        steps_per_epoch = math.ceil(len(self.train_items) / train_cfg.batch_size)
        self.schedule = StepSchedule(
            self.optimizer, train_cfg.epochs * steps_per_epoch, kind="poly", power=train_cfg.poly_power
        )
        # The moving average of the weights (buffers too: BatchNorm statistics) is what validation
        # sees and what best.pt keeps; the raw weights go on training unchanged.
        self.ema = None
        if train_cfg.ema_decay > 0:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(train_cfg.ema_decay), use_buffers=True
            )
        self.val_probs: dict[str, torch.Tensor] = {}

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated and kept: the moving average when on, else the model."""
        return self.model if self.ema is None else self.ema.module

    def n_items(self) -> int:
        return len(self.train_items)

    def load(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise ValueError("last.pt was written without ema_decay: resume with the run's own config")
            self.ema.load_state_dict(checkpoint["ema"])

    def state(self) -> dict:
        states = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }
        if self.ema is not None:
            states["ema"] = self.ema.state_dict()
        return states

    def start(self) -> Validation | None:
        return self._validation() if self.start_is_candidate else None

    def begin_epoch(self, epoch: int) -> None:
        self.model.train()

    def train_step(self, epoch: int, step: int, indices: list[int]) -> dict[str, float]:
        images, targets = coarse_batch([self.train_items[i] for i in indices], self.ctx.device)
        if self.train_cfg.augment:
            generator = step_generator(self.cfg.data.seed, 100 + self.fold, epoch, step)
            images, targets = augment_coarse_batch(images, targets, generator, self.train_cfg)
        with torch.autocast(
            device_type=self.ctx.device.type, dtype=torch.bfloat16, enabled=self.train_cfg.precision == "bf16"
        ):
            logits = self.model(images)
        loss = coarse_loss(logits.float(), targets, self.train_cfg.ce_weight, self.train_cfg.dice_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return {"train": loss.item()}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _validation(self, train_losses: dict[str, float] | None = None) -> Validation:
        report, self.val_probs = validate_coarse(self.evaluated, self.val_items, self.ctx, self.batch_size)
        dice = report["dice_coarse"]
        entry = {"val_loss": report["loss"], "val_dice": dice}
        if train_losses is not None:
            entry = {
                "train_loss": train_losses.get("train"),
                **entry,
                "val_fp_rate": report["normal"]["fp_rate_coarse"],
                "lr": self.lr(),
            }
        losses = {"val": report["loss"]} if report["loss"] is not None else {}
        return Validation(dice=dice, entry=entry, losses=losses, summary=f"val Dice {fmt_dice(dice)}")

    def validate(self, epoch: int, train_losses: dict[str, float]) -> Validation:
        self.model.eval()
        self.evaluated.eval()
        return self._validation(train_losses)

    def save_best(self, epoch: int, validation: Validation) -> None:
        save_checkpoint(
            self.fold_dir / "best.pt",
            phase=PHASE,
            fold=self.fold,
            epoch=epoch,
            dice=validation.dice,
            model=self.evaluated.state_dict(),
            config=self.cfg.model_dump(mode="json"),
        )
        save_checkpoint(self.fold_dir / "oof_probs.pt", fold=self.fold, epoch=epoch, probs=self.val_probs)


def train_coarse_fold(ctx: RunContext, fold: int) -> dict:
    """Train one fold; returns its summary (also written to ``fold<k>/summary.json``)."""
    run = CoarseFold(ctx, fold)
    ctx.emit(
        "fold_start",
        phase=PHASE,
        fold=fold,
        epochs=run.epochs,
        extra={"n_train": len(run.train_items), "n_val": len(run.val_items)},
    )
    state = run_epochs(ctx, run)
    summary = {
        "phase": PHASE,
        "fold": fold,
        "best_epoch": state.best["epoch"],
        "best_dice": state.best["dice"],
        "epochs": run.epochs,
        "n_train": len(run.train_items),
        "n_val": len(run.val_items),
        "n_val_lesion": sum(item.lesion for item in run.val_items),
        "history": state.history,
        "elapsed_s": state.elapsed_s,
        "best_checkpoint": str(run.fold_dir / "best.pt"),
    }
    write_json(run.fold_dir / "summary.json", summary)
    ctx.emit(
        "fold_end",
        phase=PHASE,
        fold=fold,
        dice=state.best["dice"],
        extra={
            "best_epoch": state.best["epoch"],
            "checkpoint": str(run.fold_dir / "best.pt"),
            "n_val": len(run.val_items),
        },
    )
    return summary


def select_final_fold(summaries: list[dict]) -> dict:
    """The fold with the best validation Dice (ties → lower fold index)."""
    if not summaries:
        raise ValueError("no trained fold to choose the final coarse model from")

    def score(summary: dict) -> tuple[float, int]:
        dice = summary["best_dice"]
        return (-1.0 if dice is None else dice, -summary["fold"])

    return max(summaries, key=score)


def run_coarse_phase(ctx: RunContext) -> dict:
    """All folds (or ``folds_to_run``), per-fold summaries, final-model selection; returns the summary."""
    phase_dir = ctx.phase_dir(COARSE_DIR)
    folds = folds_to_run(ctx)
    ctx.emit("phase_start", phase=PHASE, extra={"folds": folds})
    summaries = []
    for fold in folds:
        if ctx.resume and ctx.state.is_done(PHASE, fold):
            summaries.append(read_json(phase_dir / f"fold{fold}" / "summary.json"))
            ctx.progress.set(_fold_key(fold), 1.0)
            log.info("coarse fold %d already complete: skipped", fold)
            continue
        summary = train_coarse_fold(ctx, fold)
        ctx.state.mark_done(PHASE, fold, {"best_dice": summary["best_dice"]})
        summaries.append(summary)

    final = select_final_fold(summaries)
    best = load_checkpoint(phase_dir / f"fold{final['fold']}" / "best.pt")
    save_checkpoint(
        phase_dir / "final.pt",
        phase=PHASE,
        fold=final["fold"],
        epoch=best["epoch"],
        dice=best["dice"],
        model=best["model"],
        config=ctx.cfg.model_dump(mode="json"),
    )
    dices = [s["best_dice"] for s in summaries if s["best_dice"] is not None]
    final_info = {"fold": final["fold"], "dice": final["best_dice"], "selection": "best validation Dice"}
    write_json(phase_dir / "final.json", final_info)
    summary = {
        "phase": PHASE,
        "folds": [{k: v for k, v in s.items() if k != "history"} for s in summaries],
        "mean_dice": float(np.mean(dices)) if dices else None,
        "std_dice": float(np.std(dices)) if dices else None,
        "final_fold": final["fold"],
        "final_dice": final["best_dice"],
        "final_checkpoint": str(phase_dir / "final.pt"),
    }
    write_json(phase_dir / "summary.json", summary)
    ctx.emit("phase_end", phase=PHASE, dice=summary["mean_dice"], extra={"final_fold": final["fold"]})
    return summary


def load_out_of_fold_probs(ctx: RunContext) -> dict[str, torch.Tensor]:
    """``id → 1×S×S`` out-of-fold coarse probabilities (float32) of every trained fold."""
    probs: dict[str, torch.Tensor] = {}
    min_fraction = ctx.cfg.refiner.min_lesion_fraction
    for path in sorted((ctx.output_dir / COARSE_DIR).glob("fold*/oof_probs.pt")):
        for sample_id, tensor in load_checkpoint(path)["probs"].items():
            # As served (a no-op for masks phase-1 validation already cleaned: the rule is idempotent).
            probs[sample_id] = drop_tiny_masks_from_probs(tensor.float(), min_fraction)
    return probs


def load_final_coarse(ctx: RunContext):
    """The final phase-1 TransUNet (``final.pt``) on the run's device, or ``None`` if absent."""
    path = ctx.output_dir / COARSE_DIR / "final.pt"
    if not path.is_file():
        return None
    model = build_coarse(ctx.cfg)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.to(ctx.device)
