"""The serving-engine interface and its registry.

An engine decides how the three fixed networks of a served model run: the coarse segmenter,
the refiner's image encoder and its mask decoder (the prompt encoder, the differentiable
prompts and the paste-back always stay in torch). :meth:`Engine.prepare_predictor` swaps them
in place for modules with the same contracts, so ``Predictor.embed``/``predict`` do not change.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


class AccelerationError(RuntimeError):
    """The engine is unavailable (missing package, unsupported CPU, export or load failure)."""


class Engine:
    """One way of running the served networks; subclasses register under their :attr:`name`."""

    #: The name in :data:`backend.app.engines.names.ENGINE_NAMES`.
    name: str = ""
    #: Whether the engine runs on CUDA too (graph runtimes here are CPU-only).
    runs_on_cuda: bool = False

    def check_device(self, device) -> None:
        if str(device) != "cpu" and not self.runs_on_cuda:
            raise AccelerationError(
                f"the {self.name} engine runs on the CPU only; use inference_engine='torch' on CUDA"
            )

    def prepare_refiner(self, refiner, cache_dir: Path):
        """Run ``refiner.image_encoder`` and ``refiner.mask_decoder`` on this engine (in place)."""
        raise NotImplementedError

    def prepare_coarse(
        self, coarse: nn.Module, in_channels: int, img_size: int, cache_dir: Path
    ) -> nn.Module:
        """A module with the coarse segmenter's contract (``B×C×S×S`` → ``B×2×S×S``)."""
        raise NotImplementedError

    def prepare_predictor(self, predictor, cache_dir: Path):
        """Run the predictor's coarse segmenter, image encoder and mask decoder on this engine.

        All three are prepared before any is swapped, so a failure (:class:`AccelerationError`)
        leaves the predictor as it was; returns the predictor.
        """
        self.check_device(getattr(predictor, "device", "cpu"))
        coarse = self.prepare_coarse(
            predictor.coarse,
            int(predictor.coarse_channels),
            int(predictor.coarse_size),
            cache_dir,
        )
        encoder, decoder = self.refiner_parts(predictor.refiner, cache_dir)
        crop = self.encoder_crop(predictor.refiner, encoder, cache_dir)
        predictor.coarse = coarse
        predictor.refiner.image_encoder, predictor.refiner.mask_decoder = encoder, decoder
        predictor.refiner.encoder_crop = crop
        return predictor

    def refiner_parts(self, refiner, cache_dir: Path) -> tuple[nn.Module, nn.Module]:
        """Stand-ins for ``refiner.image_encoder`` and ``refiner.mask_decoder`` (not swapped in)."""
        raise NotImplementedError

    def encoder_crop(self, refiner, encoder: nn.Module, cache_dir: Path):
        """The :class:`~training.modeling.encoder_crop.EncoderCrop` that goes with ``encoder`` (the
        stand-in from :meth:`refiner_parts`, not yet swapped in), or ``None``: by default the
        refiner's own (an engine that runs the torch encoder keeps it)."""
        return refiner.encoder_crop


_REGISTRY: dict[str, type[Engine]] = {}


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make ``cls`` the engine of ``cls.name``."""
    from backend.app.engines.names import ENGINE_NAMES

    if cls.name not in ENGINE_NAMES:
        raise ValueError(f"engine {cls.name!r} is not in ENGINE_NAMES")
    if cls.name in _REGISTRY:
        raise ValueError(f"engine {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Engine]]:
    return dict(_REGISTRY)
