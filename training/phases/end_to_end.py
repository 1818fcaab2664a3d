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
    TrainState,
    batches,
    epoch_order,
    final_fold_of,
    write_json,
)
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
    images = refiner_images(items, ctx.cfg.refiner.backbone, ctx.device) if ctx.cfg.refiner.roi_mode else None
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
        outputs = model(coarse_images, embeddings, geometries, refiner_images=images)
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
    cfg, e2e = ctx.cfg, ctx.cfg.end_to_end
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
    phase1_weights = {name: value.detach().clone() for name, value in model.coarse.named_parameters()}

    fold = final_fold_of(ctx)
    train_items = ctx.store.many(ctx.train_ids(fold))
    val_items = ctx.store.many(ctx.split.val_ids(fold))
    ctx.emit(
        "phase_start", phase=PHASE, extra={"fold": fold, "n_train": len(train_items), "n_val": len(val_items)}
    )
    bank = EmbeddingBank(ctx, refiner)
    bank.precompute([item.id for item in train_items + val_items], PHASE)

    # ``best`` is set below: restored, or from the baseline evaluation of a fresh start.
    train_state, checkpoint = TrainState.restore(phase_dir / "last.pt", ctx, {})
    start_epoch, start_step, history = train_state.epoch, train_state.step, train_state.history

    # The optimizer must have the param groups of the checkpoint (the coarse group joins on unfreeze).
    coarse_trainable = (
        checkpoint["coarse_in_optimizer"] if checkpoint is not None else coarse_is_trainable(0, cfg)
    )
    set_coarse_trainable(model, coarse_trainable)
    optimizer = build_optimizer(model, cfg, include_coarse=coarse_trainable)
    steps_per_epoch = math.ceil(len(train_items) / e2e.batch_size)
    schedule = StepSchedule(
        optimizer, e2e.epochs * steps_per_epoch, kind="cosine", warmup_steps=e2e.warmup_steps
    )
    use_amp = ctx.use_amp(e2e.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    if checkpoint is not None:
        model.coarse.load_state_dict(checkpoint["coarse"])
        model.refiner.load_trainable_state_dict(checkpoint["refiner"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        scaler.load_state_dict(checkpoint["scaler"])
        baseline = checkpoint["baseline"]
        phase1_weights = {k: v.to(ctx.device) for k, v in checkpoint["phase1_weights"].items()}
    else:
        report = validate_joint(model, val_items, bank, ctx)
        baseline = {"dice_coarse": report["dice_coarse"], "dice_refined": report["dice_refined"]}
        ctx.emit(
            "evaluation",
            phase=PHASE,
            dice=report["dice_refined"],
            message=(
                f"baseline: coarse Dice {_fmt(report['dice_coarse'])}, refined {_fmt(report['dice_refined'])}"
            ),
            extra={"stage": "baseline", "split": "val", "n_images": report["n_images"], **baseline},
        )
        train_state.best = {
            "epoch": -1,
            "dice": report["dice_refined"],
            "dice_score": _score(report["dice_refined"]),
        }
        save_checkpoint(
            phase_dir / "best.pt",
            phase=PHASE,
            epoch=-1,
            dice=report["dice_refined"],
            coarse=model.coarse.state_dict(),
            refiner=model.refiner.trainable_state_dict(),
            config=cfg.model_dump(mode="json"),
        )
    ctx.progress.set(f"{PHASE}/baseline", 1.0)
    train_state.start_clock()

    def save_last(epoch: int, step: int) -> None:
        train_state.save(
            epoch,
            step,
            cfg,
            phase=PHASE,
            coarse=model.coarse.state_dict(),
            refiner=model.refiner.trainable_state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            scaler=scaler.state_dict(),
            baseline=baseline,
            phase1_weights={k: v.cpu() for k, v in phase1_weights.items()},
            coarse_in_optimizer=any(g.get("name") == "coarse" for g in optimizer.param_groups),
        )

    for epoch in range(start_epoch, e2e.epochs):
        if coarse_is_trainable(epoch, cfg) and not any(
            g.get("name") == "coarse" for g in optimizer.param_groups
        ):
            unfreeze_coarse(model, optimizer, cfg)
            log.info("end-to-end epoch %d: TransUNet unfrozen", epoch)
            ctx.emit("step", phase=PHASE, epoch=epoch, message="TransUNet unfrozen", extra={"unfrozen": True})
        coarse_trainable = any(g.get("name") == "coarse" for g in optimizer.param_groups)
        model.train()
        if not coarse_trainable:
            model.coarse.eval()  # frozen: no dropout, weights bit-identical
        order = epoch_order(cfg.data.seed, 300, epoch, len(train_items))
        epoch_batches = batches(order, e2e.batch_size)
        first_step = start_step if epoch == start_epoch else 0
        running: dict[str, list[float]] = {}
        for step in range(first_step, len(epoch_batches)):
            chunk = [train_items[i] for i in epoch_batches[step]]
            coarse_images, coarse_targets, embeddings, geometries, images = joint_inputs(chunk, bank, ctx)
            with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=use_amp):
                outputs = model(coarse_images, embeddings, geometries, refiner_images=images)
            refined_terms = refined_loss(outputs, chunk, ctx)
            coarse_term = coarse_loss(
                outputs["coarse_logits"].float(), coarse_targets, cfg.coarse.ce_weight, cfg.coarse.dice_weight
            )
            l2_term = (
                l2_to_reference(model.coarse, phase1_weights)
                if coarse_trainable
                else torch.zeros((), device=ctx.device)
            )
            total = e2e.coarse_loss_weight * coarse_term + e2e.refined_loss_weight * refined_terms["total"]
            total = total + e2e.l2_to_phase1 * l2_term
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], e2e.grad_clip
            )
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            values = {
                "total": total.item(),
                "coarse": coarse_term.item(),
                "refined": refined_terms["total"].item(),
                "l2": l2_term.item(),
            }
            for name, value in values.items():
                running.setdefault(name, []).append(value)
            ctx.progress.set(PHASE, (epoch + (step + 1) / len(epoch_batches)) / e2e.epochs)
            ctx.emit(
                "step",
                phase=PHASE,
                epoch=epoch,
                epochs=e2e.epochs,
                step=step,
                steps=len(epoch_batches),
                losses=values,
                lr=_group_lr(optimizer, "refiner"),
                extra={"lr_coarse": _group_lr(optimizer, "coarse")},
            )
            ctx.check_stop(lambda e=epoch, s=step + 1: save_last(e, s), PHASE)

        report = validate_joint(model, val_items, bank, ctx)
        dice = report["dice_refined"]
        entry = {
            "epoch": epoch,
            **{f"train_{name}": float(np.mean(values)) for name, values in running.items()},
            "val_dice_coarse": report["dice_coarse"],
            "val_dice_refined": dice,
            "lr_refiner": _group_lr(optimizer, "refiner"),
            "lr_coarse": _group_lr(optimizer, "coarse"),
            "coarse_trainable": coarse_trainable,
        }
        history.append(entry)
        if (
            baseline["dice_coarse"] is not None
            and report["dice_coarse"] is not None
            and baseline["dice_coarse"] - report["dice_coarse"] > e2e.dice_drop_warning
        ):
            ctx.warn(
                f"end-to-end epoch {epoch + 1}: coarse Dice dropped from {baseline['dice_coarse']:.4f} to "
                f"{report['dice_coarse']:.4f} (more than {e2e.dice_drop_warning:.3f}); consider a lower "
                "lr_coarse, a smaller coarse_grad_scale or freeze_coarse",
                PHASE,
                epoch=epoch,
                baseline=baseline["dice_coarse"],
                dice_coarse=report["dice_coarse"],
            )
        if _score(dice) > train_state.best["dice_score"]:
            train_state.best = {"epoch": epoch, "dice": dice, "dice_score": _score(dice)}
            save_checkpoint(
                phase_dir / "best.pt",
                phase=PHASE,
                epoch=epoch,
                dice=dice,
                coarse=model.coarse.state_dict(),
                refiner=model.refiner.trainable_state_dict(),
                config=cfg.model_dump(mode="json"),
            )
        save_last(epoch + 1, 0)
        ctx.progress.set(PHASE, (epoch + 1) / e2e.epochs)
        ctx.emit(
            "epoch_end",
            phase=PHASE,
            epoch=epoch,
            epochs=e2e.epochs,
            losses={"train": entry.get("train_total", float("nan"))},
            dice=dice,
            lr=entry["lr_refiner"],
            extra={
                "dice_coarse": report["dice_coarse"],
                "lr_coarse": entry["lr_coarse"],
                "best_epoch": train_state.best["epoch"],
            },
        )
        log.info(
            "end-to-end epoch %d/%d: loss %.4f, val Dice coarse %s → refined %s",
            epoch + 1,
            e2e.epochs,
            entry.get("train_total", float("nan")),
            _fmt(report["dice_coarse"]),
            _fmt(dice),
        )

    summary = {
        "phase": PHASE,
        "fold": fold,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "baseline": baseline,
        "best_epoch": train_state.best["epoch"],
        "best_dice": train_state.best["dice"],
        "history": history,
        "elapsed_s": train_state.elapsed_s,
        "best_checkpoint": str(phase_dir / "best.pt"),
    }
    write_json(phase_dir / "summary.json", summary)
    ctx.emit("phase_end", phase=PHASE, dice=train_state.best["dice"], extra={"baseline": baseline})
    return summary


def _group_lr(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return group["lr"]
    return None


def _score(dice: float | None) -> float:
    return -1.0 if dice is None else dice


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
