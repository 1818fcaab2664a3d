"""Issue 16: can an image-level lesion-present gate stop the served model firing on lesion-free
images without losing lesions? Prints JSON.

The gate is a logistic regression on the refiner's own image embedding (the one pass serving
already makes: 256 × 64² from LiteMedSAM's frozen encoder), pooled over the image's valid
(unpadded) region by mean and max (512 features), optionally with three features of the served
masks (the coarse mask's peak probability and area, the refiner's predicted IoU). Gated images
get empty masks. Everything is decided without the validation fold:

* the gate is fitted on the training images of ``--fold`` (class-balanced, L2);
* its threshold is chosen by an inner K-fold cross-validation on those same training images:
  the highest threshold whose cross-validated lesion Dice (refined, as served) stays within
  ``--max-dice-loss`` of the ungated one;

then the validation fold (images neither the served model nor the gate trained on) says whether
it pays: refined Dice on lesion images and the false-positive rate on normal images, ungated
against gated. Embeddings go through the training pipeline's embedding cache (``--cache-dir``),
so later runs and phase 2b reuse them.

    python benchmarks/presence_gate.py --split-file models/default_split.json --fold 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.config import REPO_ROOT, SHARED_DATA_ROOT
from training.machine import describe


def pooled(embedding: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """``1×C×E×E`` embedding, ``1×1×L×L`` valid mask → mean and max over the valid cells (2C)."""
    cells = F.interpolate(valid.float(), size=embedding.shape[-2:], mode="area")[0, 0] > 0.5
    values = embedding[0][:, cells]  # C×N
    return torch.cat([values.mean(1), values.amax(1)]).numpy().astype(np.float64)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float, steps: int = 500
) -> tuple[np.ndarray, float, tuple]:
    """Class-balanced L2 logistic regression (LBFGS); returns weights, bias and the scaler."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.from_numpy((x - mean) / std)
    ys = torch.from_numpy(y.astype(np.float64))
    positive = ys.mean().clamp(1e-3, 1 - 1e-3)
    weights = torch.where(ys > 0, 0.5 / positive, 0.5 / (1 - positive))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = xs @ w + b
        loss = (F.binary_cross_entropy_with_logits(logits, ys, reduction="none") * weights).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy(), float(b.detach()), (mean, std)


def predict_logistic(model, x: np.ndarray) -> np.ndarray:
    w, b, (mean, std) = model
    return 1.0 / (1.0 + np.exp(-(((x - mean) / std) @ w + b)))


