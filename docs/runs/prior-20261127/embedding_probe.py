"""Ad hoc: how much lesion information is in the frozen LiteMedSAM embedding? A small conv head on the
cached embeddings, fold 0 of models/default_split.json, val Dice at native resolution."""
import sys, time, json
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
from training.config import TrainingConfig
from training.data.splits import Split
from training.data.datasets import list_samples, load_image, load_mask
from training.data.transforms import Geometry, mask_to_tensor
from training.modeling.refiner import build_refiner
from training.phases.refiner_finetune import embedding_cache_for
from training.evaluate import image_record, summarize
cfg = TrainingConfig()
split = Split.load("models/default_split.json")
by_id = {s.id: s for s in list_samples("busi", cfg.data.root)}
refiner = build_refiner(cfg.refiner)
cache = embedding_cache_for(refiner, cfg.cache_dir)
def load(ids):
    X, Y, G, M, L = [], [], [], [], []
    for i in ids:
        s = by_id[i]; img = load_image(s.image_path); m = load_mask(s)
        g = Geometry(m.shape[0], m.shape[1], 256)
        e = cache.get(cache.key(img, "litemedsam")); assert e is not None, i
        X.append(e.half()); Y.append((g.to_refiner(mask_to_tensor(m)) >= 0.5).float()[0])
        G.append(g); M.append(m); L.append(s.label)
    return torch.stack(X), torch.stack(Y), G, M, L
tr = load(split.train_ids(0)); va = load(split.val_ids(0))
print("loaded", len(tr[0]), len(va[0]), flush=True)
torch.manual_seed(0)
head = nn.Sequential(nn.Conv2d(256, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 1, 1))
opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-2)
def evaluate():
    head.eval(); recs = []
    with torch.no_grad():
        for x, g, m, l in zip(va[0], va[2], va[3], va[4]):
            logit = F.interpolate(head(x[None].float()), size=256, mode="bilinear")
            p = torch.sigmoid(g.from_refiner(logit))[0, 0].numpy()
            recs.append(image_record("x", l, m, p))
    head.train(); r = summarize(recs); return r["dice_coarse"], r["normal"]["fp_rate_coarse"]
for ep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 15):
    t = time.time(); perm = torch.randperm(len(tr[0]))
    for b in range(0, len(perm), 8):
        idx = perm[b:b+8]; x = tr[0][idx].float(); y = tr[1][idx]
        if torch.rand(1) < 0.5: pass
        logit = F.interpolate(head(x), size=256, mode="bilinear")
        p = torch.sigmoid(logit)
        loss = F.binary_cross_entropy_with_logits(logit, y) + (1 - (2*(p*y).sum((1,2,3))+1)/((p+y).sum((1,2,3))+1)).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    print(ep, round(loss.item(),4), evaluate(), round(time.time()-t), flush=True)
