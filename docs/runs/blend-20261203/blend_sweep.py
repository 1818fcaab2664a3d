"""Ad hoc: WiSE-FT-style interpolation between a starting bundle and its fine-tuned bundle."""
import json, sys, time, copy
from pathlib import Path
import torch
from training.checkpoints import load_bundle
from training.inference import Predictor
from training.evaluate import image_record, summarize
from training.data.datasets import list_samples, load_image, load_mask
from training.data.splits import Split
from backend.app.engines import accelerate_predictor
torch.set_num_threads(2)
start_path, tuned_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
alphas = [float(a) for a in sys.argv[4].split(",")]
sets = json.loads(Path(sys.argv[5]).read_text())  # name -> [[dataset, root, ids or null]]
start, tuned = load_bundle(start_path), load_bundle(tuned_path)
def mix(a):
    b = copy.copy(tuned)
    for key in ("coarse_state_dict", "refiner_state_dict"):
        s, t = start[key], tuned[key]
        b[key] = {k: (torch.lerp(s[k].float(), t[k].float(), a).to(t[k].dtype) if t[k].is_floating_point() else t[k]) for k in t}
    return b
samples = {}
for name, spec in sets.items():
    chosen = []
    for dataset, root, ids in spec:
        pool = list_samples(dataset, root)
        chosen += [s for s in pool if ids is None or s.id in set(ids)]
    samples[name] = chosen
enc = Predictor.from_bundle_dict(start)
accelerate_predictor(enc, "onnx-int8", Path("/tmp/exp/cache"))
cache = {}
t0 = time.time()
for name, group in samples.items():
    for s in group:
        if s.image_path not in cache:
            img = load_image(s.image_path)
            cache[s.image_path] = (img, load_mask(s), enc.embed(img))
print("embedded", len(cache), round(time.time() - t0), file=sys.stderr)
report = {}
for a in alphas:
    p = Predictor.from_bundle_dict(mix(a))
    row = {}
    for name, group in samples.items():
        recs = []
        for s in group:
            img, truth, emb = cache[s.image_path]
            pr = p.predict(img, embedding=emb)
            recs.append(image_record(s.id, s.label, truth, pr.coarse_probs, pr.refined_probs, iou=pr.iou))
        summ = summarize(recs)
        row[name] = {k: summ.get(k) for k in ("n_images", "dice_coarse", "dice_refined")}
        nm = summ.get("normal") or {}
        if nm.get("n_images"):
            row[name]["fp_refined"] = nm.get("fp_rate_refined")
    report[str(a)] = row
    print(a, json.dumps(row), file=sys.stderr)
out.write_text(json.dumps(report, indent=1))
