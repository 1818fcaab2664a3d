"""Where a new image's time goes on OpenVINO bf16: the served graphs profiled by layer type; prints JSON.

The shipped bundle is prepared by the ``openvino-bf16`` engine as the server does, so the graphs are
the served ones: the coarse segmenter, the full 256² encoder and the 224×256 crop encoder (the
crop of ``benign (1).png``). Each is compiled again with the engine's settings
plus ``PERF_COUNT`` and run on the inputs of that image; per graph the script reports the median
wall time of 15 calls and, from the median call's profile, the time per executed layer type.

    python docs/runs/encoder-crop-zen4-20261207/ov_profile.py > ov_profile.json
"""

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from PIL import Image

from backend.app.engines.openvino_engine import compile_config
from backend.app.engines.registry import get_engine
from training.data.transforms import coarse_input, refiner_input
from training.inference import Predictor
from training.machine import describe

IMAGE = Path("../shared/data/BUSI/Dataset_BUSI_with_GT/benign/benign (1).png")
RUNS = 15


def profile(path: Path, feed: list[np.ndarray]) -> dict:
    config = {**compile_config(2, bf16=True), "PERF_COUNT": True}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer(feed)
    runs = []
    for _ in range(RUNS):
        started = time.perf_counter()
        request.infer(feed)
        wall = 1000 * (time.perf_counter() - started)
        by_type: dict[str, float] = defaultdict(float)
        for layer in request.profiling_info:
            by_type[layer.node_type] += layer.real_time.total_seconds() * 1000
        runs.append((wall, dict(by_type)))
    runs.sort(key=lambda run: run[0])
    wall, by_type = runs[len(runs) // 2]
    top = dict(sorted(((name, round(ms, 1)) for name, ms in by_type.items()), key=lambda item: -item[1]))
    return {
        "graph": path.name,
        "wall_ms_median": round(statistics.median(run[0] for run in runs), 1),
        "profiled_ms_of_median_call": round(sum(by_type.values()), 1),
        "ms_by_layer_type": top,
    }


def main() -> None:
    torch.set_num_threads(2)
    predictor = Predictor.from_bundle("models/default.pt")
    get_engine("openvino-bf16").prepare_predictor(predictor, Path("var/cache/onnx"))
    image = np.asarray(Image.open(IMAGE).convert("L"))
    coarse_image = coarse_input(image, predictor.coarse_size)[None].numpy()
    refiner_image = refiner_input(image, predictor.backbone)[0][None]
    crop = predictor.refiner.encoder_crop
    crop_encoder = crop.encoder_for(224, 256)
    result = {"machine": describe(), "engine": "openvino-bf16", "threads": 2, "image": IMAGE.name}
    result["graphs"] = {}
    result["graphs"]["coarse"] = profile(predictor.coarse.path, [coarse_image])
    result["graphs"]["encoder_256x256"] = profile(crop.full.path, [refiner_image.numpy()])
    result["graphs"]["encoder_224x256"] = profile(
        crop_encoder.path, [refiner_image[..., :224, :256].contiguous().numpy()]
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
