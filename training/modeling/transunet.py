"""TransUNet: the coarse segmenter (R50 + ViT hybrid encoder, cascaded upsampler with skips).

Layout (``S`` = ``cfg.img_size``, ``w`` = ``cfg.resnet_width``):

* stem: ``B×1×S×S`` → replicated to 3 channels → StdConv 7×7/2 + GroupNorm + ReLU (``w`` ch, S/2)
  → max-pool (S/4);
* three bottleneck stages (``cfg.resnet_units``) with standardised convolutions and GroupNorm,
  as in the BiT/ViT-hybrid ResNet: ``4w`` ch at S/4, ``8w`` ch at S/8, ``16w`` ch at S/16;
* ViT: a ``patch_size`` conv embeds the S/16 map into tokens, learned position embeddings,
  ``num_layers`` pre-norm transformer blocks;
* decoder: 3×3 conv to ``2·decoder_channels[0]``, four ×2 upsampling blocks concatenating the
  S/8, S/4 and S/2 skips (the first ``n_skip`` of them), a 3×3 head to ``num_classes`` logits.

:func:`load_vit_npz` reads the public ImageNet-21k ``R50+ViT-B_16.npz`` (TensorFlow layout).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.config import TransUNetConfig

#: Epsilon of the GroupNorms of the BiT ResNet (the npz was trained with it).
_GN_EPS = 1e-6


def _groups(channels: int) -> int:
    """32 GroupNorm groups as in R50, fewer when a compact stage is narrower."""
    return math.gcd(32, channels)


class StdConv2d(nn.Conv2d):
    """Convolution with weight standardisation (zero mean, unit variance per output filter)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        variance, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(variance + 1e-5)
        return F.conv2d(features, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _std_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


class Bottleneck(nn.Module):
    """ResNet bottleneck unit (1×1 → 3×3/stride → 1×1), GroupNorm after each convolution."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _std_conv(in_ch, mid_ch, 1)
        self.gn1 = nn.GroupNorm(_groups(mid_ch), mid_ch, eps=_GN_EPS)
        self.conv2 = _std_conv(mid_ch, mid_ch, 3, stride)
        self.gn2 = nn.GroupNorm(_groups(mid_ch), mid_ch, eps=_GN_EPS)
        self.conv3 = _std_conv(mid_ch, out_ch, 1)
        self.gn3 = nn.GroupNorm(_groups(out_ch), out_ch, eps=_GN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        self.gn_proj: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = _std_conv(in_ch, out_ch, 1, stride)
            self.gn_proj = nn.GroupNorm(out_ch, out_ch, eps=_GN_EPS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        residual = features
        if self.downsample is not None:
            residual = self.gn_proj(self.downsample(features))
        out = self.relu(self.gn1(self.conv1(features)))
        out = self.relu(self.gn2(self.conv2(out)))
        out = self.gn3(self.conv3(out))
        return self.relu(residual + out)


class ResNetStages(nn.Module):
    """Stem + three bottleneck stages; returns the S/16 map and the skips (S/8, S/4, S/2)."""

    def __init__(self, units: tuple[int, int, int], width: int) -> None:
        super().__init__()
        self.width = width
        self.root = nn.Sequential()
        self.root.add_module("conv", StdConv2d(3, width, 7, stride=2, padding=3, bias=False))
        self.root.add_module("gn", nn.GroupNorm(_groups(width), width, eps=_GN_EPS))
        self.root.add_module("relu", nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.body = nn.Sequential()
        in_ch = width
        for index, (n_units, mid_mult, stride) in enumerate(zip(units, (1, 2, 4), (1, 2, 2), strict=True)):
            mid_ch, out_ch = width * mid_mult, width * mid_mult * 4
            block = nn.Sequential()
            for unit in range(n_units):
                block.add_module(
                    f"unit{unit + 1}",
                    Bottleneck(in_ch, out_ch, mid_ch, stride if unit == 0 else 1),
                )
                in_ch = out_ch
            self.body.add_module(f"block{index + 1}", block)

    @property
    def skip_channels(self) -> tuple[int, int, int]:
        """Channels of the S/8, S/4 and S/2 skips."""
        return self.width * 8, self.width * 4, self.width

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``B×3×S×S`` → (``B×16w×S/16×S/16``, [S/8, S/4, S/2 feature maps])."""
        root = self.root(images)
        stage1 = self.body.block1(self.pool(root))
        stage2 = self.body.block2(stage1)
        stage3 = self.body.block3(stage2)
        return stage3, [stage2, stage1, root]


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value/out projections (npz layout)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``B×N×D`` → ``B×N×D``."""
        batch, n_tokens, hidden = tokens.shape

        def split(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, n_tokens, self.heads, hidden // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.query(tokens)), split(self.key(tokens)), split(self.value(tokens))
        )
        return self.out(attended.transpose(1, 2).reshape(batch, n_tokens, hidden))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight)
        nn.init.normal_(self.fc1.bias, std=1e-6)
        nn.init.normal_(self.fc2.bias, std=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(tokens)))))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, hidden: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn = Mlp(hidden, mlp_dim, dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.attention_norm(tokens))
        return tokens + self.ffn(self.ffn_norm(tokens))


class Conv2dReLU(nn.Sequential):
    """3×3 convolution + BatchNorm + ReLU (decoder building block)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """×2 bilinear upsampling, concatenation with a skip (if any), two Conv2dReLU."""

    def __init__(self, in_ch: int, out_ch: int, skip_ch: int) -> None:
        super().__init__()
        self.conv1 = Conv2dReLU(in_ch + skip_ch, out_ch)
        self.conv2 = Conv2dReLU(out_ch, out_ch)

    def forward(self, features: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        features = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            features = torch.cat([features, skip], dim=1)
        return self.conv2(self.conv1(features))


class TransUNet(nn.Module):
    """R50 + ViT hybrid TransUNet: ``B×1×S×S`` images → ``B×num_classes×S×S`` logits."""

    def __init__(self, cfg: TransUNetConfig) -> None:
        super().__init__()
        if cfg.img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, got {cfg.img_size}")
        self.cfg = cfg
        self.resnet = ResNetStages(cfg.resnet_units, cfg.resnet_width)
        grid = cfg.img_size // 16 // cfg.patch_size
        self.grid_size = grid
        self.patch_embeddings = nn.Conv2d(
            cfg.resnet_width * 16, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid, cfg.hidden_size))
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_dim, cfg.dropout)
            for _ in range(cfg.num_layers)
        )
        self.encoder_norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)

        head_channels = 2 * cfg.decoder_channels[0]
        self.conv_more = Conv2dReLU(cfg.hidden_size, head_channels)
        in_channels = (head_channels, *cfg.decoder_channels[:-1])
        skip_channels = [*self.resnet.skip_channels, 0]
        for index in range(cfg.n_skip, 3):
            skip_channels[index] = 0
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(in_ch, out_ch, skip_ch)
            for in_ch, out_ch, skip_ch in zip(in_channels, cfg.decoder_channels, skip_channels, strict=True)
        )
        self.segmentation_head = nn.Conv2d(cfg.decoder_channels[-1], cfg.num_classes, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``B×1×S×S`` images in [0, 1] (or ``B×3×S×S``) → ``B×num_classes×S×S`` logits."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        deep, skips = self.resnet(images)
        embedded = self.patch_embeddings(deep)  # B×D×g×g
        batch, hidden, grid_h, grid_w = embedded.shape
        tokens = embedded.flatten(2).transpose(1, 2) + self.position_embeddings
        tokens = self.embedding_dropout(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.encoder_norm(tokens)
        features = tokens.transpose(1, 2).reshape(batch, hidden, grid_h, grid_w)
        if self.cfg.patch_size > 1:
            features = F.interpolate(features, scale_factor=self.cfg.patch_size, mode="bilinear")
        features = self.conv_more(features)
        for index, block in enumerate(self.decoder_blocks):
            skip = skips[index] if index < self.cfg.n_skip else None
            features = block(features, skip)
        return self.segmentation_head(features)


def build_transunet(cfg: TransUNetConfig | None = None) -> TransUNet:
    """Build a randomly initialised :class:`TransUNet` (``cfg`` defaults to the compact config)."""
    return TransUNet(cfg or TransUNetConfig.named("compact"))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def estimate_gflops(cfg: TransUNetConfig) -> float:
    """Forward GFLOPs of one ``1×1×S×S`` image (one multiply-add = 2 FLOPs), measured by
    :class:`torch.utils.flop_counter.FlopCounterMode`."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_transunet(cfg).eval()
    images = torch.zeros(1, cfg.in_channels, cfg.img_size, cfg.img_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    return counter.get_total_flops() / 1e9


# --------------------------------------------------------------------------------------------
# ImageNet-21k R50+ViT-B_16.npz loader
# --------------------------------------------------------------------------------------------


def _tensor(array: np.ndarray, conv: bool = False) -> torch.Tensor:
    """numpy → torch; ``conv`` converts a TensorFlow HWIO kernel to OIHW."""
    if conv:
        array = array.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def _copy(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if target.shape != value.shape:
        raise ValueError(
            f"npz entry {key!r} has shape {tuple(value.shape)}, model expects {tuple(target.shape)}"
        )
    target.copy_(value)


def _resized_position_embeddings(posemb: torch.Tensor, grid: int) -> torch.Tensor:
    """``1×N×D`` (``N`` = g² or g²+1 with a class token) → ``1×grid²×D`` (bilinear resize)."""
    tokens = posemb.shape[1]
    old_grid = math.isqrt(tokens)
    if old_grid * old_grid != tokens:  # drop the class token
        posemb = posemb[:, 1:]
        old_grid = math.isqrt(tokens - 1)
        if old_grid * old_grid != tokens - 1:
            raise ValueError(f"position embedding with {tokens} tokens is not a square grid")
    if old_grid == grid:
        return posemb
    hidden = posemb.shape[-1]
    square = posemb.reshape(1, old_grid, old_grid, hidden).permute(0, 3, 1, 2)
    square = F.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False)
    return square.permute(0, 2, 3, 1).reshape(1, grid * grid, hidden)


def load_vit_npz(model: TransUNet, path: str | Path) -> list[str]:
    """Initialise ``model`` from an ImageNet-21k ``R50+ViT-B_16.npz`` (TensorFlow layout).

    Loads the ResNet (``conv_root``, ``gn_root``, ``block{i}/unit{j}/...``), the patch embedding
    (``embedding``), the position embeddings (class token dropped, grid resized if needed) and
    every transformer block present in both. The decoder stays randomly initialised.
    Returns the list of model tensors that were loaded (by their ``state_dict`` name).
    Raises ``ValueError`` on a shape mismatch and ``FileNotFoundError`` for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ViT npz weights not found: {path}")
    loaded: list[str] = []
    named = dict(model.named_parameters())

    with np.load(path) as weights, torch.no_grad():

        def put(name: str, key: str, conv: bool = False, reshape: tuple[int, ...] | None = None, t=False):
            value = _tensor(weights[key], conv=conv)
            if reshape is not None:
                value = value.reshape(reshape)
            if t:
                value = value.t()
            _copy(named[name], value, key)
            loaded.append(name)

        hidden = model.cfg.hidden_size
        # ResNet stem and stages.
        put("resnet.root.conv.weight", "conv_root/kernel", conv=True)
        put("resnet.root.gn.weight", "gn_root/scale", reshape=(-1,))
        put("resnet.root.gn.bias", "gn_root/bias", reshape=(-1,))
        for block_name, block in model.resnet.body.named_children():
            for unit_name, unit in block.named_children():
                prefix = f"{block_name}/{unit_name}"
                module = f"resnet.body.{block_name}.{unit_name}"
                if f"{prefix}/conv1/kernel" not in weights:
                    continue
                for index in (1, 2, 3):
                    put(f"{module}.conv{index}.weight", f"{prefix}/conv{index}/kernel", conv=True)
                    put(f"{module}.gn{index}.weight", f"{prefix}/gn{index}/scale", reshape=(-1,))
                    put(f"{module}.gn{index}.bias", f"{prefix}/gn{index}/bias", reshape=(-1,))
                if unit.downsample is not None:
                    put(f"{module}.downsample.weight", f"{prefix}/conv_proj/kernel", conv=True)
                    put(f"{module}.gn_proj.weight", f"{prefix}/gn_proj/scale", reshape=(-1,))
                    put(f"{module}.gn_proj.bias", f"{prefix}/gn_proj/bias", reshape=(-1,))

        # Patch embedding and position embeddings.
        put("patch_embeddings.weight", "embedding/kernel", conv=True)
        put("patch_embeddings.bias", "embedding/bias")
        posemb = _tensor(weights["Transformer/posembed_input/pos_embedding"])
        _copy(model.position_embeddings, _resized_position_embeddings(posemb, model.grid_size), "posembed")
        loaded.append("position_embeddings")
        put("encoder_norm.weight", "Transformer/encoder_norm/scale")
        put("encoder_norm.bias", "Transformer/encoder_norm/bias")

        # Transformer blocks.
        for index in range(len(model.blocks)):
            root = f"Transformer/encoderblock_{index}"
            if f"{root}/LayerNorm_0/scale" not in weights:
                continue
            module = f"blocks.{index}"
            put(f"{module}.attention_norm.weight", f"{root}/LayerNorm_0/scale")
            put(f"{module}.attention_norm.bias", f"{root}/LayerNorm_0/bias")
            put(f"{module}.ffn_norm.weight", f"{root}/LayerNorm_2/scale")
            put(f"{module}.ffn_norm.bias", f"{root}/LayerNorm_2/bias")
            attention = f"{root}/MultiHeadDotProductAttention_1"
            for name in ("query", "key", "value", "out"):
                put(
                    f"{module}.attn.{name}.weight",
                    f"{attention}/{name}/kernel",
                    reshape=(hidden, hidden),
                    t=True,
                )
                put(f"{module}.attn.{name}.bias", f"{attention}/{name}/bias", reshape=(-1,))
            put(f"{module}.ffn.fc1.weight", f"{root}/MlpBlock_3/Dense_0/kernel", t=True)
            put(f"{module}.ffn.fc1.bias", f"{root}/MlpBlock_3/Dense_0/bias")
            put(f"{module}.ffn.fc2.weight", f"{root}/MlpBlock_3/Dense_1/kernel", t=True)
            put(f"{module}.ffn.fc2.bias", f"{root}/MlpBlock_3/Dense_1/bias")
    return loaded
