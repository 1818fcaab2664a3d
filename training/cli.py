"""`ultrarefiner` command line: train, evaluate, export, split (serve/worker/start: backend).

Every hyper-parameter of :mod:`training.config` is a flag of ``ultrarefiner train``, generated from
the pydantic models (:func:`config_flags`), so no flag can be forgotten or fail to reach the code:
a field ``refiner_train.change_penalty_weight`` becomes ``--change-penalty-weight``; a field name
used by several sections is prefixed by its section (``--coarse-lr``, ``--refiner-lr``,
``--end-to-end-epochs``; ``--epochs`` sets the epochs of every phase that runs). Booleans are
``--flag/--no-flag``, sequences are comma-separated (``--folds-to-run 0,2``), ``none`` clears an
optional value. Bad input (missing dataset root, unreadable bundle, invalid value) → a one-line
error and exit code 2.
"""

from __future__ import annotations

import inspect
import signal
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ValidationError

from training.callbacks import ProgressEvent, TrainingCallback, TrainingCancelled
from training.config import ALL_PHASES, TrainingConfig, TransUNetConfig

app = typer.Typer(help="UltraRefiner Studio: train, evaluate, export and serve.", no_args_is_help=True)

#: Flag prefix of each config section (used when a field name is ambiguous).
SECTION_PREFIX = {
    "data": "data",
    "transunet": "transunet",
    "tinyvit": "tinyvit",
    "refiner": "refiner",
    "coarse": "coarse",
    "augment": "augment",
    "refiner_train": "refiner",
    "end_to_end": "end-to-end",
    "finetune": "finetune",
}
#: Fields whose bare name would mislead (``--augment`` looks like the phase): always prefixed.
ALWAYS_PREFIXED = {
    ("refiner", "checkpoint"),
    ("refiner", "pretrained"),
    ("coarse", "augment"),
    ("coarse", "optimizer"),
    ("coarse", "precision"),
    ("coarse", "pretrained_lr_scale"),
}
#: Sections whose flags are always prefixed and leave the bare names to the others
#: (``--tinyvit-img-size`` beside TransUNet's ``--img-size``).
PREFIXED_SECTIONS = {"tinyvit"}
#: Fields set otherwise: ``transunet.name`` by ``--config``.
NOT_FLAGS = {("transunet", "name")}
#: Top-level fields with their own options (``config_name`` → ``--config``, ``phases`` → argument).
TOP_LEVEL_SPECIAL = {"config_name", "phases"}
#: Flags written by hand in ``train``; generated names must not collide with them.
RESERVED_FLAGS = {"--config", "--epochs", "--resume", "--progress", "--no-progress", "--help"}
TRAIN_PHASES = {"coarse": ["coarse"], "augment": ["augment"], "refiner": ["refiner"],
                "end-to-end": ["end-to-end"], "all": list(ALL_PHASES)}  # fmt: skip


# ============================================================================================
# Flags generated from the config models


@dataclass(frozen=True)
class ConfigFlag:
    """One command-line flag ↔ one config field."""

    section: str | None  # None: a top-level field of TrainingConfig
    field: str
    flag: str  # "--change-penalty-weight"
    param: str  # python identifier of the option
    annotation: Any
    help: str

    @property
    def path(self) -> tuple[str, ...]:
        return (self.field,) if self.section is None else (self.section, self.field)

    @property
    def is_bool(self) -> bool:
        return _base_type(self.annotation) is bool

    @property
    def is_sequence(self) -> bool:
        return typing.get_origin(_base_type(self.annotation)) in (list, tuple)

    @property
    def optional(self) -> bool:
        return _is_optional(self.annotation)

    def parse(self, raw: Any) -> Any:
        """Command-line text → value for pydantic (which validates and converts it)."""
        if self.is_bool or not isinstance(raw, str):
            return raw
        text = raw.strip()
        if self.optional and text.lower() in ("none", "null", ""):
            return None
        if self.is_sequence:
            return [part for part in text.replace(" ", ",").split(",") if part]
        return text


def _is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def _base_type(annotation: Any) -> Any:
    if _is_optional(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _metavar(annotation: Any) -> str:
    base = _base_type(annotation)
    origin = typing.get_origin(base)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(base))
    if origin in (list, tuple):
        inner = [a for a in typing.get_args(base) if a is not Ellipsis]
        name = _metavar(inner[0]) if inner else "TEXT"
        return f"{name},…"
    names = {int: "INT", float: "FLOAT", Path: "PATH", str: "TEXT"}
    return names.get(base, "TEXT")


def _sections() -> dict[str, type[BaseModel]]:
    sections = {}
    for name, field in TrainingConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections[name] = annotation
    return sections


