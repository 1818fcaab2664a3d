"""On-disk cache of frozen image-encoder embeddings.

The refiner's image encoder is frozen in phases 2 and 3, so an embedding is a pure function of
(image pixels, backbone, preprocessing, encoder weights). Each embedding is stored once, under

    <root>/<backbone>/<ab>/<abcdef…>.pt

where ``abcdef…`` is the sha256 of the image's pixel bytes, shape and dtype, the backbone
name, :data:`training.config.PREPROCESSING_VERSION` and an optional encoder-weights
fingerprint. Changing any of them changes the key, so a stale embedding is never returned.
Files are written atomically (temporary file + ``os.replace``) and carry their own key; an
unreadable, truncated or mismatching file is treated as a miss, removed and recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from training.config import PREPROCESSING_VERSION
from training.data.transforms import REFINER_INPUT_SIZE, refiner_input

log = logging.getLogger(__name__)

#: ``B×3×L×L`` refiner inputs → ``B×C×E×E`` embeddings (e.g. ``Refiner.encode``).
EncodeFn = Callable[[torch.Tensor], torch.Tensor]
#: Native image → the ``3×L×L`` input that an :data:`EncodeFn` encodes.
Prepare = Callable[[np.ndarray], torch.Tensor]
CACHE_FORMAT = "ultrarefiner-embedding"
_BACKBONE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-.")


def image_digest_input(image: np.ndarray | bytes) -> bytes:
    """The bytes that identify an image: pixel bytes + shape + dtype (raw bytes as given)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return b"bytes:" + bytes(image)
    array = np.ascontiguousarray(np.asarray(image))
    header = f"array:{array.shape}:{array.dtype.str}:".encode()
    return header + array.tobytes()


