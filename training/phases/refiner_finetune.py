"""Phase 2: offline mask augmentation (2a) and refiner fine-tuning from cached embeddings (2b).

**2a** (:func:`run_augment_phase`): every training-split (train+val) ground-truth mask →
``augment.per_mask`` soft corrupted masks (:func:`training.data.mask_augment.augment_mask`) in
refiner space at ``augment.mask_size``, stored as ``uint8`` probabilities in
``<output_dir>/augment/masks/<n>.npz`` with ``index.json`` (id → file) and ``summary.json``
(count and mean Dice per corruption type). Resumable image by image.

**2b** (:func:`run_refiner_phase`): the image encoder is frozen, so every image is embedded once
into the :class:`~training.data.embedding_cache.EmbeddingCache` (with progress) and training reads
the cache. Trainable: prompt encoder + mask decoder (+ gate). Loss: quality-aware
(BCE + Dice + λ·change penalty). AdamW + per-step cosine schedule; mixed precision only on CUDA.
Hybrid data: each training sample uses, with probability ``real_ratio``, the real phase-1
prediction of the fold model that did not train on it (out-of-fold), else one of its augmented
soft masks. Training/validation images: those of the final coarse fold (see
:func:`~training.phases.context.final_fold_of`). Outputs in ``<output_dir>/refiner/``:
``last.pt`` (resume), ``best.pt`` (trainable weights of the best epoch by validation refined
Dice), ``sam_refiner.pth`` (full state dict with the original keys — loads into
``segment_anything.sam_model_registry['vit_b']`` / LiteMedSAM without renaming), ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.checkpoints import initial_refiner, load_checkpoint, save_checkpoint
from training.evaluate import coarse_finds_lesion, image_record, refines_coarse, served_refined, summarize
from training.modeling.losses import quality_aware_loss
from training.modeling.refiner import Refiner
from training.phases.coarse import load_out_of_fold_probs
from training.phases.context import (
    AUGMENT_DIR,
    REFINER_DIR,
    LoadedSample,
    RunContext,
    StepSchedule,
    final_fold_of,
    read_json,
    write_json,
)
from training.phases.loop import LoopPhase, Validation, baseline_validation, fmt_dice, run_epochs

log = logging.getLogger("training.refiner")
AUGMENT_PHASE = "augment"
PHASE = "refiner"
#: Embeddings kept in memory up to this many images (4 MiB each); beyond, read from the cache.
IN_MEMORY_EMBEDDINGS = 256


# ============================================================================================
# Phase 2a — offline mask augmentation


def run_augment_phase(ctx: RunContext) -> dict:
    from training.data.mask_augment import augment_mask

    cfg = ctx.cfg.augment
    image_side = ctx.cfg.refiner.image_side
    phase_dir = ctx.phase_dir(AUGMENT_DIR)
    masks_dir = phase_dir / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    ids = list(ctx.split.trainval_ids)
    ctx.emit("phase_start", phase=AUGMENT_PHASE, extra={"n_images": len(ids), "per_mask": cfg.per_mask})
    index: dict[str, str] = {}
    per_kind: dict[str, list[float]] = {}
    started = time.monotonic()
    for position, sample_id in enumerate(ids):
        path = masks_dir / f"{position:05d}.npz"
        index[sample_id] = path.name
        if ctx.resume and path.is_file():
            stored = np.load(path)
            if str(stored["id"]) == sample_id and _stored_side(stored) == image_side:
                for kind, value in zip(stored["kinds"], stored["dice"], strict=True):
                    per_kind.setdefault(str(kind), []).append(float(value))
                continue
        item = ctx.store.get(sample_id)
        rng = np.random.default_rng([ctx.cfg.data.seed, 2, position])
        augmented = augment_mask(item.mask, cfg.per_mask, rng, cfg, image_side=image_side)
        soft = np.stack([np.round(entry.soft * 255.0).astype(np.uint8) for entry in augmented])
        kinds = np.array([entry.kind for entry in augmented])
        dices = np.array([entry.dice for entry in augmented], dtype=np.float32)
        side = np.array(image_side or 0)
        _save_npz(path, id=np.array(sample_id), soft=soft, kinds=kinds, dice=dices, image_side=side)
        for kind, value in zip(kinds, dices, strict=True):
            per_kind.setdefault(str(kind), []).append(float(value))
        ctx.progress.set(AUGMENT_PHASE, (position + 1) / len(ids))
        ctx.emit("step", phase=AUGMENT_PHASE, step=position, steps=len(ids), extra={"id": sample_id})
        ctx.check_stop(lambda: write_json(phase_dir / "index.json", index), AUGMENT_PHASE)
    write_json(phase_dir / "index.json", index)
    summary = {
        "phase": AUGMENT_PHASE,
        "n_images": len(ids),
        "n_masks": sum(len(v) for v in per_kind.values()),
        "mask_size": cfg.mask_size,
        "image_side": image_side,
        "kinds": {
            kind: {"count": len(values), "mean_dice": float(np.mean(values))}
            for kind, values in sorted(per_kind.items())
        },
        "elapsed_s": time.monotonic() - started,
        "index": str(phase_dir / "index.json"),
    }
    write_json(phase_dir / "summary.json", summary)
    ctx.progress.set(AUGMENT_PHASE, 1.0)
    ctx.emit("phase_end", phase=AUGMENT_PHASE, extra={"n_masks": summary["n_masks"]})
    return summary


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _stored_side(stored) -> int | None:
    """The refiner ``image_side`` a phase-2a file was made for (files from before the field: None)."""
    side = int(stored["image_side"]) if "image_side" in stored.files else 0
    return side or None


def load_augmented_masks(ctx: RunContext) -> dict[str, torch.Tensor]:
    """``id → K×M×M`` uint8 soft masks of phase 2a (empty dict if phase 2a has not run). Masks made
    for another ``refiner.image_side`` are an error: they sit elsewhere in refiner space."""
    phase_dir = ctx.output_dir / AUGMENT_DIR
    index_path = phase_dir / "index.json"
    if not index_path.is_file():
        return {}
    summary_path = phase_dir / "summary.json"
    made_for = read_json(summary_path).get("image_side") if summary_path.is_file() else None
    if made_for != ctx.cfg.refiner.image_side:
        raise ValueError(
            f"phase 2a's masks in {phase_dir} were made for refiner.image_side {made_for}, this run's "
            f"refiner places images at {ctx.cfg.refiner.image_side}: rerun the augment phase"
        )
    masks = {}
    for sample_id, name in read_json(index_path).items():
        path = phase_dir / "masks" / name
        if path.is_file():
            masks[sample_id] = torch.from_numpy(np.load(path)["soft"])
    return masks


# ============================================================================================
# Embeddings


def embedding_cache_for(refiner: Refiner, root: Path):
    """The embedding cache of ``refiner``'s frozen encoder (its weights' fingerprint is in every key)."""
    from training.data.embedding_cache import EmbeddingCache, weights_fingerprint

    encoder_weights = {k: v for k, v in refiner.state_dict().items() if k.startswith("image_encoder.")}
    return EmbeddingCache(root, weights_fingerprint=weights_fingerprint(encoder_weights))


class EmbeddingBank:
    """Image embeddings of the frozen encoder by sample id, through the persistent cache."""

    def __init__(self, ctx: RunContext, refiner: Refiner) -> None:
        self.ctx = ctx
        self.refiner = refiner
        self.cache = embedding_cache_for(refiner, ctx.cfg.cache_dir)
        self.memory: dict[str, torch.Tensor] = {}
        self.keys: dict[str, str] = {}
        self.keep_in_memory = True

    def _key(self, item: LoadedSample) -> str:
        if item.id not in self.keys:
            self.keys[item.id] = self.cache.key(item.image, self.refiner.embedding_kind)
        return self.keys[item.id]

    def precompute(self, sample_ids: list[str], phase: str, progress_key: str | None = None) -> dict:
        """Embed every image not yet cached (emits ``step`` events with ``stage='embeddings'``)."""
        self.keep_in_memory = len(sample_ids) <= IN_MEMORY_EMBEDDINGS
        computed, started = 0, time.monotonic()
        for position, sample_id in enumerate(sample_ids):
            item = self.ctx.store.get(sample_id)
            key = self._key(item)
            embedding = self.cache.get(key)
            if embedding is None:
                embedding = self._encode(item)
                self.cache.put(key, embedding[0])
                computed += 1
            if self.keep_in_memory:
                self.memory[sample_id] = _batched(embedding)
            if progress_key:
                self.ctx.progress.set(progress_key, (position + 1) / len(sample_ids))
            self.ctx.emit(
                "step",
                phase=phase,
                step=position,
                steps=len(sample_ids),
                message="embedding images",
                extra={"stage": "embeddings", "computed": computed},
            )
            self.ctx.check_stop(lambda: None, phase)  # the cache itself is the checkpoint
        return {"n_images": len(sample_ids), "computed": computed, "elapsed_s": time.monotonic() - started}

    def _encode(self, item: LoadedSample) -> torch.Tensor:
        images, _ = self.refiner.prepare(item.image)
        return self.refiner.encode(images[None].to(self.ctx.device)).cpu()

    def get(self, sample_id: str) -> torch.Tensor:
        """``1×256×E×E`` embedding (CPU)."""
        if sample_id in self.memory:
            return self.memory[sample_id]
        item = self.ctx.store.get(sample_id)
        embedding = self.cache.get(self._key(item))
        if embedding is None:
            embedding = self._encode(item)
            self.cache.put(self._key(item), embedding[0])
        embedding = _batched(embedding)
        if self.keep_in_memory:
            self.memory[sample_id] = embedding
        return embedding

    def batch(self, sample_ids: list[str], device: torch.device) -> torch.Tensor:
        return torch.cat([self.get(sample_id) for sample_id in sample_ids]).to(device)


def _batched(embedding: torch.Tensor) -> torch.Tensor:
    embedding = embedding.float()
    return embedding[None] if embedding.dim() == 3 else embedding


def refiner_images(items: list[LoadedSample], refiner: Refiner, device: torch.device) -> torch.Tensor:
    """``B×3×L×L`` inputs of ``refiner`` (only needed in ROI mode)."""
    return torch.stack([refiner.prepare(item.image)[0] for item in items]).to(device)


# ============================================================================================
# Coarse masks fed to the refiner


class CoarseMasks:
    """Where phase 2b gets each sample's coarse mask: real out-of-fold predictions or augmented."""

    def __init__(self, oof: dict[str, torch.Tensor], augmented: dict[str, torch.Tensor], real_ratio: float):
        self.oof = oof
        self.augmented = augmented
        self.real_ratio = real_ratio

    def usable(self, sample_id: str) -> bool:
        return sample_id in self.oof or sample_id in self.augmented

    def training_map(self, item: LoadedSample, rng: np.random.Generator) -> tuple[torch.Tensor, str]:
        """``1×1×L×L`` coarse probabilities in refiner space for one training sample, and its source."""
        has_real, has_augmented = item.id in self.oof, item.id in self.augmented
        draw = rng.random()
        if has_real and (not has_augmented or draw < self.real_ratio):
            return item.geometry.to_refiner(self.oof[item.id][None]), "real"
        masks = self.augmented[item.id]
        soft = masks[int(rng.integers(masks.shape[0]))].float()[None, None] / 255.0
        return _to_side(soft, item.geometry.size), "augmented"

    def validation_map(self, item: LoadedSample) -> torch.Tensor:
        """Real out-of-fold prediction if any, else the first augmented mask (deterministic)."""
        if item.id in self.oof:
            return item.geometry.to_refiner(self.oof[item.id][None])
        soft = self.augmented[item.id][0].float()[None, None] / 255.0
        return _to_side(soft, item.geometry.size)

    def validation_native(self, item: LoadedSample, refiner_map: torch.Tensor) -> np.ndarray:
        """The same coarse mask at native resolution (the baseline of the validation report)."""
        height, width = item.mask.shape
        if item.id in self.oof:
            native = F.interpolate(
                self.oof[item.id][None], size=(height, width), mode="bilinear", align_corners=False
            )
        else:
            native = item.geometry.from_refiner(refiner_map)
        return native[0, 0].numpy()


