"""Optional ONNX Runtime / OpenVINO inference for serving (``settings.inference_engine``).

At serving time the networks are fixed, so the coarse TransUNet, the refiner's image encoder and
its mask decoder are exported once to ONNX and run by a graph runtime (the prompt encoder, the
differentiable prompts and the paste-back stay in torch):

* ``"onnx"``: ``torch.onnx.export`` of the three networks, run by ONNX Runtime in fp32;
* ``"onnx-int8"``: the encoder graph with int8 dynamic quantisation of its ``MatMul`` nodes only
  (convolutions and attention softmax stay fp32, which keeps the accuracy drop small); the
  TransUNet and the decoder stay fp32 (quantising them saved little and changed the masks);
* ``"openvino"``: the same fp32 ONNX files run by OpenVINO's CPU plugin in fp32;
* ``"openvino-bf16"``: OpenVINO with bf16 inference precision for all three networks, on CPUs
  with native bf16 (AVX512-BF16 or AMX; :class:`AccelerationError` elsewhere, where OpenVINO
  would silently compute in fp32 instead).

The setting ``"auto"`` (:func:`resolve_engine`) picks ``"openvino-bf16"`` where OpenVINO is
installed and the CPU has native bf16, else ``"onnx-int8"``: the fastest engine measured on each
kind of CPU, both within the allowed Dice drop (README, Measured numbers).

The ONNX files are generated from the weights the predictor already holds (nothing is
downloaded) and cached under ``settings.onnx_cache_dir`` by a hash of those weights, the input
size, the torch version and the opset, so an export happens once per model (the encoder, frozen
in every phase, once per backbone). Files are written to
a temporary name and renamed into place, under a process-wide lock.

:func:`accelerate_predictor` swaps ``predictor.coarse`` for an :class:`OnnxCoarse`,
``predictor.refiner.image_encoder`` for an
:class:`OnnxImageEncoder` (same ``B×3×L×L → B×256×E×E`` contract) and ``mask_decoder`` for an
:class:`OnnxMaskDecoder` (same contract as SAM's ``MaskDecoder``), so ``Predictor.embed``/
``predict`` are unchanged.
"""

from __future__ import annotations

import functools
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

Engine = Literal["torch", "onnx", "onnx-int8", "openvino", "openvino-bf16"]
ENGINES: tuple[Engine, ...] = ("torch", "onnx", "onnx-int8", "openvino", "openvino-bf16")
OPENVINO_ENGINES: tuple[Engine, ...] = ("openvino", "openvino-bf16")
ONNX_OPSET = 17
_EXPORT_LOCK = threading.Lock()


class AccelerationError(RuntimeError):
    """The accelerated path is unavailable (missing package, unsupported CPU, export or load failure)."""


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


def export_encoder(encoder: nn.Module, input_size: int, path: Path) -> Path:
    """The image encoder (input ``1×3×L×L`` → embeddings) as ONNX at ``path``."""
    example = (torch.rand(1, 3, input_size, input_size),)
    return _export(
        encoder, example, path, "image encoder", input_names=["images"], output_names=["embeddings"]
    )


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


def export_mask_decoder(decoder: nn.Module, embed_dim: int, embed_side: int, path: Path) -> Path:
    """The mask decoder (one image, any number of sparse prompt tokens) as ONNX at ``path``."""
    grid = (1, embed_dim, embed_side, embed_side)
    example = (torch.randn(grid), torch.randn(grid), torch.randn(1, 3, embed_dim), torch.randn(grid))
    return _export(
        _MaskDecoderGraph(decoder),
        example,
        path,
        "mask decoder",
        input_names=list(DECODER_INPUTS),
        output_names=["masks", "iou_predictions"],
        dynamic_axes={"sparse_prompt_embeddings": {1: "tokens"}},
    )


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


def _cached_onnx(stem: str, engine: Engine, cache_dir: Path, export) -> Path:
    """``cache_dir/stem[.int8].onnx`` for ``engine``, exported (``export(path)``) and quantised on
    first use."""
    if engine not in ENGINES or engine == "torch":
        raise ValueError(f"not an ONNX engine: {engine!r}")
    cache_dir = Path(cache_dir)
    fp32 = cache_dir / f"{stem}.onnx"
    int8 = cache_dir / f"{stem}.int8.onnx"
    with _EXPORT_LOCK:
        if not fp32.is_file():
            export(fp32)
        if engine == "onnx-int8" and not int8.is_file():
            quantize_matmul_int8(fp32, int8)
    return int8 if engine == "onnx-int8" else fp32


