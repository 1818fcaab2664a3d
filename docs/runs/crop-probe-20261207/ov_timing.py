"""The refiner's encoder graph on OpenVINO bf16 at the crop shapes of ``crop_probe.py``; prints JSON.

Each ``Hc×Wc`` shape is exported to ONNX with the project's exporter, compiled by the serving
engine's :class:`OpenVinoSession` (bf16, 2 threads) and timed on random input (median of 15 after
3 warm-up calls).

    python docs/runs/crop-probe-20261207/ov_timing.py
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from crop_probe import encode  # noqa: E402

from backend.app.engines.onnx_export import _export  # noqa: E402
from backend.app.engines.openvino_engine import OpenVinoSession  # noqa: E402
from training.inference import Predictor  # noqa: E402
from training.machine import describe  # noqa: E402


class CropEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, images)


def main() -> None:
    torch.set_num_threads(2)
    encoder = Predictor.from_bundle("models/default.pt").refiner.image_encoder
    shapes = [(256, 256), (224, 256), (216, 256), (192, 256), (160, 256)]
    result = {"machine": describe(), "engine": "openvino-bf16", "threads": 2, "median_ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for hc, wc in shapes:
            path = Path(tmp) / f"encoder_{hc}x{wc}.onnx"
            with torch.no_grad():
                _export(
                    CropEncoder(encoder),
                    (torch.rand(1, 3, hc, wc),),
                    path,
                    "image encoder",
                    input_names=["images"],
                    output_names=["embeddings"],
                )
            session = OpenVinoSession(path, 2, bf16=True)
            feed = {"images": np.random.rand(1, 3, hc, wc).astype(np.float32)}
            for _ in range(3):
                session.run(None, feed)
            times = []
            for _ in range(15):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(1000 * (time.perf_counter() - start))
            result["median_ms"][f"{hc}x{wc}"] = round(statistics.median(times), 1)
            print(hc, wc, result["median_ms"][f"{hc}x{wc}"], file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
