"""Dice of the refined mask per inference engine (torch, ONNX Runtime fp32 / int8, OpenVINO fp32 /
bf16); prints JSON.

The same model is run over N BUSI lesion images (benign + malignant) once per engine of
``--engines`` (:mod:`backend.app.engines`: the engine runs the coarse TransUNet, the image
encoder and the mask decoder; prompt derivation and paste-back are the same torch code).
Two prompt modes:

* ``box`` (default): the ground-truth box as the clinician's prompt (the refiner alone, as in the
  zero-shot LiteMedSAM measurement) — isolates the refiner's part of the engine's effect;
* ``coarse``: the prompts derived from the served model's coarse mask (the full pipeline).

Reported per engine: mean Dice vs the ground truth, its delta to torch, the mean Dice agreement
with the torch masks, and the median encoder time.

    python benchmarks/accuracy_engines.py --n 30 [--model var/models/x.pt] [--prompt box]
    python benchmarks/accuracy_engines.py --split-file models/default_split.json --prompt coarse

``--split-file`` takes every lesion image of that split's held-out test set (``--n`` is then
ignored): the figure the serving issue asks for (the Dice drop of an engine on the test split).
With ``--fold K`` too it takes the lesion images of validation fold K instead, which is where a
choice between engine recipes is made (the test split only reports the chosen one):

    python benchmarks/accuracy_engines.py --split-file models/default_split.json --fold 0 --prompt coarse

``--encoder-crop-multiple`` overrides the bundle's encoder crop rule (``0``: the full padded
input), to compare the crop with the full input on the same images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.app.engines import ENGINE_NAMES, accelerate_predictor
from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.evaluate import truth_box
from training.inference import Predictor
from training.machine import describe
from training.modeling.losses import dice_score


def _has_lesion(sample) -> bool:
    return sample.label != "normal" and bool(sample.mask_paths)


def lesion_samples(root: Path, n: int, split_file: Path | None = None, fold: int | None = None) -> list:
    samples = list_samples("busi", root)
    if split_file is not None:
        split = Split.load(split_file)
        try:
            if fold is None:
                chosen = split.test_samples(samples, str(root))
            else:
                chosen = split.val_samples(fold, samples, str(root))
        except IndexError:
            raise SystemExit(f"--fold {fold}: the split has folds 0..{len(split.folds) - 1}") from None
        return [s for s in chosen if _has_lesion(s)]
    if fold is not None:
        raise SystemExit("--fold needs --split-file")
    samples = [s for s in samples if _has_lesion(s)]
    # Alternate benign and malignant so a small N still covers both.
    benign = [s for s in samples if s.label == "benign"]
    malignant = [s for s in samples if s.label == "malignant"]
    mixed = [s for pair in zip(benign, malignant, strict=False) for s in pair]
    return mixed[:n]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20, help="BUSI lesion images.")
    parser.add_argument("--root", type=Path, default=SHARED_DATA_ROOT / "BUSI", help="BUSI root.")
    parser.add_argument("--model", type=Path, help="Bundle (default: shipped default / untrained).")
    parser.add_argument("--prompt", choices=["box", "coarse"], default="box")
    parser.add_argument("--engines", default=",".join(ENGINE_NAMES), help="Comma-separated engines.")
    parser.add_argument("--onnx-cache", type=Path, help="ONNX cache dir (default: a temporary one).")
    parser.add_argument("--split-file", type=Path, help="Use every lesion image of this split's test set.")
    parser.add_argument(
        "--fold", type=int, help="With --split-file: the lesion images of this validation fold instead."
    )
    parser.add_argument(
        "--encoder-crop-multiple",
        type=int,
        help="Override the bundle's refiner.encoder_crop_multiple (0: encode the full padded input).",
    )
    args = parser.parse_args(argv)

    samples = lesion_samples(args.root, args.n, args.split_file, args.fold)
    if not samples:
        raise SystemExit(f"no BUSI lesion images under {args.root}")
    images = [load_image(s.image_path) for s in samples]
    truths = [load_mask(s) for s in samples]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    cache_dir = args.onnx_cache or Path(tempfile.mkdtemp(prefix="ultrarefiner-onnx-"))

    masks: dict[str, list[np.ndarray]] = {}
    report: dict = {
        "machine": describe(),
        "n_images": len(samples),
        "images": (
            "first benign/malignant"
            if args.split_file is None
            else ("test split" if args.fold is None else f"validation fold {args.fold}")
        ),
        "prompt": args.prompt,
        "image_names": [Path(s.image_path).name for s in samples],
        "engines": {},
    }
    for engine in engines:
        predictor = Predictor.from_bundle(args.model)
        report["model_version"] = predictor.model_version
        if args.encoder_crop_multiple is not None:
            try:
                predictor.use_encoder_crop(args.encoder_crop_multiple)
            except ValueError:  # pydantic's ValidationError: the config field's bounds
                raise SystemExit(
                    "--encoder-crop-multiple must be 0 or a positive multiple of 4 "
                    f"(got {args.encoder_crop_multiple})"
                ) from None
        report["encoder_crop_multiple"] = predictor.config.refiner.encoder_crop_multiple
        started = time.perf_counter()
        accelerate_predictor(predictor, engine, cache_dir)
        prepare_s = time.perf_counter() - started
        dices, encoder_ms = [], []
        masks[engine] = []
        for image, truth in zip(images, truths, strict=True):
            started = time.perf_counter()
            embedding = predictor.embed(image)
            encoder_ms.append((time.perf_counter() - started) * 1000.0)
            box = truth_box(truth) if args.prompt == "box" else None
            prediction = predictor.predict(image, embedding=embedding, box=box)
            mask = prediction.refined_mask()
            masks[engine].append(mask)
            dices.append(dice_score(mask, truth))
        report["engines"][engine] = {
            "dice_mean": round(statistics.fmean(dices), 4),
            # Per image, in the order of "image_names": to compare two runs image by image.
            "dice_per_image": [round(float(d), 4) for d in dices],
            "encoder_ms_median": round(statistics.median(encoder_ms), 1),
            "prepare_s": round(prepare_s, 1),
        }
    if "torch" in masks:
        base = report["engines"]["torch"]["dice_mean"]
        for engine in engines:
            entry = report["engines"][engine]
            entry["dice_delta_vs_torch"] = round(entry["dice_mean"] - base, 4)
            agreement = [dice_score(a, b) for a, b in zip(masks[engine], masks["torch"], strict=True)]
            entry["agreement_dice_vs_torch"] = round(statistics.fmean(agreement), 4)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
