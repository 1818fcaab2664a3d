"""One predictor for serving and evaluation: native image → coarse and refined probabilities.

The path is exactly the training path: :func:`training.data.transforms.coarse_input` feeds the
TransUNet, its lesion probabilities (softmax channel 1) are mapped into refiner space with
:meth:`Geometry.to_refiner`, and the refiner is prompted either by the prompts it derives from that
coarse mask or by a clinician's points/box (native pixel coordinates, mapped with the geometry).

A :class:`Predictor` keeps no per-call state: its modules are in ``eval()`` mode and every call runs
under :func:`torch.inference_mode`, so concurrent ``predict`` calls from several threads are safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.checkpoints import (
    DEFAULT_BUNDLE_PATH,
    BundleError,
    build_seeded_refiner,
    build_untrained_bundle,
    bundle_config,
    load_bundle,
    validate_bundle,
)
from training.config import TrainingConfig
from training.data.transforms import (
    Geometry,
    coarse_input,
    full_scale,
    is_blank,
    to_gray,
)
from training.evaluate import coarse_finds_lesion, refines_coarse
from training.modeling.coarse_registry import coarse_in_channels, coarse_input_size
from training.modeling.encoder_crop import torch_encoder_crop
from training.modeling.lesion_filter import drop_tiny_masks_from_logits


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict`, all at the native ``H×W`` resolution of the input."""

    coarse_probs: np.ndarray  # H×W float32 lesion probability of the TransUNet
    refined_probs: np.ndarray  # H×W float32 lesion probability of the refiner
    iou: float  # the refiner's predicted IoU of the selected mask
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess/coarse/encoder/decoder/total
    prompts: dict = field(default_factory=dict)  # the prompts used, in native pixel coordinates
    #: ``1×256×E×E`` image embedding when this call computed it (for the caller's cache); None when
    #: it was passed in, or when the encoder was skipped (no coarse lesion, no clinician prompts).
    embedding: torch.Tensor | None = None

    def coarse_mask(self, threshold: float = 0.5) -> np.ndarray:
        return self.coarse_probs >= threshold

    def refined_mask(self, threshold: float = 0.5) -> np.ndarray:
        return self.refined_probs >= threshold


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
        # TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer): the ViT's matmuls
        # are otherwise computed in full fp32, several times slower, for no accuracy a mask needs.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def build_models_from_bundle(bundle: dict, device: str | torch.device = "cpu"):
    """``(TransUNet, Refiner, TrainingConfig)`` rebuilt from a validated bundle, in ``eval()`` mode."""
    from training.modeling.coarse_registry import build_coarse

    cfg = bundle_config(bundle)
    coarse = build_coarse(cfg)
    try:
        coarse.load_state_dict(bundle["coarse_state_dict"], strict=True)
    except RuntimeError as error:
        raise BundleError(
            f"coarse weights do not fit the bundle's {cfg.coarse_model} config: {error}"
        ) from None
    refiner = build_seeded_refiner(cfg)
    load_refiner_trainable(refiner, bundle["refiner_state_dict"])
    device = resolve_device(device)
    return coarse.to(device).eval(), refiner.to(device).eval(), cfg