def _help_text(description: str | None, default: Any, section: str | None) -> str:
    text = (description or "").rstrip(".")
    if section == "transunet":
        return f"{text} (default: from --config)"
    if default is None or "default:" in text:
        return text
    return f"{text} (default: {default})"


def config_flags() -> list[ConfigFlag]:
    """One flag per leaf field of :class:`TrainingConfig` (sections and top level)."""
    sections = _sections()
    fields: list[tuple[str | None, str, Any]] = []
    for name, field in TrainingConfig.model_fields.items():
        if name not in sections and name not in TOP_LEVEL_SPECIAL:
            fields.append((None, name, field))
    for section, model in sections.items():
        for name, field in model.model_fields.items():
            if (section, name) not in NOT_FLAGS:
                fields.append((section, name, field))
    counts: dict[str, int] = {}
    for section, name, _ in fields:
        if section not in PREFIXED_SECTIONS:
            counts[name] = counts.get(name, 0) + 1
    flags: list[ConfigFlag] = []
    seen = set(RESERVED_FLAGS)
    for section, name, field in fields:
        bare = "--" + name.replace("_", "-")
        qualified = section is not None and (
            section in PREFIXED_SECTIONS
            or counts[name] > 1
            or (section, name) in ALWAYS_PREFIXED
            or bare in RESERVED_FLAGS
        )
        flag = f"--{SECTION_PREFIX[section]}-{name.replace('_', '-')}" if qualified else bare
        if flag in seen:
            raise RuntimeError(f"generated flag {flag} is not unique ({section}.{name})")
        seen.add(flag)
        default = field.get_default(call_default_factory=True)
        flags.append(
            ConfigFlag(
                section=section,
                field=name,
                flag=flag,
                param=(f"{section}__{name}" if section else name),
                annotation=field.annotation,
                help=_help_text(field.description, default, section),
            )
        )
    return flags


#: Help panel of each config section.
SECTION_PANEL = {
    None: "Run",
    "data": "Data",
    "transunet": "TransUNet architecture",
    "tinyvit": "TinyViT coarse architecture (--coarse-model tinyvit)",
    "refiner": "Refiner and prompts",
    "coarse": "Phase 1: coarse",
    "augment": "Phase 2a: mask augmentation",
    "refiner_train": "Phase 2b: refiner fine-tuning",
    "end_to_end": "Phase 3: end-to-end",
    "finetune": "Fine-tuning from a bundle (--init-from)",
}


def _option_parameters(flags: list[ConfigFlag]) -> list[inspect.Parameter]:
    parameters = []
    for flag in flags:
        panel = SECTION_PANEL[flag.section]
        if flag.is_bool:
            names = f"{flag.flag}/--no-{flag.flag[2:]}"
            annotation = Annotated[
                bool | None, typer.Option(names, help=flag.help, show_default=False, rich_help_panel=panel)
            ]
        else:
            annotation = Annotated[
                str | None,
                typer.Option(
                    flag.flag,
                    help=flag.help,
                    metavar=_metavar(flag.annotation),
                    show_default=False,
                    rich_help_panel=panel,
                ),
            ]
        parameters.append(inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=annotation))  # fmt: skip
    return parameters


def build_config(
    values: dict[str, Any],
    *,
    config_name: str | None = None,
    phases: list[str] | None = None,
    epochs: int | None = None,
    flags: list[ConfigFlag] | None = None,
) -> TrainingConfig:
    """The :class:`TrainingConfig` of parsed options (``values``: option param → raw value or None)."""
    flags = flags if flags is not None else config_flags()
    overrides: dict[str, Any] = {}
    for flag in flags:
        raw = values.get(flag.param)
        if raw is None:
            continue
        value = flag.parse(raw)
        if flag.section is None:
            overrides[flag.field] = value
        else:
            overrides.setdefault(flag.section, {})[flag.field] = value
    if epochs is not None:
        for section in ("coarse", "refiner_train", "end_to_end"):
            overrides.setdefault(section, {}).setdefault("epochs", epochs)
    if "transunet" in overrides:  # explicit sizes start from the named architecture, not the full one
        base = TransUNetConfig.named(config_name or "compact").model_dump()
        overrides["transunet"] = {**base, **overrides["transunet"]}
    if config_name is not None:
        overrides["config_name"] = config_name
    if phases is not None:
        overrides["phases"] = phases
    return TrainingConfig(**overrides)


# ============================================================================================
# Errors and progress


