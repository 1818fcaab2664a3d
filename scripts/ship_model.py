"""Ship a finished training run as the default model: ``models/default.{pt,json}`` and its split.

    python scripts/ship_model.py --run-dir runs/compact-e30 --command "ultrarefiner train all ..."

Copies the run's ``bundle.pt`` and its split (``split.json``, or the ``--split-file`` it was
given), and writes ``models/default.json``: the pipeline's
own per-image test evaluation of the bundle (``evaluation_test.json``), the per-fold phase-1
figures, the phase-2b/3 summaries, and the test split evaluated after each phase — phase 1
(final coarse model + the pretrained refiner) and phase 2 (+ the fine-tuned refiner) — with the
same protocol and serving path (``training.evaluate.evaluate`` through a ``Predictor``). The model
card quotes these numbers; ``tests/integration/test_default_model.py`` re-checks them.
Prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from training.checkpoints import build_seeded_refiner, load_bundle, load_checkpoint, make_bundle
from training.config import REPO_ROOT, TrainingConfig
from training.data.datasets import list_samples
from training.data.splits import Split
from training.evaluate import evaluate
from training.inference import Predictor
from training.phases.context import COARSE_DIR, END_TO_END_DIR, REFINER_DIR, read_json
from training.phases.refiner_finetune import embedding_cache_for


def _evaluate_bundle(bundle: dict, cfg: TrainingConfig, samples: list) -> dict:
    predictor = Predictor.from_bundle_dict(bundle)
    cache = embedding_cache_for(predictor.refiner, cfg.cache_dir)
    report = evaluate(predictor, samples, embedding_cache=cache)
    return {k: v for k, v in report.items() if k != "per_image"} | {"split": "test"}


def _split_path(run: Path, cfg: TrainingConfig) -> Path:
    """The run's own ``split.json``, else the split its config names (``TrainingConfig.split_path``
    with the run folder as output: a run given ``--split-file`` writes no split of its own)."""
    own = run / "split.json"
    trained_on = cfg.model_copy(update={"output_dir": run}).split_path
    candidates = [own, trained_on] if trained_on.is_absolute() else [own, trained_on, REPO_ROOT / trained_on]
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(f"{run} has no split: neither split.json nor its data.split_file exists")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--command", required=True, help="The exact command that trained the run.")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    args = parser.parse_args()

    run = args.run_dir
    needed = ["config.json", "bundle.pt", "evaluation_test.json", f"{COARSE_DIR}/final.pt"]
    missing = [name for name in needed if not (run / name).is_file()]
    if missing:
        raise SystemExit(f"{run} is not a finished `train all` run: missing {', '.join(missing)}")
    cfg = TrainingConfig.from_stored(read_json(run / "config.json"))
    split_path = _split_path(run, cfg)
    bundle = load_bundle(run / "bundle.pt")
    test = read_json(run / "evaluation_test.json")
    split = Split.load(split_path)
    samples = split.test_samples(list_samples(cfg.data.dataset, cfg.data.root), source=str(cfg.data.root))

    coarse = load_checkpoint(run / COARSE_DIR / "final.pt")["model"]
    phase1 = make_bundle(
        config=cfg,
        coarse_state_dict=coarse,
        refiner_state_dict=build_seeded_refiner(cfg).trainable_state_dict(),
        metrics={},
        untrained=False,
    )
    phase2 = make_bundle(
        config=cfg,
        coarse_state_dict=coarse,
        refiner_state_dict=load_checkpoint(run / REFINER_DIR / "best.pt")["refiner"],
        metrics={},
        untrained=False,
    )
    record = {
        "model_version": bundle["model_version"],
        "dataset": cfg.data.dataset,
        "split_seed": cfg.data.seed,
        "folds": cfg.data.folds,
        "command": args.command,
        "coarse_folds": bundle["metrics"]["coarse_folds"],
        "test": test,
        "test_after_phase1": _evaluate_bundle(phase1, cfg, samples),
        "test_after_phase2": _evaluate_bundle(phase2, cfg, samples),
        # The phase summaries without their per-epoch histories (the run directory keeps those).
        **{
            key: {k: v for k, v in read_json(run / folder / "summary.json").items() if k != "history"}
            for key, folder in (("refiner", REFINER_DIR), ("end_to_end", END_TO_END_DIR))
        },
    }

    models = args.models_dir
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "bundle.pt", models / "default.pt")
    if split_path.resolve() != (models / "default_split.json").resolve():
        shutil.copyfile(split_path, models / "default_split.json")
    (models / "default.json").write_text(json.dumps(record, indent=1) + "\n")
    summary = {
        name: {k: record[name].get(k) for k in ("dice_coarse", "dice_refined", "delta")}
        for name in ("test_after_phase1", "test_after_phase2", "test")
    }
    print(json.dumps({"model_version": record["model_version"], **summary}, indent=1))


if __name__ == "__main__":
    main()
