"""Refined Dice when the refiner's TinyViT encodes only the image part of its padded 256² input.

For each fold-0 validation lesion image the shipped model (torch, fp32) is run twice with the prompts
it derives from its own coarse mask: once with the usual embedding of the padded 256² input, once
with the embedding of the top-left ``Hc×Wc`` crop that holds the image (rounded up to ``--align``
pixels), pasted into the embedding of an all-zero input. Prints JSON: mean Dice of both, the mean
absolute difference, and the encoder's median time for both.

    python docs/runs/crop-probe-20261207/crop_probe.py --align 56
"""

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch

from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.data.transforms import refiner_input, to_gray
from training.inference import Predictor
from training.modeling.losses import dice_score


def set_resolution(encoder, hc: int, wc: int) -> None:
    """Point every TinyViT stage at an ``hc×wc`` input (its code reads ``input_resolution``)."""
    for index, layer in enumerate(encoder.layers):
        shift = 2 if index == 3 else index
        resolution = (hc // 2**shift, wc // 2**shift)
        layer.input_resolution = resolution
        for block in getattr(layer, "blocks", []):
            if hasattr(block, "input_resolution"):
                block.input_resolution = resolution
        if layer.downsample is not None:
            layer.downsample.input_resolution = resolution


def encode(encoder, x: torch.Tensor) -> torch.Tensor:
    hc, wc = x.shape[-2:]
    set_resolution(encoder, hc, wc)
    y = encoder.patch_embed(x)
    for layer in encoder.layers:
        y = layer(y)
    y = y.view(y.shape[0], hc // 4, wc // 4, -1).permute(0, 3, 1, 2)
    return encoder.neck(y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--align", type=int, default=56)
    parser.add_argument("--n", type=int, default=0, help="first N lesion images only (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = Predictor.from_bundle("models/default.pt")
    encoder = predictor.refiner.image_encoder
    samples = list_samples("busi", SHARED_DATA_ROOT / "BUSI")
    split = Split.load("models/default_split.json")
    chosen = [s for s in split.val_samples(0, samples) if s.label != "normal" and s.mask_paths]
    if args.n:
        chosen = chosen[: args.n]
    with torch.inference_mode():
        zero_embedding = encode(encoder, torch.zeros(1, 3, 256, 256))
    full, cropped, diffs, t_full, t_crop, areas = [], [], [], [], [], []
    for sample in chosen:
        image = to_gray(load_image(sample.image_path))
        truth = load_mask(sample)
        x, geometry = refiner_input(image, "litemedsam")
        rh, rw = geometry.resized_hw
        hc = min(256, math.ceil(rh / args.align) * args.align)
        wc = min(256, math.ceil(rw / args.align) * args.align)
        with torch.inference_mode():
            start = time.perf_counter()
            e_full = encode(encoder, x[None])
            t_full.append(time.perf_counter() - start)
            start = time.perf_counter()
            e_crop = encode(encoder, x[None, :, :hc, :wc].contiguous())
            t_crop.append(time.perf_counter() - start)
        pasted = zero_embedding.clone()
        pasted[..., : hc // 4, : wc // 4] = e_crop
        areas.append(hc * wc / 256**2)
        a = predictor.predict(image, embedding=e_full).refined_mask()
        b = predictor.predict(image, embedding=pasted).refined_mask()
        full.append(float(dice_score(a, truth)))
        cropped.append(float(dice_score(b, truth)))
        diffs.append(abs(full[-1] - cropped[-1]))
    print(
        json.dumps(
            {
                "align": args.align,
                "n": len(chosen),
                "dice_full": float(np.mean(full)),
                "dice_crop": float(np.mean(cropped)),
                "mean_abs_dice_change": float(np.mean(diffs)),
                "max_abs_dice_change": float(np.max(diffs)),
                "mean_area_fraction": float(np.mean(areas)),
                "encoder_ms_full_median": 1000 * statistics.median(t_full),
                "encoder_ms_crop_median": 1000 * statistics.median(t_crop),
            }
        )
    )


if __name__ == "__main__":
    main()
