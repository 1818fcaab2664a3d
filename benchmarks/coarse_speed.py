"""Coarse-segmenter forward time per registered architecture, on a serving engine; prints JSON.

Each architecture of the coarse-segmenter registry (``training/modeling/coarse_registry.py``) is
built from the default config of its section (random weights: enough for timing), put on the
engine the server would use (``--engine``, default ``auto``; graphs exported into a temporary
folder first, untimed) and timed on one ``1×C×S×S`` input, the call ``/segment`` makes per new
image. Run it on an otherwise idle machine; the CPU's flags are part of the output.

    python benchmarks/coarse_speed.py [--models transunet,tinyvit] [--engine auto] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from backend.app.engines import DEFAULT_ENGINE, ENGINE_CHOICES, accelerate_predictor, resolve_engine
from training.config import RefinerConfig, TrainingConfig
from training.machine import describe
from training.modeling.coarse_registry import (
    COARSE_SEGMENTERS,
    build_coarse,
    coarse_in_channels,
    coarse_input_size,
)
from training.modeling.refiner import build_refiner


def time_coarse(name: str, engine: str, repeats: int, warmup: int, cache_dir: Path) -> dict:
    cfg = TrainingConfig(coarse_model=name)
    torch.manual_seed(0)
    side, channels = coarse_input_size(cfg), coarse_in_channels(cfg)
    predictor = SimpleNamespace(
        coarse=build_coarse(cfg).eval(),
        refiner=build_refiner(RefinerConfig(pretrained=False)).eval(),
        coarse_size=side,
        coarse_channels=channels,
        device="cpu",
    )
    n_parameters = sum(p.numel() for p in predictor.coarse.parameters())
    predictor = accelerate_predictor(predictor, engine, cache_dir)
    image = torch.rand(1, channels, side, side)
    times = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            start = time.perf_counter()
            predictor.coarse(image)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return {
        "input": [channels, side, side],
        "parameters_m": round(n_parameters / 1e6, 2),
        "median_ms": round(statistics.median(times), 1),
        "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(COARSE_SEGMENTERS))
    parser.add_argument("--engine", default=DEFAULT_ENGINE, choices=ENGINE_CHOICES)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    names = [name for name in args.models.split(",") if name]
    unknown = sorted(set(names) - set(COARSE_SEGMENTERS))
    if unknown:
        parser.error(f"unknown coarse segmenters {unknown}; known: {sorted(COARSE_SEGMENTERS)}")
    torch.set_num_threads(args.threads)
    engine = resolve_engine(args.engine)
    with tempfile.TemporaryDirectory() as cache:
        results = {
            name: time_coarse(name, args.engine, args.repeats, args.warmup, Path(cache)) for name in names
        }
    report = {"engine": engine, "threads": args.threads, "coarse": results, "machine": describe()}
    json.dump(report, sys.stdout, indent=1)
    print()
    return report


if __name__ == "__main__":
    main()
