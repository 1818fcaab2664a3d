"""TransUNet size and CPU training speed; prints JSON.

``python benchmarks/model_size.py [--steps 5] [--batch-size 8] [--threads N] [--epoch-images 500]``

Reports parameters and forward GFLOPs per 224×224 image (FlopCounterMode, 2 FLOPs per
multiply-add) of the ``compact`` and ``full`` configurations, and the seconds per phase-1
training step (forward + backward + SGD step, ``0.5·CE + 0.5·Dice``) of ``compact`` on the CPU,
extrapolated to one epoch over ``--epoch-images`` images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from training.config import TrainingConfig, TransUNetConfig
from training.machine import describe
from training.modeling.losses import coarse_loss
from training.modeling.transunet import build_transunet, count_parameters, estimate_gflops


def step_seconds(
    cfg: TransUNetConfig, batch_size: int, steps: int, warmup: int = 1
) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of ``steps`` phase-1 training steps (after ``warmup``
    untimed ones). CPU seconds (all threads) stay meaningful on a machine shared with others."""
    train = TrainingConfig().coarse
    torch.manual_seed(0)
    model = build_transunet(cfg).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )
    images = torch.rand(batch_size, 1, cfg.img_size, cfg.img_size)
    target = torch.zeros(batch_size, cfg.img_size, cfg.img_size, dtype=torch.long)
    target[:, cfg.img_size // 4 : cfg.img_size // 2, cfg.img_size // 3 : cfg.img_size // 2] = 1
    times, cpu_times = [], []
    for step in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = coarse_loss(model(images), target, train.ce_weight, train.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=TrainingConfig().coarse.batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--epoch-images", type=int, default=500)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict = {"machine": describe(), "configs": {}}
    for name in ("compact", "full"):
        cfg = TransUNetConfig.named(name)
        with torch.device("meta"):
            parameters = count_parameters(build_transunet(cfg))
        report["configs"][name] = {
            "parameters": parameters,
            "parameters_m": round(parameters / 1e6, 3),
            "gflops_per_image": round(estimate_gflops(cfg), 3),
            "architecture": cfg.model_dump(mode="json"),
        }
    compact = TransUNetConfig.named("compact")
    times, cpu_times = step_seconds(compact, args.batch_size, args.steps)
    median = statistics.median(times)
    steps_per_epoch = -(-args.epoch_images // args.batch_size)
    report["compact_training_step"] = {
        "device": "cpu",
        "batch_size": args.batch_size,
        "img_size": compact.img_size,
        "seconds_per_step": round(median, 4),
        "seconds_per_step_all": [round(t, 4) for t in times],
        "cpu_seconds_per_step": round(statistics.median(cpu_times), 4),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "epoch_images": args.epoch_images,
        "estimated_epoch_seconds": round(median * steps_per_epoch, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
