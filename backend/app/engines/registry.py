"""The registry of serving engines: every engine module imported, names resolved (``auto``)."""

from __future__ import annotations

from pathlib import Path

from backend.app.engines import onnxruntime_engine, openvino_engine, torch_engine  # noqa: F401 (register)
from backend.app.engines.base import AccelerationError, Engine, registered  # noqa: F401 (re-exported)
from backend.app.engines.names import AUTO, ENGINE_CHOICES, ENGINE_NAMES
from backend.app.engines.openvino_engine import cpu_has_native_bf16

_registered = registered()
if set(_registered) != set(ENGINE_NAMES):  # pragma: no cover - a programming error, seen at import
    raise RuntimeError(f"engines registered {sorted(_registered)} != ENGINE_NAMES {sorted(ENGINE_NAMES)}")
#: Engine classes by name, in the order of ENGINE_NAMES.
ENGINES: dict[str, type[Engine]] = {name: _registered[name] for name in ENGINE_NAMES}


def resolve_engine(choice: str, device: object = "cpu") -> str:
    """``"auto"`` → on a CPU ``"openvino-bf16"`` (native bf16 here) else ``"onnx-int8"``; on a GPU
    (``device`` other than ``cpu``) the first engine that runs there (``torch``). An engine name is
    returned as it is; anything else is a ``ValueError`` naming the choices."""
    if choice == AUTO:
        if str(device) != "cpu":
            return next(name for name, cls in ENGINES.items() if cls.runs_on_cuda)
        return "openvino-bf16" if cpu_has_native_bf16() else "onnx-int8"
    if choice not in ENGINES:
        raise ValueError(f"unknown inference engine {choice!r}; known: {', '.join(ENGINE_CHOICES)}")
    return choice


def get_engine(choice: str, device: object = "cpu") -> Engine:
    """The engine for a name or ``auto`` (resolved for ``device``)."""
    return ENGINES[resolve_engine(choice, device)]()


def accelerate_predictor(predictor, engine: str, cache_dir: Path):
    """Run the predictor's networks on ``engine`` (a name or ``auto``); returns the predictor.

    Raises :class:`AccelerationError` when the engine cannot be prepared, leaving the predictor
    unchanged (the caller decides whether to fall back to torch).
    """
    device = getattr(predictor, "device", "cpu")
    return get_engine(engine, device).prepare_predictor(predictor, Path(cache_dir))


def accelerate_refiner(refiner, engine: str, cache_dir: Path, device="cpu"):
    """Run a refiner's image encoder and mask decoder on ``engine`` (in place); returns it."""
    chosen = get_engine(engine, device)
    chosen.check_device(device)
    return chosen.prepare_refiner(refiner, Path(cache_dir))
