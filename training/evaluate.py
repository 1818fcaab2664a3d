"""The one evaluation protocol (CLI, worker, store and reports all use it).

* **Lesion images** (non-empty ground truth): Dice per image at the native resolution of the
  image, thresholding probabilities at 0.5, then the mean over images — for the coarse (baseline)
  and the refined mask, side by side, with ``delta = dice_refined - dice_coarse``.
* **Normal images** (empty ground truth) are reported separately, never averaged into Dice:
  ``fp_rate_*`` is the fraction of normal images on which the mask is *not* empty (a false-positive
  detection) and ``empty_correct_*`` the fraction on which it is empty (``1 - fp_rate``);
  ``fp_pixels_*`` is the mean fraction of the image wrongly marked as lesion.

Report keys: ``n_images``, ``dice_coarse``, ``dice_refined``, ``delta``, ``per_image``, ``normal``
(``n_images``, ``fp_rate_coarse``, ``fp_rate_refined``, ``empty_correct_coarse``,
``empty_correct_refined``, ``fp_pixels_coarse``, ``fp_pixels_refined``), plus ``threshold`` and
``model_version``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from training.callbacks import ProgressEvent, TrainingCallback
from training.modeling.losses import dice_score

THRESHOLD = 0.5


def coarse_finds_lesion(coarse_probs, valid=None, threshold: float = THRESHOLD) -> bool:
    """Whether a coarse probability map (any shape; refiner space with its ``valid`` mask of the
    same shape, which excludes the padding) has a lesion pixel: at least ``threshold``."""
    if valid is not None:
        coarse_probs = coarse_probs * valid
    return bool(coarse_probs.max() >= threshold)


def refines_coarse(coarse_found_lesion: bool, refiner_cfg) -> bool:
    """Whether the serving path refines a coarse mask: when it found a lesion, or always with
    ``refine_empty_coarse`` (the refiner refines, it does not detect)."""
    return coarse_found_lesion or refiner_cfg.refine_empty_coarse


def served_refined(
    refined: np.ndarray, coarse: np.ndarray, coarse_found_lesion: bool, refiner_cfg
) -> np.ndarray:
    """The refined mask the serving path (:class:`training.inference.Predictor`) returns for these
    native-resolution probabilities: the refiner's, except that with ``refine_empty_coarse`` off a
    coarse mask without a lesion is returned as it is (the refiner refines, it does not detect).
    Validation of phases 2b and 3 scores the same rule, so a best epoch is chosen on what users get."""
    return refined if refines_coarse(coarse_found_lesion, refiner_cfg) else coarse


def image_record(
    sample_id: str,
    label: str,
    ground_truth: np.ndarray,
    coarse_probs: np.ndarray,
    refined_probs: np.ndarray | None = None,
    *,
    iou: float | None = None,
    threshold: float = THRESHOLD,
) -> dict:
    """Per-image entry of a report: Dice (lesion images) or false positives (normal images)."""
    truth = np.asarray(ground_truth, dtype=bool)
    record: dict = {"id": sample_id, "label": label, "lesion": bool(truth.any())}
    for name, probs in (("coarse", coarse_probs), ("refined", refined_probs)):
        if probs is None:
            continue
        if probs.shape != truth.shape:
            raise ValueError(f"{sample_id}: {name} prediction {probs.shape} ≠ ground truth {truth.shape}")
        predicted = np.asarray(probs) >= threshold
        if record["lesion"]:
            record[f"dice_{name}"] = float(dice_score(predicted, truth))
        else:
            record[f"fp_{name}"] = bool(predicted.any())
            record[f"fp_pixels_{name}"] = float(predicted.mean())
    if iou is not None:
        record["iou_pred"] = float(iou)
    return record


def truth_box(mask: np.ndarray) -> list[float]:
    """The tight box ``[x0, y0, x1, y1]`` (pixels, exclusive end) of a non-empty mask: the box a
    clinician would draw around the lesion, as the refiner's prompt."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError("an empty mask has no box")
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarize(
    records: Iterable[dict], threshold: float = THRESHOLD, model_version: str | None = None
) -> dict:
    """Aggregate :func:`image_record` entries into the report dict."""
    records = list(records)
    lesion = [r for r in records if r["lesion"]]
    normal = [r for r in records if not r["lesion"]]
    dice_coarse = _mean([r["dice_coarse"] for r in lesion if "dice_coarse" in r])
    dice_refined = _mean([r["dice_refined"] for r in lesion if "dice_refined" in r])
    delta = None if dice_coarse is None or dice_refined is None else dice_refined - dice_coarse
    normal_report: dict = {"n_images": len(normal)}
    for name in ("coarse", "refined"):
        flags = [float(r[f"fp_{name}"]) for r in normal if f"fp_{name}" in r]
        fp_rate = _mean(flags)
        normal_report[f"fp_rate_{name}"] = fp_rate
        normal_report[f"empty_correct_{name}"] = None if fp_rate is None else 1.0 - fp_rate
        normal_report[f"fp_pixels_{name}"] = _mean(
            [r[f"fp_pixels_{name}"] for r in normal if f"fp_pixels_{name}" in r]
        )
    return {
        "n_images": len(lesion),
        "dice_coarse": dice_coarse,
        "dice_refined": dice_refined,
        "delta": delta,
        "per_image": records,
        "normal": normal_report,
        "threshold": threshold,
        "model_version": model_version,
    }


