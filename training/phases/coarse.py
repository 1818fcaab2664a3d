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
from torchvision.transforms.v2.functional import gaussian_blur

from training.checkpoints import initial_coarse_state, load_checkpoint, save_checkpoint
from training.config import CoarseTrainConfig
from training.evaluate import image_record, summarize
from training.modeling.coarse_registry import build_coarse, load_coarse_pretrained
from training.modeling.losses import coarse_loss
from training.phases.context import (
    COARSE_DIR,
    LoadedSample,
    RunContext,
    StepSchedule,
    TrainState,
    batches,
    epoch_order,
    read_json,
    step_generator,
    write_json,
)

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
    """Random flip, affine (rotation, zoom, shift), gamma/contrast/brightness, noise, blur, low resolution.

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
    mirror = torch.where(flip, -1.0, 1.0)
    theta = torch.stack(
        [
            torch.stack([cos * mirror, -sin, 2 * shift_x], dim=1),
            torch.stack([sin * mirror, cos, 2 * shift_y], dim=1),
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
    """Evaluation-protocol report of the coarse model on ``items`` and their ``1×S×S`` probabilities."""
    logits_list = predict_coarse_logits(model, items, ctx.device, batch_size)
    records, probs = [], {}
    losses = []
    for item, logits in zip(items, logits_list, strict=True):
        height, width = item.mask.shape
        native = native_coarse_probs(logits, height, width)
        records.append(image_record(item.id, item.sample.label, item.mask, native))
        probs[item.id] = logits.softmax(dim=0)[1:2].half()
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


def train_coarse_fold(ctx: RunContext, fold: int) -> dict:
    """Train one fold; returns its summary (also written to ``fold<k>/summary.json``)."""
    cfg, train_cfg = ctx.cfg, ctx.cfg.coarse
    fold_dir = ctx.phase_dir(COARSE_DIR) / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_items = ctx.store.many(ctx.train_ids(fold))
    val_items = ctx.store.many(ctx.split.val_ids(fold))
    if not train_items:
        raise ValueError(f"fold {fold} has no training images")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.data.seed + fold)
        model = build_coarse(cfg)
    initial = initial_coarse_state(cfg)
    if initial is not None:  # fine-tuning from a bundle (init_from)
        model.load_state_dict(initial)
    else:
        load_coarse_pretrained(model, cfg)
    model.to(ctx.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(train_items) / train_cfg.batch_size)
    schedule = StepSchedule(
        optimizer, train_cfg.epochs * steps_per_epoch, kind="poly", power=train_cfg.poly_power
    )
    train_state, checkpoint = TrainState.restore(fold_dir / "last.pt", ctx, {"epoch": None, "dice": None})
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        log.info("fold %d: resuming at epoch %d step %d", fold, train_state.epoch, train_state.step)
    start_epoch, start_step, history = train_state.epoch, train_state.step, train_state.history

    def save_last(epoch: int, step: int) -> None:
        train_state.save(
            epoch,
            step,
            cfg,
            phase=PHASE,
            fold=fold,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
        )

    ctx.emit(
        "fold_start",
        phase=PHASE,
        fold=fold,
        epochs=train_cfg.epochs,
        extra={"n_train": len(train_items), "n_val": len(val_items)},
    )
    if initial is not None and start_epoch == 0 and start_step == 0:
        # Fine-tuning: the starting weights are the first candidate (epoch -1), so a fold never
        # keeps a model that validates worse than the one the run was given.
        report, val_probs = validate_coarse(model, val_items, ctx, train_cfg.batch_size)
        dice = report["dice_coarse"]
        history.append({"epoch": -1, "val_dice": dice, "val_loss": report["loss"], "start": True})
        train_state.best = {"epoch": -1, "dice": dice, "dice_score": -1.0 if dice is None else dice}
        save_checkpoint(
            fold_dir / "best.pt",
            phase=PHASE,
            fold=fold,
            epoch=-1,
            dice=dice,
            model=model.state_dict(),
            config=cfg.model_dump(mode="json"),
        )
        save_checkpoint(fold_dir / "oof_probs.pt", fold=fold, epoch=-1, probs=val_probs)
        log.info("coarse fold %d: the starting model validates at %s", fold, dice)
    for epoch in range(start_epoch, train_cfg.epochs):
        model.train()
        order = epoch_order(cfg.data.seed, 100 + fold, epoch, len(train_items))
        epoch_batches = batches(order, train_cfg.batch_size)
        first_step = start_step if epoch == start_epoch else 0
        running = []
        for step in range(first_step, len(epoch_batches)):
            images, targets = coarse_batch([train_items[i] for i in epoch_batches[step]], ctx.device)
            if train_cfg.augment:
                generator = step_generator(cfg.data.seed, 100 + fold, epoch, step)
                images, targets = augment_coarse_batch(images, targets, generator, train_cfg)
            logits = model(images)
            loss = coarse_loss(logits, targets, train_cfg.ce_weight, train_cfg.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running.append(loss.item())
            ctx.progress.set(_fold_key(fold), (epoch + (step + 1) / len(epoch_batches)) / train_cfg.epochs)
            ctx.emit(
                "step",
                phase=PHASE,
                fold=fold,
                epoch=epoch,
                epochs=train_cfg.epochs,
                step=step,
                steps=len(epoch_batches),
                losses={"train": running[-1]},
                lr=optimizer.param_groups[0]["lr"],
            )
            ctx.check_stop(lambda e=epoch, s=step + 1: save_last(e, s), PHASE)

        report, val_probs = validate_coarse(model, val_items, ctx, train_cfg.batch_size)
        dice = report["dice_coarse"]
        entry = {
            "epoch": epoch,
            "train_loss": float(np.mean(running)) if running else None,
            "val_loss": report["loss"],
            "val_dice": dice,
            "val_fp_rate": report["normal"]["fp_rate_coarse"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(entry)
        score = -1.0 if dice is None else dice
        if train_state.best["epoch"] is None or score > train_state.best["dice_score"]:
            train_state.best = {"epoch": epoch, "dice": dice, "dice_score": score}
            save_checkpoint(
                fold_dir / "best.pt",
                phase=PHASE,
                fold=fold,
                epoch=epoch,
                dice=dice,
                model=model.state_dict(),
                config=cfg.model_dump(mode="json"),
            )
            save_checkpoint(fold_dir / "oof_probs.pt", fold=fold, epoch=epoch, probs=val_probs)
        save_last(epoch + 1, 0)
        model.train()
        ctx.progress.set(_fold_key(fold), (epoch + 1) / train_cfg.epochs)
        ctx.emit(
            "epoch_end",
            phase=PHASE,
            fold=fold,
            epoch=epoch,
            epochs=train_cfg.epochs,
            losses={
                k: v for k, v in (("train", entry["train_loss"]), ("val", entry["val_loss"])) if v is not None
            },
            dice=dice,
            lr=entry["lr"],
            extra={"best_epoch": train_state.best["epoch"], "best_dice": train_state.best["dice"]},
        )
        log.info(
            "coarse fold %d epoch %d/%d: train loss %.4f, val Dice %s",
            fold,
            epoch + 1,
            train_cfg.epochs,
            entry["train_loss"] or float("nan"),
            "n/a" if dice is None else f"{dice:.4f}",
        )

    summary = {
        "phase": PHASE,
        "fold": fold,
        "best_epoch": train_state.best["epoch"],
        "best_dice": train_state.best["dice"],
        "epochs": train_cfg.epochs,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "n_val_lesion": sum(item.lesion for item in val_items),
        "history": history,
        "elapsed_s": train_state.elapsed_s,
        "best_checkpoint": str(fold_dir / "best.pt"),
    }
    write_json(fold_dir / "summary.json", summary)
    ctx.emit(
        "fold_end",
        phase=PHASE,
        fold=fold,
        dice=train_state.best["dice"],
        extra={
            "best_epoch": train_state.best["epoch"],
            "checkpoint": str(fold_dir / "best.pt"),
            "n_val": len(val_items),
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
    for path in sorted((ctx.output_dir / COARSE_DIR).glob("fold*/oof_probs.pt")):
        for sample_id, tensor in load_checkpoint(path)["probs"].items():
            probs[sample_id] = tensor.float()
    return probs


def load_final_coarse(ctx: RunContext):
    """The final phase-1 TransUNet (``final.pt``) on the run's device, or ``None`` if absent."""
    path = ctx.output_dir / COARSE_DIR / "final.pt"
    if not path.is_file():
        return None
    model = build_coarse(ctx.cfg)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.to(ctx.device)
