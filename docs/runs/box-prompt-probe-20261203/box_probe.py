"""Probe: refine with a hard box from the coarse mask (box-only prompt), shipped vs pretrained decoder."""

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.checkpoints import build_seeded_refiner
from training.config import SHARED_DATA_ROOT
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from training.inference import Predictor
from training.modeling.losses import dice_score

root = SHARED_DATA_ROOT / "BUSI"
samples = Split.load(Path("models/default_split.json")).val_samples(0, list_samples("busi", root), str(root))
if len(sys.argv) > 1:
    samples = samples[: int(sys.argv[1])]
shipped = Predictor.from_bundle(None)
pre = Predictor(shipped.coarse, build_seeded_refiner(shipped.config), shipped.config, model_version="pre")


def boxes(cm):
    out = {}
    if not cm.any():
        return out
    ys, xs = np.nonzero(cm)
    out["all"] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    lab, n = ndimage.label(cm)
    sizes = ndimage.sum(cm, lab, range(1, n + 1))
    ys, xs = np.nonzero(lab == 1 + int(np.argmax(sizes)))
    out["largest"] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return {k: [float(v) for v in b] for k, b in out.items()}


def grow(b, f, h, w):
    x0, y0, x1, y1 = b
    dx, dy = (x1 - x0) * f, (y1 - y0) * f
    return [max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)]


scores, fps = {}, {}
t0 = time.time()
for s in samples:
    img = load_image(s.image_path)
    truth = load_mask(s) if s.label != "normal" else None
    emb = shipped.embed(img)
    base = shipped.predict(img, embedding=emb)
    cm = base.coarse_mask()
    h, w = cm.shape
    res = {"coarse": cm, "base": base.refined_mask()}
    bx = boxes(cm)
    for kind in ("all", "largest"):
        for f in (0.0, 0.05, 0.1):
            for name, p in (("ship", shipped), ("pre", pre)):
                key = f"{name}-{kind}-{f}"
                if kind in bx:
                    res[key] = p.predict(img, embedding=emb, box=grow(bx[kind], f, h, w)).refined_mask()
                else:
                    res[key] = cm
    for k, m in res.items():
        if truth is None:
            fps.setdefault(k, []).append(float(m.any()))
        else:
            scores.setdefault(k, []).append(dice_score(m, truth))
out = {
    k: {"dice": round(statistics.fmean(v), 4), "fp": round(statistics.fmean(fps.get(k, [0])), 3)}
    for k, v in scores.items()
}
print(
    json.dumps(
        {
            "n_lesion": len(scores["base"]),
            "n_normal": len(fps.get("base", [])),
            "s": round(time.time() - t0),
            "r": out,
        },
        indent=1,
    )
)