@contextmanager
def user_errors() -> Iterator[None]:
    """Expected failures → ``error: …`` on stderr and exit code 2 (no traceback)."""
    from training.checkpoints import BundleError

    try:
        yield
    except TrainingCancelled as cancelled:
        typer.echo(f"cancelled: {cancelled}", err=True)
        raise typer.Exit(130) from None
    except ValidationError as error:
        typer.echo(f"error: invalid configuration:\n{_validation_message(error)}", err=True)
        raise typer.Exit(2) from None
    except (BundleError, FileNotFoundError, NotADirectoryError, ValueError, KeyError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None


def _validation_message(error: ValidationError) -> str:
    by_path = {flag.path: flag.flag for flag in config_flags()}
    lines = []
    for item in error.errors():
        location = tuple(str(part) for part in item["loc"])
        name = by_path.get(location[:2]) or by_path.get(location[:1]) or ".".join(location)
        lines.append(f"  {name}: {item['msg']}")
    return "\n".join(lines)


class TerminalProgress(TrainingCallback):
    """A rich progress bar over the whole run; epoch, evaluation and warning lines; Ctrl-C → stop.

    ``bar=False`` (``--no-progress``) prints the same lines without the bar: what a log file of
    an unattended run needs. The first Ctrl-C asks the phase to stop after the current step (it
    saves, the run can be resumed with ``--resume``); a second one interrupts at once.
    """

    def __init__(self, console=None, *, bar: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            transient=False,
        )
        self.bar = bar
        self.task = None
        self.stop_requested = False
        self._previous_handler = None

    def __enter__(self) -> TerminalProgress:
        if self.bar:
            self.progress.start()
            self.task = self.progress.add_task("starting", total=1.0, detail="")
        if sys.platform != "win32":
            try:
                self._previous_handler = signal.signal(signal.SIGINT, self._interrupt)
            except ValueError:  # not the main thread
                self._previous_handler = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
        if self.bar:
            self.progress.stop()

    def _interrupt(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.console.print("[yellow]stopping after this step (Ctrl-C again to abort now)…")

    def should_stop(self) -> bool:
        return self.stop_requested

    def on_event(self, event: ProgressEvent) -> None:
        description = event.phase or event.kind
        if event.fold is not None:
            description += f" fold {event.fold}"
        if event.epoch is not None and event.epochs:
            description += f" epoch {event.epoch + 1}/{event.epochs}"
        detail = ""
        if event.kind == "step" and event.steps:
            detail = f"step {event.step + 1}/{event.steps}"
            if event.losses:
                detail += " " + " ".join(f"{k} {v:.4f}" for k, v in list(event.losses.items())[:3])
            elif event.message:
                detail += f" {event.message}"
        if self.task is not None and event.progress is not None:
            self.progress.update(self.task, completed=event.progress, description=description, detail=detail)
        if event.kind == "epoch_end":
            dice = "n/a" if event.dice is None else f"{event.dice:.4f}"
            losses = " ".join(f"{k} {v:.4f}" for k, v in event.losses.items())
            self.console.print(f"{description}: {losses} val Dice {dice} lr {event.lr or 0:.2e}")
        elif event.kind in ("evaluation", "run_start", "run_end", "fold_end") and event.message:
            self.console.print(f"[cyan]{event.phase or event.kind}: {event.message}")
        elif event.kind == "warning":
            self.console.print(f"[yellow]warning: {event.message}")
        elif not self.bar and event.kind == "step" and event.extra.get("stage") == "embeddings":
            # Minutes of image encoding on a CPU: a line every tenth, so a log shows it is alive.
            done, total = event.step + 1, event.steps or 0
            if total and (done == total or done % -(-total // 10) == 0):  # ceil(total / 10)
                self.console.print(f"{event.phase}: embedding images {done}/{total}")


# ============================================================================================
# Commands


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as _version

    typer.echo(_version("ultrarefiner-studio"))


_TRAIN_FLAGS = config_flags()


def _train(
    phase: str,
    config: str | None = None,
    epochs: int | None = None,
    resume: bool = False,
    progress: bool = True,
    **options: Any,
) -> None:
    """Train phases of the method (all: coarse → augment → refiner → end-to-end, then test + bundle)."""
    import json

    with user_errors():
        cfg = build_config(options, config_name=config, phases=TRAIN_PHASES[phase], epochs=epochs,
                           flags=_TRAIN_FLAGS)  # fmt: skip
        from training.data.datasets import list_samples
        from training.pipeline import run_training

        list_samples(cfg.data.dataset, cfg.data.root)  # fail early, clearly, on a bad dataset root
        if cfg.data.pooled:
            list_samples(cfg.data.pool_dataset, cfg.data.pool_root)
        with TerminalProgress(bar=progress) as terminal:
            summary = run_training(cfg, callback=terminal, resume=resume)
        brief = {
            k: summary[k] for k in ("output_dir", "bundle_path", "model_version", "coarse_folds", "test")
        }
        typer.echo(json.dumps(brief, indent=1, default=str))


_train.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            "phase",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[Literal[tuple(TRAIN_PHASES)], typer.Argument(help="Phase(s) to run.")],
        ),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Literal["compact", "full"] | None,
                typer.Option("--config", help="Named configuration (TransUNet size) (default: compact)"),
            ],
        ),
        inspect.Parameter(
            "epochs",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                int | None, typer.Option("--epochs", min=1, help="Epochs of every phase run.")
            ],
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir.")],
        ),
        inspect.Parameter(
            "progress",
            inspect.Parameter.KEYWORD_ONLY,
            default=True,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--progress/--no-progress",
                    help="Show a progress bar (--no-progress: the epoch, evaluation and warning lines only).",
                ),
            ],
        ),
        *_option_parameters(_TRAIN_FLAGS),
    ]
)
app.command("train", help=_train.__doc__, no_args_is_help=True)(_train)


