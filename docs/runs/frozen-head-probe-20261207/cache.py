"""Cache frozen LiteMedSAM embeddings (served engine) of fold-K train (+hflip) and val images,
plus the shipped coarse model's served coarse probabilities on val (baseline)."""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from backend.app.engines import accelerate_predictor
from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.data.transforms import refiner_input, to_gray
from training.inference import Predictor

fold = int(sys.argv[1])
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(2)
pred = Predictor.from_bundle("models/default.pt")
pred = accelerate_predictor(pred, "auto", Path(".cache/engines"))
root = SHARED_DATA_ROOT / "BUSI"
samples = list_samples("busi", root)
split = Split.load("models/default_split.json")
by_id = {s.id: s for s in samples}
parts = {"train": split.train_ids(fold), "val": split.val_ids(fold)}
for part, ids in parts.items():
    emb, gts, hw, labels, names, base = [], [], [], [], [], []
    t0 = time.time()
    for i, sid in enumerate(ids):
        s = by_id[sid]
        image = to_gray(load_image(s.image_path))
        mask = load_mask(s) if s.mask_paths else np.zeros(image.shape, bool)
        variants = [(image, mask)]
        if part == "train":
            variants.append((image[:, ::-1].copy(), mask[:, ::-1].copy()))
        for im, m in variants:
            x, g = refiner_input(im, "litemedsam")
            with torch.inference_mode():
                e = pred.refiner.encode(x[None])
            emb.append(e[0].to(torch.float16))
            gt = g.to_refiner(torch.from_numpy(m.astype(np.float32))[None, None])[0, 0] >= 0.5
            gts.append(gt)
            hw.append(g.resized_hw)
            labels.append(s.label)
            names.append(sid)
        if part == "val":
            p = pred.predict(image)
            base.append(p.coarse_probs >= 0.5)
        if i % 50 == 0:
            print(part, i, len(ids), f"{time.time() - t0:.0f}s", flush=True)
    torch.save(
        {"emb": torch.stack(emb), "gt": torch.stack(gts), "hw": hw, "labels": labels, "ids": names},
        out / f"{part}.pt",
    )
    if part == "val":
        np.save(out / "val_baseline.npy", np.array(base, dtype=object), allow_pickle=True)
print("done")
