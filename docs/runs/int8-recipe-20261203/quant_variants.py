"""Int8 recipes for the encoder's MatMuls, against the fp32 graph; prints one JSON line per recipe.

The ad-hoc probe behind this folder's first table (2026-12-03, 2-core AVX2-only EPYC): each recipe
of ``onnxruntime.quantization.quantize_dynamic`` is applied to the cached fp32 encoder graph, and
its embeddings of the first 12 fold-0 validation images are compared with the fp32 graph's
(mean cosine, mean relative error); then each image is timed once (p50, min).

    python docs/runs/int8-recipe-20261203/quant_variants.py var/cache/onnx/encoder-256-<hash>.onnx
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from backend.app.engines.onnxruntime_engine import onnxruntime_session  # noqa: E402
from training.config import SHARED_DATA_ROOT  # noqa: E402
from training.data.datasets import list_samples, load_image  # noqa: E402
from training.data.splits import Split  # noqa: E402
from training.data.transforms import refiner_input  # noqa: E402

RECIPES = {
    "s8 (previous)": dict(weight_type=QuantType.QInt8),
    "s8 reduce_range": dict(weight_type=QuantType.QInt8, reduce_range=True),
    "u8u8": dict(weight_type=QuantType.QUInt8),
    "s8 per_channel": dict(weight_type=QuantType.QInt8, per_channel=True),
    "pc7: s8 per_channel reduce_range": dict(
        weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
    ),
}


def session(path: Path):
    """The session the served ``onnx-int8`` engine opens (2 threads, as on the 2-core VM)."""
    return onnxruntime_session(path, 2)


def run(sess, image: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: image})[0].ravel()


def main() -> None:
    fp32_path = Path(sys.argv[1])
    busi = SHARED_DATA_ROOT / "BUSI"
    split = Split.load(REPO / "models" / "default_split.json")
    validation = sorted(split.val_samples(0, list_samples("busi", busi), str(busi)), key=lambda s: s.id)
    images = [refiner_input(load_image(s.image_path), "litemedsam")[0][None].numpy() for s in validation[:12]]
    reference = session(fp32_path)
    wanted = [run(reference, image) for image in images]
    workdir = Path(tempfile.mkdtemp(prefix="int8-recipes-"))
    for index, (name, options) in enumerate(RECIPES.items()):
        target = workdir / f"recipe{index}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(fp32_path), str(target), op_types_to_quantize=["MatMul"], **options)
        quantised = session(target)
        cosines, errors = [], []
        for image, want in zip(images, wanted, strict=True):
            got = run(quantised, image)
            cosines.append(float(want @ got / np.linalg.norm(want) / np.linalg.norm(got)))
            errors.append(float(np.linalg.norm(want - got) / np.linalg.norm(want)))
        for _ in range(2):
            run(quantised, images[0])
        times = []
        for image in images:
            started = time.perf_counter()
            run(quantised, image)
            times.append((time.perf_counter() - started) * 1000.0)
        print(
            json.dumps(
                {
                    "recipe": name,
                    "cosine_mean": round(float(np.mean(cosines)), 4),
                    "relative_error_mean": round(float(np.mean(errors)), 4),
                    "p50_ms": round(float(np.median(times)), 1),
                    "min_ms": round(min(times), 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