def _to_side(maps: torch.Tensor, side: int) -> torch.Tensor:
    if maps.shape[-1] == side:
        return maps
    return F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)


@torch.no_grad()
def validate_refiner(
    refiner: Refiner,
    items: list[LoadedSample],
    coarse_maps: dict[str, torch.Tensor],
    coarse_native: dict[str, np.ndarray],
    bank: EmbeddingBank,
    ctx: RunContext,
    batch_size: int,
) -> dict:
    """Evaluation-protocol report: given coarse masks vs refined masks, native resolution."""
    refiner.eval()
    records = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        embeddings = bank.batch([item.id for item in chunk], ctx.device)
        coarse = torch.cat([coarse_maps[item.id] for item in chunk]).to(ctx.device)
        valid = torch.cat([item.geometry.valid_mask() for item in chunk]).to(ctx.device)
        images = refiner_images(chunk, refiner, ctx.device) if refiner.cfg.roi_mode else None
        output = refiner(embeddings, coarse, valid=valid, images=images)
        for index, item in enumerate(chunk):
            refined = torch.sigmoid(
                item.geometry.from_refiner(output.refined_logits[index : index + 1].float())
            )
            found = coarse_finds_lesion(coarse[index], valid[index])
            served = served_refined(refined[0, 0].cpu().numpy(), coarse_native[item.id], found, refiner.cfg)
            records.append(
                image_record(
                    item.id,
                    item.sample.label,
                    item.mask,
                    coarse_native[item.id],
                    served,
                    iou=float(output.selected_iou[index]) if refines_coarse(found, refiner.cfg) else 0.0,
                )
            )
    return summarize(records)


