"""The one list of serving-engine names (no heavy imports: settings and the CLI read it).

Each name is implemented by exactly one engine class in this package
(:data:`backend.app.engines.registry.ENGINES` checks that at import); ``auto`` is not an engine
but a choice resolved per machine by :func:`backend.app.engines.resolve_engine`.
"""

from __future__ import annotations

from typing import Literal

#: Every engine that can serve, in the order the docs list them.
ENGINE_NAMES: tuple[str, ...] = ("torch", "onnx", "onnx-int8", "openvino", "openvino-bf16")
AUTO = "auto"
#: What settings, ``serve --engine`` and compose accept.
ENGINE_CHOICES: tuple[str, ...] = (*ENGINE_NAMES, AUTO)
DEFAULT_ENGINE = AUTO

EngineName = Literal[ENGINE_NAMES]  # type: ignore[valid-type]
EngineChoice = Literal[ENGINE_CHOICES]  # type: ignore[valid-type]

ENGINE_HELP = (
    "'torch' (eager), 'onnx' (ONNX Runtime fp32), 'onnx-int8' (ONNX Runtime, int8 dynamic "
    "quantisation of the encoder's MatMuls), 'openvino' (OpenVINO fp32), 'openvino-bf16' (OpenVINO "
    "bf16; CPUs with native bf16) or 'auto' (default: openvino-bf16 where the CPU has native bf16, "
    "else onnx-int8; torch on a CUDA device)"
)