def scores(records: list[dict], keep: np.ndarray) -> dict:
    """Mean refined Dice over lesion images and FP rate over normal images, gated by ``keep``."""
    dice = [r["dice"] if k else 0.0 for r, k in zip(records, keep, strict=True) if r["lesion"]]
    fp = [r["fp"] and bool(k) for r, k in zip(records, keep, strict=True) if not r["lesion"]]
    return {
        "dice_refined": float(np.mean(dice)) if dice else None,
        "fp_rate_refined": float(np.mean(fp)) if fp else None,
        "lesions_gated_off": int(sum(1 for r, k in zip(records, keep, strict=True) if r["lesion"] and not k)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=SHARED_DATA_ROOT / "BUSI")
    parser.add_argument("--split-file", type=Path, default=REPO_ROOT / "models" / "default_split.json")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "models" / "default.pt")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache" / "embeddings")
    parser.add_argument("--inner-folds", type=int, default=5)
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--max-dice-loss", type=float, default=0.005)
    parser.add_argument("--limit", type=int, help="Only N training and N validation images (a smoke run).")
    parser.add_argument(
        "--busbra-root",
        type=Path,
        default=SHARED_DATA_ROOT / "BUSBRA-sample",
        help="Ultrasound from another hospital: gated lesions there are reported too (a look).",
    )
    args = parser.parse_args(argv)

    from training.data.datasets import list_samples, load_image, load_mask
    from training.data.splits import Split
    from training.evaluate import image_record
    from training.inference import Predictor
    from training.phases.refiner_finetune import embedding_cache_for

    split = Split.load(args.split_file)
    samples = {s.id: s for s in list_samples("busi", args.root)}
    train, val = split.train_ids(args.fold), split.val_ids(args.fold)
    if args.limit:
        train, val = train[: args.limit], val[: args.limit]
    other = list_samples("busbra", args.busbra_root) if args.busbra_root.is_dir() else []
    samples.update({f"busbra:{s.id}": s for s in other})
    other_ids = [f"busbra:{s.id}" for s in other]
    predictor = Predictor.from_bundle(args.bundle)
    cache = embedding_cache_for(predictor.refiner, args.cache_dir)

    started = time.monotonic()
    computed = 0
    rows: dict[str, dict] = {}
    for sample_id in [*train, *val, *other_ids]:
        sample = samples[sample_id]
        image, mask = load_image(sample.image_path), load_mask(sample)
        key = cache.key(image, predictor.backbone)
        embedding = cache.get(key)
        if embedding is None:
            with torch.inference_mode():
                refiner_image, _ = predictor.refiner.prepare(image)
                embedding = predictor.refiner.encode(refiner_image[None])[0]
            cache.put(key, embedding)
            computed += 1
        embedding = embedding.float()[None]
        prediction = predictor.predict(image, embedding=embedding)
        _, geometry = predictor.refiner.prepare(image)
        record = image_record(
            sample_id, sample.label, mask, prediction.coarse_probs, prediction.refined_probs
        )
        coarse = prediction.coarse_probs
        rows[sample_id] = {
            "lesion": record["lesion"],
            "dice": record.get("dice_refined", 0.0),
            "fp": record.get("fp_refined", False),
            "embedding": pooled(embedding, geometry.valid_mask()),
            "served": np.array([coarse.max(), (coarse >= 0.5).mean(), prediction.iou], dtype=np.float64),
        }
    prepare_s = time.monotonic() - started

    def features(ids: list[str], with_served: bool) -> np.ndarray:
        return np.stack(
            [
                np.concatenate([rows[i]["embedding"], rows[i]["served"]])
                if with_served
                else rows[i]["embedding"]
                for i in ids
            ]
        )

    labels = np.array([rows[i]["lesion"] for i in train])
    train_records = [rows[i] for i in train]
    val_records = [rows[i] for i in val]
    rng = np.random.default_rng(0)
    inner = rng.permutation(len(train)) % args.inner_folds
    report_variants = {}
    for name, with_served in (("embedding", False), ("embedding+served", True)):
        x_train = features(train, with_served)
        # inner cross-validation: out-of-fold gate probabilities of every training image
        oof = np.zeros(len(train))
        for k in range(args.inner_folds):
            held = inner == k
            model = fit_logistic(x_train[~held], labels[~held], args.l2)
            oof[held] = predict_logistic(model, x_train[held])
        ungated = scores(train_records, np.ones(len(train), dtype=bool))
        threshold = 0.0
        for candidate in np.linspace(0.05, 0.95, 19):
            gated = scores(train_records, oof >= candidate)
            if gated["dice_refined"] >= ungated["dice_refined"] - args.max_dice_loss:
                threshold = float(candidate)
        model = fit_logistic(x_train, labels, args.l2)
        val_probs = predict_logistic(model, features(val, with_served))
        auc_pairs = [(p, rows[i]["lesion"]) for p, i in zip(val_probs, val, strict=True)]
        positives = [p for p, lesion in auc_pairs if lesion]
        negatives = [p for p, lesion in auc_pairs if not lesion]
        auc = (
            float(np.mean([[1.0 if p > n else 0.5 if p == n else 0.0 for n in negatives] for p in positives]))
            if positives and negatives
            else None
        )
        entry = {
            "threshold": threshold,
            "inner_cv_train": {"ungated": ungated, "gated": scores(train_records, oof >= threshold)},
            "val_auc": auc,
            "val_gated": scores(val_records, val_probs >= threshold),
        }
        if other_ids:
            other_probs = predict_logistic(model, features(other_ids, with_served))
            entry["busbra_sample_gated"] = scores([rows[i] for i in other_ids], other_probs >= threshold)
        report_variants[name] = entry

    report = {
        "machine": describe(),
        "fold": args.fold,
        "n_train": len(train),
        "n_val": len(val),
        "n_val_normal": int(sum(not r["lesion"] for r in val_records)),
        "embeddings_computed": computed,
        "prepare_s": round(prepare_s, 1),
        "val_ungated": scores(val_records, np.ones(len(val), dtype=bool)),
        "busbra_sample_ungated": scores([rows[i] for i in other_ids], np.ones(len(other_ids), dtype=bool))
        if other_ids
        else None,
        "variants": report_variants,
    }
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
