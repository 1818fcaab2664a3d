"""The coarse-segmenter registry: every coarse network is built and fed through it by name."""

from __future__ import annotations

import typing

import pytest
import torch
from pydantic import ValidationError

from training.config import CoarseModel, TrainingConfig, TransUNetConfig
from training.modeling.coarse_registry import (
    COARSE_SEGMENTERS,
    build_coarse,
    coarse_in_channels,
    coarse_input_size,
    coarse_spec,
    load_coarse_pretrained,
)
from training.modeling.transunet import TransUNet

TINY = TransUNetConfig.named("compact").model_dump() | {"img_size": 64, "hidden_size": 32, "num_heads": 2}


def test_the_config_names_exactly_the_registered_segmenters():
    assert set(typing.get_args(CoarseModel)) == set(COARSE_SEGMENTERS)
    for name, spec in COARSE_SEGMENTERS.items():
        assert spec.section in TrainingConfig.model_fields, name  # its architecture has a section


def test_transunet_is_built_fed_and_sized_from_its_section():
    cfg = TrainingConfig.model_validate({"coarse_model": "transunet", "transunet": TINY})
    model = build_coarse(cfg).eval()
    assert isinstance(model, TransUNet) and model.cfg.hidden_size == 32
    assert (coarse_input_size(cfg), coarse_in_channels(cfg)) == (64, 1)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2, 64, 64)
    assert load_coarse_pretrained(model, cfg) is False  # no npz named: nothing loaded


def test_an_unknown_segmenter_is_a_clear_error():
    with pytest.raises(ValidationError, match="coarse_model"):
        TrainingConfig.model_validate({"coarse_model": "unet9000"})
    cfg = TrainingConfig.model_construct(coarse_model="unet9000")
    known = "known: \\['tinyvit', 'transunet'\\]"
    with pytest.raises(ValueError, match=f"unknown coarse segmenter 'unet9000'; {known}"):
        coarse_spec(cfg)
