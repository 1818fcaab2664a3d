"""Backend JSON → what the admin UI shows (tables, plots, Markdown). No Gradio, no HTTP.

Tolerant of missing keys: a run that has not started has no phase, a metric row may lack a
loss, an evaluation may lack the refined Dice. Every function returns plain data (lists of
rows, pandas frames, Markdown strings, matplotlib figures) that the app hands to Gradio.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pandas as pd

JSON = dict[str, Any]

RUN_COLUMNS = ["ID", "Status", "Phase", "Fold", "Epoch", "Progress %", "ETA", "Created"]
FOLD_COLUMNS = ["Fold", "Phase", "Best epoch", "Baseline (coarse) Dice", "Refined Dice", "Δ Dice"]
EVAL_COLUMNS = ["Phase", "Dataset", "Split", "Images", "Baseline Dice", "Refined Dice", "Δ Dice"]
#: Run states that ``POST /api/runs/{id}/resume`` accepts.
RESUMABLE = ("cancelled", "lost", "failed")

#: What each stored phase name means, as the tables show it.
PHASE_LABELS = {
    "coarse": "phase 1 · coarse",
    "augment": "phase 2a · mask augmentation",
    "refiner": "phase 2 · refiner (baseline of phase 3)",
    "end_to_end": "phase 3 · end-to-end",
    "end-to-end": "phase 3 · end-to-end",
    "test": "test split · final model",
    "blend": "blend with the starting model",
}


def phase_label(phase: Any, stage: Any = None) -> str:
    """A phase's readable name (``refiner`` → the phase-2 baseline), with ``before training`` for a
    baseline-stage evaluation."""
    text = PHASE_LABELS.get(str(phase or ""), str(phase or ""))
    return f"{text} · before training" if stage == "baseline" else text


MODEL_COLUMNS = [
    "ID",
    "Active",
    "Version",
    "Run",
    "Evaluated on",
    "Coarse Dice",
    "Refined Dice",
    "Δ Dice",
    "Fine-tuned: refined Dice before → after",
    "Created",
]

STATUS_ICONS = {
    "queued": "…",
    "running": "▶",
    "succeeded": "✓",
    "failed": "✗",
    "cancelled": "■",
    "lost": "?",
}
TERMINAL = {"succeeded", "failed", "cancelled"}


def fmt_duration(seconds: Any) -> str:
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return ""
    if math.isnan(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def fmt_time(value: Any) -> str:
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_dice(value: Any, signed: bool = False) -> str:
    if value is None:
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return ""
    return f"{number:+.4f}" if signed else f"{number:.4f}"


def progress_percent(run: JSON) -> float:
    """``RunSummary.progress`` (0..1) as a percentage."""
    value = run.get("progress")
    return round(float(value) * 100.0, 1) if isinstance(value, int | float) else 0.0


def eta_text(run: JSON) -> str:
    """``RunSummary.eta_s`` as a duration (nothing once the run ended)."""
    if str(run.get("status")) in TERMINAL or run.get("eta_s") is None:
        return ""
    return fmt_duration(run["eta_s"]) or str(run["eta_s"])


def epoch_text(run: JSON) -> str:
    epoch, epochs = run.get("epoch"), run.get("epochs")
    if epoch is None:
        return ""
    return f"{int(epoch) + 1}/{epochs}" if epochs else str(int(epoch) + 1)


def fold_text(value: Any) -> str:
    if value is None or value == "" or (isinstance(value, int | float) and value < 0):
        return ""
    return str(value)


def run_rows(runs: list[JSON]) -> list[list[Any]]:
    rows = []
    for run in runs:
        status = str(run.get("status") or "")
        rows.append(
            [
                run.get("id"),
                status,
                run.get("phase") or "",
                fold_text(run.get("fold")),
                epoch_text(run),
                progress_percent(run),
                eta_text(run),
                fmt_time(run.get("created_at")),
            ]
        )
    return rows


def run_choices(runs: list[JSON]) -> list[tuple[str, str]]:
    choices = []
    for run in runs:
        run_id = str(run.get("id"))
        status = str(run.get("status") or "")
        label = f"#{run_id} · {status}"
        config = run.get("config") or {}
        data = config.get("data") if isinstance(config, dict) else None
        if isinstance(data, dict) and data.get("dataset"):
            label += f" · {data['dataset']}"
        choices.append((label, run_id))
    return choices


def run_summary_md(run: JSON) -> str:
    status = str(run.get("status") or "?")
    icon = STATUS_ICONS.get(status, "")
    lines = [f"### Run #{run.get('id')} {icon} `{status}`"]
    facts = []
    if run.get("phase"):
        facts.append(f"phase **{run['phase']}**")
    if fold_text(run.get("fold")):
        facts.append(f"fold **{run['fold']}**")
    if epoch_text(run):
        facts.append(f"epoch **{epoch_text(run)}**")
    facts.append(f"progress **{progress_percent(run):.1f}%**")
    if eta_text(run):
        facts.append(f"ETA **{eta_text(run)}**")
    if run.get("device"):
        facts.append(f"device `{run['device']}`")
    lines.append(" · ".join(facts))
    times = []
    for key, label in (("created_at", "created"), ("started_at", "started"), ("finished_at", "finished")):
        if run.get(key):
            times.append(f"{label} {fmt_time(run[key])}")
    if times:
        lines.append(" · ".join(times))
    phases = run.get("phases") or (run.get("config") or {}).get("phases")
    if phases:
        lines.append("phases: " + " → ".join(str(p) for p in phases))
    if run.get("error"):
        lines.append(f"\n**Error:** {run['error']}")
    return "\n\n".join(lines)


def _flatten_losses(row: JSON) -> dict[str, float]:
    values: dict[str, float] = {}
    losses = row.get("losses")
    if isinstance(losses, dict):
        for key, value in losses.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[key if "loss" in key else f"{key} loss"] = float(value)
    for key, value in row.items():
        if "loss" in key and isinstance(value, int | float) and not isinstance(value, bool):
            values[key] = float(value)
    return values


def _series_name(row: JSON) -> str:
    phase = str(row.get("phase") or "")
    fold = row.get("fold")
    return f"{phase} fold {fold}" if fold_text(fold) else phase


def epoch_frames(metrics: JSON) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(loss frame, Dice frame), each with columns ``epoch``, ``value``, ``series``."""
    rows = metrics.get("epochs") or []
    losses, dices = [], []
    for row in rows:
        if not isinstance(row, dict) or row.get("epoch") is None:
            continue
        epoch = int(row["epoch"]) + 1
        series = _series_name(row)
        for name, value in _flatten_losses(row).items():
            label = name if name in ("total", "loss") else name
            losses.append({"epoch": epoch, "value": value, "series": f"{series} · {label}"})
        dice = row.get("dice")
        if isinstance(dice, int | float):
            dices.append({"epoch": epoch, "value": float(dice), "series": series})
    columns = ["epoch", "value", "series"]
    return pd.DataFrame(losses, columns=columns), pd.DataFrame(dices, columns=columns)