def onnx_encoder_path(encoder: nn.Module, input_size: int, engine: Engine, cache_dir: Path) -> Path:
    """The cached ONNX file of ``encoder`` for ``engine`` (exported/quantised on first use)."""
    stem = f"encoder-{input_size}-{weights_fingerprint(encoder, str(input_size))}"
    return _cached_onnx(stem, engine, cache_dir, lambda path: export_encoder(encoder, input_size, path))


def onnx_decoder_path(decoder: nn.Module, embed_dim: int, embed_side: int, cache_dir: Path) -> Path:
    """The cached fp32 ONNX file of the mask ``decoder`` (for either ONNX engine); keyed by its
    (fine-tuned) weights, so every model gets its own file."""
    stem = f"decoder-{embed_side}-{weights_fingerprint(decoder, f'{embed_dim}x{embed_side}')}"
    # Always fp32: the fp32 graph matches torch to ~1e-5 (tests/unit/test_accelerate.py); int8
    # MatMuls saved little in an ad-hoc timing and changed the masks.
    return _cached_onnx(
        stem, "onnx", cache_dir, lambda path: export_mask_decoder(decoder, embed_dim, embed_side, path)
    )


def onnx_coarse_path(coarse: nn.Module, in_channels: int, img_size: int, cache_dir: Path) -> Path:
    """The cached fp32 ONNX file of the coarse TransUNet (for either ONNX engine)."""
    shape_key = f"{in_channels}x{img_size}"
    stem = f"coarse-{img_size}-{weights_fingerprint(coarse, shape_key)}"
    # fp32: matches torch to ~1e-5 (tests/unit/test_accelerate.py); int8 saved little ad hoc.
    return _cached_onnx(
        stem, "onnx", cache_dir, lambda path: export_coarse(coarse, in_channels, img_size, path)
    )


def _session(path: Path, num_threads: int | None, engine: Engine = "onnx"):
    num_threads = num_threads or max(1, torch.get_num_threads())
    if engine in OPENVINO_ENGINES:
        return OpenVinoSession(path, num_threads, bf16=engine == "openvino-bf16")
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


def resolve_engine(engine: str) -> Engine:
    """``"auto"`` → ``"openvino-bf16"`` (OpenVINO installed, native bf16) else ``"onnx-int8"``;
    any other engine name is returned as it is."""
    if engine != "auto":
        return engine  # type: ignore[return-value]
    return "openvino-bf16" if cpu_has_native_bf16() else "onnx-int8"


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
                "(fp32) or 'onnx-int8'"
            )
        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
            "INFERENCE_NUM_THREADS": num_threads,
            "PERFORMANCE_HINT": "LATENCY",
            # torch runs the prompts and paste-back between the graphs, on the same cores.
            "ENABLE_CPU_PINNING": False,
        }
        try:
            self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
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
        results = request.infer(feed)
        # Copies: the request's output buffers are reused by its next inference.
        return [np.array(results[port]) for port in self._outputs]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


class _OnnxModule(nn.Module):
    """An ONNX Runtime session (or :class:`OpenVinoSession`) standing in for a torch module.

    Both sessions' ``run`` are thread-safe, so one instance serves concurrent requests.
    """

    def __init__(self, path: Path, num_threads: int | None = None, engine: Engine = "onnx") -> None:
        super().__init__()
        self.session = _session(path, num_threads, engine)
        self.path = Path(path)
        self.engine = engine


class OnnxPerSample(_OnnxModule):
    """Drop-in one-input module: ``B×…`` float tensor → ``B×…``; the graph is exported at batch 1,
    so a batch is run one sample at a time."""

    def __init__(self, path: Path, num_threads: int | None = None, engine: Engine = "onnx") -> None:
        super().__init__(path, num_threads, engine)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = [self.session.run(None, {self.input_name: _numpy(item[None])})[0] for item in inputs]
        return torch.from_numpy(np.concatenate(outputs, axis=0)).to(inputs.device)


class OnnxImageEncoder(OnnxPerSample):
    """The refiner's image encoder: ``B×3×L×L`` → ``B×256×E×E``."""


