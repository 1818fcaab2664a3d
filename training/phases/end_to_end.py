"""Phase 3: the coarse segmenter and the refiner trained jointly (UltraRefiner).

* Starts from the final phase-1 TransUNet (``coarse/final.pt``) and the phase-2b refiner
  (``refiner/best.pt``; the pretrained backbone if phase 2b has not run) and first evaluates that
  baseline on the validation images of the final coarse fold (coarse and refined Dice).
* Loss: ``coarse_loss_weight``·(CE/Dice of the coarse logits, phase-1 weights) +
  ``refined_loss_weight``·(BCE + Dice of the refined mask, weights of ``refiner_train``) +
  ``l2_to_phase1``·Σ‖θ − θ₁‖² over the TransUNet parameters. With ``native_resolution_loss`` the
  refined term is computed per image at the native resolution instead of in refiner space.
* AdamW with two param groups (``lr_coarse`` / ``lr_refiner``), linear warm-up then cosine
  (:class:`~training.phases.context.StepSchedule`, which reads the param groups at every step);
  gradients into TransUNet through the prompts are scaled by ``coarse_grad_scale``
  (:class:`training.modeling.ultrarefiner.GradScale`); gradient-norm clipping ``grad_clip``.
* ``freeze_coarse``: TransUNet frozen (and in eval mode) — its weights stay bit-identical — until
  ``unfreeze_epoch``, when its param group joins the optimizer *and the schedule*.
* A ``warning`` event (and a log line) whenever the validation coarse Dice drops more than
  ``dice_drop_warning`` below the baseline.
* The best epoch by validation refined Dice is kept (the baseline counts as epoch −1).

Outputs in ``<output_dir>/end_to_end/``: ``last.pt`` (resume), ``best.pt``
(``coarse``/``refiner`` weights), ``summary.json``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from training.checkpoints import save_checkpoint
from training.evaluate import coarse_finds_lesion, image_record, refines_coarse, served_refined, summarize
from training.modeling.losses import coarse_loss, quality_aware_loss
from training.modeling.ultrarefiner import UltraRefiner
from training.phases.coarse import load_final_coarse, native_coarse_probs
from training.phases.context import (
    END_TO_END_DIR,
    LoadedSample,
    RunContext,
    StepSchedule,
    final_fold_of,
    write_json,
)
from training.phases.loop import LoopPhase, Validation, baseline_validation, fmt_dice, run_epochs
from training.phases.refiner_finetune import (
    EmbeddingBank,
    load_phase2_refiner,
    refiner_images,
    trainable_parameters,
)

log = logging.getLogger("training.end_to_end")
PHASE = "end-to-end"


def plan(ctx: RunContext) -> None:
    ctx.progress.add(f"{PHASE}/baseline", 0.5)
    ctx.progress.add(PHASE, ctx.cfg.end_to_end.epochs)


def coarse_is_trainable(epoch: int, cfg) -> bool:
    """Whether TransUNet trains during ``epoch`` (0-based)."""
    e2e = cfg.end_to_end
    if not e2e.freeze_coarse:
        return True
    return e2e.unfreeze_epoch is not None and epoch >= e2e.unfreeze_epoch


def set_coarse_trainable(model: UltraRefiner, trainable: bool) -> None:
    for parameter in model.coarse.parameters():
        parameter.requires_grad_(trainable)


def build_optimizer(model: UltraRefiner, cfg, include_coarse: bool) -> torch.optim.AdamW:
    """AdamW with a ``refiner`` group and, if TransUNet trains, a ``coarse`` group."""
    e2e = cfg.end_to_end
    groups = [{"params": trainable_parameters(model.refiner), "lr": e2e.lr_refiner, "name": "refiner"}]
    if include_coarse:
        groups.append({"params": list(model.coarse.parameters()), "lr": e2e.lr_coarse, "name": "coarse"})
    return torch.optim.AdamW(groups, lr=e2e.lr_refiner, weight_decay=e2e.weight_decay)


def unfreeze_coarse(model: UltraRefiner, optimizer: torch.optim.Optimizer, cfg) -> None:
    """Make TransUNet trainable and add its param group; the schedule picks it up at the next step."""
    if any(group.get("name") == "coarse" for group in optimizer.param_groups):
        return
    set_coarse_trainable(model, True)
    optimizer.add_param_group(
        {"params": list(model.coarse.parameters()), "lr": cfg.end_to_end.lr_coarse, "name": "coarse"}
    )


def l2_to_reference(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ‖θ − θ₁‖² over the trainable parameters of ``model`` present in ``reference``."""
    total = None
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and name in reference:
            term = (parameter - reference[name]).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return total


