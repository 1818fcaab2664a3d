"""A fine-tuned model blended with the model it started from, as far as a guard set allows.

A fine-tuning run (``init_from``) on a few images of a new site adapts the model to that site and
makes it forget its first one. Blending the weights, ``start + α·(tuned − start)`` (weight-space
ensembling; M. Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022), trades one
against the other with a single number. :func:`choose_blend` tries ``cfg.finetune.blend_alphas``
largest first on the *guard images* — the starting model's own validation fold, which it was
selected on but never trained on — and keeps the first α whose refined lesion Dice falls by at
most ``blend_max_dice_drop`` and whose normal-image false-positive rate rises by at most
``blend_max_fp_rise`` against the starting model; α = 0 (the starting model) when none does.

Guard images that this run trained on or holds out as its test split are left out — by id, and
by content (the same image saved again under another id, e.g. as a correction) — so the choice
never sees the run's own images. Without the guard images (the starting model's data is
not on this machine) the fine-tuned weights are kept unblended and the report says why.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from training.config import REPO_ROOT, TrainingConfig

log = logging.getLogger(__name__)

PHASE = "blend"
STATE_KEYS = ("coarse_state_dict", "refiner_state_dict")


def blend_state(start: dict, tuned: dict, alpha: float) -> dict:
    """``start + α·(tuned − start)`` for every floating-point tensor; other tensors (counters)
    are the tuned ones. Both must hold the same keys and shapes."""
    if set(start) != set(tuned):
        raise ValueError("the two state dicts hold different tensors")
    blended = {}
    for key, value in tuned.items():
        other = start[key]
        if other.shape != value.shape:
            raise ValueError(f"tensor {key} has shape {tuple(other.shape)} and {tuple(value.shape)}")
        if value.is_floating_point():
            blended[key] = torch.lerp(other.float(), value.float(), float(alpha)).to(value.dtype)
        else:
            blended[key] = value.clone()
    return blended


def blend_bundle(start: dict, tuned: dict, alpha: float) -> dict:
    """A copy of ``tuned`` whose coarse and refiner weights are blended with ``start``'s."""
    bundle = dict(tuned)
    for key in STATE_KEYS:
        bundle[key] = blend_state(start[key], tuned[key], alpha)
    bundle["metrics"] = dict(tuned.get("metrics") or {})
    return bundle


def same_weights(start: dict, tuned: dict) -> bool:
    return all(
        set(start[key]) == set(tuned[key])
        and all(torch.equal(start[key][name], tuned[key][name]) for name in tuned[key])
        for key in STATE_KEYS
    )


def _data_root(root: Path) -> Path:
    root = Path(root).expanduser()
    if root.is_absolute() or root.exists():
        return root
    return REPO_ROOT / root


def _start_samples(data) -> list:
    """The starting model's images, listed as its run listed them, with relative roots resolved
    against the repository."""
    from training.pipeline import load_data_samples

    update = {"root": _data_root(data.root)}
    if data.pooled:
        update["pool_root"] = _data_root(data.pool_root)
    return load_data_samples(data.model_copy(update=update))


def _start_split(cfg: TrainingConfig, data, samples: list):
    """The split the starting model was trained with, when it can be found, else ``None``.

    A pooled split is taken only from a file (its second dataset, saved corrections, may have
    changed since, so it cannot be rebuilt); its validation images that are gone are skipped."""
    from training.data.splits import Split

    candidates = [data.split_file] if data.split_file and not data.pooled else []
    if cfg.init_from is not None:  # scripts/ship_model.py writes the split beside the bundle
        init = Path(cfg.init_from)
        candidates.append(init.with_name(f"{init.stem}_split.json"))
        candidates.append(init.with_name("split.json"))  # a run directory's bundle.pt
    for path in candidates:
        path = _data_root(path)
        if not path.is_file():
            continue
        loaded = Split.load(path)
        if loaded.dataset == data.name if data.pooled else loaded.matches(samples, data.dataset):
            return loaded
    return None


def guard_samples(cfg: TrainingConfig, starting: dict, exclude: set[str]) -> tuple[list, str | None]:
    """The starting model's validation images minus ``exclude`` (ids), or ``([], reason)``."""
    from training.checkpoints import bundle_config
    from training.data.splits import seeded_split

    final = (starting.get("metrics") or {}).get("final_fold") or {}
    if "fold" not in final:
        return [], "the starting bundle does not record its final coarse fold"
    data = bundle_config(starting).data
    try:
        samples = _start_samples(data)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        return [], f"the starting model's {data.name} data is not readable ({type(error).__name__})"
    split = _start_split(cfg, data, samples)
    if split is None:
        if data.pooled:
            return [], "the starting model's pooled split is not beside it (split.json)"
        split = seeded_split(samples, data)
    fold = int(final["fold"])
    if fold >= len(split.folds):
        return [], f"the starting model's final fold {fold} is not in its split"
    wanted = [sample_id for sample_id in split.val_ids(fold) if sample_id not in exclude]
    by_id = {sample.id: sample for sample in samples}
    chosen = [by_id[sample_id] for sample_id in wanted if sample_id in by_id]
    if cfg.finetune.blend_guard_limit:
        chosen = chosen[: cfg.finetune.blend_guard_limit]
    if not any(sample.mask_paths for sample in chosen):
        return [], "no lesion image is left among the starting model's validation images"
    return chosen, None


