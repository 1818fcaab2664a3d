"""Averaged coarse models against the served single one, through the serving path; prints JSON.

The members are phase-1 checkpoints (``coarse/fold*/best.pt`` of a run) averaged at the logit level
(:class:`training.modeling.coarse_ensemble.MeanLogits`), optionally with the bundle's own coarse
model, and feed the bundle's refiner through :class:`training.inference.Predictor` and the one
evaluation protocol (:func:`training.evaluate.evaluate`): mean coarse and refined Dice over lesion
images at native resolution, and the normal-image false-positive rates.

Decide on validation images that **no member trained on**:

* a seed ensemble — members trained on the same fold's training images with other ``--seed``\\ s —
  is judged on that fold's validation images (``--split-file … --fold K``);
* the K fold models of one run (``--run-dir``) have no such fold (each fold's validation images are
  the other folds' training images): only the test split (``--test``) is unseen by all of them, so
  that figure is a record, not a basis for a choice;
* ``--dataset busbra --root …`` scores every image of another dataset (a look, not a choice).

    python benchmarks/coarse_ensemble.py --split-file models/default_split.json --fold 0 \\
        --members runs/seed43/coarse/fold0/best.pt runs/seed44/coarse/fold0/best.pt
    python benchmarks/coarse_ensemble.py --run-dir runs/compact-e30 --test --without-bundle-coarse
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.data.datasets import DATASETS, list_samples
from training.data.splits import Split
from training.evaluate import evaluate
from training.inference import Predictor
from training.machine import describe
from training.modeling.coarse_ensemble import MeanLogits
from training.modeling.coarse_registry import coarse_in_channels, coarse_input_size, load_coarse_checkpoint
from training.phases.context import COARSE_DIR
from training.phases.refiner_finetune import embedding_cache_for


def _summary(report: dict) -> dict:
    normal = report["normal"]
    return {
        "dice_coarse": round(report["dice_coarse"], 4) if report["dice_coarse"] is not None else None,
        "dice_refined": round(report["dice_refined"], 4) if report["dice_refined"] is not None else None,
        "n_lesion_images": report["n_images"],
        "n_normal_images": normal["n_images"],
        "normal_fp_rate_coarse": normal["fp_rate_coarse"],
        "normal_fp_rate_refined": normal["fp_rate_refined"],
    }


def _samples(args, predictor: Predictor) -> tuple[list, str]:
    if args.dataset is not None:
        if args.root is None:
            raise SystemExit("--dataset needs --root")
        return list_samples(args.dataset, args.root), f"all of {args.dataset}"
    split_file = args.split_file or (args.run_dir / "split.json" if args.run_dir else None)
    if split_file is None or (args.fold is None) == (not args.test):
        raise SystemExit(
            "choose the images: --split-file (or --run-dir) with --fold K or --test, or --dataset"
        )
    cfg = predictor.config
    root = args.root or cfg.data.root
    samples = list_samples(cfg.data.dataset, root)
    split = Split.load(split_file)
    if args.test:
        return split.test_samples(samples, source=str(root)), "test split"
    return split.val_samples(args.fold, samples, source=str(root)), f"validation fold {args.fold}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, help="Bundle: refiner and served coarse model (default: shipped)."
    )
    parser.add_argument("--members", type=Path, nargs="*", default=[], help="Phase-1 coarse checkpoints.")
    parser.add_argument(
        "--run-dir", type=Path, help="Add every fold model of this run (coarse/fold*/best.pt)."
    )
    parser.add_argument(
        "--without-bundle-coarse",
        action="store_true",
        help="Average the members only, not the bundle's model.",
    )
    parser.add_argument("--split-file", type=Path, help="Split JSON (default with --run-dir: the run's).")
    parser.add_argument("--fold", type=int, help="Score this fold's validation images.")
    parser.add_argument("--test", action="store_true", help="Score the test split.")
    parser.add_argument("--dataset", choices=DATASETS, help="Score every image of this dataset instead.")
    parser.add_argument("--root", type=Path, help="Dataset root (default: the bundle's).")
    args = parser.parse_args(argv)

    predictor = Predictor.from_bundle(args.bundle)
    cfg = predictor.config
    samples, images = _samples(args, predictor)
    paths = list(args.members)
    if args.run_dir is not None:
        paths += sorted((args.run_dir / COARSE_DIR).glob("fold*/best.pt"))
    members, inputs = [], set()
    for path in paths:
        try:
            model, member_cfg = load_coarse_checkpoint(cfg, path)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
            # One line, not a traceback: a wrong path, not a checkpoint, or another architecture.
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SystemExit(f"--members / --run-dir: {path}: {detail}") from None
        members.append(model)
        inputs.add((coarse_input_size(member_cfg), coarse_in_channels(member_cfg)))
    if not args.without_bundle_coarse:
        members.insert(0, predictor.coarse)
        inputs.add((predictor.coarse_size, predictor.coarse_channels))
    if len(members) < 2:
        raise SystemExit(f"{len(members)} coarse model(s): an ensemble needs two or more")
    if len(inputs) > 1:
        raise SystemExit(
            "--members / --run-dir: the coarse models read images of different sizes or channels "
            f"({', '.join(f'{size} px × {channels}' for size, channels in sorted(inputs))}); "
            "average models of one architecture (--without-bundle-coarse to leave the bundle's out)"
        )
    cache = embedding_cache_for(predictor.refiner, cfg.cache_dir)

    started = time.perf_counter()
    results = {"served": _summary(evaluate(predictor, samples, embedding_cache=cache))}
    # Every member reads the same input (checked above), so any member's config names it.
    predictor.replace_coarse(MeanLogits(members), member_cfg if paths else cfg)
    results[f"mean_of_{len(members)}"] = _summary(evaluate(predictor, samples, embedding_cache=cache))
    report = {
        "machine": describe(),
        "model_version": predictor.model_version,
        "images": images,
        "members": (["bundle"] if not args.without_bundle_coarse else []) + [str(path) for path in paths],
        "elapsed_s": round(time.perf_counter() - started, 1),
        **results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
