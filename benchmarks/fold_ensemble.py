"""The K phase-1 fold models averaged as one coarse segmenter, against the final (single) one; prints JSON.

Phase 1 trains one TransUNet per cross-validation fold and keeps the best as the final coarse
model. This measures what averaging all of them would give instead: the mean of the folds' coarse
logits feeds the same refiner (the run's bundle) through the serving path (``Predictor``), on the
**test split** — the only images none of the fold models trained on (each fold's validation
images are training images of the other folds, so no validation fold can judge an ensemble).
Reported for both: mean coarse and refined Dice over lesion images at native resolution, Δ, and
the normal-image false-positive rates (``training.evaluate``).

    python benchmarks/fold_ensemble.py --run-dir runs/compact-e30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from training.checkpoints import load_checkpoint
from training.data.datasets import list_samples
from training.data.splits import Split
from training.evaluate import evaluate
from training.inference import Predictor
from training.machine import describe
from training.modeling.coarse_registry import build_coarse
from training.phases.context import COARSE_DIR
from training.phases.refiner_finetune import embedding_cache_for


class MeanLogits(nn.Module):
    """``B×1×S×S`` → the mean ``B×2×S×S`` logits of several coarse models."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([model(images) for model in self.models]).mean(dim=0)


def _summary(report: dict) -> dict:
    normal = report["normal"]
    return {
        "dice_coarse": round(report["dice_coarse"], 4),
        "dice_refined": round(report["dice_refined"], 4),
        "delta": round(report["delta"], 4),
        "normal_fp_rate_coarse": round(normal["fp_rate_coarse"], 4),
        "normal_fp_rate_refined": round(normal["fp_rate_refined"], 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="A finished `train all` run.")
    parser.add_argument("--bundle", type=Path, help="Bundle to take the refiner from (default: the run's).")
    args = parser.parse_args(argv)

    run = args.run_dir
    predictor = Predictor.from_bundle(args.bundle or run / "bundle.pt")
    cfg = predictor.config
    split = Split.load(run / "split.json")
    samples = split.test_samples(list_samples(cfg.data.dataset, cfg.data.root), source=str(cfg.data.root))
    cache = embedding_cache_for(predictor.refiner, cfg.cache_dir)

    folds = []
    for path in sorted((run / COARSE_DIR).glob("fold*/best.pt")):
        model = build_coarse(cfg)
        model.load_state_dict(load_checkpoint(path)["model"])
        folds.append(model.eval())
    if len(folds) < 2:
        raise SystemExit(f"{run} has {len(folds)} trained fold model(s); an ensemble needs two or more")

    started = time.perf_counter()
    results = {"final": _summary(evaluate(predictor, samples, embedding_cache=cache))}
    predictor.coarse = MeanLogits(folds)
    results[f"mean_of_{len(folds)}_folds"] = _summary(evaluate(predictor, samples, embedding_cache=cache))
    report = {
        "machine": describe(),
        "model_version": predictor.model_version,
        "run_dir": str(run),
        "n_images": len(samples),
        "elapsed_s": round(time.perf_counter() - started, 1),
        **results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
