"""The coarse segmenter's pretrained prior: the refiner's frozen image embedding, resampled into the
TransUNet frame (:func:`training.data.transforms.coarse_prior`), through the model, phase-1
augmentation, training, the Predictor, the served-model cache and ONNX Runtime."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from training.checkpoints import build_untrained_bundle, load_checkpoint
from training.config import TrainingConfig, TransUNetConfig
from training.data.transforms import Geometry, coarse_input, coarse_prior, refiner_input
from training.inference import Predictor
from training.modeling.transunet import build_transunet
from training.phases.coarse import augment_coarse_batch

TINY_PRIOR = TransUNetConfig(
    img_size=32,
    resnet_units=(1, 1, 1),
    resnet_width=8,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    mlp_dim=64,
    decoder_channels=(32, 16, 8, 8),
    prior_channels=256,
    prior_width=8,
)


def _image(height: int = 90, width: int = 130) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    image = 120 + 40 * np.sin(cols / 9.0) + 20 * np.cos(rows / 7.0)
    image[((rows - 40) / 18) ** 2 + ((cols - 70) / 25) ** 2 <= 1] = 40
    return image.astype(np.uint8)


# ------------------------------------------------------------------------------- alignment


def test_prior_cells_lie_over_the_same_image_region_as_the_coarse_pixels():
    # A wide image: in the 256×256 refiner frame it fills the top half (rows 0..127); the 64×64
    # embedding covers it with rows 0..31, and its padding (rows 32..63) must not leak in.
    geometry = Geometry(height=60, width=120, size=256)
    embedding = torch.zeros(1, 2, 64, 64)
    embedding[0, 0, :32, 48:] = 1.0  # right quarter of the image
    embedding[0, 1, 32:, :] = 5.0  # padding only
    prior = coarse_prior(embedding, [geometry], size=32)
    assert prior.shape == (1, 2, 8, 8)
    assert torch.allclose(prior[0, 0, :, 7], torch.ones(8)) and prior[0, 0, :, :5].abs().max() < 1e-6
    assert prior[0, 1].abs().max() < 1e-6

    # The same image through the two preprocessings: the prior of the refiner input, averaged over
    # channels, is the coarse input seen at a quarter of its resolution.
    image = _image()
    refiner_image, geometry = refiner_input(image, "litemedsam")
    embedded = F.avg_pool2d(refiner_image[None], 4)  # an "encoder" that keeps the picture
    prior = coarse_prior(embedded, [geometry], size=64)[0].mean(0)
    expected = F.avg_pool2d(coarse_input(image, 64)[None], 4)[0, 0]
    assert np.corrcoef(prior.flatten().numpy(), expected.flatten().numpy())[0, 1] > 0.95


def test_prior_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one geometry per sample"):
        coarse_prior(torch.zeros(2, 4, 16, 16), [Geometry(10, 10, 256)], size=32)


# ----------------------------------------------------------------------------------- model


def test_transunet_with_a_prior_uses_it_and_checks_it():
    torch.manual_seed(0)
    model = build_transunet(TINY_PRIOR)
    images, prior = torch.rand(2, 1, 32, 32), torch.randn(2, 256, 8, 8)
    logits = model(images, prior)
    assert logits.shape == (2, 2, 32, 32)
    assert not torch.allclose(model(images, torch.zeros_like(prior)), logits)  # the prior matters
    logits.square().mean().backward()
    assert model.prior_tokens[1].weight.grad.abs().sum() > 0
    assert model.prior_skip[0].weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="none was given"):
        model(images)
    with pytest.raises(ValueError, match=r"prior must be \(2, 256, 8, 8\)"):
        model(images, torch.zeros(2, 256, 4, 4))
    plain = build_transunet(TINY_PRIOR.model_copy(update={"prior_channels": 0}))
    with pytest.raises(ValueError, match="without a prior"):
        plain(images, prior)
    assert not any(name.startswith("prior") for name in plain.state_dict())


def test_prior_channels_must_match_the_refiner_embedding():
    transunet = TransUNetConfig.named("compact").model_dump()
    with pytest.raises(ValidationError, match="prior_channels must be 0 .* or 256"):
        TrainingConfig(transunet=transunet | {"prior_channels": 128})
    assert TrainingConfig(transunet=transunet | {"prior_channels": 256}).transunet.prior_channels == 256


def test_augmentation_moves_the_prior_with_the_image():
    # A prior that *is* the target mask at a quarter resolution must still be after the affine.
    targets = torch.zeros(4, 32, 32, dtype=torch.long)
    targets[:, 6:18, 4:14] = 1
    prior = F.avg_pool2d(targets[:, None].float(), 4).expand(-1, 3, -1, -1).contiguous()
    images = targets[:, None].float() * 0.5 + 0.25
    generator = torch.Generator().manual_seed(3)
    _, moved_targets, moved_prior = augment_coarse_batch(images, targets, generator, prior)
    assert moved_prior.shape == prior.shape
    expected = F.avg_pool2d(moved_targets[:, None].float(), 4)
    assert (moved_prior[:, :1] - expected).abs().mean() < 0.06
    assert (prior[:, :1] - expected).abs().mean() > 2 * (moved_prior[:, :1] - expected).abs().mean()


# ------------------------------------------------------------------------------- predictor


@pytest.fixture
def prior_predictor(tmp_path, fast_refiner_encoder) -> Predictor:
    transunet = TransUNetConfig.named("compact").model_dump() | {"img_size": 64, "prior_channels": 256}
    cfg = TrainingConfig(transunet=transunet, refiner={"pretrained": False})
    return Predictor.from_bundle_dict(build_untrained_bundle(cfg))


def test_predictor_feeds_the_embedding_to_the_coarse_model(prior_predictor):
    image = _image()
    embedding = prior_predictor.embed(image)
    prediction = prior_predictor.predict(image)
    assert prediction.embedding is not None  # computed first, for the prior
    torch.testing.assert_close(prediction.embedding, embedding)
    with torch.inference_mode():
        _, geometry = refiner_input(image, "litemedsam")
        prior = coarse_prior(embedding, [geometry], 64)
        logits = prior_predictor.coarse(coarse_input(image, 64)[None], prior)
        native = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(native.softmax(1)[0, 1].numpy(), prediction.coarse_probs, atol=1e-6)
    assert prediction.timings_ms["encoder"] > 0


def test_predictor_with_a_prior_reuses_a_given_embedding(prior_predictor, monkeypatch):
    image = _image()
    embedding = prior_predictor.embed(image)
    reference = prior_predictor.predict(image)

    def no_encoder(images):
        raise AssertionError("the encoder must not run when the embedding is given")

    monkeypatch.setattr(prior_predictor.refiner, "encode", no_encoder)
    again = prior_predictor.predict(image, embedding=embedding, box=[40, 20, 100, 60])
    np.testing.assert_allclose(again.coarse_probs, reference.coarse_probs, atol=1e-6)
    assert again.embedding is None


def test_served_coarse_cache_keys_on_the_prior_too():
    from backend.app.model_holder import CachedCoarse

    torch.manual_seed(0)
    calls = []
    inner = build_transunet(TINY_PRIOR).eval()
    original = inner.forward

    def counting(images, prior=None):
        calls.append(1)
        return original(images, prior)

    inner.forward = counting
    cached = CachedCoarse(inner, max_items=4)
    images, prior = torch.rand(1, 1, 32, 32), torch.randn(1, 256, 8, 8)
    with torch.inference_mode():
        first = cached(images, prior)
        assert torch.equal(cached(images, prior), first) and len(calls) == 1
        cached(images, prior + 1.0)
    assert len(calls) == 2


def test_onnx_coarse_with_a_prior_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from backend.app.accelerate import OnnxCoarse, onnx_coarse_path

    torch.manual_seed(1)
    coarse = build_transunet(TINY_PRIOR).eval()
    path = onnx_coarse_path(coarse, 1, 32, tmp_path, prior_channels=256)
    assert path != onnx_coarse_path(build_transunet(TINY_PRIOR).eval(), 1, 32, tmp_path, 256)
    fast = OnnxCoarse(path)
    images, prior = torch.rand(2, 1, 32, 32), torch.randn(2, 256, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(fast(images, prior), coarse(images, prior), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="got no prior"):
        fast(images)


def test_accelerate_predictor_exports_the_prior_input(tmp_path):
    pytest.importorskip("onnxruntime")
    from test_refiner import tiny_refiner

    from backend.app.accelerate import OnnxCoarse, accelerate_predictor
    from training.config import RefinerConfig

    torch.manual_seed(2)
    coarse = build_transunet(TINY_PRIOR).eval()
    predictor = SimpleNamespace(
        refiner=tiny_refiner(RefinerConfig(pretrained=False)),
        coarse=coarse,
        coarse_size=32,
        config=SimpleNamespace(transunet=TINY_PRIOR),
        device="cpu",
    )
    accelerate_predictor(predictor, "onnx", tmp_path)
    assert isinstance(predictor.coarse, OnnxCoarse)
    assert [i.name for i in predictor.coarse.session.get_inputs()] == ["images", "prior"]


# -------------------------------------------------------------------------------- training


@pytest.mark.slow  # runs phase 1 (seconds) with the cheap stand-in encoder
def test_phase1_trains_with_the_prior_and_serving_reproduces_its_predictions(
    tiny_training_config, fast_refiner_encoder
):
    from training.callbacks import EventRecorder
    from training.phases.context import COARSE_DIR
    from training.pipeline import load_run_samples, run_training

    transunet = TransUNetConfig.named("compact").model_dump() | {"img_size": 64, "prior_channels": 256}
    cfg = tiny_training_config(transunet=transunet, phases=["coarse"])
    recorder = EventRecorder()
    run_training(cfg, recorder)

    embedding_steps = [
        e for e in recorder.of_kind("step") if e.phase == "coarse" and e.extra.get("stage") == "embeddings"
    ]
    assert embedding_steps and embedding_steps[-1].steps == embedding_steps[-1].step + 1

    # The out-of-fold probabilities of the final fold, made in training, are what the Predictor
    # gives for the same images from the final weights: one prior path for training and serving.
    final = load_checkpoint(cfg.output_dir / COARSE_DIR / "final.pt")
    oof = load_checkpoint(cfg.output_dir / COARSE_DIR / f"fold{final['fold']}" / "oof_probs.pt")["probs"]
    bundle = build_untrained_bundle(cfg) | {"coarse_state_dict": final["model"]}
    predictor = Predictor.from_bundle_dict(bundle)
    samples = {sample.id: sample for sample in load_run_samples(cfg)}
    from training.data.datasets import load_image

    for sample_id, probs in list(oof.items())[:3]:
        image = load_image(samples[sample_id].image_path)
        with torch.inference_mode():
            embedding = predictor.embed(image)
            _, geometry = refiner_input(image, "litemedsam")
            logits = predictor.coarse(coarse_input(image, 64)[None], coarse_prior(embedding, [geometry], 64))
        served = logits.softmax(1)[0, 1:2]
        torch.testing.assert_close(served, probs.float(), atol=2e-3, rtol=0)  # float16 storage