def load_refiner_trainable(refiner: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a ``trainable_state_dict()`` (prompt encoder, mask decoder, gate) into ``refiner``, exactly."""
    expected = set(refiner.trainable_state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise BundleError(
            "refiner weights do not fit the bundle's refiner config "
            f"(missing: {missing[:5]}{'…' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'…' if len(unexpected) > 5 else ''})"
        )
    try:
        refiner.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        raise BundleError(f"refiner weights do not fit the bundle's refiner config: {error}") from None


def native_to_refiner_coords(coords: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """``…×2`` (x, y) native pixel coordinates → refiner input pixel coordinates."""
    rh, rw = geometry.resized_hw
    scale = torch.tensor(
        [rw / geometry.width, rh / geometry.height], dtype=coords.dtype, device=coords.device
    )
    return coords * scale


def refiner_to_native_coords(coords: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    rh, rw = geometry.resized_hw
    scale = torch.tensor(
        [geometry.width / rw, geometry.height / rh], dtype=coords.dtype, device=coords.device
    )
    return coords * scale


class Predictor:
    """TransUNet coarse mask → refined mask, for one image at a time (thread-safe)."""

    def __init__(
        self,
        coarse: torch.nn.Module,
        refiner: torch.nn.Module,
        config: TrainingConfig,
        *,
        model_version: str,
        untrained: bool = False,
        metrics: dict | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = resolve_device(device)
        self.coarse = coarse.to(self.device).eval()
        self.refiner = refiner.to(self.device).eval()
        # Inference encodes only the non-padding part of the refiner input (config: the crop rule).
        self.refiner.encoder_crop = torch_encoder_crop(self.refiner, config.refiner.encoder_crop_multiple)
        self.config = config
        self.model_version = model_version
        self.untrained = untrained
        self.metrics = dict(metrics or {})
        self.backbone = config.refiner.backbone
        self.coarse_size = coarse_input_size(config)
        self.coarse_channels = coarse_in_channels(config)

    def replace_coarse(self, coarse: torch.nn.Module, cfg: TrainingConfig) -> None:
        """Use another coarse segmenter (a phase-1 checkpoint, an ensemble) with the input size and
        channels that ``cfg``, its own config, names; the refiner and the bundle stay as they are."""
        self.coarse = coarse.to(self.device).eval()
        self.coarse_size = coarse_input_size(cfg)
        self.coarse_channels = coarse_in_channels(cfg)

    def use_encoder_crop(self, multiple: int) -> None:
        """Encode only the non-padding part of refiner inputs, its shorter side rounded up to
        ``multiple`` px (``0``: the full input; :mod:`training.modeling.encoder_crop`). Call it
        before a serving engine prepares the predictor: the engine builds its graphs for the rule
        that is set then."""
        self.config.refiner.encoder_crop_multiple = multiple
        self.refiner.cfg.encoder_crop_multiple = multiple
        self.refiner.encoder_crop = torch_encoder_crop(self.refiner, multiple)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> Predictor:
        """Load a bundle file; ``None`` → ``models/default.pt`` if shipped, else an untrained bundle."""
        if path is None:
            if DEFAULT_BUNDLE_PATH.is_file():
                bundle = load_bundle(DEFAULT_BUNDLE_PATH)
            else:
                bundle = build_untrained_bundle(TrainingConfig.model_validate({}))
        else:
            bundle = load_bundle(path)
        return cls.from_bundle_dict(bundle, device=device)

    @classmethod
    def from_bundle_dict(cls, bundle: dict, device: str | torch.device = "cpu") -> Predictor:
        validate_bundle(bundle)
        coarse, refiner, cfg = build_models_from_bundle(bundle, device=device)
        return cls(
            coarse,
            refiner,
            cfg,
            model_version=bundle["model_version"],
            untrained=bool(bundle["untrained"]),
            metrics=bundle.get("metrics"),
            device=device,
        )

    # ------------------------------------------------------------------ inference
    def embed(self, image: np.ndarray) -> torch.Tensor:
        """Native image → ``1×256×E×E`` image embedding on the predictor's device (cacheable)."""
        refiner_image, _ = self.refiner.prepare(image)
        with torch.inference_mode():
            return self.refiner.encode(refiner_image.to(self.device)[None])

    def predict(
        self,
        image: np.ndarray,
        *,
        embedding: torch.Tensor | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
    ) -> Prediction:
        """Coarse and refined lesion probabilities of one native image.

        ``points`` (N×2, x/y) with ``point_labels`` (N; 1 lesion, 0 background; default all 1) and
        ``box`` (x0, y0, x1, y1) are native pixel coordinates; given any of them, they replace the
        prompts derived from the coarse mask. ``embedding`` (from :meth:`embed` of the same image)
        skips the image encoder; without it the encoder runs only when there is something to
        refine (a coarse lesion or clinician prompts), and the result carries the embedding it
        computed so a caller can cache it.
        """
        started = time.perf_counter()
        timings: dict[str, float] = {}
        computed = None
        # Gray once: the blank check and both network inputs read it (to_gray of gray is itself).
        scale, image = full_scale(image), to_gray(image)
        blank_std = self.config.refiner.blank_image_std
        if points is None and box is None and is_blank(image, blank_std, scale=scale):
            # A uniform frame has no lesion: answered before any network runs (and not refined).
            if point_labels is not None:
                raise ValueError("point_labels given without points")
            empty = np.zeros(image.shape, dtype=np.float32)
            timings["total"] = (time.perf_counter() - started) * 1000.0
            return Prediction(coarse_probs=empty, refined_probs=empty.copy(), iou=0.0, timings_ms=timings)
        with torch.inference_mode():
            coarse_image = coarse_input(image, self.coarse_size).to(self.device)[None]  # 1×1×S×S
            refiner_image, geometry = self.refiner.prepare(image)
            refiner_image = refiner_image.to(self.device)[None]  # 1×3×L×L
            override = self._clinician_prompts(geometry, points, point_labels, box)
            mark = self._lap(timings, "preprocess", started)

            # A mask too small as a whole to be a lesion is emptied (the served rule, as in validation).
            coarse_logits = drop_tiny_masks_from_logits(
                self.coarse(coarse_image), self.refiner.cfg.min_lesion_fraction
            )  # 1×2×S×S
            coarse_probs_square = coarse_logits.softmax(dim=1)[:, 1:2]  # 1×1×S×S
            mark = self._lap(timings, "coarse", mark)

            coarse_probs_refiner = geometry.to_refiner(coarse_probs_square)  # 1×1×L×L
            valid = geometry.valid_mask().to(self.device)
            coarse_logits_native = F.interpolate(
                coarse_logits, size=(geometry.height, geometry.width), mode="bilinear", align_corners=False
            )
            coarse_probs = coarse_logits_native.softmax(dim=1)[0, 1]
            coarse_found_lesion = coarse_finds_lesion(coarse_probs_refiner, valid)
            if override is None and not refines_coarse(coarse_found_lesion, self.refiner.cfg):
                # The refiner refines, it does not detect: no coarse lesion → nothing to refine,
                # and the image encoder is not even run.
                refined_probs, iou, prompts = coarse_probs, 0.0, {}
                mark = self._lap(timings, "encoder", mark)
            else:
                if embedding is None:
                    embedding = computed = self.refiner.encode(refiner_image)
                else:
                    embedding = self._check_embedding(embedding)
                mark = self._lap(timings, "encoder", mark)
                output = self.refiner(
                    embedding,
                    coarse_probs_refiner,
                    valid=valid,
                    prompts_override=override,
                    images=refiner_image,
                )
                refined_logits_native = geometry.from_refiner(output.refined_logits)  # 1×1×H×W
                refined_probs = torch.sigmoid(refined_logits_native)[0, 0]
                iou = float(output.selected_iou.reshape(-1)[0])
                prompts = self._native_prompts(output.prompts, geometry)
            self._lap(timings, "decoder", mark)
        timings["total"] = (time.perf_counter() - started) * 1000.0
        return Prediction(
            coarse_probs=coarse_probs.float().cpu().numpy(),
            refined_probs=refined_probs.float().cpu().numpy(),
            iou=iou,
            timings_ms=timings,
            prompts=prompts,
            embedding=computed,
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _lap(timings: dict[str, float], name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = (now - since) * 1000.0
        return now

    def _check_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        if not isinstance(embedding, torch.Tensor):
            raise TypeError("embedding must be a tensor returned by Predictor.embed")
        if embedding.ndim == 3:
            embedding = embedding[None]
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"embedding must be 1×C×E×E, got {tuple(embedding.shape)}")
        return embedding.to(self.device)

    def _clinician_prompts(self, geometry: Geometry, points, point_labels, box):
        if points is None and box is None:
            if point_labels is not None:
                raise ValueError("point_labels given without points")
            return None
        from training.modeling.prompts import Prompts

        prompt_points = prompt_labels = prompt_box = None
        if points is not None:
            native_points = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(-1, 2)
            if native_points.shape[0] == 0:
                raise ValueError("points is empty")
            if point_labels is None:
                labels = torch.ones(native_points.shape[0], dtype=torch.float32)
            else:
                labels = torch.as_tensor(np.asarray(point_labels, dtype=np.float32)).reshape(-1)
                if labels.shape[0] != native_points.shape[0]:
                    raise ValueError(f"{native_points.shape[0]} points but {labels.shape[0]} point labels")
                if not bool(((labels == 0) | (labels == 1)).all()):
                    raise ValueError("point labels must be 1 (lesion) or 0 (background)")
            prompt_points = native_to_refiner_coords(native_points, geometry)[None].to(self.device)
            prompt_labels = labels[None].to(self.device)
        elif point_labels is not None:
            raise ValueError("point_labels given without points")
        if box is not None:
            native_box = torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(-1)
            if native_box.shape[0] != 4:
                raise ValueError("box must be (x0, y0, x1, y1)")
            x0, y0, x1, y1 = native_box.tolist()
            native_box = torch.tensor([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)])
            prompt_box = (
                native_to_refiner_coords(native_box.view(2, 2), geometry).reshape(1, 4).to(self.device)
            )
        return Prompts(points=prompt_points, point_labels=prompt_labels, boxes=prompt_box, mask_logits=None)

    @staticmethod
    def _native_prompts(prompts, geometry: Geometry) -> dict:
        """The sparse prompts actually used, in native pixel coordinates (for display)."""
        if prompts is None:
            return {}
        result: dict = {}
        points = getattr(prompts, "points", None)
        if points is not None:
            result["points"] = refiner_to_native_coords(points[0].float(), geometry).cpu().tolist()
            labels = getattr(prompts, "point_labels", None)
            if labels is not None:
                result["point_labels"] = [int(v) for v in labels[0].cpu().tolist()]
        boxes = getattr(prompts, "boxes", None)
        if boxes is not None:
            result["box"] = (
                refiner_to_native_coords(boxes[0].float().view(2, 2), geometry).reshape(4).cpu().tolist()
            )
        return result


_DEFAULT_LOCK = threading.Lock()
_DEFAULT_PREDICTORS: dict[str, Predictor] = {}


def default_predictor(device: str | torch.device = "cpu") -> Predictor:
    """A process-wide :meth:`Predictor.from_bundle(None)` per device (built once)."""
    key = str(resolve_device(device))
    with _DEFAULT_LOCK:
        if key not in _DEFAULT_PREDICTORS:
            _DEFAULT_PREDICTORS[key] = Predictor.from_bundle(None, device=key)
        return _DEFAULT_PREDICTORS[key]
