"""ONNX export of the served networks, cached on disk by a hash of their weights.

The graph engines (:mod:`~backend.app.engines.onnxruntime_engine`,
:mod:`~backend.app.engines.openvino_engine`) run the same ONNX files: ``torch.onnx.export`` of
the coarse segmenter, the refiner's image encoder and its mask decoder, generated from the
weights the predictor already holds (nothing is downloaded) and kept under the cache folder by a
hash of those weights, the input size, the torch version and the opset, so an export happens
once per model (the encoder, frozen in every phase, once per backbone). Files are written to a
temporary name and renamed into place, under a process-wide lock. ``onnx-int8`` adds an int8
dynamic quantisation of the encoder's ``MatMul`` nodes (:func:`quantize_matmul_int8`). The mask
decoder is exported twice: directly, and as :class:`~backend.app.engines.factorised_decoder.
FactorisedMaskDecoder` (the same function, less work with few prompt tokens).
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

import torch
from torch import nn

from backend.app.engines.base import AccelerationError
from backend.app.engines.factorised_decoder import FACTORISED_DECODER_VERSION, FactorisedMaskDecoder

log = logging.getLogger(__name__)

ONNX_OPSET = 17
_EXPORT_LOCK = threading.Lock()


def weights_fingerprint(module: nn.Module, shape_key: str) -> str:
    """A short hash of the module's weights + its input shapes + torch version + opset."""
    digest = hashlib.sha256(f"{shape_key}|{torch.__version__}|{ONNX_OPSET}|".encode())
    for name, tensor in sorted(module.state_dict().items()):
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


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, what: str, **kwargs) -> Path:
    """``torch.onnx.export`` of ``module`` on ``example`` inputs to ``path`` atomically."""
    try:
        import onnx  # noqa: F401  (the TorchScript exporter needs it)
    except ImportError as error:
        raise AccelerationError(
            f"the 'onnx' package is required to export the {what} (pip install onnx)"
        ) from error
    tmp = _atomic_target(path)
    module = module.eval()
    started = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example,
                str(tmp),
                dynamo=False,
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                **kwargs,
            )
        os.replace(tmp, path)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise AccelerationError(
            f"ONNX export of the {what} failed ({type(error).__name__}: {error})"
        ) from None
    log.info("exported the %s to ONNX in %.1f s", what, time.perf_counter() - started)
    return path


def export_encoder(encoder: nn.Module, input_size: int | tuple[int, int], path: Path) -> Path:
    """The image encoder (input ``1×3×L×L``, or ``1×3×H×W`` for a ``(H, W)`` size → embeddings)
    as ONNX at ``path``."""
    height, width = _hw(input_size)
    example = (torch.rand(1, 3, height, width),)
    return _export(
        encoder, example, path, "image encoder", input_names=["images"], output_names=["embeddings"]
    )


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def export_coarse(coarse: nn.Module, in_channels: int, img_size: int, path: Path) -> Path:
    """The coarse TransUNet (input ``1×C×S×S`` → ``1×2×S×S`` logits) as ONNX at ``path``."""
    example = (torch.rand(1, in_channels, img_size, img_size),)
    return _export(coarse, example, path, "coarse segmenter", input_names=["images"], output_names=["logits"])


class _MaskDecoderGraph(nn.Module):
    """SAM's ``MaskDecoder.predict_masks`` (all ``1 + num_multimask`` masks) as a traceable module;
    the multimask slicing of ``MaskDecoder.forward`` happens outside the graph."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
        return self.decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
        )


DECODER_INPUTS = ("image_embeddings", "image_pe", "sparse_prompt_embeddings", "dense_prompt_embeddings")


def export_mask_decoder(
    decoder: nn.Module, embed_dim: int, embed_side: int, path: Path, *, factorised: bool = False
) -> Path:
    """The mask decoder (one image, any number of sparse prompt tokens) as ONNX at ``path``:
    SAM's own ``predict_masks``, or with ``factorised`` its :class:`FactorisedMaskDecoder` form."""
    grid = (1, embed_dim, embed_side, embed_side)
    example = (torch.randn(grid), torch.randn(grid), torch.randn(1, 3, embed_dim), torch.randn(grid))
    return _export(
        FactorisedMaskDecoder(decoder) if factorised else _MaskDecoderGraph(decoder),
        example,
        path,
        "factorised mask decoder" if factorised else "mask decoder",
        input_names=list(DECODER_INPUTS),
        output_names=["masks", "iou_predictions"],
        dynamic_axes={"sparse_prompt_embeddings": {1: "tokens"}},
    )