def cache_key(
    image: np.ndarray | bytes,
    backbone: str,
    preprocessing_version: str = PREPROCESSING_VERSION,
    weights_fingerprint: str | None = None,
) -> str:
    """``"<backbone>/<sha256 hex>"`` for an image array (or raw bytes) and everything it depends on."""
    if not backbone or not set(backbone.lower()) <= _BACKBONE_CHARS:
        raise ValueError(f"invalid backbone name for the cache: {backbone!r}")
    digest = hashlib.sha256()
    for part in (
        b"ultrarefiner-embedding-v1",
        backbone.encode(),
        str(preprocessing_version).encode(),
        (weights_fingerprint or "").encode(),
    ):
        digest.update(len(part).to_bytes(8, "little") + part)
    digest.update(image_digest_input(image))
    return f"{backbone}/{digest.hexdigest()}"


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """A short sha256 of a state dict (names, shapes, dtypes and values) to put in cache keys."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


class EmbeddingCache:
    """Embeddings on disk, keyed by :func:`cache_key`.

    ``half=True`` stores float16 (half the disk) and returns float32 either way.
    ``weights_fingerprint`` (e.g. from :func:`weights_fingerprint`) enters every key computed
    by this instance, so embeddings of other encoder weights are never mixed up.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        half: bool = False,
        weights_fingerprint: str | None = None,
        preprocessing_version: str = PREPROCESSING_VERSION,
    ) -> None:
        self.root = Path(root)
        self.half = half
        self.weights_fingerprint = weights_fingerprint
        self.preprocessing_version = preprocessing_version
        self.hits = 0
        self.misses = 0

    # -- keys and paths ---------------------------------------------------------------------

    def key(
        self,
        image: np.ndarray | bytes,
        backbone: str,
        preprocessing_version: str | None = None,
        weights_fingerprint: str | None = None,
    ) -> str:
        return cache_key(
            image,
            backbone,
            self.preprocessing_version if preprocessing_version is None else preprocessing_version,
            self.weights_fingerprint if weights_fingerprint is None else weights_fingerprint,
        )

    def path(self, key: str) -> Path:
        backbone, _, digest = key.partition("/")
        if not digest or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"malformed cache key: {key!r}")
        return self.root / backbone / digest[:2] / f"{digest}.pt"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    # -- get / put --------------------------------------------------------------------------

    def get(self, key: str) -> torch.Tensor | None:
        """The cached float32 embedding, or ``None`` (missing or corrupt: a corrupt file is removed)."""
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
                raise ValueError("not an embedding-cache file")
            if payload.get("key") != key:
                raise ValueError(f"file holds key {payload.get('key')!r}")
            embedding = payload["embedding"]
            if not isinstance(embedding, torch.Tensor) or embedding.numel() == 0:
                raise ValueError("no embedding tensor")
            if not torch.isfinite(embedding).all():
                raise ValueError("non-finite values")
        except Exception as error:  # any unreadable file is a miss, never a crash
            log.warning("discarding corrupt embedding-cache file %s: %s", path, error)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return embedding.float()

    def put(self, key: str, embedding: torch.Tensor) -> Path:
        """Store one embedding (``C×E×E``) atomically; returns its path."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # clone(): a row of a batch is a view of the whole batch's storage, which torch.save would
        # otherwise write in full (a batch of 4 made every file 4× its size).
        tensor = embedding.detach().to("cpu", torch.float16 if self.half else torch.float32).clone()
        payload = {"format": CACHE_FORMAT, "key": key, "embedding": tensor}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(payload, file)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    # -- compute ----------------------------------------------------------------------------

    @staticmethod
    def _resolve(backbone_or_refiner, encode_fn: EncodeFn | None) -> tuple[str, str, EncodeFn, Prepare]:
        """``(backbone, kind, encode, prepare)``: ``kind`` names what ``encode`` computes of
        ``prepare``'s input in cache keys (a refiner's
        :attr:`~training.modeling.refiner.Refiner.embedding_kind` and ``prepare``, else the backbone
        and :func:`refiner_input` of it)."""
        if isinstance(backbone_or_refiner, str):
            if encode_fn is None:
                raise ValueError("encode_fn is required when a backbone name is given")
            name = backbone_or_refiner

            def by_name(image: np.ndarray) -> torch.Tensor:
                return refiner_input(image, name)[0]

            return name, name, encode_fn, by_name
        refiner = backbone_or_refiner  # a Refiner: `.backbone`, `.encode` (and `.prepare`)

        own = getattr(refiner, "prepare", None)

        def prepare(image: np.ndarray) -> torch.Tensor:
            return own(image)[0] if own is not None else refiner_input(image, refiner.backbone)[0]

        kind = getattr(refiner, "embedding_kind", refiner.backbone)
        return refiner.backbone, kind, encode_fn or refiner.encode, prepare

    def get_or_compute(self, image: np.ndarray, backbone, encode_fn: EncodeFn | None = None) -> torch.Tensor:
        """Cached embedding of a native image, computing and storing it on a miss.

        ``backbone`` is a backbone name (with ``encode_fn``) or a refiner object with
        ``.backbone`` and ``.encode``. Returns ``C×E×E`` float32 on the CPU.
        """
        _, kind, encode, prepare = self._resolve(backbone, encode_fn)
        key = self.key(image, kind)
        cached = self.get(key)
        if cached is not None:
            return cached
        embedding = _encode_batch(encode, [prepare(image)])[0]
        self.put(key, embedding)
        # Return exactly what later hits will return (float16 rounding included).
        return embedding.half().float() if self.half else embedding

    def compute_many(
        self,
        images: Iterable[np.ndarray | Path | str],
        backbone,
        encode_fn: EncodeFn | None = None,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Fill the cache for many images (arrays or image paths); returns their keys in order.

        Only misses are encoded, ``batch_size`` at a time; ``progress(done, total)`` is called
        after every batch (and once at the start). Embeddings are not kept in memory: read them
        back with :meth:`get`.
        """
        from training.data.datasets import load_image

        name, kind, encode, prepare = self._resolve(backbone, encode_fn)
        if name not in REFINER_INPUT_SIZE:
            raise ValueError(f"unknown refiner backbone {name!r}; known: {sorted(REFINER_INPUT_SIZE)}")
        items = list(images)
        keys: list[str] = []
        missing: list[int] = []
        for index, item in enumerate(items):
            array = load_image(item) if isinstance(item, Path | str) else item
            key = self.key(array, kind)
            keys.append(key)
            if self.get(key) is None:
                missing.append(index)
        total = len(missing)
        if progress is not None:
            progress(0, total)
        for start in range(0, total, max(1, batch_size)):
            chunk = missing[start : start + max(1, batch_size)]
            arrays = [load_image(items[i]) if isinstance(items[i], Path | str) else items[i] for i in chunk]
            embeddings = _encode_batch(encode, [prepare(array) for array in arrays])
            for index, embedding in zip(chunk, embeddings, strict=True):
                self.put(keys[index], embedding)
            if progress is not None:
                progress(min(start + len(chunk), total), total)
        return keys

    def load_many(self, keys: Sequence[str]) -> torch.Tensor:
        """``N×C×E×E`` float32 of cached keys (a missing key is an error: run :meth:`compute_many`)."""
        tensors = []
        for key in keys:
            tensor = self.get(key)
            if tensor is None:
                raise KeyError(f"embedding not cached: {key} ({self.path(key)})")
            tensors.append(tensor)
        return torch.stack(tensors)


def _encode_batch(encode: EncodeFn, inputs: list[torch.Tensor]) -> torch.Tensor:
    batch = torch.stack(inputs)
    with torch.no_grad():
        embeddings = encode(batch)
    if not isinstance(embeddings, torch.Tensor) or embeddings.shape[0] != batch.shape[0]:
        raise ValueError("encode_fn must map a B×3×L×L batch to a B×… tensor of embeddings")
    return embeddings.detach().to("cpu", torch.float32)
