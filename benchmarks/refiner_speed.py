"""Refiner forward time: ``litemedsam`` at 256 vs ``sam_vit_b`` at 1024, in one run; prints JSON.

Random initialisation (``pretrained=False``) is enough for timing. For each backbone the image
encoder (``Refiner.encode``) and the prompt/mask decoder (``Refiner.forward`` on the embedding,
prompts derived from a synthetic coarse mask) are timed separately; ``forward_ms`` is their sum.

``litemedsam`` runs on the server's default engine (``auto``: OpenVINO bf16 on a CPU with native
bf16, else ONNX Runtime int8), as a new user's server does; ``--engine torch|onnx|onnx-int8|
openvino|openvino-bf16`` picks another (:mod:`backend.app.engines`; graphs exported into a
temporary folder first, untimed). ``sam_vit_b`` always runs in eager PyTorch, as segment-anything
ships it.

    python benchmarks/refiner_speed.py --repeats 3 [--engine torch]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from backend.app.engines import DEFAULT_ENGINE, ENGINE_CHOICES, resolve_engine
from training.config import RefinerConfig
from training.machine import describe
from training.modeling.refiner import build_refiner


def synthetic_coarse_probs(side: int) -> torch.Tensor:
    """``1×1×side×side`` soft disc, the kind of mask a coarse segmenter proposes."""
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    distance = ((yy - side * 0.45) ** 2 + (xx - side * 0.55) ** 2).sqrt()
    return torch.sigmoid((side * 0.18 - distance) / (side * 0.02))[None, None]


def time_backbone(backbone: str, repeats: int, warmup: int, engine: str = "torch") -> dict:
    engine = resolve_engine(engine)
    torch.manual_seed(0)
    refiner = build_refiner(RefinerConfig(backbone=backbone, pretrained=False)).eval()
    parameters = sum(p.numel() for p in refiner.parameters())
    if engine != "torch":
        from backend.app.engines import accelerate_refiner

        accelerate_refiner(refiner, engine, Path(tempfile.mkdtemp(prefix="refiner-speed-onnx-")))
    side = int(refiner.input_size)
    images = torch.rand(1, 3, side, side)
    coarse = synthetic_coarse_probs(side)
    encode_ms: list[float] = []
    decode_ms: list[float] = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            started = time.perf_counter()
            embedding = refiner.encode(images)
            encoded = time.perf_counter()
            refiner(embedding, coarse)
            done = time.perf_counter()
            if index >= warmup:
                encode_ms.append((encoded - started) * 1000.0)
                decode_ms.append((done - encoded) * 1000.0)
    del refiner
    encoder = statistics.median(encode_ms)
    decoder = statistics.median(decode_ms)
    return {
        "backbone": backbone,
        "engine": engine,
        "input_size": side,
        "parameters": parameters,
        "encoder_ms": round(encoder, 1),
        "decoder_ms": round(decoder, 1),
        "forward_ms": round(encoder + decoder, 1),
        "runs_ms": [round(e + d, 1) for e, d in zip(encode_ms, decode_ms, strict=True)],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed forwards per backbone (median kept).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed forwards first.")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default=DEFAULT_ENGINE,
        help="Engine of litemedsam (default: the server's default, auto).",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lite = time_backbone("litemedsam", args.repeats, args.warmup, args.engine)
    sam = time_backbone("sam_vit_b", args.repeats, args.warmup)
    report = {
        "device": "cpu",
        "machine": describe(),
        "litemedsam": lite,
        "sam_vit_b": sam,
        "ratio_forward_sam_vit_b_over_litemedsam": round(sam["forward_ms"] / lite["forward_ms"], 2),
        "ratio_encoder_sam_vit_b_over_litemedsam": round(sam["encoder_ms"] / lite["encoder_ms"], 2),
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