def refined_loss(outputs: dict, items: list[LoadedSample], ctx: RunContext) -> dict[str, torch.Tensor]:
    """BCE + Dice of the refined mask: in refiner space, or per image at native resolution."""
    weights = ctx.cfg.refiner_train
    if not ctx.cfg.end_to_end.native_resolution_loss:
        target = torch.stack([item.refiner_target for item in items]).float().to(ctx.device)
        return quality_aware_loss(
            outputs["refined_logits"].float(),
            target,
            outputs["refiner_coarse_probs"].float(),
            weights.bce_weight,
            weights.dice_weight,
            0.0,
            valid=outputs["valid"],
        )
    terms: dict[str, list[torch.Tensor]] = {}
    for index, item in enumerate(items):
        geometry = item.geometry
        refined = geometry.from_refiner(outputs["refined_logits"][index : index + 1].float())
        coarse = geometry.from_refiner(outputs["refiner_coarse_probs"][index : index + 1].float())
        target = torch.from_numpy(item.mask.astype(np.float32))[None, None].to(ctx.device)
        losses = quality_aware_loss(refined, target, coarse, weights.bce_weight, weights.dice_weight, 0.0)
        for name, value in losses.items():
            terms.setdefault(name, []).append(value)
    return {name: torch.stack(values).mean() for name, values in terms.items()}


def joint_inputs(items: list[LoadedSample], bank: EmbeddingBank, ctx: RunContext):
    coarse_images = torch.stack([item.coarse_image for item in items]).to(ctx.device)
    coarse_targets = torch.stack([item.coarse_target for item in items]).long().to(ctx.device)
    embeddings = bank.batch([item.id for item in items], ctx.device)
    geometries = [item.geometry for item in items]
    images = refiner_images(items, bank.refiner, ctx.device) if ctx.cfg.refiner.roi_mode else None
    return coarse_images, coarse_targets, embeddings, geometries, images


@torch.no_grad()
def validate_joint(
    model: UltraRefiner, items: list[LoadedSample], bank: EmbeddingBank, ctx: RunContext
) -> dict:
    """Evaluation-protocol report (coarse vs refined, native resolution) of the joint model."""
    model.eval()
    records = []
    batch_size = ctx.cfg.end_to_end.batch_size
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        coarse_images, _, embeddings, geometries, images = joint_inputs(chunk, bank, ctx)
        outputs = model(
            coarse_images,
            embeddings,
            geometries,
            refiner_images=images,
            min_lesion_fraction=model.refiner.cfg.min_lesion_fraction,
        )
        for index, item in enumerate(chunk):
            height, width = item.mask.shape
            coarse = native_coarse_probs(outputs["coarse_logits"][index].float().cpu(), height, width)
            refined = torch.sigmoid(
                item.geometry.from_refiner(outputs["refined_logits"][index : index + 1].float())
            )
            found = coarse_finds_lesion(outputs["refiner_coarse_probs"][index], outputs["valid"][index])
            served = served_refined(refined[0, 0].cpu().numpy(), coarse, found, model.refiner.cfg)
            records.append(
                image_record(
                    item.id,
                    item.sample.label,
                    item.mask,
                    coarse,
                    served,
                    iou=float(outputs["selected_iou"][index])
                    if refines_coarse(found, model.refiner.cfg)
                    else 0.0,
                )
            )
    return summarize(records)