# ============================================================================================
# Phase 2b — refiner fine-tuning


def trainable_parameters(refiner: Refiner) -> list[torch.nn.Parameter]:
    """Prompt encoder, mask decoder (and gate) parameters; the image encoder stays frozen."""
    parameters = []
    for name, parameter in refiner.named_parameters():
        trainable = not name.startswith("image_encoder.")
        parameter.requires_grad_(trainable)
        if trainable:
            parameters.append(parameter)
    return parameters


def load_phase2_refiner(ctx: RunContext) -> tuple[Refiner, bool]:
    """The refiner with phase-2b weights if they exist (``True``), else the one the run started
    from (the pretrained backbone, or the ``init_from`` bundle's)."""
    refiner = initial_refiner(ctx.cfg)
    best = ctx.output_dir / REFINER_DIR / "best.pt"
    trained = best.is_file()
    if trained:
        refiner.load_trainable_state_dict(load_checkpoint(best)["refiner"])
    return refiner.to(ctx.device), trained


def plan(ctx: RunContext) -> None:
    ctx.progress.add(f"{PHASE}/embeddings", 1.0)
    ctx.progress.add(PHASE, ctx.cfg.refiner_train.epochs)


def run_refiner_phase(ctx: RunContext) -> dict:
    cfg, train_cfg = ctx.cfg, ctx.cfg.refiner_train
    phase_dir = ctx.phase_dir(REFINER_DIR)
    fold = final_fold_of(ctx)
    ctx.emit("phase_start", phase=PHASE, extra={"fold": fold})

    refiner = initial_refiner(cfg)
    refiner.to(ctx.device)
    parameters = trainable_parameters(refiner)

    masks = CoarseMasks(load_out_of_fold_probs(ctx), load_augmented_masks(ctx), train_cfg.real_ratio)
    if not masks.augmented and train_cfg.real_ratio < 1:
        ctx.warn(
            "no augmented masks found (phase augment not run): the refiner trains on real masks only", PHASE
        )
    train_ids = [i for i in ctx.train_ids(fold) if masks.usable(i)]
    val_ids = [i for i in ctx.split.val_ids(fold) if masks.usable(i)]
    if not train_ids:
        raise ValueError(
            "phase refiner has no coarse masks to learn from: run phase 'augment' (or 'coarse') first "
            f"in {ctx.output_dir}"
        )
    if train_cfg.real_ratio > 0 and not any(i in masks.oof for i in train_ids):
        # Out-of-fold masks of the refiner's training images come from the *other* folds: with
        # folds_to_run = [k] (or phase coarse not run) there are none, and the method's hybrid
        # real/augmented data silently becomes augmented-only.
        reason = (
            "no phase-1 out-of-fold predictions found"
            if not masks.oof
            else f"none of fold {fold}'s training images has an out-of-fold phase-1 mask "
            "(phase 1 trained too few folds, see folds_to_run)"
        )
        ctx.warn(f"{reason}: the refiner trains on augmented masks only (real_ratio is ignored)", PHASE)

    bank = EmbeddingBank(ctx, refiner)
    embed_stats = bank.precompute(
        list(dict.fromkeys([*train_ids, *val_ids, *ctx.split.test_ids])),
        PHASE,
        progress_key=f"{PHASE}/embeddings",
    )
    log.info(
        "embeddings: %d images, %d computed in %.1f s",
        embed_stats["n_images"],
        embed_stats["computed"],
        embed_stats["elapsed_s"],
    )

    train_items = ctx.store.many(train_ids)
    val_items = ctx.store.many(val_ids)
    run = RefinerTraining(ctx, refiner, parameters, masks, bank, train_items, val_items, phase_dir)
    train_state = run_epochs(ctx, run)

    summary = {
        "phase": PHASE,
        "fold": fold,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "best_epoch": train_state.best["epoch"],
        "best_dice": train_state.best["dice"],
        "val_dice_coarse": train_state.best.get("dice_coarse"),
        "history": train_state.history,
        "embeddings": embed_stats,
        "elapsed_s": train_state.elapsed_s,
        "best_checkpoint": str(phase_dir / "best.pt"),
        "sam_checkpoint": str(phase_dir / "sam_refiner.pth"),
    }
    write_json(phase_dir / "summary.json", summary)
    ctx.emit("phase_end", phase=PHASE, dice=train_state.best["dice"])
    return summary


