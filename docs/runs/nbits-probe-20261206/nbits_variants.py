"""Block-wise weight-only quantisation (ONNX Runtime ``MatMulNBits``) of the encoder's MatMuls against
the served ``pc7`` recipe and the fp32 graph; prints one JSON line per recipe.

Ad hoc probe (2026-12-06, 2-core AVX2-only EPYC). Each recipe of
``onnxruntime.quantization.matmul_nbits_quantizer`` is applied to the cached fp32 encoder graph; its
embeddings of the first 12 fold-0 validation images are compared with the fp32 graph's (mean and
minimum cosine, mean relative error); then the 12 images are timed ``ROUNDS`` times (p50, min).

    python docs/runs/nbits-probe-20261206/nbits_variants.py var/cache/onnx/encoder-256-<hash>.onnx \
        var/cache/onnx/encoder-256-<hash>.int8-pc7.onnx
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from backend.app.engines.onnxruntime_engine import onnxruntime_session  # noqa: E402
from training.config import SHARED_DATA_ROOT  # noqa: E402
from training.data.datasets import list_samples, load_image  # noqa: E402
from training.data.splits import Split  # noqa: E402
from training.data.transforms import refiner_input  # noqa: E402

ROUNDS = 3
RECIPES = {
    "8-bit, block 32, int8 compute": dict(bits=8, block_size=32, accuracy_level=4),
    "8-bit, block 128, int8 compute": dict(bits=8, block_size=128, accuracy_level=4),
    "4-bit, block 32, int8 compute": dict(bits=4, block_size=32, accuracy_level=4),
    "8-bit, block 32, fp32 compute": dict(bits=8, block_size=32, accuracy_level=1),
}


def run(sess, image: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: image})[0].ravel()


def score(name: str, sess, images, wanted) -> dict:
    cosines, errors = [], []
    for image, want in zip(images, wanted, strict=True):
        got = run(sess, image)
        cosines.append(float(want @ got / np.linalg.norm(want) / np.linalg.norm(got)))
        errors.append(float(np.linalg.norm(want - got) / np.linalg.norm(want)))
    for _ in range(2):
        run(sess, images[0])
    times = []
    for _ in range(ROUNDS):
        for image in images:
            started = time.perf_counter()
            run(sess, image)
            times.append((time.perf_counter() - started) * 1000.0)
    return {
        "recipe": name,
        "cosine_mean": round(float(np.mean(cosines)), 4),
        "cosine_min": round(float(np.min(cosines)), 4),
        "relative_error": round(float(np.mean(errors)), 4),
        "p50_ms": round(float(np.median(times)), 1),
        "min_ms": round(float(np.min(times)), 1),
    }


def main() -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fp32_path, served_path = Path(sys.argv[1]), Path(sys.argv[2])
    busi = SHARED_DATA_ROOT / "BUSI"
    split = Split.load(REPO / "models" / "default_split.json")
    validation = sorted(split.val_samples(0, list_samples("busi", busi), str(busi)), key=lambda s: s.id)
    images = [refiner_input(load_image(s.image_path), "litemedsam")[0][None].numpy() for s in validation[:12]]
    reference = onnxruntime_session(fp32_path, 2)
    wanted = [run(reference, image) for image in images]
    print(json.dumps(score("fp32", reference, images, wanted)), flush=True)
    print(json.dumps(score("pc7 (served)", onnxruntime_session(served_path, 2), images, wanted)), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="nbits-recipes-"))
    for index, (name, options) in enumerate(RECIPES.items()):
        target = workdir / f"recipe{index}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantiser = MatMulNBitsQuantizer(str(fp32_path), is_symmetric=True, **options)
            quantiser.process()
            quantiser.model.save_model_to_file(str(target), use_external_data_format=False)
        print(json.dumps(score(name, onnxruntime_session(target, 2), images, wanted)), flush=True)


if __name__ == "__main__":
    main()
