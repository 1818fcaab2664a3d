"""Serving engines: how the served networks run (``settings.inference_engine``).

One interface (:class:`~backend.app.engines.base.Engine`), one module per engine
(:mod:`.torch_engine`, :mod:`.onnxruntime_engine`, :mod:`.openvino_engine`; the two graph
runtimes share :mod:`.graph` and :mod:`.onnx_export`), one list of names
(:data:`~backend.app.engines.names.ENGINE_NAMES`).

``auto`` (:func:`resolve_engine`), the default, picks ``openvino-bf16`` where the CPU has native
bf16, else ``onnx-int8``: the fastest engine measured on each kind of CPU, both within the allowed
Dice drop of torch (README, Measured numbers). On a CUDA device it picks ``torch``, the one engine
that runs there.
"""

from __future__ import annotations

from backend.app.engines.names import AUTO, DEFAULT_ENGINE, ENGINE_CHOICES, ENGINE_NAMES

#: Served lazily from :mod:`.registry` (it imports torch and the runtimes); the names above do not.
_FROM_REGISTRY = (
    "ENGINES",
    "AccelerationError",
    "Engine",
    "accelerate_predictor",
    "accelerate_refiner",
    "cpu_has_native_bf16",
    "get_engine",
    "resolve_engine",
)

__all__ = ["AUTO", "DEFAULT_ENGINE", "ENGINE_CHOICES", "ENGINE_NAMES", *_FROM_REGISTRY]


def __getattr__(name: str):
    if name in _FROM_REGISTRY:
        from backend.app.engines import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
