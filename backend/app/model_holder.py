"""The served model: one :class:`~training.inference.Predictor`, hot-swappable, plus its embedding LRU.

A request takes a :meth:`ModelHolder.snapshot` (predictor + its cache namespace) once and uses it
to the end, so a model activated mid-request (:meth:`ModelHolder.load`) never mixes two models in
one answer. Loading happens outside the lock (seconds); only the swap is locked.

The store's "activate model" route swaps the served model with::

    request.app.state.model_holder.load(bundle_path)
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from backend.app.core.settings import Settings
    from training.inference import Predictor

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Thread-safe LRU of image embeddings (``1×256×E×E`` tensors), bounded by item count."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max(0, int(max_items))
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.max_items == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class CachedCoarse(nn.Module):
    """Wraps the coarse segmenter: identical inputs (the same image) reuse the cached logits.

    The TransUNet output depends only on the image, not on the clinician's prompts, so a repeated
    image with new prompts skips it, like the image encoder. Keyed by a hash of the exact input
    tensor (``B×1×S×S``), so it can never return logits of another image.
    """

    def __init__(self, coarse: nn.Module, max_items: int) -> None:
        super().__init__()
        self.inner = coarse
        self.cache = EmbeddingCache(max_items)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().float().contiguous().cpu().numpy()
        digest = hashlib.blake2b(array.tobytes(), digest_size=20)
        digest.update(str(array.shape).encode())
        key = digest.hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            return cached.to(images.device).clone()
        logits = self.inner(images)
        self.cache.put(key, logits.detach().clone())
        return logits


@dataclass(frozen=True)
class ServedModel:
    """One loaded model: the predictor and how it was obtained."""

    predictor: Predictor
    model_version: str
    source: str  # "settings", "store", "default" or "explicit"
    path: Path | None
    engine: str  # the encoder engine actually in use
    generation: int  # increases at every load: namespaces the embedding cache
    loaded_at: float


class ModelHolder:
    """Holds the served predictor; :meth:`load` hot-swaps it (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = EmbeddingCache(settings.embedding_cache_items)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._served: ServedModel | None = None
        self._generation = 0

    # ------------------------------------------------------------------ state
    @property
    def served(self) -> ServedModel | None:
        with self._lock:
            return self._served

    @property
    def predictor(self) -> Predictor:
        served = self.served
        if served is None:
            raise RuntimeError("no model is loaded")
        return served.predictor

    @property
    def loaded(self) -> bool:
        return self.served is not None

    @property
    def model_version(self) -> str | None:
        served = self.served
        return served.model_version if served else None

    def snapshot(self) -> ServedModel:
        served = self.served
        if served is None:
            raise RuntimeError("no model is loaded")
        return served

    # ------------------------------------------------------------------ loading
    def build(self, path: Path | None) -> tuple[Predictor, str]:
        """A predictor for ``path`` (None → shipped default / untrained) with the engine applied."""
        from training.inference import Predictor

        predictor = Predictor.from_bundle(path, device=self.settings.device)
        from backend.app.engines import AccelerationError, get_engine, resolve_engine

        engine = resolve_engine(self.settings.inference_engine, predictor.device)
        try:
            get_engine(engine).prepare_predictor(predictor, self.settings.onnx_cache_dir)
        except AccelerationError as error:
            log.warning("inference engine %r unavailable, serving with torch: %s", engine, error)
            engine = "torch"
        if self.settings.embedding_cache_items > 0:  # around the (possibly ONNX) coarse network
            predictor.coarse = CachedCoarse(predictor.coarse, self.settings.embedding_cache_items).eval()
        return predictor, engine

    def load(self, path: str | Path | None, *, source: str = "explicit") -> ServedModel:
        """Load the bundle at ``path`` (None → default) and make it the served model.

        Raises the loader's error (e.g. ``training.checkpoints.BundleError``) and keeps the
        current model when the new one cannot be loaded.
        """
        path = Path(path) if path is not None else None
        with self._load_lock:  # one load at a time; requests keep being served meanwhile
            started = time.perf_counter()
            predictor, engine = self.build(path)
            with self._lock:
                self._generation += 1
                served = ServedModel(
                    predictor=predictor,
                    model_version=str(predictor.model_version),
                    source=source,
                    path=path,
                    engine=engine,
                    generation=self._generation,
                    loaded_at=time.time(),
                )
                self._served = served
            self.cache.clear()
        log.info(
            "serving model %s (%s, engine %s), loaded in %.1f s",
            served.model_version,
            source,
            engine,
            time.perf_counter() - started,
        )
        return served

    def set_predictor(
        self, predictor: Predictor, *, source: str = "explicit", engine: str = "torch"
    ) -> ServedModel:
        """Serve an already built predictor (tests, benchmarks)."""
        with self._lock:
            self._generation += 1
            self._served = ServedModel(
                predictor=predictor,
                model_version=str(predictor.model_version),
                source=source,
                path=None,
                engine=engine,
                generation=self._generation,
                loaded_at=time.time(),
            )
            served = self._served
        self.cache.clear()
        return served

    def load_initial(self, active_path: Path | None) -> ServedModel:
        """Start-up choice: ``settings.model_path``, else the store's active model, else the default."""
        if self.settings.model_path is not None:
            return self.load(self.settings.model_path, source="settings")
        if active_path is not None:
            try:
                return self.load(active_path, source="store")
            except Exception as error:  # a broken active bundle must not stop the API
                log.error(
                    "the active model could not be loaded (%s); serving the default", type(error).__name__
                )
        return self.load(None, source="default")

    # ------------------------------------------------------------------ embeddings
    def embedding_key(self, served: ServedModel, pixel_hash: str) -> str:
        return f"{served.generation}:{served.engine}:{pixel_hash}"
