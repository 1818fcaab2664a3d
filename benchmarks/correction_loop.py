"""What the correction loop buys: save corrected masks of a new hospital, fine-tune, compare; prints JSON.

The 12-image BUS-BRA sample (GE Logiq 7, Brazil: a hospital and scanner the shipped model never saw)
stands in for a new site. Its images are split by patient (``Case``): the masks of 8 images are
saved through the real API (``POST /api/corrections``, the masks a clinician would have corrected:
here the dataset's ground truth), a run fine-tunes the starting bundle on the ``corrections``
dataset (``init_from``), and the 4 images of the held-out patients are segmented by the model
before and after. The BUSI test split of ``models/default_split.json`` checks that the fine-tuned
model did not forget its first hospital.

    python benchmarks/correction_loop.py [--init-from models/default.pt] [--held-out-cases 16,28]
        [--coarse-epochs 10 --coarse-lr 0.001 --refiner-epochs 2] [--busi-limit N] [--engine auto]
        [--pool-busi --pool-weight 10 --folds-to-run 0] [--replay-busi N] [--replay-normal N]
        [--blend-guard init|none --blend-max-dice-drop 0.01 --blend-max-fp-rise 0.1]

Everything is written under a temporary folder (``--work-dir`` to keep it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from backend.app.engines.names import DEFAULT_ENGINE, ENGINE_CHOICES
from training.config import REPO_ROOT, SHARED_DATA_ROOT, TrainingConfig
from training.machine import describe


def _union_mask(sample, work: Path) -> Path:
    """The sample's ground truth as one mask file (BUSI lesions may have several; none at all: an
    all-background mask of the image's size)."""
    if len(sample.mask_paths) == 1:
        return sample.mask_paths[0]
    import numpy as np
    from PIL import Image

    from training.data.datasets import load_mask

    path = work / "union-masks" / f"{sample.id.replace(' ', '_').replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(load_mask(sample), 255, 0).astype(np.uint8)).save(path)
    return path


def _replay_pool(busi: list, split, init_from: Path) -> list:
    """BUSI images the starting model trained on: its final coarse fold's training part."""
    from training.checkpoints import load_bundle

    final = (load_bundle(init_from).get("metrics") or {}).get("final_fold") or {}
    fold = int(final.get("fold", 0))
    train = set(split.train_ids(fold))
    return sorted((s for s in busi if s.id in train), key=lambda s: s.id)


