"""Train a small coarse head on frozen LiteMedSAM embeddings (fold K) and score it on fold-K val
like the served coarse mask (native Dice at 0.5, tiny-mask rule, FP on normal images)."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.checkpoints import bundle_config, load_bundle
from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.transforms import Geometry
from training.modeling.lesion_filter import drop_tiny_masks_from_logits
from training.modeling.losses import dice_score

torch.manual_seed(0)
torch.set_num_threads(2)
d = Path(sys.argv[1])
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 40
width = int(sys.argv[3]) if len(sys.argv) > 3 else 96
tr = torch.load(d / "train.pt")
va = torch.load(d / "val.pt")
base = np.load(d / "val_baseline.npy", allow_pickle=True)
#: The served tiny-mask rule of the shipped bundle (0.001 for `…20261207T034342Z`).
min_fraction = bundle_config(load_bundle("models/default.pt")).refiner.min_lesion_fraction


def cbr(i, o, k=3):
    conv = nn.Conv2d(i, o, k, padding=k // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class Head(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.a = nn.Sequential(cbr(256, w, 1), cbr(w, w), cbr(w, w))
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, e):
        x = self.a(e)
        return F.interpolate(self.out(x), size=(256, 256), mode="bilinear", align_corners=False)


def valid_of(hw):
    v = torch.zeros(len(hw), 1, 256, 256)
    for i, (h, w) in enumerate(hw):
        v[i, :, :h, :w] = 1
    return v


head = Head(width)
print("params", sum(p.numel() for p in head.parameters()))
opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=1e-4)
n = len(tr["emb"])
steps = epochs * ((n + 15) // 16)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
gt_tr = tr["gt"].float()[:, None]
v_tr = valid_of(tr["hw"])
t0 = time.time()
for ep in range(epochs):
    head.train()
    perm = torch.randperm(n)
    tot = 0.0
    for k in range(0, n, 16):
        idx = perm[k : k + 16]
        e = tr["emb"][idx].float()
        y, v = gt_tr[idx], v_tr[idx]
        logit = head(e)
        bce = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * v).sum() / v.sum()
        p = torch.sigmoid(logit) * v
        inter = (p * y).sum((1, 2, 3))
        den = p.sum((1, 2, 3)) + y.sum((1, 2, 3))
        has = y.sum((1, 2, 3)) > 0
        dice = (1 - (2 * inter + 1) / (den + 1))[has].mean() if has.any() else torch.tensor(0.0)
        loss = bce + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        tot += float(loss.detach()) * len(idx)
    if ep % 5 == 4 or ep == epochs - 1:
        print(ep, f"loss {tot / n:.4f}", f"{time.time() - t0:.0f}s", flush=True)

# score on val exactly like served coarse probs in native space
samples = {s.id: s for s in list_samples("busi", SHARED_DATA_ROOT / "BUSI")}
head.eval()
rec = {"head": {"dice": [], "fp": []}, "shipped": {"dice": [], "fp": []}}
with torch.no_grad():
    for i, sid in enumerate(va["ids"]):
        s = samples[sid]
        img = load_image(s.image_path)
        truth = load_mask(s) if s.mask_paths else np.zeros(img.shape[:2], bool)
        g = Geometry(height=truth.shape[0], width=truth.shape[1], size=256)
        lo = head(va["emb"][i : i + 1].float())  # 1x1x256x256
        logits2 = torch.cat([torch.zeros_like(lo), lo], 1)
        logits2 = drop_tiny_masks_from_logits(logits2, min_fraction)
        probs = g.from_refiner(logits2.softmax(1)[:, 1:2])[0, 0].numpy()
        for name, m in (("head", probs >= 0.5), ("shipped", base[i])):
            if truth.any():
                rec[name]["dice"].append(float(dice_score(m, truth)))
            else:
                rec[name]["fp"].append(bool(m.any()))
res = {
    k: {
        "dice": float(np.mean(v["dice"])),
        "fp": float(np.mean(v["fp"])),
        "n": len(v["dice"]),
        "n_normal": len(v["fp"]),
    }
    for k, v in rec.items()
}
print(json.dumps(res))
torch.save(head.state_dict(), d / f"head_w{width}_e{epochs}.pt")
