"""Does refining a crop around the lesion beat refining the whole frame? Prints JSON.

With the ground-truth box as the prompt (so the coarse model plays no part), the refiner of a
bundle is run on lesion images of a validation fold three ways:

* ``full_frame``: the whole image (what the API serves);
* ``roi_mode``: the refiner's own ROI mode (``refiner.roi_mode``): a square crop of the refiner
  input around the box (``roi_margin``), re-encoded, pasted back;
* ``native_crop_<margin>``: a square crop of the *native* image around the box (side = box side ×
  (1 + 2·margin), zero outside the image) given to the refiner as an image of its own, pasted
  back — the most detail a crop can give the encoder.

    python benchmarks/roi_crop.py --split-file models/default_split.json --fold 0 --limit 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.inference import Predictor
from training.machine import describe
from training.modeling.losses import dice_score


def native_crop_dice(predictor: Predictor, image: np.ndarray, truth: np.ndarray, margin: float) -> float:
    """Dice of the refined mask of a native crop around the ground-truth box, pasted back."""
    height, width = truth.shape
    ys, xs = np.nonzero(truth)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    half = max(16.0, max(x1 - x0, y1 - y0) * (0.5 + margin))
    left, top = round((x0 + x1) / 2 - half), round((y0 + y1) / 2 - half)
    side = round(2 * half)
    canvas = np.zeros((side, side) + image.shape[2:], dtype=image.dtype)
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
    crop_mask = predictor.predict(canvas, box=[x0 - left, y0 - top, x1 - left, y1 - top]).refined_mask()
    pasted = np.zeros(truth.shape, dtype=bool)
    pasted[sy0:sy1, sx0:sx1] = crop_mask[sy0 - top : sy1 - top, sx0 - left : sx1 - left]
    return dice_score(pasted, truth)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split-file", type=Path, required=True, help="Split JSON of the bundle.")
    parser.add_argument("--fold", type=int, required=True, help="Validation fold to use.")
    parser.add_argument("--root", type=Path, default=SHARED_DATA_ROOT / "BUSI", help="BUSI root.")
    parser.add_argument("--model", type=Path, help="Bundle (default: the shipped default).")
    parser.add_argument("--limit", type=int, default=40, help="First N lesion images of the fold.")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.2, 1.0], help="Native-crop margins.")
    args = parser.parse_args(argv)

    try:
        samples = Split.load(args.split_file).val_samples(
            args.fold, list_samples("busi", args.root), str(args.root)
        )
    except (FileNotFoundError, IndexError, ValueError) as error:
        raise SystemExit(f"--split-file / --fold / --root: {error}") from None
    samples = [s for s in samples if s.label != "normal"][: args.limit]
    if not samples:
        raise SystemExit(f"no lesion image of fold {args.fold} under {args.root}")
    predictor = Predictor.from_bundle(args.model)
    roi_default = predictor.refiner.cfg.roi_mode
    scores: dict[str, list[float]] = {"full_frame": [], "roi_mode": []}
    scores.update({f"native_crop_{m:g}": [] for m in args.margins})

    started = time.perf_counter()
    for sample in samples:
        image, truth = load_image(sample.image_path), load_mask(sample)
        ys, xs = np.nonzero(truth)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        predictor.refiner.cfg.roi_mode = False
        full = predictor.predict(image, box=box)
        scores["full_frame"].append(dice_score(full.refined_mask(), truth))
        predictor.refiner.cfg.roi_mode = True
        roi = predictor.predict(image, box=box, embedding=full.embedding)
        scores["roi_mode"].append(dice_score(roi.refined_mask(), truth))
        predictor.refiner.cfg.roi_mode = False
        for margin in args.margins:
            scores[f"native_crop_{margin:g}"].append(native_crop_dice(predictor, image, truth, margin))
    predictor.refiner.cfg.roi_mode = roi_default

    report = {
        "machine": describe(),
        "model_version": predictor.model_version,
        "prompt": "ground-truth box",
        "fold": args.fold,
        "n_lesion_images": len(samples),
        "roi_margin": predictor.refiner.cfg.roi_margin,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "dice_refined": {name: round(statistics.fmean(values), 4) for name, values in scores.items()},
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