def curves_figure(frame: pd.DataFrame, title: str, ylabel: str):
    """A small matplotlib figure of one value per epoch and series (markers: 1-epoch runs show)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 3.2), dpi=90, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if frame.empty:
        axes.text(0.5, 0.5, "no epochs yet", ha="center", va="center", transform=axes.transAxes, color="gray")
    else:
        for series, group in frame.groupby("series", sort=False):
            group = group.sort_values("epoch")
            axes.plot(group["epoch"], group["value"], marker="o", markersize=4, label=str(series))
        axes.xaxis.get_major_locator().set_params(integer=True)
        last = int(frame["epoch"].max())
        axes.set_xlim(0.5, last + 0.5)  # one epoch: a point in the middle, not at a squeezed edge
        axes.set_xticks(range(1, last + 1, max(1, last // 10)))
        axes.legend(fontsize=7, loc="best")
    return figure


def _eval_fold(evaluation: JSON, default_fold: int | None) -> int | None:
    """The fold a validation evaluation was computed on (``extra.fold``, ``fold3``-style split,
    else the fold the later phases continued from)."""
    extra = evaluation.get("extra") if isinstance(evaluation.get("extra"), dict) else {}
    for value in (evaluation.get("fold"), extra.get("fold")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    split = str(evaluation.get("split") or "")
    digits = "".join(ch for ch in split if ch.isdigit())
    if "fold" in split and digits:
        return int(digits)
    if split in ("val", "valid", "validation"):
        return default_fold
    return None


def dice_triplet(item: JSON) -> tuple[Any, Any, Any]:
    """(coarse, refined, delta) Dice of an evaluation (``EvaluationRead``'s keys)."""
    coarse = item.get("dice_coarse")
    refined = item.get("dice_refined")
    delta = item.get("delta")
    if delta is None and isinstance(coarse, int | float) and isinstance(refined, int | float):
        delta = refined - coarse
    return coarse, refined, delta


def final_fold(run: JSON | None) -> int | None:
    """The coarse fold whose model the later phases continued from (from the run's summary)."""
    summary = (run or {}).get("summary")
    if not isinstance(summary, dict):
        return None
    phases = summary.get("phase_summaries")
    coarse = phases.get("coarse") if isinstance(phases, dict) else None
    value = coarse.get("final_fold") if isinstance(coarse, dict) else summary.get("final_fold")
    return value if isinstance(value, int) else None


def fold_rows(metrics: JSON, run: JSON | None = None) -> list[list[Any]]:
    """Per fold and stage: the coarse model's validation Dice (the baseline), and for the
    refining phases evaluated on that fold's validation images, refined Dice and delta."""
    rows: list[list[Any]] = []
    for item in metrics.get("folds") or []:
        if not isinstance(item, dict):
            continue
        best = item.get("best_epoch")
        coarse, refined, delta = dice_triplet(item)
        if coarse is None and str(item.get("phase")) == "coarse":
            coarse = item.get("val_dice")
        rows.append(
            [
                fold_text(item.get("fold")),
                phase_label(item.get("phase")),
                int(best) + 1 if isinstance(best, int) else "",
                fmt_dice(coarse) if coarse is not None else fmt_dice(item.get("val_dice")),
                fmt_dice(refined),
                fmt_dice(delta, signed=True),
            ]
        )
    default_fold = final_fold(run)
    for evaluation in metrics.get("evaluations") or []:
        if not isinstance(evaluation, dict):
            continue
        fold = _eval_fold(evaluation, default_fold)
        if fold is None and str(evaluation.get("split")) not in ("val", "valid", "validation"):
            continue
        coarse, refined, delta = dice_triplet(evaluation)
        rows.append(
            [
                "" if fold is None else str(fold),
                phase_label(evaluation.get("phase"), evaluation.get("stage")),
                "",
                fmt_dice(coarse),
                fmt_dice(refined),
                fmt_dice(delta, signed=True),
            ]
        )
    return rows


def eval_rows(metrics: JSON) -> list[list[Any]]:
    rows = []
    for evaluation in metrics.get("evaluations") or []:
        if not isinstance(evaluation, dict):
            continue
        coarse, refined, delta = dice_triplet(evaluation)
        rows.append(
            [
                phase_label(evaluation.get("phase"), evaluation.get("stage")),
                evaluation.get("dataset") or "",
                evaluation.get("split") or "",
                evaluation.get("n_images") if evaluation.get("n_images") is not None else "",
                fmt_dice(coarse),
                fmt_dice(refined),
                fmt_dice(delta, signed=True),
            ]
        )
    return rows


def logs_text(run: JSON, metrics: JSON | None = None) -> str:
    parts = []
    if run.get("error"):
        parts.append(f"ERROR: {run['error']}")
    warnings = (metrics or {}).get("warnings") or run.get("warnings") or []
    for warning in warnings:
        parts.append(f"WARNING: {warning if isinstance(warning, str) else warning.get('message', warning)}")
    tail = run.get("log_tail") or run.get("logs") or (metrics or {}).get("log_tail")
    if tail:
        parts.append(str(tail).rstrip())
    return "\n".join(parts) if parts else "(no log lines yet)"


def metric_block(metrics: JSON) -> JSON:
    """The metrics to show for a model: top-level Dice values, else the best-named nested block.

    The worker stores evaluations as ``{"<dataset>/<split>[/<phase>]": {dice_coarse, ...}}``;
    the test split is preferred, then any other split.
    """
    if any(k in metrics for k in ("dice_coarse", "dice_refined")):
        return metrics
    blocks = [
        (str(key), value)
        for key, value in metrics.items()
        if isinstance(value, dict) and ("dice_coarse" in value or "dice_refined" in value)
    ]
    if not blocks:
        return {}
    blocks.sort(key=lambda item: (0 if "test" in item[0] else 1, item[0].count("/"), item[0]))
    return {**blocks[0][1], "_name": blocks[0][0]}


def model_version_name(model: JSON) -> str:
    for key in ("name", "model_version"):
        if model.get(key):
            return str(model[key])
    path = str(model.get("bundle_path") or "")
    return path.rsplit("/", 1)[-1].removesuffix(".pt") if path else ""


def model_rows(models: list[JSON]) -> list[list[Any]]:
    rows = []
    for model in models:
        metrics = model.get("metrics") if isinstance(model.get("metrics"), dict) else {}
        block = metric_block(metrics)
        coarse, refined, delta = dice_triplet(block)
        rows.append(
            [
                model.get("id"),
                ("✓ active" if model.get("active") else "")
                + (" · shipped default" if model.get("shipped") else ""),
                model_version_name(model),
                model.get("run_id") if model.get("run_id") is not None else "",
                block.get("_name", ""),
                fmt_dice(coarse),
                fmt_dice(refined),
                fmt_dice(delta, signed=True),
                fine_tuning_text(metrics),
                fmt_time(model.get("created_at")),
            ]
        )
    return rows


def fine_tuning_text(metrics: JSON) -> str:
    """``0.819 → 0.859 from compact-…``: the run's test split scored by the model it started from
    (``init_test``) and by itself (``test``); empty for a model trained from scratch."""
    before, after = metrics.get("init_test"), metrics.get("test")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    source = (metrics.get("init_from") or {}).get("model_version") or "?"
    text = f"{fmt_dice(before.get('dice_refined'))} → {fmt_dice(after.get('dice_refined'))}"
    # A pooled run (e.g. busi + corrections): what each dataset's held-out part gained or kept.
    parts_before, parts_after = before.get("by_dataset"), after.get("by_dataset")
    if isinstance(parts_before, dict) and isinstance(parts_after, dict):
        each = [
            f"{name} {fmt_dice((parts_before.get(name) or {}).get('dice_refined'))} → "
            f"{fmt_dice((part or {}).get('dice_refined'))}"
            for name, part in parts_after.items()
        ]
        text += f" ({'; '.join(each)})"
    text += f" from {source}"
    blend = metrics.get("blend")
    if (
        isinstance(blend, dict)
        and blend.get("status") == "chosen"
        and isinstance(blend.get("alpha"), int | float)
    ):
        # How far from the starting weights the guard let the run go (training.weight_blend).
        text += f", blend α {blend['alpha']:g}"
    return text


def model_choices(models: list[JSON]) -> list[tuple[str, str]]:
    choices = []
    for model in models:
        label = f"#{model.get('id')} {model_version_name(model)}".strip()
        if model.get("active"):
            label += " (active)"
        choices.append((label, str(model.get("id"))))
    return choices
