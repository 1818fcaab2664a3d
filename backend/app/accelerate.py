"""Optional ONNX Runtime image encoder for serving (``settings.inference_engine``).

The refiner's image encoder is frozen, so it can be exported once and run by ONNX Runtime:

* ``"onnx"``: ``torch.onnx.export`` of the encoder (fp32), run with ONNX Runtime;
* ``"onnx-int8"``: the same graph with int8 dynamic quantisation of the ``MatMul`` nodes only
  (convolutions and attention softmax stay fp32, which keeps the accuracy drop small).

The ONNX files are generated from the weights the predictor already holds (nothing is
downloaded) and cached under ``settings.onnx_cache_dir`` by a hash of those weights, the input
size, the torch version and the opset, so an export happens once per model. Files are written to
a temporary name and renamed into place, under a process-wide lock.

:func:`accelerate_predictor` swaps ``predictor.refiner.image_encoder`` for an
:class:`OnnxImageEncoder` (same ``B×3×L×L → B×256×E×E`` contract), so
``Predictor.embed``/``predict`` are unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Engine = Literal["torch", "onnx", "onnx-int8"]
ENGINES: tuple[Engine, ...] = ("torch", "onnx", "onnx-int8")
ONNX_OPSET = 17
_EXPORT_LOCK = threading.Lock()


class AccelerationError(RuntimeError):
    """The ONNX path is unavailable (missing package, export or load failure)."""


def encoder_fingerprint(encoder: nn.Module, input_size: int) -> str:
    """A short hash of the encoder weights + input size + torch version + opset."""
    digest = hashlib.sha256(f"{input_size}|{torch.__version__}|{ONNX_OPSET}|".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        array = tensor.detach().cpu().contiguous()
        digest.update(str(array.dtype).encode())
        digest.update(
            array.numpy().tobytes() if array.dtype != torch.bfloat16 else array.float().numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def export_encoder(encoder: nn.Module, input_size: int, path: Path) -> Path:
    """``torch.onnx.export`` of ``encoder`` (input ``1×3×L×L`` → embeddings) to ``path`` atomically."""
    try:
        import onnx  # noqa: F401  (the TorchScript exporter needs it)
    except ImportError as error:
        raise AccelerationError(
            "the 'onnx' package is required to export the encoder (pip install onnx)"
        ) from error
    tmp = _atomic_target(path)
    encoder = encoder.eval()
    example = torch.rand(1, 3, input_size, input_size)
    started = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["images"],
                output_names=["embeddings"],
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise AccelerationError(
            f"ONNX export of the image encoder failed ({type(error).__name__}: {error})"
        ) from None
    log.info("exported the image encoder to ONNX in %.1f s", time.perf_counter() - started)
    return path


def quantize_matmul_int8(source: Path, path: Path) -> Path:
    """Int8 dynamic quantisation of the ``MatMul`` nodes of ``source`` into ``path`` (atomic)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as error:
        raise AccelerationError("onnxruntime.quantization (and 'onnx') are required for onnx-int8") from error
    tmp = _atomic_target(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(source), str(tmp), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8
            )
        os.replace(tmp, path)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise AccelerationError(f"int8 quantisation failed ({type(error).__name__}: {error})") from None
    return path


def onnx_encoder_path(encoder: nn.Module, input_size: int, engine: Engine, cache_dir: Path) -> Path:
    """The cached ONNX file of ``encoder`` for ``engine`` (exported/quantised on first use)."""
    if engine not in ("onnx", "onnx-int8"):
        raise ValueError(f"not an ONNX engine: {engine!r}")
    cache_dir = Path(cache_dir)
    stem = f"encoder-{input_size}-{encoder_fingerprint(encoder, input_size)}"
    fp32 = cache_dir / f"{stem}.onnx"
    int8 = cache_dir / f"{stem}.int8.onnx"
    with _EXPORT_LOCK:
        if not fp32.is_file():
            export_encoder(encoder, input_size, fp32)
        if engine == "onnx-int8" and not int8.is_file():
            quantize_matmul_int8(fp32, int8)
    return int8 if engine == "onnx-int8" else fp32


class OnnxImageEncoder(nn.Module):
    """Drop-in image encoder: ``B×3×L×L`` float tensor → ``B×256×E×E`` via ONNX Runtime.

    ``InferenceSession.run`` is thread-safe, so one instance serves concurrent requests.
    """

    def __init__(self, path: Path, engine: Engine, num_threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise AccelerationError("onnxruntime is not installed") from error
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise AccelerationError(
                f"ONNX Runtime could not load {path.name} ({type(error).__name__})"
            ) from None
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)
        self.engine = engine

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for image in images.detach().float().cpu():  # the graph is exported at batch 1
            batch = np.ascontiguousarray(image[None].numpy())
            outputs.append(self.session.run(None, {self.input_name: batch})[0])
        return torch.from_numpy(np.concatenate(outputs, axis=0)).to(images.device)


def accelerate_predictor(predictor, engine: Engine, cache_dir: Path):
    """Replace the predictor's image encoder by the ONNX Runtime one; return the predictor.

    ``engine == "torch"`` leaves it unchanged. Raises :class:`AccelerationError` when the ONNX
    path cannot be prepared (the caller decides whether to fall back to torch).
    """
    if engine == "torch":
        return predictor
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {engine!r}; known: {', '.join(ENGINES)}")
    refiner = predictor.refiner
    if str(getattr(predictor, "device", "cpu")) != "cpu":
        raise AccelerationError("the ONNX engines run on the CPU only; use inference_engine='torch' on CUDA")
    encoder = refiner.image_encoder
    if isinstance(encoder, OnnxImageEncoder):
        return predictor
    path = onnx_encoder_path(encoder, int(refiner.input_size), engine, cache_dir)
    refiner.image_encoder = OnnxImageEncoder(path, engine)
    return predictor