def run_end_to_end_phase(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    phase_dir = ctx.phase_dir(END_TO_END_DIR)
    coarse = load_final_coarse(ctx)
    if coarse is None:
        raise ValueError(
            f"phase end-to-end needs the phase-1 coarse model ({ctx.output_dir}/coarse/final.pt): "
            "run phase 'coarse' first with the same output directory"
        )
    refiner, refiner_trained = load_phase2_refiner(ctx)
    if not refiner_trained:
        ctx.warn("no phase-2 refiner found: phase 3 starts from the pretrained refiner", PHASE)
    model = UltraRefiner(coarse, refiner, cfg).to(ctx.device)

    fold = final_fold_of(ctx)
    train_items = ctx.store.many(ctx.train_ids(fold))
    val_items = ctx.store.many(ctx.split.val_ids(fold))
    ctx.emit(
        "phase_start", phase=PHASE, extra={"fold": fold, "n_train": len(train_items), "n_val": len(val_items)}
    )
    bank = EmbeddingBank(ctx, refiner)
    bank.precompute([item.id for item in train_items + val_items], PHASE)

    run = EndToEndTraining(ctx, model, bank, train_items, val_items, phase_dir)
    train_state = run_epochs(ctx, run)
    summary = {
        "phase": PHASE,
        "fold": fold,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "baseline": run.baseline,
        "best_epoch": train_state.best["epoch"],
        "best_dice": train_state.best["dice"],
        "history": train_state.history,
        "elapsed_s": train_state.elapsed_s,
        "best_checkpoint": str(phase_dir / "best.pt"),
    }
    write_json(phase_dir / "summary.json", summary)
    ctx.emit("phase_end", phase=PHASE, dice=train_state.best["dice"], extra={"baseline": run.baseline})
    return summary


class EndToEndTraining(LoopPhase):
    """Phase 3's epochs as the training loop drives them. The baseline (phase-1 coarse model +
    phase-2 refiner) is always the epoch −1 candidate."""

    phase = PHASE
    progress_key = PHASE
    order_tag = 300
    start_is_candidate = True

    def __init__(
        self,
        ctx: RunContext,
        model: UltraRefiner,
        bank: EmbeddingBank,
        train_items: list[LoadedSample],
        val_items: list[LoadedSample],
        phase_dir: Path,
    ) -> None:
        self.ctx, self.cfg, self.e2e = ctx, ctx.cfg, ctx.cfg.end_to_end
        self.model, self.bank = model, bank
        self.train_items, self.val_items, self.phase_dir = train_items, val_items, phase_dir
        self.epochs, self.batch_size = self.e2e.epochs, self.e2e.batch_size
        self.last_path = phase_dir / "last.pt"
        self.phase1_weights = {
            name: value.detach().clone() for name, value in model.coarse.named_parameters()
        }
        self.baseline: dict = {}
        self.use_amp = ctx.use_amp(self.e2e.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.coarse_trainable = False
        self._build_optimizer(coarse_is_trainable(0, self.cfg))

    def _build_optimizer(self, include_coarse: bool) -> None:
        """The optimizer (with the coarse param group iff ``include_coarse``) and its schedule."""
        set_coarse_trainable(self.model, include_coarse)
        self.optimizer = build_optimizer(self.model, self.cfg, include_coarse=include_coarse)
        steps_per_epoch = math.ceil(len(self.train_items) / self.e2e.batch_size)
        self.schedule = StepSchedule(
            self.optimizer,
            self.e2e.epochs * steps_per_epoch,
            kind="cosine",
            warmup_steps=self.e2e.warmup_steps,
        )

    def _coarse_in_optimizer(self) -> bool:
        return any(group.get("name") == "coarse" for group in self.optimizer.param_groups)

    def n_items(self) -> int:
        return len(self.train_items)

    def load(self, checkpoint: dict) -> None:
        # The optimizer must have the param groups of the checkpoint (the coarse group joins on unfreeze).
        self._build_optimizer(checkpoint["coarse_in_optimizer"])
        self.model.coarse.load_state_dict(checkpoint["coarse"])
        self.model.refiner.load_trainable_state_dict(checkpoint["refiner"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.baseline = checkpoint["baseline"]
        self.phase1_weights = {k: v.to(self.ctx.device) for k, v in checkpoint["phase1_weights"].items()}
        self.ctx.progress.set(f"{PHASE}/baseline", 1.0)

    def state(self) -> dict:
        return {
            "coarse": self.model.coarse.state_dict(),
            "refiner": self.model.refiner.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "baseline": self.baseline,
            "phase1_weights": {k: v.cpu() for k, v in self.phase1_weights.items()},
            "coarse_in_optimizer": self._coarse_in_optimizer(),
        }

    def start(self) -> Validation:
        report = validate_joint(self.model, self.val_items, self.bank, self.ctx)
        self.baseline = {"dice_coarse": report["dice_coarse"], "dice_refined": report["dice_refined"]}
        start = baseline_validation(self.ctx, PHASE, report)
        self.ctx.progress.set(f"{PHASE}/baseline", 1.0)
        return start

    def begin_epoch(self, epoch: int) -> None:
        if coarse_is_trainable(epoch, self.cfg) and not self._coarse_in_optimizer():
            unfreeze_coarse(self.model, self.optimizer, self.cfg)
            log.info("end-to-end epoch %d: TransUNet unfrozen", epoch)
            self.ctx.emit(
                "step", phase=PHASE, epoch=epoch, message="TransUNet unfrozen", extra={"unfrozen": True}
            )
        self.coarse_trainable = self._coarse_in_optimizer()
        self.model.train()
        if not self.coarse_trainable:
            self.model.coarse.eval()  # frozen: no dropout, weights bit-identical

    def train_step(self, epoch: int, step: int, indices: list[int]) -> dict[str, float]:
        ctx, cfg, e2e = self.ctx, self.cfg, self.e2e
        chunk = [self.train_items[i] for i in indices]
        coarse_images, coarse_targets, embeddings, geometries, images = joint_inputs(chunk, self.bank, ctx)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=self.use_amp):
            outputs = self.model(coarse_images, embeddings, geometries, refiner_images=images)
        refined_terms = refined_loss(outputs, chunk, ctx)
        coarse_term = coarse_loss(
            outputs["coarse_logits"].float(), coarse_targets, cfg.coarse.ce_weight, cfg.coarse.dice_weight
        )
        l2_term = (
            l2_to_reference(self.model.coarse, self.phase1_weights)
            if self.coarse_trainable
            else torch.zeros((), device=ctx.device)
        )
        total = e2e.coarse_loss_weight * coarse_term + e2e.refined_loss_weight * refined_terms["total"]
        total = total + e2e.l2_to_phase1 * l2_term
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for group in self.optimizer.param_groups for p in group["params"]], e2e.grad_clip
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return {
            "total": total.item(),
            "coarse": coarse_term.item(),
            "refined": refined_terms["total"].item(),
            "l2": l2_term.item(),
        }

    def lr(self) -> float | None:
        return _group_lr(self.optimizer, "refiner")

    def step_extra(self) -> dict:
        return {"lr_coarse": _group_lr(self.optimizer, "coarse")}

    def validate(self, epoch: int, train_losses: dict[str, float]) -> Validation:
        report = validate_joint(self.model, self.val_items, self.bank, self.ctx)
        dice = report["dice_refined"]
        entry = {
            **{f"train_{name}": value for name, value in train_losses.items()},
            "val_dice_coarse": report["dice_coarse"],
            "val_dice_refined": dice,
            "lr_refiner": _group_lr(self.optimizer, "refiner"),
            "lr_coarse": _group_lr(self.optimizer, "coarse"),
            "coarse_trainable": self.coarse_trainable,
        }
        baseline = self.baseline
        drop = self.e2e.dice_drop_warning
        if (
            baseline.get("dice_coarse") is not None
            and report["dice_coarse"] is not None
            and baseline["dice_coarse"] - report["dice_coarse"] > drop
        ):
            self.ctx.warn(
                f"end-to-end epoch {epoch + 1}: coarse Dice dropped from {baseline['dice_coarse']:.4f} to "
                f"{report['dice_coarse']:.4f} (more than {drop:.3f}); consider a lower "
                "lr_coarse, a smaller coarse_grad_scale or freeze_coarse",
                PHASE,
                epoch=epoch,
                baseline=baseline["dice_coarse"],
                dice_coarse=report["dice_coarse"],
            )
        return Validation(
            dice=dice,
            entry=entry,
            event={"dice_coarse": report["dice_coarse"], "lr_coarse": entry["lr_coarse"]},
            summary=f"val Dice coarse {fmt_dice(report['dice_coarse'])} → refined {fmt_dice(dice)}",
        )

    def save_best(self, epoch: int, validation: Validation) -> None:
        save_checkpoint(
            self.phase_dir / "best.pt",
            phase=PHASE,
            epoch=epoch,
            dice=validation.dice,
            coarse=self.model.coarse.state_dict(),
            refiner=self.model.refiner.trainable_state_dict(),
            config=self.cfg.model_dump(mode="json"),
        )


def _group_lr(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return group["lr"]
    return None
