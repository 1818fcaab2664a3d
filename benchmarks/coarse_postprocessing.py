"""Inference-time variants of the coarse mask and their effect on refined Dice; prints JSON.

Variants (each wraps the served model's coarse TransUNet; the refiner is unchanged):

* ``base``: the coarse logits as the network gives them (the served tiny-mask rule off);
* ``largest``: only the connected component (of coarse probability ≥ 0.5) with the largest
  probability mass stays a lesion; other islands become background before prompts are derived;
* ``flip``: the mean of the coarse logits of the image and of its horizontal mirror;
* ``flip+largest``: both;
* ``min-area-<p>%``: lesion components smaller than p % of the frame become background (no
  assumption on the number of lesions);
* ``min-total-<p>%``: no lesion where the whole coarse lesion covers under p % of the frame (the
  served rule, ``refiner.min_lesion_fraction``, at p/100); a larger mask stays whole.

Decide on a **validation** fold of the served coarse model (``--fold``: the images it was not
trained on), never on the test split. Reported per variant: mean coarse and refined Dice over
lesion images (native resolution) and the share of normal images with any coarse / refined
lesion pixel. The image embedding is computed once per image and shared by the variants.

    python benchmarks/coarse_postprocessing.py --split-file models/default_split.json --fold 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from backend.app.engines import DEFAULT_ENGINE, ENGINE_CHOICES, accelerate_predictor, resolve_engine
from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.evaluate import image_record, summarize
from training.inference import Predictor
from training.machine import describe
from training.modeling.lesion_filter import EMPTY_LOGIT_MARGIN, drop_tiny_masks_from_logits


class FlipAveraged(nn.Module):
    """``B×C×S×S → B×2×S×S``: mean logits of the image and of its horizontal mirror."""

    def __init__(self, coarse: nn.Module) -> None:
        super().__init__()
        self.coarse = coarse

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.coarse(images) + self.coarse(images.flip(-1)).flip(-1))


def _components_to_background(coarse_logits: torch.Tensor, dropped) -> torch.Tensor:
    """``B×2×S×S`` logits with the pixels ``dropped(labels, count, probs)`` chooses (a boolean map
    from the labelled components of probability ≥ 0.5) made background; images without a lesion
    component are left as they are."""
    lesion_probs = coarse_logits.softmax(dim=1)[:, 1].cpu().numpy()
    kept = coarse_logits.clone()
    for index, probs in enumerate(lesion_probs):
        labels, count = ndimage.label(probs >= 0.5)
        if count == 0:
            continue
        pixels = torch.from_numpy(dropped(labels, count, probs))
        kept[index, 1][pixels] = kept[index, 0][pixels] - EMPTY_LOGIT_MARGIN
    return kept


class LargestComponent(nn.Module):
    """Keeps the lesion component with the largest probability mass; other islands → background."""

    def __init__(self, coarse: nn.Module) -> None:
        super().__init__()
        self.coarse = coarse

    @staticmethod
    def _islands(labels: np.ndarray, count: int, probs: np.ndarray) -> np.ndarray:
        mass = ndimage.sum(probs, labels, index=np.arange(1, count + 1))
        return (labels > 0) & (labels != 1 + int(np.argmax(mass)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _components_to_background(self.coarse(images), self._islands)


class MinimumArea(nn.Module):
    """Lesion components (probability ≥ 0.5) smaller than ``fraction`` of the frame → background,
    one by one (measured, not served: it cuts a real lesion the coarse model split into pieces)."""

    def __init__(self, coarse: nn.Module, fraction: float) -> None:
        super().__init__()
        self.coarse, self.fraction = coarse, fraction

    def _specks(self, labels: np.ndarray, count: int, probs: np.ndarray) -> np.ndarray:
        areas = np.bincount(labels.ravel(), minlength=count + 1)[1:] / probs.size
        return np.isin(labels, np.flatnonzero(areas < self.fraction) + 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _components_to_background(self.coarse(images), self._specks)


class MinimumTotalArea(nn.Module):
    """The served rule (:mod:`training.modeling.lesion_filter`) at another ``fraction``: no lesion
    where the whole coarse mask covers under ``fraction`` of the frame; a larger mask stays whole."""

    def __init__(self, coarse: nn.Module, fraction: float) -> None:
        super().__init__()
        self.coarse, self.fraction = coarse, fraction

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return drop_tiny_masks_from_logits(self.coarse(images), self.fraction)


#: Each variant wraps the engine's coarse model; the served tiny-mask rule is switched off inside
#: the predictor while variants run, so ``min-total-*`` and ``base`` (no rule) say what it buys.
VARIANTS = {
    "base": lambda coarse: coarse,
    "largest": LargestComponent,
    "flip": FlipAveraged,
    "flip+largest": lambda coarse: LargestComponent(FlipAveraged(coarse)),
    "min-area-0.05%": lambda coarse: MinimumArea(coarse, 0.0005),
    "min-area-0.1%": lambda coarse: MinimumArea(coarse, 0.001),
    "min-area-0.2%": lambda coarse: MinimumArea(coarse, 0.002),
    "min-area-0.3%": lambda coarse: MinimumArea(coarse, 0.003),
    "min-total-0.1%": lambda coarse: MinimumTotalArea(coarse, 0.001),
    "min-total-0.2%": lambda coarse: MinimumTotalArea(coarse, 0.002),
    "min-total-0.3%": lambda coarse: MinimumTotalArea(coarse, 0.003),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split-file", type=Path, required=True, help="Split JSON of the served model.")
    parser.add_argument("--fold", type=int, required=True, help="Validation fold of the served coarse model.")
    parser.add_argument("--root", type=Path, default=SHARED_DATA_ROOT / "BUSI", help="BUSI root.")
    parser.add_argument("--model", type=Path, help="Bundle (default: shipped default).")
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default=DEFAULT_ENGINE,
        help="Inference engine (default: the served default).",
    )
    parser.add_argument("--onnx-cache", type=Path, help="ONNX cache dir (default: a temporary one).")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"Comma-separated, of: {', '.join(VARIANTS)}."
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown or not chosen:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")

    try:
        samples = Split.load(args.split_file).val_samples(
            args.fold, list_samples("busi", args.root), str(args.root)
        )
    except (FileNotFoundError, IndexError, ValueError) as error:
        raise SystemExit(f"--split-file / --fold / --root: {error}") from None
    predictor = Predictor.from_bundle(args.model)
    cache_dir = args.onnx_cache or Path(tempfile.mkdtemp(prefix="ultrarefiner-onnx-"))
    accelerate_predictor(predictor, args.engine, cache_dir)
    served_coarse = predictor.coarse
    served_fraction = predictor.refiner.cfg.min_lesion_fraction
    predictor.refiner.cfg = predictor.refiner.cfg.model_copy(update={"min_lesion_fraction": 0.0})
    variants = {name: VARIANTS[name](served_coarse) for name in dict.fromkeys(["base", *chosen])}
    records: dict[str, list[dict]] = {name: [] for name in variants}

    started = time.perf_counter()
    for sample in samples:
        image = load_image(sample.image_path)
        truth = load_mask(sample)  # all background for a normal image
        embedding = None
        for name, coarse in variants.items():
            predictor.coarse = coarse
            prediction = predictor.predict(image, embedding=embedding)
            embedding = embedding if prediction.embedding is None else prediction.embedding
            probs = prediction.coarse_probs, prediction.refined_probs
            records[name].append(image_record(sample.id, sample.label, truth, *probs))
    predictor.coarse = served_coarse
    # The evaluation protocol's figures (training.evaluate), rounded for the report.
    summaries = {name: summarize(entries) for name, entries in records.items()}

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    base = summaries["base"]
    report = {
        "machine": describe(),
        "model_version": predictor.model_version,
        "engine": resolve_engine(args.engine),
        "served_min_lesion_fraction": served_fraction,
        "fold": args.fold,
        "n_lesion_images": base["n_images"],
        "n_normal_images": base["normal"]["n_images"],
        "elapsed_s": round(time.perf_counter() - started, 1),
        "variants": {
            name: {
                "dice_coarse": rounded(summary["dice_coarse"]),
                "dice_refined": rounded(summary["dice_refined"]),
                "normal_fp_rate_coarse": rounded(summary["normal"].get("fp_rate_coarse")),
                "normal_fp_rate_refined": rounded(summary["normal"].get("fp_rate_refined")),
            }
            for name, summary in summaries.items()
        },
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