#: Tag of the int8 recipe in the cached file's name: a graph quantised by an earlier recipe is
#: not reused. "pc7": per-output-channel weight scales and 7-bit weights (``reduce_range``).
#: On a CPU without VNNI (AVX2 only) ONNX Runtime multiplies u8 activations by s8 weights with
#: ``vpmaddubsw``, whose int16 pair sums saturate for full-range weights; 7-bit weights cannot
#: saturate. Measured on a 2-core AVX2-only EPYC (fold-0 validation, README): the encoder's
#: embedding moved from cosine 0.978 to 0.993 of fp32, at the same speed.
INT8_RECIPE = "pc7"


def quantize_matmul_int8(source: Path, path: Path) -> Path:
    """Int8 dynamic quantisation of the ``MatMul`` nodes of ``source`` into ``path`` (atomic):
    per-channel, 7-bit weights (:data:`INT8_RECIPE`)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as error:
        raise AccelerationError("onnxruntime.quantization (and 'onnx') are required for onnx-int8") from error
    tmp = _atomic_target(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(source),
                str(tmp),
                op_types_to_quantize=["MatMul"],
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,
            )
        os.replace(tmp, path)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise AccelerationError(f"int8 quantisation failed ({type(error).__name__}: {error})") from None
    return path


def _cached_onnx(stem: str, cache_dir: Path, export, *, int8: bool = False) -> Path:
    """``cache_dir/stem[.int8-RECIPE].onnx``, exported (``export(path)``) and quantised on first use."""
    cache_dir = Path(cache_dir)
    fp32 = cache_dir / f"{stem}.onnx"
    quantised = cache_dir / f"{stem}.int8-{INT8_RECIPE}.onnx"
    with _EXPORT_LOCK:
        if not fp32.is_file():
            export(fp32)
        if int8 and not quantised.is_file():
            quantize_matmul_int8(fp32, quantised)
            # The same graph quantised by an earlier recipe is never read again.
            for stale in cache_dir.glob(f"{stem}.int8*.onnx"):
                if stale != quantised:
                    stale.unlink(missing_ok=True)
    return quantised if int8 else fp32


def onnx_encoder_path(
    encoder: nn.Module, input_size: int | tuple[int, int], cache_dir: Path, *, int8: bool = False
) -> Path:
    """The cached ONNX file of ``encoder`` at an ``L×L`` (or ``(H, W)``) input (its MatMuls
    int8-quantised with ``int8``)."""
    height, width = _hw(input_size)
    side = str(height) if height == width else f"{height}x{width}"
    stem = f"encoder-{side}-{weights_fingerprint(encoder, side)}"
    export = lambda path: export_encoder(encoder, (height, width), path)  # noqa: E731
    return _cached_onnx(stem, cache_dir, export, int8=int8)


def onnx_decoder_path(
    decoder: nn.Module, embed_dim: int, embed_side: int, cache_dir: Path, *, factorised: bool = False
) -> Path:
    """The cached fp32 ONNX file of the mask ``decoder`` (for either ONNX engine), direct or
    ``factorised``; keyed by its (fine-tuned) weights, so every model gets its own files."""
    shape_key = f"{embed_dim}x{embed_side}"
    if factorised:
        shape_key += f"|factorised-v{FACTORISED_DECODER_VERSION}"
    kind = "decoder-factorised" if factorised else "decoder"
    stem = f"{kind}-{embed_side}-{weights_fingerprint(decoder, shape_key)}"
    # Always fp32: the fp32 graph matches torch to ~1e-5 (tests/unit/test_engines.py); int8
    # MatMuls saved little in an ad-hoc timing and changed the masks.
    return _cached_onnx(
        stem,
        cache_dir,
        lambda path: export_mask_decoder(decoder, embed_dim, embed_side, path, factorised=factorised),
    )


def onnx_coarse_path(coarse: nn.Module, in_channels: int, img_size: int, cache_dir: Path) -> Path:
    """The cached fp32 ONNX file of the coarse TransUNet (for either ONNX engine)."""
    shape_key = f"{in_channels}x{img_size}"
    stem = f"coarse-{img_size}-{weights_fingerprint(coarse, shape_key)}"
    # fp32: matches torch to ~1e-5 (tests/unit/test_engines.py); int8 saved little ad hoc.
    return _cached_onnx(stem, cache_dir, lambda path: export_coarse(coarse, in_channels, img_size, path))
