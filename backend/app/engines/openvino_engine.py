"""``openvino`` and ``openvino-bf16``: the exported graphs run by OpenVINO's CPU plugin.

``openvino`` computes in fp32, ``openvino-bf16`` with bf16 inference precision for all three
graphs, on CPUs with native bf16 only (AVX512-BF16 or AMX): elsewhere it refuses
(:class:`AccelerationError`) rather than let OpenVINO silently compute in fp32.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from backend.app.engines.base import AccelerationError, register
from backend.app.engines.graph import GraphEngine


@functools.cache
def _openvino_core():
    """One OpenVINO ``Core`` per process, shared by every session (its methods are thread-safe)."""
    import openvino

    return openvino.Core()


def cpu_has_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 natively here (AVX512-BF16 or AMX)."""
    try:
        core = _openvino_core()
    except ImportError:
        return False
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class _Input:
    def __init__(self, name: str) -> None:
        self.name = name


def compile_config(num_threads: int, *, bf16: bool) -> dict:
    """The CPU plugin settings every served graph is compiled with."""
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
        "INFERENCE_NUM_THREADS": num_threads,
        "PERFORMANCE_HINT": "LATENCY",
        # torch runs the prompts and paste-back between the graphs, on the same cores.
        "ENABLE_CPU_PINNING": False,
    }


class OpenVinoSession:
    """An OpenVINO compiled model behind the two calls this module makes of an ONNX Runtime
    ``InferenceSession`` (``get_inputs``, ``run``); thread-safe (one infer request per thread)."""

    def __init__(self, path: Path, num_threads: int, *, bf16: bool) -> None:
        try:
            core = _openvino_core()
        except ImportError as error:
            raise AccelerationError("OpenVINO is not installed (pip install openvino)") from error
        if bf16 and not cpu_has_native_bf16():
            raise AccelerationError(
                "this CPU has no native bf16 (AVX512-BF16 or AMX); use inference_engine='openvino' "
                "(fp32), 'onnx-int8' or 'auto'"
            )
        try:
            self._compiled = core.compile_model(
                core.read_model(str(path)), "CPU", compile_config(num_threads, bf16=bf16)
            )
        except Exception as error:
            raise AccelerationError(f"OpenVINO could not load {path.name} ({type(error).__name__})") from None
        self._inputs = [_Input(port.get_any_name()) for port in self._compiled.inputs]
        self._outputs = list(self._compiled.outputs)
        self._local = threading.local()
        #: The precision OpenVINO actually computes in ("f32" or "bf16").
        self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def get_inputs(self) -> list[_Input]:
        return self._inputs

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs in graph order (``output_names`` must be ``None``, as this module passes)."""
        if output_names is not None:
            raise ValueError("OpenVinoSession.run returns all outputs; pass output_names=None")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        # The feed's arrays are the caller's for the length of this call: no copy into the request.
        results = request.infer(feed, share_inputs=True)
        # Copies: the request's output buffers are reused by its next inference.
        return [np.array(results[port]) for port in self._outputs]


@register
class OpenVinoEngine(GraphEngine):
    name = "openvino"
    bf16 = False

    def session(self, path: Path, num_threads: int):
        return OpenVinoSession(path, num_threads, bf16=self.bf16)


@register
class OpenVinoBf16Engine(OpenVinoEngine):
    name = "openvino-bf16"
    bf16 = True
