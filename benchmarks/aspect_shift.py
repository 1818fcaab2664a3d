"""How the served model copes with a field of view of another shape; prints JSON.

Scanners and exports crop the ultrasound frame differently: BUSI frames are landscape (median
width/height 1.2, 5th–95th percentile 0.99–1.54), the BUS-BRA sample's are portrait (0.71–1.05).
The coarse model sees the whole frame squeezed to a square, so a lesion in a portrait frame
reaches it wider than any training lesion did. This probe simulates that on a **validation**
fold of the served coarse model (images it never trained on):

* ``full``: the validation image as it is;
* ``portrait``: a crop of it ``--aspect`` × its height wide (default 0.74, the BUS-BRA sample's
  median), placed around the lesion's bounding box (centred on it, kept inside the frame); normal
  images are cropped at the centre; images already that narrow are left whole;
* ``portrait+canvas``: the same crop given to the served model with the frame widened (black
  columns either side) to ``--canvas-aspect`` (default 1.2, BUSI's median) when it is narrower
  than that; the masks are cut back to the crop.
* ``full+canvas``: the whole validation image, widened the same way where it is narrower.

Reported per variant: mean coarse / refined Dice of the lesion images (native resolution of the
image as given) and the share of normal images with any coarse / refined lesion pixel.

    python benchmarks/aspect_shift.py --split-file models/default_split.json --fold 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.app.engines import DEFAULT_ENGINE, ENGINE_CHOICES, accelerate_predictor, resolve_engine
from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.evaluate import image_record, summarize
from training.inference import Predictor
from training.machine import describe
from training.modeling.coarse_registry import load_coarse_checkpoint

VARIANTS = ("full", "portrait", "portrait+canvas", "full+canvas")


def portrait_window(mask: np.ndarray, aspect: float) -> tuple[int, int]:
    """Columns ``[x0, x1)`` of a crop ``aspect`` × height wide, centred on the lesion's columns
    (on the frame's centre where ``mask`` is empty) and kept inside the frame."""
    height, width = mask.shape
    crop = min(width, max(1, round(aspect * height)))
    columns = np.flatnonzero(mask.any(axis=0))
    centre = (int(columns[0]) + int(columns[-1]) + 1) / 2 if columns.size else width / 2
    x0 = min(max(0, int(round(centre - crop / 2))), width - crop)
    return x0, x0 + crop


def widen(image: np.ndarray, aspect: float) -> tuple[np.ndarray, int]:
    """The image with black columns either side up to ``aspect`` (width/height); its left offset."""
    height, width = image.shape[:2]
    target = round(aspect * height)
    if width >= target:
        return image, 0
    left = (target - width) // 2
    pad = [(0, 0), (left, target - width - left)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad), left


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split-file", type=Path, required=True, help="Split JSON of the served model.")
    parser.add_argument("--fold", type=int, required=True, help="Validation fold of the served coarse model.")
    parser.add_argument("--root", type=Path, default=SHARED_DATA_ROOT / "BUSI", help="BUSI root.")
    parser.add_argument("--model", type=Path, help="Bundle (default: shipped default).")
    parser.add_argument(
        "--coarse",
        type=Path,
        help="A phase-1 checkpoint (coarse/fold<k>/best.pt) in place of the bundle's coarse model.",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default=DEFAULT_ENGINE,
        help="Inference engine (default: the served default).",
    )
    parser.add_argument("--onnx-cache", type=Path, help="ONNX cache dir (default: a temporary one).")
    parser.add_argument("--aspect", type=float, default=0.74, help="Width/height of the portrait crop.")
    parser.add_argument("--canvas-aspect", type=float, default=1.2, help="Width/height of the widened frame.")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"Comma-separated, of: {', '.join(VARIANTS)}."
    )
    parser.add_argument("--limit", type=int, help="Only the first N images (a quick look).")
    args = parser.parse_args(argv)

    try:
        samples = Split.load(args.split_file).val_samples(
            args.fold, list_samples("busi", args.root), str(args.root)
        )
    except (FileNotFoundError, IndexError, ValueError) as error:
        raise SystemExit(f"--split-file / --fold / --root: {error}") from None
    samples = samples[: args.limit] if args.limit else samples
    predictor = Predictor.from_bundle(args.model)
    if args.coarse is not None:
        try:
            predictor.replace_coarse(*load_coarse_checkpoint(predictor.config, args.coarse))
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SystemExit(f"--coarse: {args.coarse}: {detail}") from None
    accelerate_predictor(
        predictor, args.engine, args.onnx_cache or Path(tempfile.mkdtemp(prefix="ultrarefiner-onnx-"))
    )

    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")
    records: dict[str, list[dict]] = {name: [] for name in variants}
    cropped = 0
    started = time.perf_counter()
    for sample in samples:
        image = load_image(sample.image_path)
        truth = load_mask(sample) if sample.label != "normal" else None
        lesion = truth if truth is not None else np.zeros(image.shape[:2], dtype=bool)
        x0, x1 = portrait_window(lesion, args.aspect)
        cropped += int(x1 - x0 < image.shape[1])
        inputs = {
            "full": (image, truth),
            "portrait": (image[:, x0:x1], None if truth is None else truth[:, x0:x1]),
        }
        inputs["portrait+canvas"] = inputs["portrait"]
        inputs["full+canvas"] = inputs["full"]
        for name in variants:
            given, given_truth = inputs[name]
            offset, width = 0, given.shape[1]
            if name.endswith("+canvas"):
                given, offset = widen(given, args.canvas_aspect)
            prediction = predictor.predict(np.ascontiguousarray(given))
            columns = slice(offset, offset + width)
            truth_given = given_truth if given_truth is not None else np.zeros(given.shape[:2], dtype=bool)
            records[name].append(
                image_record(
                    sample.id,
                    sample.label,
                    truth_given,
                    prediction.coarse_probs[:, columns],
                    prediction.refined_probs[:, columns],
                )  # fmt: skip
            )
    summaries = {name: summarize(entries) for name, entries in records.items()}

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    report = {
        "machine": describe(),
        "model_version": predictor.model_version,
        "coarse_checkpoint": str(args.coarse) if args.coarse else None,
        "engine": resolve_engine(args.engine),
        "fold": args.fold,
        "aspect": args.aspect,
        "canvas_aspect": args.canvas_aspect,
        "n_lesion_images": summaries[variants[0]]["n_images"],
        "n_normal_images": summaries[variants[0]]["normal"]["n_images"],
        "n_cropped": cropped,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "variants": {
            name: {
                "dice_coarse": rounded(summary["dice_coarse"]),
                "dice_refined": rounded(summary["dice_refined"]),
                "normal_fp_rate_coarse": rounded(summary["normal"]["fp_rate_coarse"]),
                "normal_fp_rate_refined": rounded(summary["normal"]["fp_rate_refined"]),
            }
            for name, summary in summaries.items()
        },
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
