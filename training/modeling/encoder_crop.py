"""Encoding only the image part of the refiner's padded input (LiteMedSAM's TinyViT).

:func:`~training.data.transforms.refiner_input` resizes an image so that its longer side is ``L``
(256 for LiteMedSAM) and pads the shorter side with zeros up to ``L``. TinyViT spends as much
arithmetic on that padding as on the image. :class:`EncoderCrop` encodes instead the top-left
``L×Wc`` (or ``Hc×L``) part that holds everything that is not padding, ``Wc`` rounded up to a
multiple of ``multiple`` pixels, and pastes that part's embedding into the embedding of an all-zero
input, which stands for the padding (computed once per encoder). The zero padding is found in the
tensor itself, so the same rule holds wherever a refiner input is encoded (serving, the embedding
cache, evaluation), whatever produced the input.

Only the shorter side is cropped, so there are at most ``2·⌈L/multiple⌉ − 1`` crop shapes; an
encoder is built per shape on first use (``at_shape(hc, wc)``: a TinyViT set up for that shape,
or a graph engine's exported graph of it) and kept. Multiples of 56 px tile TinyViT's attention
windows at every stage (14 tokens at the 64² stage, two windows of 7 at the others), which the
served graphs run fastest (docs/runs/crop-probe-20261207). Fold-0 validation Dice of the result:
README, "Encoder crop".
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable

import torch
from torch import nn

#: Backbones whose encoder can run on a smaller input (TinyViT reads its grid from
#: ``input_resolution``; SAM ViT-B's absolute position embedding is fixed at 64²).
CROPPABLE_BACKBONES = ("litemedsam",)


def crop_shape(
    used_hw: tuple[int, int], size: int, multiple: int, long_side: int | None = None
) -> tuple[int, int]:
    """The crop that holds an ``h×w`` used region of an ``size²`` input whose image was resized to
    a longer side of ``long_side`` (``None``: ``size``, :class:`~training.data.transforms.Geometry`):
    the longer side is ``long_side``, the shorter the used extent; each is rounded up to a multiple
    of ``multiple`` and capped at ``size``. The longer side does not follow the used extent, so an
    image whose far rows (or columns) are black is encoded like any other of its shape."""

    def rounded(side: int) -> int:
        return min(size, max(multiple, math.ceil(side / multiple) * multiple))

    h, w = used_hw
    long = rounded(max(h, w, size if long_side is None else long_side))
    if h >= w:
        return long, min(long, rounded(w))
    return min(long, rounded(h)), long


def used_extent(images: torch.Tensor) -> tuple[int, int]:
    """Rows and columns of ``B×C×H×W`` up to the last that is not all zeros, over the batch
    (``(0, 0)`` when all are zeros)."""
    nonzero = images != 0
    rows = torch.nonzero(nonzero.any(dim=3).any(dim=1).any(dim=0))
    cols = torch.nonzero(nonzero.any(dim=2).any(dim=1).any(dim=0))
    if rows.numel() == 0:
        return 0, 0
    return int(rows[-1]) + 1, int(cols[-1]) + 1


class TinyViTAtShape(nn.Module):
    """LiteMedSAM's TinyViT run on an ``hc×wc`` input (``1×3×hc×wc`` → ``1×256×hc/4×wc/4``).

    It shares the weights of ``encoder`` but not its modules: the stages' ``input_resolution`` is
    set on copies, so the original encoder and the other shapes keep theirs (and concurrent
    requests of different shapes cannot see each other's settings). The vendored
    ``forward_features`` hard-codes the 64² output grid, so this module runs the stages itself.
    """

    def __init__(self, encoder: nn.Module, hc: int, wc: int) -> None:
        super().__init__()
        if hc % 4 or wc % 4:
            raise ValueError(f"a TinyViT crop must be a multiple of 4 px, got {hc}×{wc}")
        shared = {id(t): t for t in [*encoder.parameters(), *encoder.buffers()]}
        self.encoder = copy.deepcopy(encoder, memo=shared)
        self.hc, self.wc = hc, wc
        for index, layer in enumerate(self.encoder.layers):
            # Stages 0–2 each halve the grid on the way out; the last keeps stage 2's grid.
            shift = min(index, len(self.encoder.layers) - 2)
            resolution = (hc // 2**shift, wc // 2**shift)
            layer.input_resolution = resolution
            for block in getattr(layer, "blocks", []):
                if hasattr(block, "input_resolution"):
                    block.input_resolution = resolution
            if layer.downsample is not None:
                layer.downsample.input_resolution = resolution

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.hc, self.wc):
            raise ValueError(f"this encoder takes {self.hc}×{self.wc} inputs, got {tuple(images.shape[-2:])}")
        x = self.encoder.patch_embed(images)
        for layer in self.encoder.layers:
            x = layer(x)
        x = x.view(x.shape[0], self.hc // 4, self.wc // 4, -1).permute(0, 3, 1, 2)
        return self.encoder.neck(x)


class EncoderCrop:
    """``B×3×L×L`` zero-padded refiner inputs → ``B×256×E×E`` embeddings, encoding only the part
    that is not padding (see the module docstring). Thread-safe.

    ``full`` encodes ``L×L`` inputs; ``at_shape(hc, wc)`` returns an encoder of ``hc×wc`` inputs
    (called once per shape), or ``None`` where there is none (a graph that failed to export):
    inputs of that shape are then encoded whole. Without ``at_shape``, ``full`` is a torch TinyViT
    and each shape runs a :class:`TinyViTAtShape` of it. Not an ``nn.Module``: it holds encoders, it does
    not own weights, so a refiner's ``state_dict`` is the same with and without it.

    ``long_side`` is the refiner's ``image_side`` (the longer image side inside the ``L×L`` input;
    ``None`` for ``L``): with a smaller side both sides of the crop are rounded up to ``multiple``
    (see :func:`crop_shape`), not only the shorter one.
    """

    def __init__(
        self,
        full: Callable[[torch.Tensor], torch.Tensor],
        at_shape: Callable[[int, int], Callable[[torch.Tensor], torch.Tensor] | None] | None,
        size: int,
        multiple: int,
        long_side: int | None = None,
    ) -> None:
        if multiple <= 0 or multiple % 4:
            raise ValueError(f"the crop multiple must be a positive multiple of 4, got {multiple}")
        self.full, self.at_shape = full, at_shape
        self.size, self.multiple, self.long_side = size, multiple, long_side
        self._reset()

    def _reset(self) -> None:
        # ``_lock`` guards the two dicts only; a shape's encoder is built under that shape's own
        # lock, so requests of shapes already built never wait behind a build (seconds for a graph).
        self._lock = threading.Lock()
        self._encoders: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor] | None] = {}
        self._building: dict[tuple[int, int], threading.Lock] = {}
        self._zero_lock = threading.Lock()
        self._zero: torch.Tensor | None = None

    # A copy (``copy.deepcopy`` of a refiner, pickling) keeps the rule and the encoders it was
    # given, deep-copied with the rest, and builds its per-shape encoders and zero embedding anew.
    def __getstate__(self) -> dict:
        return {
            "full": self.full,
            "at_shape": self.at_shape,
            "size": self.size,
            "multiple": self.multiple,
            "long_side": self.long_side,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _build(self, hc: int, wc: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.at_shape is None:  # the torch TinyViT in ``full`` itself
            return TinyViTAtShape(self.full, hc, wc).eval()
        return self.at_shape(hc, wc)

    @property
    def name(self) -> str:
        """A short tag of the rule, for cache keys (embeddings differ from the full encoder's)."""
        return f"crop{self.multiple}"

    def zero_embedding(self, like: torch.Tensor) -> torch.Tensor:
        """``1×256×E×E``: the embedding of an all-zero ``L×L`` input (what the padding reads)."""
        with self._zero_lock:
            if self._zero is None:
                zeros = torch.zeros(1, like.shape[1], self.size, self.size, dtype=like.dtype)
                self._zero = self.full(zeros.to(like.device))
            return self._zero

    def encoder_for(self, hc: int, wc: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The encoder of ``hc×wc`` crops, built on the first call for that shape (once, even when
        several threads ask at the same time; other shapes are served meanwhile)."""
        shape = (hc, wc)
        with self._lock:
            if shape in self._encoders:
                return self._encoders[shape]
            building = self._building.setdefault(shape, threading.Lock())
        with building:
            with self._lock:
                if shape in self._encoders:  # built by the thread that held ``building``
                    return self._encoders[shape]
            encoder = self._build(hc, wc)
            with self._lock:
                self._encoders[shape] = encoder
                del self._building[shape]
            return encoder

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[-2:]) != (self.size, self.size):
            shape = tuple(images.shape)
            raise ValueError(f"expected B×C×{self.size}×{self.size} refiner inputs, got {shape}")
        if images.shape[0] > 1:  # one crop per image: an embedding must not depend on its batch
            return torch.cat([self(images[index : index + 1]) for index in range(images.shape[0])])
        h, w = used_extent(images)
        if h == 0:  # all padding: exactly the zero input's embedding
            return self.zero_embedding(images).clone()
        hc, wc = crop_shape((h, w), self.size, self.multiple, self.long_side)
        if (hc, wc) == (self.size, self.size):
            return self.full(images)
        encoder = self.encoder_for(hc, wc)
        if encoder is None:
            return self.full(images)
        part = encoder(images[..., :hc, :wc].contiguous())
        embedding = self.zero_embedding(images).clone()
        scale = self.size // embedding.shape[-1]
        embedding[..., : hc // scale, : wc // scale] = part
        return embedding


def can_crop(refiner, encoder: nn.Module | None = None) -> bool:
    """Whether ``encoder`` (default: the refiner's) is a TinyViT of a croppable backbone."""
    encoder = refiner.image_encoder if encoder is None else encoder
    tinyvit = all(hasattr(encoder, name) for name in ("patch_embed", "layers", "neck"))
    return refiner.backbone in CROPPABLE_BACKBONES and tinyvit


def torch_encoder_crop(refiner, multiple: int) -> EncoderCrop | None:
    """The crop of ``refiner``'s own (torch) image encoder, or ``None`` where ``multiple`` is 0 or
    the encoder cannot run on a smaller input (:func:`can_crop`)."""
    if not multiple or not can_crop(refiner):
        return None
    return EncoderCrop(refiner.image_encoder, None, int(refiner.input_size), multiple, refiner.image_side)
