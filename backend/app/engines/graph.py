"""Engines that run exported ONNX graphs, and the graph-backed stand-ins for the networks.

:class:`GraphEngine` exports (once, cached: :mod:`~backend.app.engines.onnx_export`) and loads
the three graphs; a subclass says how a graph file becomes a session (:meth:`GraphEngine.session`)
and whether the encoder is int8-quantised. With the refiner's encoder crop
(:mod:`training.modeling.encoder_crop`), each crop shape gets its own encoder graph, exported and
loaded the first time an image of that shape comes (a few seconds, then cached on disk like the
others). The stand-ins keep the torch contracts:
:class:`OnnxCoarse` ``B×C×S×S → B×2×S×S`` logits, :class:`OnnxImageEncoder`
``B×3×L×L → B×256×E×E``, :class:`OnnxMaskDecoder` SAM's ``MaskDecoder.forward``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backend.app.engines.base import AccelerationError, Engine
from backend.app.engines.factorised_decoder import max_factorised_prompt_tokens
from backend.app.engines.onnx_export import (
    DECODER_INPUTS,
    onnx_coarse_path,
    onnx_decoder_path,
    onnx_encoder_path,
)
from training.modeling.encoder_crop import EncoderCrop, TinyViTAtShape, can_crop

logger = logging.getLogger(__name__)


class GraphEngine(Engine):
    """The coarse segmenter, the image encoder and the mask decoder as ONNX graphs (CPU)."""

    #: Whether the image encoder's MatMuls run int8-quantised.
    int8_encoder = False

    def session(self, path: Path, num_threads: int):
        """A session on the graph at ``path`` (:class:`AccelerationError` when it cannot load)."""
        raise NotImplementedError

    def _num_threads(self) -> int:
        return max(1, torch.get_num_threads())

    def prepare_coarse(
        self, coarse: nn.Module, in_channels: int, img_size: int, cache_dir: Path
    ) -> nn.Module:
        if isinstance(coarse, OnnxCoarse):
            return coarse
        path = onnx_coarse_path(coarse, in_channels, img_size, cache_dir)
        return OnnxCoarse(self.session(path, self._num_threads()), path, self.name)

    def refiner_parts(self, refiner, cache_dir: Path) -> tuple[nn.Module, nn.Module]:
        encoder, decoder = refiner.image_encoder, refiner.mask_decoder
        if not isinstance(encoder, OnnxImageEncoder):
            path = onnx_encoder_path(encoder, int(refiner.input_size), cache_dir, int8=self.int8_encoder)
            encoder = OnnxImageEncoder(self.session(path, self._num_threads()), path, self.name)
        if not isinstance(decoder, OnnxMaskDecoder):
            embed_dim = int(refiner.prompt_encoder.embed_dim)
            embed_side = int(refiner.prompt_encoder.image_embedding_size[0])
            # Always fp32: it matches torch to ~1e-5 (tests/unit/test_engines.py); int8 MatMuls
            # saved little in an ad-hoc timing and changed the masks.
            path = onnx_decoder_path(decoder, embed_dim, embed_side, cache_dir)
            direct = self.session(path, self._num_threads())
            decoder = OnnxMaskDecoder(
                direct,
                path,
                self.name,
                factorised=self._factorised_session(decoder, embed_dim, embed_side, cache_dir),
                factorised_up_to=max_factorised_prompt_tokens(decoder),
            )
        return encoder, decoder

    def _factorised_session(self, decoder: nn.Module, embed_dim: int, embed_side: int, cache_dir: Path):
        """A session on the factorised decoder graph, or ``None`` (with a warning) when it cannot
        be exported or this runtime cannot load it: the direct graph computes the same function,
        only slower, so a runtime's failure on the rewritten graph must not cost the engine."""
        try:
            path = onnx_decoder_path(decoder, embed_dim, embed_side, cache_dir, factorised=True)
            return self.session(path, self._num_threads())
        except (AccelerationError, ValueError) as error:  # ValueError: a decoder it cannot rewrite
            logger.warning("%s; every prompt runs on the direct mask decoder graph", error)
            return None

    def encoder_crop(self, refiner, encoder: nn.Module, cache_dir: Path):
        """The crop rule of ``refiner.cfg`` on this engine's graphs: one encoder graph per crop
        shape, exported (once per model, cached like the others) and loaded on first use."""
        source = refiner.image_encoder
        if isinstance(source, OnnxImageEncoder):  # prepared before: its crop goes with it
            return refiner.encoder_crop
        multiple = int(refiner.cfg.encoder_crop_multiple)
        if not multiple or not can_crop(refiner, source):
            return None
        threads = self._num_threads()

        def at_shape(hc: int, wc: int) -> OnnxImageEncoder | None:
            started = time.perf_counter()
            try:
                path = onnx_encoder_path(
                    TinyViTAtShape(source, hc, wc).eval(), (hc, wc), cache_dir, int8=self.int8_encoder
                )
                stand_in = OnnxImageEncoder(self.session(path, threads), path, self.name)
            except AccelerationError as error:  # the full graph computes the embedding instead
                logger.warning("%s; %d×%d crops are encoded whole", error, hc, wc)
                return None
            logger.info(
                "image encoder graph for %d×%d crops ready in %.1f s", hc, wc, time.perf_counter() - started
            )
            return stand_in

        return EncoderCrop(encoder, at_shape, int(refiner.input_size), multiple, refiner.image_side)

    def prepare_refiner(self, refiner, cache_dir: Path):
        encoder, decoder = self.refiner_parts(refiner, cache_dir)
        crop = self.encoder_crop(refiner, encoder, cache_dir)
        refiner.image_encoder, refiner.mask_decoder, refiner.encoder_crop = encoder, decoder, crop
        return refiner


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())


