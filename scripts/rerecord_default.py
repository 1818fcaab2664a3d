"""Re-evaluate the shipped default model on its test split after a change of the serving rules.

    python scripts/rerecord_default.py --reason "refiner.min_lesion_fraction 0.001 (speck rule)"

The bundle is unchanged; what the serving path does with its outputs (a rule of
:class:`training.inference.Predictor`, defaulted from ``training/config.py`` for a bundle whose
config predates it) changed, so the recorded test evaluation in ``models/default.json`` no longer
describes what the API serves. This evaluates ``models/default.pt`` on the test split of
``models/default_split.json`` with the pipeline's protocol and serving path, replaces ``test`` with
the fresh per-image evaluation and keeps the previous summary (without per-image records) in
``test_history`` with the reason. The records of the phase-1 and phase-2 models stay as they were
measured. Prints the new and the previous summary as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.config import REPO_ROOT
from training.data.datasets import list_samples
from training.data.splits import Split
from training.evaluate import evaluate
from training.inference import Predictor
from training.phases.context import write_json
from training.phases.refiner_finetune import embedding_cache_for


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reason", required=True, help="What changed in the serving path.")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    args = parser.parse_args(argv)

    record_path = args.models_dir / "default.json"
    record = json.loads(record_path.read_text())
    predictor = Predictor.from_bundle(args.models_dir / "default.pt")
    if predictor.model_version != record["model_version"]:
        raise SystemExit(
            f"{record_path} records {record['model_version']}, the bundle is {predictor.model_version}"
        )
    cfg = predictor.config
    samples = Split.load(args.models_dir / "default_split.json").test_samples(
        list_samples(cfg.data.dataset, cfg.data.root), source=str(cfg.data.root)
    )
    cache = embedding_cache_for(predictor.refiner, cfg.cache_dir)
    fresh = evaluate(predictor, samples, embedding_cache=cache) | {"split": "test"}
    fresh.pop("elapsed_s", None)
    previous = {k: v for k, v in record["test"].items() if k != "per_image"}
    record.setdefault("test_history", []).append({"replaced_because": args.reason, **previous})
    record["test"] = fresh
    write_json(record_path, record)  # atomic: an interrupted run leaves the old record whole
    summary = {
        "model_version": predictor.model_version,
        "reason": args.reason,
        "test": {k: v for k, v in fresh.items() if k != "per_image"},
        "previous": previous,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
