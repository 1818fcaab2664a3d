"""The ``tinyvit`` coarse segmenter (issue 16): LiteMedSAM's pretrained TinyViT encoder, fine-tuned
with a U-Net decoder, built, trained, bundled and served through the coarse-segmenter registry."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from training.config import TinyViTCoarseConfig, TrainingConfig
from training.modeling.coarse_registry import (
    build_coarse,
    coarse_in_channels,
    coarse_input_size,
    coarse_param_groups,
    load_coarse_pretrained,
)
from training.modeling.tinyvit_coarse import TinyViTCoarse, litemedsam_encoder_state

SMALL = {"img_size": 56, "decoder_channels": (16, 8, 8)}


def _cfg(**tinyvit) -> TrainingConfig:
    return TrainingConfig.model_validate({"coarse_model": "tinyvit", "tinyvit": SMALL | tinyvit})


def test_built_fed_and_sized_from_its_section():
    cfg = _cfg()
    model = build_coarse(cfg).eval()
    assert isinstance(model, TinyViTCoarse)
    assert (coarse_input_size(cfg), coarse_in_channels(cfg)) == (56, 1)
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 56, 56))
    assert logits.shape == (2, 2, 56, 56) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="expected 56×56 images"):
        model(torch.rand(1, 1, 64, 64))


def test_the_encoder_starts_from_litemedsam_and_trains_at_its_own_rate():
    cfg = _cfg()
    cfg.coarse.lr, cfg.coarse.pretrained_lr_scale = 1e-3, 0.1
    model = build_coarse(cfg)
    assert load_coarse_pretrained(model, cfg) is True
    reference = litemedsam_encoder_state()
    for key, value in model.encoder.state_dict().items():
        if key in reference:
            torch.testing.assert_close(value, reference[key], msg=key)
    rest, encoder = coarse_param_groups(model, cfg)
    assert rest["lr"] == pytest.approx(1e-3) and encoder["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters()}
    assert len(rest["params"]) + len(encoder["params"]) == len(list(model.parameters()))
    assert load_coarse_pretrained(build_coarse(_cfg(pretrained=False)), _cfg(pretrained=False)) is False


def test_training_keeps_the_pretrained_batch_norm_statistics():
    cfg = _cfg()
    model = build_coarse(cfg)
    load_coarse_pretrained(model, cfg)
    model.train()
    encoder_norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    decoder_norms = [m for m in norms if m not in encoder_norms]
    assert encoder_norms and not any(m.training for m in encoder_norms)
    assert decoder_norms and all(m.training for m in decoder_norms)
    before = [m.running_mean.clone() for m in encoder_norms]
    model(torch.rand(2, 1, 56, 56)).sum().backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(encoder_norms, before, strict=True))
    assert model.encoder.patch_embed.seq[0].bn.weight.grad is not None  # their affine weights train


@pytest.mark.parametrize("size", [50, 64, 0])
def test_an_input_side_that_the_windows_do_not_tile_is_refused(size):
    with pytest.raises(ValidationError, match="img_size"):
        TinyViTCoarseConfig(img_size=size)


@pytest.mark.slow  # all phases on the synthetic tree with the real LiteMedSAM encoder weights
def test_a_tinyvit_run_trains_bundles_predicts_and_serves(
    tiny_training_config, fast_refiner_encoder, tmp_path
):
    from backend.app.engines import accelerate_predictor
    from training.checkpoints import load_bundle
    from training.inference import Predictor
    from training.pipeline import run_training

    cfg = tiny_training_config(
        coarse_model="tinyvit",
        tinyvit=SMALL,
        coarse={"optimizer": "adamw", "lr": 1e-3, "pretrained_lr_scale": 0.1, "precision": "bf16"},
    )
    summary = run_training(cfg)
    assert summary["status"] == "completed"
    bundle = load_bundle(cfg.output_dir / "bundle.pt")
    assert bundle["config"]["coarse_model"] == "tinyvit" and bundle["config"]["tinyvit"]["img_size"] == 56
    reference = litemedsam_encoder_state()
    coarse = bundle["coarse_state_dict"]
    tuned = {k.removeprefix("encoder."): v for k, v in coarse.items() if k.startswith("encoder.")}
    assert set(reference) <= set(tuned)
    assert any(not torch.equal(tuned[k], reference[k]) for k in reference if reference[k].is_floating_point())

    predictor = Predictor.from_bundle(cfg.output_dir / "bundle.pt")
    assert isinstance(predictor.coarse, TinyViTCoarse) and predictor.coarse_size == 56
    image = (np.random.default_rng(0).random((90, 120)) * 255).astype(np.uint8)
    prediction = predictor.predict(image)
    assert prediction.coarse_probs.shape == (90, 120) and np.isfinite(prediction.coarse_probs).all()

    # The serving engines export it through the registry like TransUNet (ONNX Runtime here).
    served = accelerate_predictor(
        SimpleNamespace(
            refiner=copy.deepcopy(predictor.refiner),
            coarse=copy.deepcopy(predictor.coarse),
            coarse_size=56,
            coarse_channels=1,
            device="cpu",
        ),
        "onnx",
        tmp_path / "graphs",
    )
    images = torch.rand(2, 1, 56, 56)
    with torch.inference_mode():
        torch.testing.assert_close(served.coarse(images), predictor.coarse(images), atol=1e-3, rtol=1e-3)


def test_a_tinyvit_fold_checkpoint_loads_into_a_transunet_bundle_predictor(tmp_path):
    """A phase-1 checkpoint carries its own config: the benchmarks that swap a fold model into the
    shipped (TransUNet) bundle's predictor build a TinyViT from it and feed it at its own size."""
    from training.checkpoints import save_checkpoint
    from training.inference import Predictor
    from training.modeling.coarse_registry import load_coarse_checkpoint

    cfg = _cfg()
    trained = build_coarse(cfg).eval()
    path = tmp_path / "best.pt"
    save_checkpoint(
        path,
        phase="coarse",
        fold=1,
        epoch=0,
        dice=0.5,
        model=trained.state_dict(),
        config=cfg.model_dump(mode="json"),
    )
    served = TrainingConfig.model_validate({})
    assert served.coarse_model == "transunet"
    model, own = load_coarse_checkpoint(served, path)
    assert isinstance(model, TinyViTCoarse) and own.coarse_model == "tinyvit"
    assert own.refiner == served.refiner and own.data == served.data  # only the architecture changes
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    predictor = Predictor.from_bundle(None)
    predictor.replace_coarse(model, own)
    assert (predictor.coarse_size, predictor.coarse_channels) == (56, 1)
    image = (np.random.default_rng(0).random((90, 120)) * 255).astype(np.uint8)
    prediction = predictor.predict(image)
    assert prediction.coarse_probs.shape == (90, 120)