def evaluate(
    predictor,
    samples: Sequence,
    *,
    threshold: float = THRESHOLD,
    embedding_cache=None,
    callback: TrainingCallback | None = None,
    on_image: Callable[[int, int, dict], None] | None = None,
    phase: str | None = "evaluation",
    stage: str = "final",
) -> dict:
    """Run ``predictor`` (a :class:`training.inference.Predictor`) on ``samples`` and report Dice.

    ``embedding_cache`` (an :class:`~training.data.embedding_cache.EmbeddingCache`) skips the image
    encoder for images already embedded. ``on_image(index, total, record)`` is called per image.
    """
    from training.data.datasets import load_image, load_mask

    started = time.monotonic()
    records = []
    for index, sample in enumerate(samples):
        image = load_image(sample.image_path)
        truth = load_mask(sample)
        embedding = None
        if embedding_cache is not None:
            embedding = embedding_cache.get_or_compute(image, predictor.refiner)
        prediction = predictor.predict(image, embedding=embedding)
        record = image_record(
            sample.id,
            sample.label,
            truth,
            prediction.coarse_probs,
            prediction.refined_probs,
            iou=prediction.iou,
            threshold=threshold,
        )
        records.append(record)
        if on_image is not None:
            on_image(index, len(samples), record)
        if callback is not None and callback.should_stop():
            from training.callbacks import TrainingCancelled

            raise TrainingCancelled("evaluation cancelled")
    report = summarize(records, threshold=threshold, model_version=getattr(predictor, "model_version", None))
    report["elapsed_s"] = time.monotonic() - started
    if callback is not None:
        callback.on_event(
            ProgressEvent(
                kind="evaluation",
                phase=phase,
                dice=report["dice_refined"],
                elapsed_s=report["elapsed_s"],
                message=format_report(report),
                extra={**{k: v for k, v in report.items() if k != "per_image"}, "stage": stage},
            )
        )
    return report


def by_dataset(report: dict, dataset_of: Callable[[str], str]) -> dict[str, dict]:
    """The report of each dataset of a pooled evaluation (``dataset_of``: image id → dataset
    name), each without its per-image list."""
    groups: dict[str, list[dict]] = {}
    for record in report["per_image"]:
        groups.setdefault(dataset_of(record["id"]), []).append(record)
    parts = {}
    for name, records in groups.items():
        part = summarize(records, threshold=report["threshold"], model_version=report.get("model_version"))
        part.pop("per_image")
        parts[name] = part
    return parts


def format_report(report: dict) -> str:
    """One line: ``Dice coarse 0.712 → refined 0.745 (Δ +0.033) on 42 lesion images; …``."""

    def number(value, signed=False):
        if value is None:
            return "n/a"
        return f"{value:+.3f}" if signed else f"{value:.3f}"

    text = (
        f"Dice coarse {number(report['dice_coarse'])} → refined {number(report['dice_refined'])} "
        f"(Δ {number(report['delta'], signed=True)}) on {report['n_images']} lesion images"
    )
    normal = report["normal"]
    if normal["n_images"]:
        text += (
            f"; {normal['n_images']} normal images: FP rate coarse {number(normal['fp_rate_coarse'])}, "
            f"refined {number(normal['fp_rate_refined'])}"
        )
    return text