def _evaluate(bundle_path: Path, samples: list, engine: str, cache_dir: Path) -> dict:
    """The evaluation protocol with the derived prompts, and the refined Dice of the lesion
    images when the prompt is instead the box around the true lesion (a clinician's box)."""
    from backend.app.engines import accelerate_predictor
    from training.data.datasets import load_image, load_mask
    from training.evaluate import image_record, summarize, truth_box
    from training.inference import Predictor

    predictor = Predictor.from_bundle(bundle_path)
    if engine != "torch":
        accelerate_predictor(predictor, engine, cache_dir)
    derived, boxed = [], []
    for sample in samples:
        image, truth = load_image(sample.image_path), load_mask(sample)
        embedding = predictor.embed(image)
        pred = predictor.predict(image, embedding=embedding)
        derived.append(image_record(sample.id, sample.label, truth, pred.coarse_probs, pred.refined_probs))
        if truth.any():
            pred = predictor.predict(image, embedding=embedding, box=truth_box(truth))
            boxed.append(image_record(sample.id, sample.label, truth, pred.coarse_probs, pred.refined_probs))
    report = summarize(derived)
    result = {key: report.get(key) for key in ("n_images", "dice_coarse", "dice_refined", "delta")}
    result["dice_refined_with_box"] = summarize(boxed)["dice_refined"] if boxed else None
    normal = report.get("normal") or {}
    if normal.get("n_images"):
        result["normal_images"] = normal["n_images"]
        result["normal_fp_rate_refined"] = normal.get("fp_rate_refined")
    if len(samples) <= 12:  # a handful of images: each one's figures
        result["per_image"] = {
            record["id"]: {k: round(v, 4) for k, v in record.items() if k.startswith("dice_")}
            for record in report["per_image"]
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", type=Path, default=REPO_ROOT / "models" / "default.pt")
    parser.add_argument("--busbra-root", type=Path, default=SHARED_DATA_ROOT / "BUSBRA-sample")
    parser.add_argument("--busi-root", type=Path, default=SHARED_DATA_ROOT / "BUSI")
    parser.add_argument("--split-file", type=Path, default=REPO_ROOT / "models" / "default_split.json")
    parser.add_argument("--held-out-cases", default="16,28", help="BUS-BRA Case ids kept out of training.")
    parser.add_argument("--coarse-epochs", type=int, default=10)
    parser.add_argument("--coarse-lr", type=float, default=0.001)
    parser.add_argument("--refiner-epochs", type=int, default=2)
    parser.add_argument("--end-to-end-epochs", type=int, default=0, help="0: no phase 3.")
    parser.add_argument("--busi-limit", type=int, help="Evaluate only the first N BUSI test images.")
    parser.add_argument(
        "--replay-busi",
        type=int,
        default=0,
        help="Also save N BUSI images that the starting model trained on (its final fold's training "
        "part: never the test split, never the blend's guard) as corrections: replay of the first "
        "hospital against forgetting.",
    )
    parser.add_argument(
        "--replay-normal",
        type=int,
        default=0,
        help="Also save N lesion-free BUSI images (drawn like --replay-busi) as corrections with an "
        "empty mask ('no lesion here'): the new site's masks are all lesions, and a model tuned on "
        "them alone learns to fire everywhere.",
    )
    parser.add_argument(
        "--pool-busi",
        action="store_true",
        help="Train on BUSI and the corrections pooled (data.pool_dataset): BUSI keeps --split-file "
        "(its test part never trained on), the corrections get a split of their own.",
    )
    parser.add_argument(
        "--pool-weight", type=int, default=1, help="Pooled: each correction drawn N times per epoch."
    )
    parser.add_argument(
        "--folds-to-run", default=None, help="Phase-1 folds to train, e.g. 0 (default: all of the split's)."
    )
    parser.add_argument(
        "--blend-guard",
        default=None,
        choices=["init", "none"],
        help="finetune.blend_guard (default: the config's): blend with the starting weights, guarded.",
    )
    parser.add_argument("--blend-max-dice-drop", type=float, help="finetune.blend_max_dice_drop.")
    parser.add_argument("--blend-max-fp-rise", type=float, help="finetune.blend_max_fp_rise.")
    parser.add_argument("--cache-dir", type=Path, help="Embedding cache (default: under the work folder).")
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default=DEFAULT_ENGINE,
        help="Serving engine of the evaluations (default: the served default).",
    )
    parser.add_argument("--work-dir", type=Path, help="Keep everything here (default: a temp folder).")
    args = parser.parse_args(argv)

    from fastapi.testclient import TestClient

    from backend.app.core.settings import Settings
    from backend.app.engines import resolve_engine
    from backend.app.main import create_app
    from training.data.datasets import list_samples
    from training.data.splits import Split
    from training.pipeline import run_training

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="correction-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    engine = resolve_engine(args.engine)
    held_cases = {case.strip() for case in args.held_out_cases.split(",") if case.strip()}
    samples = list_samples("busbra", args.busbra_root)
    by_case = {sample.id: sample.id.split("_")[1].split("-")[0].lstrip("0") for sample in samples}
    held_out = [s for s in samples if by_case[s.id] in held_cases]
    to_save = [s for s in samples if by_case[s.id] not in held_cases]
    if not held_out or not to_save:
        raise SystemExit(f"--held-out-cases {args.held_out_cases} leaves no images on one side")

    # 1. Save the corrected masks through the API, as the Compare tab does.
    token = "correction-loop"
    settings = Settings(
        database_url=f"sqlite:///{work / 'store.sqlite'}",
        admin_token=token,
        corrections_dir=work / "corrections",
        runs_dir=work / "runs",
        inference_engine="torch",
    )
    client = TestClient(create_app(settings))
    busi = list_samples("busi", args.busi_root)
    split = Split.load(args.split_file)
    # Replayed BUSI images come from the training part of the starting model's final fold: never
    # its test split, and never the validation images that guard the blend (training.weight_blend).
    replay_pool = _replay_pool(busi, split, args.init_from)
    replay = []
    if args.replay_busi:
        lesion_first = sorted(replay_pool, key=lambda s: (s.label == "normal", s.id))
        step = max(1, len(lesion_first) // args.replay_busi)
        replay = [s for s in lesion_first[::step] if s.mask_paths][: args.replay_busi]
    normals = []
    if args.replay_normal:
        pool = [s for s in replay_pool if s.label == "normal"]
        step = max(1, len(pool) // args.replay_normal)
        normals = pool[::step][: args.replay_normal]
    started = time.monotonic()
    for sample in [*to_save, *replay, *normals]:
        mask_path = _union_mask(sample, work)  # a lesion-free image's is all background
        response = client.post(
            "/api/corrections",
            files={
                "file": (sample.image_path.name, sample.image_path.read_bytes()),
                "mask": (mask_path.name, mask_path.read_bytes(), "image/png"),
            },
            data={"mask_source": "corrected", "model_version": "correction-loop"},
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code != 201:
            raise SystemExit(f"saving {sample.id} failed: {response.status_code} {response.text}")
    save_s = time.monotonic() - started

    # 2. Fine-tune from the starting bundle on the corrections dataset.
    phases = ["coarse", "augment", "refiner"] + (["end-to-end"] if args.end_to_end_epochs else [])
    if args.pool_busi:
        data = {
            "dataset": "busi",
            "root": str(args.busi_root),
            "split_file": str(args.split_file),
            "folds": len(split.folds),
            "pool_dataset": "corrections",
            "pool_root": str(settings.corrections_dir),
            "pool_weight": args.pool_weight,
        }
    else:
        data = {"dataset": "corrections", "root": str(settings.corrections_dir), "folds": 2}
    folds_to_run = None
    if args.folds_to_run:
        folds_to_run = [int(fold) for fold in args.folds_to_run.split(",")]
    cfg = TrainingConfig.model_validate(
        {
            "phases": phases,
            "device": "cpu",
            "init_from": str(args.init_from),
            "output_dir": str(work / "run"),
            "cache_dir": str(args.cache_dir or work / "embeddings"),
            "data": data,
            "coarse": {
                "epochs": args.coarse_epochs,
                "lr": args.coarse_lr,
                "batch_size": 4,
                "folds_to_run": folds_to_run,
            },
            "augment": {"per_mask": 3},
            "refiner_train": {"epochs": args.refiner_epochs, "batch_size": 4},
            "end_to_end": {"epochs": max(1, args.end_to_end_epochs), "batch_size": 2},
            "finetune": {
                key: value
                for key, value in (
                    ("blend_guard", args.blend_guard),
                    ("blend_max_dice_drop", args.blend_max_dice_drop),
                    ("blend_max_fp_rise", args.blend_max_fp_rise),
                )
                if value is not None
            },
        }
    )
    started = time.monotonic()
    summary = run_training(cfg)
    train_s = time.monotonic() - started
    tuned = Path(summary["bundle_path"])

    # 3. Before and after: the held-out patients of the new site, and BUSI's test split.
    busi_test = split.test_samples(busi)
    if args.busi_limit:
        busi_test = busi_test[: args.busi_limit]
    onnx_dir = work / "onnx"
    report = {
        "machine": describe(),
        "engine": engine,
        "init_from": str(args.init_from),
        "saved_images": [s.id for s in to_save],
        "replayed_busi_images": len(replay),
        "replayed_normal_images": len(normals),
        "held_out_images": [s.id for s in held_out],
        "run": {
            "phases": phases,
            "coarse_epochs": args.coarse_epochs,
            "coarse_lr": args.coarse_lr,
            "refiner_epochs": args.refiner_epochs,
            "pooled_with_busi": args.pool_busi,
            "pool_weight": args.pool_weight if args.pool_busi else None,
            "folds_to_run": folds_to_run,
            "split": summary["split"],
            "corrections_test_before": summary.get("init_test"),
            "corrections_test_after": summary.get("test"),
            # The blend of the fine-tuned and the starting weights kept (training.weight_blend).
            "blend": (summary.get("metrics") or {}).get("blend"),
        },
        "save_s": round(save_s, 1),
        "train_s": round(train_s, 1),
        "held_out_before": _evaluate(args.init_from, held_out, engine, onnx_dir),
        "held_out_after": _evaluate(tuned, held_out, engine, onnx_dir),
        "busi_test_before": _evaluate(args.init_from, busi_test, engine, onnx_dir),
        "busi_test_after": _evaluate(tuned, busi_test, engine, onnx_dir),
        "work_dir": str(work),
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