def without_run_images(guard: list, run_samples: list, cfg: TrainingConfig) -> tuple[list, int]:
    """``guard`` minus the images that this run's data holds too, under another id or re-saved
    (exact or near duplicates by the split's rule, ``data.dedup_threshold``): a BUSI validation
    image saved as a correction would otherwise guard the run that trained on it."""
    from training.data.splits import duplicates_of

    flags = duplicates_of(guard, run_samples, cfg.data.dedup_threshold)
    kept = [sample for sample, duplicate in zip(guard, flags, strict=True) if not duplicate]
    if len(kept) < len(guard):
        log.info("blend guard: %d image(s) left out, this run's data holds them too", len(guard) - len(kept))
    return kept, len(guard) - len(kept)


def _summary(report: dict) -> dict:
    normal = report.get("normal") or {}
    return {
        "n_images": report["n_images"],
        "dice_coarse": report["dice_coarse"],
        "dice_refined": report["dice_refined"],
        "normal_images": normal.get("n_images", 0),
        "fp_rate_refined": normal.get("fp_rate_refined") if normal.get("n_images") else None,
    }


def within_guard(start: dict, candidate: dict, cfg) -> bool:
    """Whether ``candidate``'s guard summary stays within ``cfg`` (a ``FinetuneConfig``) of ``start``'s."""
    if candidate["dice_refined"] < start["dice_refined"] - cfg.blend_max_dice_drop - 1e-12:
        return False
    if start["fp_rate_refined"] is not None and candidate["fp_rate_refined"] is not None:
        if candidate["fp_rate_refined"] > start["fp_rate_refined"] + cfg.blend_max_fp_rise + 1e-12:
            return False
    return True


def choose_blend(ctx, starting: dict, tuned: dict, exclude: set[str]) -> tuple[dict, dict]:
    """``(bundle, report)``: ``tuned`` blended with ``starting`` by the largest α within the guard."""
    from training.evaluate import evaluate, format_report
    from training.inference import Predictor
    from training.phases.refiner_finetune import embedding_cache_for

    settings = ctx.cfg.finetune
    report: dict = {
        "guard": settings.blend_guard,
        "max_dice_drop": settings.blend_max_dice_drop,
        "max_fp_rise": settings.blend_max_fp_rise,
    }
    if settings.blend_guard == "none":
        return tuned, {**report, "status": "off", "alpha": 1.0}
    if same_weights(starting, tuned):
        return tuned, {
            **report,
            "status": "unchanged",
            "alpha": 0.0,
            "reason": "the run kept the starting weights",
        }
    samples, reason = guard_samples(ctx.cfg, starting, exclude)
    if reason is None:
        # The images this run trains or tests on (``exclude``), compared by content.
        run_images = [ctx.store.samples[i] for i in sorted(exclude) if i in ctx.store.samples]
        samples, dropped = without_run_images(samples, run_images, ctx.cfg)
        report["guard_duplicates_dropped"] = dropped
        if not any(sample.mask_paths for sample in samples):
            reason = "every lesion image among the starting model's validation images is in this run's data"
    if reason is not None:
        ctx.warn(f"fine-tuned weights kept unblended: {reason}", PHASE)
        return tuned, {**report, "status": "skipped", "alpha": 1.0, "reason": reason}

    candidates = [0.0, *settings.blend_alphas]
    total = len(candidates) * len(samples)
    done = 0

    def score(bundle: dict, alpha: float) -> dict:
        nonlocal done
        predictor = Predictor.from_bundle_dict(bundle, device=ctx.device)
        cache = embedding_cache_for(predictor.refiner, ctx.cfg.cache_dir)
        offset = done

        def on_image(index: int, count: int, record: dict) -> None:
            ctx.progress.set(PHASE, (offset + index + 1) / total)
            ctx.emit("step", phase=PHASE, step=offset + index, steps=total, extra={"alpha": alpha})
            if ctx.callback.should_stop():
                from training.callbacks import TrainingCancelled

                raise TrainingCancelled("training cancelled while choosing the blend")

        result = evaluate(predictor, samples, embedding_cache=cache, on_image=on_image, phase=None)
        done += len(samples)
        log.info("blend α=%.2f on %d guard images: %s", alpha, len(samples), format_report(result))
        return _summary(result)

    # α = 0: the starting weights, with this run's config and metrics — what the run ships when
    # no α is within the guard, and so the baseline every candidate is compared with.
    chosen_alpha, chosen = 0.0, blend_bundle(starting, tuned, 0.0)
    start_summary = score(chosen, 0.0)
    rows = []
    for alpha in settings.blend_alphas:
        bundle = blend_bundle(starting, tuned, alpha)
        summary = score(bundle, alpha)
        ok = within_guard(start_summary, summary, settings)
        rows.append({"alpha": alpha, **summary, "within_guard": ok})
        if ok:
            chosen_alpha, chosen = alpha, bundle
            break
    ctx.progress.set(PHASE, 1.0)
    report.update(
        status="chosen",
        alpha=chosen_alpha,
        guard_images=len(samples),
        start=start_summary,
        candidates=rows,
    )
    message = (
        f"blend α = {chosen_alpha:g} kept (the largest within the guard on {len(samples)} of the "
        "starting model's validation images)"
        if chosen_alpha
        else "no blend stays within the guard: the starting model's weights are kept"
    )
    ctx.emit("phase_end", phase=PHASE, message=message, extra={"alpha": chosen_alpha})
    return chosen, report
