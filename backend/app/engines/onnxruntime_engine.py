"""``onnx`` and ``onnx-int8``: the exported graphs run by ONNX Runtime's CPU provider.

``onnx`` runs all three graphs in fp32; ``onnx-int8`` runs the image encoder with int8 dynamic
quantisation of its ``MatMul`` nodes only (convolutions and attention softmax stay fp32, which
keeps the accuracy drop small), the coarse segmenter and the decoder in fp32 (quantising them
saved little and changed the masks).
"""

from __future__ import annotations

from pathlib import Path

from backend.app.engines.base import AccelerationError, register
from backend.app.engines.graph import GraphEngine


def onnxruntime_session(path: Path, num_threads: int):
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise AccelerationError("onnxruntime is not installed") from error
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Three sessions run one after the other per request: idle workers that spin (ORT's default)
    # steal the cores of the next session (server p50 552 → 497 ms per new image on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise AccelerationError(f"ONNX Runtime could not load {path.name} ({type(error).__name__})") from None


@register
class OnnxEngine(GraphEngine):
    name = "onnx"

    def session(self, path: Path, num_threads: int):
        return onnxruntime_session(path, num_threads)


@register
class OnnxInt8Engine(OnnxEngine):
    name = "onnx-int8"
    int8_encoder = True