class _OnnxModule(nn.Module):
    """A graph session (ONNX Runtime's ``InferenceSession`` or an ``OpenVinoSession``: the two
    calls used are ``get_inputs`` and ``run``) standing in for a torch module.

    Both sessions' ``run`` are thread-safe, so one instance serves concurrent requests.
    """

    def __init__(self, session, path: Path, engine: str) -> None:
        super().__init__()
        self.session = session
        self.path = Path(path)
        self.engine = engine


class OnnxPerSample(_OnnxModule):
    """Drop-in one-input module: ``B×…`` float tensor → ``B×…``; the graph is exported at batch 1,
    so a batch is run one sample at a time."""

    def __init__(self, session, path: Path, engine: str) -> None:
        super().__init__(session, path, engine)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = [self.session.run(None, {self.input_name: _numpy(item[None])})[0] for item in inputs]
        return torch.from_numpy(np.concatenate(outputs, axis=0)).to(inputs.device)


class OnnxImageEncoder(OnnxPerSample):
    """The refiner's image encoder: ``B×3×L×L`` → ``B×256×E×E``."""


class OnnxCoarse(OnnxPerSample):
    """The coarse TransUNet: ``B×1×S×S`` → ``B×2×S×S`` logits."""


class OnnxMaskDecoder(_OnnxModule):
    """Drop-in SAM mask decoder (same ``forward`` contract as ``MaskDecoder``) via a graph session.

    The graph holds ``predict_masks`` for one image; batches are run one sample at a time, and the
    single-/multi-mask selection is the same slicing as SAM's ``MaskDecoder.forward``. With a
    ``factorised`` session (:class:`~backend.app.engines.factorised_decoder.FactorisedMaskDecoder`,
    the same function), prompts of at most ``factorised_up_to`` sparse tokens run on it, where it
    does less work; more tokens run on the direct graph.
    """

    def __init__(
        self, session, path: Path, engine: str, *, factorised=None, factorised_up_to: int = -1
    ) -> None:
        super().__init__(session, path, engine)
        self.factorised_session = factorised
        self.factorised_up_to = factorised_up_to if factorised is not None else -1

    def session_for(self, prompt_tokens: int):
        """The session that runs a prompt of ``prompt_tokens`` sparse tokens."""
        if prompt_tokens <= self.factorised_up_to:
            return self.factorised_session
        return self.session

    def _image_pe_numpy(self, image_pe: torch.Tensor) -> np.ndarray:
        """``image_pe`` as a graph input; the refiner passes the same tensor each call (it is a
        constant), whose conversion is then kept instead of repeated."""
        cached = getattr(self, "_pe_cache", None)
        if cached is not None and cached[0] is image_pe:
            return cached[1]
        converted = _numpy(image_pe)
        self._pe_cache = (image_pe, converted)
        return converted

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
        pe = self._image_pe_numpy(image_pe)
        session = self.session_for(int(sparse_prompt_embeddings.shape[1]))
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
            low_res, iou = session.run(None, feed)
            masks.append(low_res)
            ious.append(iou)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        device = image_embeddings.device
        mask_tensor = torch.from_numpy(np.concatenate(masks))[:, chosen].to(device)
        return mask_tensor, torch.from_numpy(np.concatenate(ious))[:, chosen].to(device)