class OnnxCoarse(OnnxPerSample):
    """The coarse TransUNet: ``B×1×S×S`` → ``B×2×S×S`` logits."""


class OnnxMaskDecoder(_OnnxModule):
    """Drop-in SAM mask decoder (same ``forward`` contract as ``MaskDecoder``) via ONNX Runtime.

    The graph holds ``predict_masks`` for one image; batches are run one sample at a time, and the
    single-/multi-mask selection is the same slicing as SAM's ``MaskDecoder.forward``.
    """

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets")
        pe = _numpy(image_pe)
        masks, ious = [], []
        for index in range(batch):
            embedding = image_embeddings[index if image_embeddings.shape[0] > 1 else 0]
            feed = dict(
                zip(
                    DECODER_INPUTS,
                    (
                        _numpy(embedding[None]),
                        pe,
                        _numpy(sparse_prompt_embeddings[index : index + 1]),
                        _numpy(dense_prompt_embeddings[index : index + 1]),
                    ),
                    strict=True,
                )
            )
            low_res, iou = self.session.run(None, feed)
            masks.append(low_res)
            ious.append(iou)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        device = image_embeddings.device
        mask_tensor = torch.from_numpy(np.concatenate(masks))[:, chosen].to(device)
        return mask_tensor, torch.from_numpy(np.concatenate(ious))[:, chosen].to(device)


def _check_engine(engine: str, device) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown inference engine {engine!r}; known: {', '.join(ENGINES)}")
    if engine != "torch" and str(device) != "cpu":
        raise AccelerationError(
            "the ONNX and OpenVINO engines run on the CPU only; use inference_engine='torch' on CUDA"
        )


def _onnx_refiner_parts(refiner, engine: Engine, cache_dir: Path) -> tuple[nn.Module, nn.Module]:
    """ONNX Runtime / OpenVINO stand-ins for ``refiner.image_encoder`` and ``refiner.mask_decoder``."""
    encoder, decoder = refiner.image_encoder, refiner.mask_decoder
    if not isinstance(encoder, OnnxImageEncoder):
        path = onnx_encoder_path(encoder, int(refiner.input_size), engine, cache_dir)
        encoder = OnnxImageEncoder(path, engine=engine)
    if not isinstance(decoder, OnnxMaskDecoder):
        embed_dim = int(refiner.prompt_encoder.embed_dim)
        embed_side = int(refiner.prompt_encoder.image_embedding_size[0])
        path = onnx_decoder_path(decoder, embed_dim, embed_side, cache_dir)
        decoder = OnnxMaskDecoder(path, engine=engine)
    return encoder, decoder


def accelerate_refiner(refiner, engine: Engine, cache_dir: Path, device="cpu"):
    """Run a refiner's image encoder and mask decoder in ONNX Runtime or OpenVINO (in place);
    return it."""
    _check_engine(engine, device)
    if engine != "torch":
        refiner.image_encoder, refiner.mask_decoder = _onnx_refiner_parts(refiner, engine, cache_dir)
    return refiner


def accelerate_predictor(predictor, engine: Engine, cache_dir: Path):
    """Run the predictor's coarse TransUNet and the refiner's image encoder and mask decoder in ONNX
    Runtime or OpenVINO; return the predictor.

    ``engine == "torch"`` leaves it unchanged. ``"onnx"`` runs all three in fp32; ``"onnx-int8"``
    adds int8 dynamic quantisation of the image encoder's ``MatMul`` nodes (the others stay fp32);
    ``"openvino"`` / ``"openvino-bf16"`` run all three in OpenVINO in fp32 / bf16.
    Raises :class:`AccelerationError` when the path cannot be prepared (the caller decides
    whether to fall back to torch).
    """
    _check_engine(engine, getattr(predictor, "device", "cpu"))
    if engine == "torch":
        return predictor
    coarse = predictor.coarse
    if not isinstance(coarse, OnnxCoarse):
        size = int(predictor.coarse_size)
        path = onnx_coarse_path(coarse, int(predictor.config.transunet.in_channels), size, cache_dir)
        coarse = OnnxCoarse(path, engine=engine)
    encoder, decoder = _onnx_refiner_parts(predictor.refiner, engine, cache_dir)
    # Swapped only once all three are ready, so a failure leaves the predictor on torch.
    predictor.coarse = coarse
    predictor.refiner.image_encoder, predictor.refiner.mask_decoder = encoder, decoder
    return predictor
