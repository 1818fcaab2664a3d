"""How much lesion information does the frozen LiteMedSAM image embedding hold without a prompt?

A small convolutional head (256 → 64 → 64 → 1, 3×3 convs) is trained on the cached embeddings of
the training images of fold 0 of ``models/default_split.json`` (masks in the refiner frame at
64×64 → upsampled to 256; BCE + Dice; AdamW 1e-3; batch 8; one torch thread) and evaluated on that
fold's validation images with the evaluation protocol (native resolution, lesion images).
Prints one line per epoch: epoch, last batch loss, (validation Dice, normal FP rate), seconds.

    python docs/runs/prior-20261127/embedding_probe.py 12     # needs the embeddings cached
"""

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.config import TrainingConfig
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.data.transforms import Geometry, mask_to_tensor
from training.evaluate import image_record, summarize
from training.modeling.refiner import build_refiner
from training.phases.refiner_finetune import embedding_cache_for

torch.set_num_threads(1)
cfg = TrainingConfig()
split = Split.load("models/default_split.json")
by_id = {s.id: s for s in list_samples("busi", cfg.data.root)}
cache = embedding_cache_for(build_refiner(cfg.refiner), cfg.cache_dir)


def load(ids):
    embeddings, targets, rest = [], [], []
    for sample_id in ids:
        sample = by_id[sample_id]
        image, mask = load_image(sample.image_path), load_mask(sample)
        geometry = Geometry(mask.shape[0], mask.shape[1], 256)
        embedding = cache.get(cache.key(image, "litemedsam"))
        if embedding is None:
            raise SystemExit(f"embedding of {sample_id} not cached: run phase 2b (or train all) first")
        embeddings.append(embedding.half())
        targets.append((geometry.to_refiner(mask_to_tensor(mask)) >= 0.5).float()[0])
        rest.append((geometry, mask, sample.label))
    return torch.stack(embeddings), torch.stack(targets), rest


train_x, train_y, _ = load(split.train_ids(0))
val_x, _, val_rest = load(split.val_ids(0))
print("loaded", len(train_x), len(val_x), flush=True)
torch.manual_seed(0)
head = nn.Sequential(
    nn.Conv2d(256, 64, 3, padding=1),
    nn.BatchNorm2d(64),
    nn.ReLU(),
    nn.Conv2d(64, 64, 3, padding=1),
    nn.BatchNorm2d(64),
    nn.ReLU(),
    nn.Conv2d(64, 1, 1),
)
optimizer = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-2)


def validate():
    head.eval()
    records = []
    with torch.no_grad():
        for embedding, (geometry, mask, label) in zip(val_x, val_rest, strict=True):
            logits = F.interpolate(head(embedding[None].float()), size=256, mode="bilinear")
            probs = torch.sigmoid(geometry.from_refiner(logits))[0, 0].numpy()
            records.append(image_record("val", label, mask, probs))
    head.train()
    report = summarize(records)
    return report["dice_coarse"], report["normal"]["fp_rate_coarse"]


for epoch in range(int(sys.argv[1]) if len(sys.argv) > 1 else 15):
    started = time.time()
    order = torch.randperm(len(train_x))
    for start in range(0, len(order), 8):
        index = order[start : start + 8]
        target = train_y[index]
        logits = F.interpolate(head(train_x[index].float()), size=256, mode="bilinear")
        probs = torch.sigmoid(logits)
        dice = (2 * (probs * target).sum((1, 2, 3)) + 1) / ((probs + target).sum((1, 2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(epoch, round(loss.item(), 4), validate(), round(time.time() - started), flush=True)
