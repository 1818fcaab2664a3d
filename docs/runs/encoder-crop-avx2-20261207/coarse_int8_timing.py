"""The shipped coarse graph (``tinyvit`` at 112 px) on ONNX Runtime fp32, on ONNX Runtime with the
encoder's int8 recipe applied to its MatMuls, and on OpenVINO fp32; prints JSON (median of 20 after
3 warm-up calls, 2 threads, random input; the largest logit difference from ONNX Runtime fp32).

    python docs/runs/encoder-crop-avx2-20261207/coarse_int8_timing.py
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backend.app.engines.onnx_export import onnx_coarse_path, quantize_matmul_int8
from backend.app.engines.onnxruntime_engine import onnxruntime_session
from backend.app.engines.openvino_engine import OpenVinoSession
from training.inference import Predictor
from training.machine import describe


def main() -> None:
    torch.set_num_threads(2)
    predictor = Predictor.from_bundle("models/default.pt")
    with tempfile.TemporaryDirectory() as tmp:
        side, channels = predictor.coarse_size, predictor.coarse_channels
        source = onnx_coarse_path(predictor.coarse, channels, side, Path(tmp))
        quantised = quantize_matmul_int8(source, Path(tmp) / "coarse.int8.onnx")
        images = np.random.default_rng(0).random((1, channels, side, side), dtype=np.float32)
        result = {"machine": describe(), "coarse_size": side, "median_ms": {}, "max_abs_logit_diff": {}}
        reference = None
        sessions = {
            "onnxruntime-fp32": onnxruntime_session(source, 2),
            "onnxruntime-int8-matmul": onnxruntime_session(quantised, 2),
            "openvino-fp32": OpenVinoSession(source, 2, bf16=False),
        }
        for name, session in sessions.items():
            feed = {session.get_inputs()[0].name: images}
            for _ in range(3):
                logits = session.run(None, feed)[0]
            times = []
            for _ in range(20):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(1000 * (time.perf_counter() - start))
            reference = logits if reference is None else reference
            result["median_ms"][name] = round(statistics.median(times), 1)
            result["max_abs_logit_diff"][name] = round(float(np.abs(logits - reference).max()), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