@app.command("evaluate")
def evaluate_command(
    dataset: Annotated[str, typer.Option(help="Dataset layout: busi, busbra, bus, bus_uc, bus_uclm.")],
    root: Annotated[Path, typer.Option(help="Dataset root folder.")],
    output: Annotated[Path, typer.Option(help="Report JSON to write.")],
    model: Annotated[str, typer.Option(help="Bundle file, or 'default' (shipped/untrained).")] = "default",
    split: Annotated[Literal["test", "all"], typer.Option(help="Images to use.")] = "test",
    split_file: Annotated[
        Path | None, typer.Option(help="Split JSON (default: the bundle's seeded split).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Evaluate only the first N of those images (round-robin labels)."),
    ] = None,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(help="Inference device.")] = "cpu",
    cache_dir: Annotated[Path | None, typer.Option(help="Embedding cache folder (skip the encoder).")] = None,
) -> None:
    """Evaluate a model bundle: per-image Dice (coarse vs refined) at native resolution."""
    with user_errors():
        from training.data.datasets import list_samples
        from training.data.splits import Split, seeded_split
        from training.evaluate import evaluate, format_report
        from training.inference import Predictor
        from training.phases.context import limit_samples, write_json

        samples = list_samples(dataset, root)
        predictor = Predictor.from_bundle(None if model == "default" else Path(model), device=device)
        if split == "test":
            if split_file is not None:
                chosen = Split.load(split_file)
            else:
                # The bundle's own seeded split: made on the images its run used (its data.limit),
                # never on the --limit subset (that split's "test" images could be training images).
                data = predictor.config.data
                pool = limit_samples(samples, data.limit) if dataset == data.dataset else samples
                chosen = seeded_split(pool, data, dataset=dataset)
            samples = chosen.test_samples(samples, source=str(root))
        samples = limit_samples(samples, limit)
        cache = None
        if cache_dir is not None:
            from training.phases.refiner_finetune import embedding_cache_for

            cache = embedding_cache_for(predictor.refiner, cache_dir)
        with _simple_bar(len(samples), "evaluating") as advance:
            report = evaluate(predictor, samples, embedding_cache=cache, on_image=lambda i, n, r: advance())
        report.update({"dataset": dataset, "root": str(root), "split": split, "model": model})
        write_json(output, report)
        typer.echo(format_report(report))
        typer.echo(f"report: {output}")


@contextmanager
def _simple_bar(total: int, description: str):
    from tqdm import tqdm

    with tqdm(total=total, desc=description, file=sys.stderr, leave=False) as bar:
        yield lambda: bar.update(1)


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Option(help="Training output directory.")],
    output: Annotated[Path, typer.Option(help="Bundle file to write.")],
) -> None:
    """Export a run's final models as a bundle (the format Predictor and the server load)."""
    with user_errors():
        from training.checkpoints import load_bundle
        from training.pipeline import export_bundle

        path = export_bundle(run_dir, output)
        bundle = load_bundle(path)
        typer.echo(f"{path} ({bundle['model_version']})")


_SPLIT_FLAGS = [flag for flag in config_flags() if flag.section == "data" and flag.field != "split_file"]


def _split(output: Path, **options: Any) -> None:
    """Write the seeded, duplicate-aware, stratified split (test + K folds) of a dataset."""
    import json

    with user_errors():
        from training.data.datasets import list_samples
        from training.data.splits import seeded_split
        from training.phases.context import limit_samples

        cfg = build_config(options, flags=_SPLIT_FLAGS)
        data = cfg.data
        samples = limit_samples(list_samples(data.dataset, data.root), data.limit)
        split = seeded_split(samples, data)
        split.save(output)
        typer.echo(json.dumps(split.counts(), indent=1))
        typer.echo(f"split: {output}")


_split.__signature__ = inspect.Signature(
    [
        inspect.Parameter(
            "output",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[Path, typer.Option("--output", help="Split JSON to write.")],
        ),
        *_option_parameters(_SPLIT_FLAGS),
    ]
)
app.command("split", help=_split.__doc__)(_split)
