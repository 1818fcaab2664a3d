"""Phase-2 training speed: one epoch from the embedding cache vs recomputing embeddings every step.

Same images, same coarse masks, same starting weights and the same optimizer for both epochs; the
only difference is where the frozen encoder's embeddings come from. Prints one JSON object::

    python benchmarks/train_speed.py --images 32 --batch-size 8

``precompute_s`` is the one-off cost of filling the cache (paid once per image, ever: embeddings
are keyed by image, backbone, preprocessing version and encoder weights).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.machine import describe


def main(argv: list[str] | None = None) -> dict:
    from training.checkpoints import build_seeded_refiner
    from training.config import SHARED_DATA_ROOT, TrainingConfig
    from training.data.datasets import list_samples
    from training.data.mask_augment import augment_mask
    from training.inference import resolve_device
    from training.modeling.losses import quality_aware_loss
    from training.phases.context import SampleStore, limit_samples
    from training.phases.refiner_finetune import _to_side, embedding_cache_for, trainable_parameters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="busi")
    parser.add_argument("--root", type=Path, default=SHARED_DATA_ROOT / "BUSI")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="litemedsam", choices=["litemedsam", "sam_vit_b"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cfg = TrainingConfig(refiner={"backbone": args.backbone}, device=device.type)
    train_cfg = cfg.refiner_train
    samples = limit_samples(list_samples(args.dataset, args.root), args.images)
    store = SampleStore(samples, cfg)
    items = store.many([sample.id for sample in samples])
    refiner = build_seeded_refiner(cfg).to(device)
    initial = {k: v.clone() for k, v in refiner.trainable_state_dict().items()}

    rng = np.random.default_rng(0)
    coarse_maps = {}
    for item in items:  # one augmented soft mask per image: the same coarse input in both epochs
        soft = torch.from_numpy(augment_mask(item.mask, 1, rng, cfg.augment)[0].soft)[None, None]
        coarse_maps[item.id] = _to_side(soft, item.geometry.size)

    temporary = None
    if args.cache_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="train_speed_")
        args.cache_dir = Path(temporary.name)
    cache = embedding_cache_for(refiner, args.cache_dir)
    keys = {item.id: cache.key(item.image, refiner.backbone) for item in items}
    started = time.perf_counter()
    computed = 0
    for item in items:
        if cache.get(keys[item.id]) is None:
            images, _ = refiner.prepare(item.image)
            cache.put(keys[item.id], refiner.encode(images[None].to(device))[0].cpu())
            computed += 1
    precompute_s = time.perf_counter() - started

    def cached_embeddings(chunk):
        return torch.stack([cache.get(keys[item.id]) for item in chunk]).to(device)

    def recomputed_embeddings(chunk):
        images = torch.stack([refiner.prepare(item.image)[0] for item in chunk]).to(device)
        return refiner.encode(images)

    def epoch(embeddings_of) -> tuple[float, float]:
        refiner.load_trainable_state_dict(initial)
        refiner.train()
        optimizer = torch.optim.AdamW(trainable_parameters(refiner), lr=train_cfg.lr)
        order = np.random.default_rng(1).permutation(len(items))
        losses = []
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(items), args.batch_size):
            chunk = [items[i] for i in order[start : start + args.batch_size]]
            embeddings = embeddings_of(chunk)
            coarse = torch.cat([coarse_maps[item.id] for item in chunk]).to(device)
            target = torch.stack([item.refiner_target for item in chunk]).float().to(device)
            valid = torch.cat([item.geometry.valid_mask() for item in chunk]).to(device)
            output = refiner(embeddings, coarse, valid=valid)
            loss = quality_aware_loss(
                output.refined_logits,
                target,
                coarse,
                train_cfg.bce_weight,
                train_cfg.dice_weight,
                train_cfg.change_penalty_weight,
                valid=valid,
            )["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, float(np.mean(losses))

    cached_s, cached_loss = epoch(cached_embeddings)
    recompute_s, recompute_loss = epoch(recomputed_embeddings)
    steps = math.ceil(len(items) / args.batch_size)
    result = {
        "machine": describe(),
        "benchmark": "phase2_epoch_cache_vs_recompute",
        "dataset": args.dataset,
        "images": len(items),
        "batch_size": args.batch_size,
        "steps": steps,
        "backbone": args.backbone,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "precompute_s": round(precompute_s, 3),
        "precomputed_images": computed,
        "epoch_cached_s": round(cached_s, 3),
        "epoch_recompute_s": round(recompute_s, 3),
        "per_step_cached_ms": round(1000 * cached_s / steps, 1),
        "per_step_recompute_ms": round(1000 * recompute_s / steps, 1),
        "speedup": round(recompute_s / cached_s, 2),
        "mean_loss_cached": round(cached_loss, 5),
        "mean_loss_recompute": round(recompute_loss, 5),
    }
    print(json.dumps(result, indent=1))
    if temporary is not None:
        temporary.cleanup()
    return result


if __name__ == "__main__":
    main()
