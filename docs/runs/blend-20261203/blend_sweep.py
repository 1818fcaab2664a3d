"""The α sweep behind sweep_*_grid.json: a starting bundle blended with its fine-tuned bundle.

Usage (repo root, venv active):
    python docs/runs/blend-20261203/blend_sweep.py START.pt TUNED.pt OUT.json 0,0.1,0.2,... sets.json

``sets.json`` maps a set name to ``[[dataset, root, ids or null], ...]``. Every image is embedded
once with the starting model's encoder (the blend leaves the frozen encoder alone), then each α
is scored with the evaluation protocol (``training.evaluate.image_record``/``summarize``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from backend.app.engines import accelerate_predictor
from training.checkpoints import load_bundle
from training.data.datasets import list_samples, load_image, load_mask
from training.evaluate import image_record, summarize
from training.inference import Predictor
from training.weight_blend import blend_bundle


def load_sets(path: Path) -> dict[str, list]:
    sets = json.loads(path.read_text())
    samples = {}
    for name, spec in sets.items():
        chosen = []
        for dataset, root, ids in spec:
            wanted = None if ids is None else set(ids)
            chosen += [s for s in list_samples(dataset, root) if wanted is None or s.id in wanted]
        samples[name] = chosen
    return samples


def main() -> None:
    torch.set_num_threads(2)
    start_path, tuned_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    alphas = [float(a) for a in sys.argv[4].split(",")]
    samples = load_sets(Path(sys.argv[5]))
    start, tuned = load_bundle(start_path), load_bundle(tuned_path)

    encoder = Predictor.from_bundle_dict(start)
    accelerate_predictor(encoder, "onnx-int8", Path("/tmp/exp/cache"))
    cache = {}
    t0 = time.time()
    for group in samples.values():
        for s in group:
            if s.image_path not in cache:
                image = load_image(s.image_path)
                cache[s.image_path] = (image, load_mask(s), encoder.embed(image))
    print("embedded", len(cache), round(time.time() - t0), file=sys.stderr)

    report = {}
    for alpha in alphas:
        predictor = Predictor.from_bundle_dict(blend_bundle(start, tuned, alpha))
        row = {}
        for name, group in samples.items():
            records = []
            for s in group:
                image, truth, embedding = cache[s.image_path]
                pred = predictor.predict(image, embedding=embedding)
                records.append(
                    image_record(s.id, s.label, truth, pred.coarse_probs, pred.refined_probs, iou=pred.iou)
                )
            summary = summarize(records)
            row[name] = {k: summary.get(k) for k in ("n_images", "dice_coarse", "dice_refined")}
            normal = summary.get("normal") or {}
            if normal.get("n_images"):
                row[name]["fp_refined"] = normal.get("fp_rate_refined")
        report[str(alpha)] = row
        print(alpha, json.dumps(row), file=sys.stderr)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