class RefinerTraining(LoopPhase):
    """Phase 2b's epochs as the training loop drives them (the refiner's trainable tensors only)."""

    phase = PHASE
    progress_key = PHASE
    order_tag = 200

    def __init__(
        self,
        ctx: RunContext,
        refiner: Refiner,
        parameters: list[torch.nn.Parameter],
        masks: CoarseMasks,
        bank: EmbeddingBank,
        train_items: list[LoadedSample],
        val_items: list[LoadedSample],
        phase_dir: Path,
    ) -> None:
        cfg, train_cfg = ctx.cfg, ctx.cfg.refiner_train
        self.ctx, self.cfg, self.train_cfg = ctx, cfg, train_cfg
        self.refiner, self.masks, self.bank = refiner, masks, bank
        self.train_items, self.val_items, self.phase_dir = train_items, val_items, phase_dir
        self.epochs, self.batch_size = train_cfg.epochs, train_cfg.batch_size
        self.last_path = phase_dir / "last.pt"
        # Fine-tuning (init_from): the weights the run started from are a candidate too.
        self.start_is_candidate = cfg.init_from is not None
        self.val_maps = {item.id: masks.validation_map(item) for item in val_items}
        self.val_native = {
            item.id: masks.validation_native(item, self.val_maps[item.id]) for item in val_items
        }
        self.optimizer = torch.optim.AdamW(parameters, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        steps_per_epoch = math.ceil(len(train_items) / train_cfg.batch_size)
        self.schedule = StepSchedule(self.optimizer, train_cfg.epochs * steps_per_epoch, kind="cosine")
        self.use_amp = ctx.use_amp(train_cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.sources = {"real": 0, "augmented": 0}

    def n_items(self) -> int:
        return len(self.train_items)

    def load(self, checkpoint: dict) -> None:
        self.refiner.load_trainable_state_dict(checkpoint["refiner"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.scaler.load_state_dict(checkpoint["scaler"])

    def state(self) -> dict:
        return {
            "refiner": self.refiner.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def _report(self) -> dict:
        return validate_refiner(
            self.refiner, self.val_items, self.val_maps, self.val_native, self.bank, self.ctx, self.batch_size
        )

    def start(self) -> Validation:
        baseline = self._report()
        return baseline_validation(
            self.ctx,
            PHASE,
            baseline,
            message=f"baseline (before fine-tuning): refined Dice {fmt_dice(baseline['dice_refined'])}",
            best={"dice_coarse": baseline["dice_coarse"]},
        )

    def begin_epoch(self, epoch: int) -> None:
        self.refiner.train()
        self.sources = {"real": 0, "augmented": 0}

    def train_step(self, epoch: int, step: int, indices: list[int]) -> dict[str, float]:
        ctx, cfg, train_cfg = self.ctx, self.cfg, self.train_cfg
        chunk = [self.train_items[i] for i in indices]
        rng = np.random.default_rng([cfg.data.seed, 201, epoch, step])
        coarse_maps = []
        for item in chunk:
            coarse_map, source = self.masks.training_map(item, rng)
            coarse_maps.append(coarse_map)
            self.sources[source] += 1
        coarse = torch.cat(coarse_maps).to(ctx.device)
        target = torch.stack([item.refiner_target for item in chunk]).float().to(ctx.device)
        valid = torch.cat([item.geometry.valid_mask() for item in chunk]).to(ctx.device)
        embeddings = self.bank.batch([item.id for item in chunk], ctx.device)
        images = refiner_images(chunk, self.refiner, ctx.device) if cfg.refiner.roi_mode else None
        with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=self.use_amp):
            output = self.refiner(embeddings, coarse, valid=valid, images=images)
        losses = quality_aware_loss(
            output.refined_logits.float(),
            target,
            coarse,
            train_cfg.bce_weight,
            train_cfg.dice_weight,
            train_cfg.change_penalty_weight,
            valid=valid,
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return {name: value.item() for name, value in losses.items()}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def validate(self, epoch: int, train_losses: dict[str, float]) -> Validation:
        report = self._report()
        dice = report["dice_refined"]
        entry = {
            **{f"train_{name}": value for name, value in train_losses.items()},
            "val_dice_coarse": report["dice_coarse"],
            "val_dice_refined": dice,
            "val_fp_rate_refined": report["normal"]["fp_rate_refined"],
            "lr": self.lr(),
            "sources": dict(self.sources),
        }
        return Validation(
            dice=dice,
            entry=entry,
            best={"dice_coarse": report["dice_coarse"]},
            event={"dice_coarse": report["dice_coarse"]},
            summary=f"val Dice coarse {fmt_dice(report['dice_coarse'])} → refined {fmt_dice(dice)}",
        )

    def save_best(self, epoch: int, validation: Validation) -> None:
        save_checkpoint(
            self.phase_dir / "best.pt",
            phase=PHASE,
            epoch=epoch,
            dice=validation.dice,
            refiner=self.refiner.trainable_state_dict(),
            config=self.cfg.model_dump(mode="json"),
        )
        if epoch >= 0:  # the starting weights are the run's input, not a phase-2b result
            save_checkpoint(self.phase_dir / "sam_refiner.pth", **self.refiner.sam_state_dict())
