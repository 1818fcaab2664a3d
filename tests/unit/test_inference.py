"""Predictor: the shared preprocessing, prompts in native coordinates, embeddings, threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import inference
from training.checkpoints import BundleError, build_untrained_bundle, save_bundle
from training.config import TrainingConfig, TransUNetConfig
from training.data.transforms import Geometry, coarse_input
from training.inference import Predictor, native_to_refiner_coords, refiner_to_native_coords

TIMINGS = {"preprocess", "coarse", "encoder", "decoder", "total"}


def _image(height: int = 90, width: int = 130) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    image = 120 + 40 * np.sin(cols / 9.0) + 20 * np.cos(rows / 7.0)
    image[((rows - 40) / 18) ** 2 + ((cols - 70) / 25) ** 2 <= 1] = 40
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    transunet = TransUNetConfig.named("compact").model_dump() | {"img_size": 64}
    cfg = TrainingConfig(transunet=transunet, refiner={"pretrained": False})
    path = save_bundle(tmp_path_factory.mktemp("bundle") / "bundle.pt", build_untrained_bundle(cfg))
    return Predictor.from_bundle(path)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _image()


@pytest.fixture(scope="module")
def embedding(predictor, image) -> torch.Tensor:
    return predictor.embed(image)


@pytest.fixture(scope="module")
def prediction(predictor, image, embedding):
    return predictor.predict(image, embedding=embedding)


def test_prediction_at_native_resolution(prediction, image, embedding):
    assert embedding.shape == (1, 256, 64, 64)
    for probs in (prediction.coarse_probs, prediction.refined_probs):
        assert probs.shape == image.shape and probs.dtype == np.float32
        assert 0.0 <= probs.min() and probs.max() <= 1.0
    assert isinstance(prediction.iou, float)
    assert set(prediction.timings_ms) == TIMINGS
    assert prediction.timings_ms["encoder"] < prediction.timings_ms["total"]
    assert {"points", "point_labels", "box"} <= set(prediction.prompts)  # derived prompts, native coords


def test_predict_without_embedding_matches(predictor, image, embedding, prediction):
    full = predictor.predict(image)
    np.testing.assert_allclose(full.refined_probs, prediction.refined_probs, atol=1e-5)
    np.testing.assert_allclose(full.coarse_probs, prediction.coarse_probs, atol=1e-6)
    # The embedding it computed comes back for the caller's cache; a given one is not echoed.
    assert full.embedding is not None
    torch.testing.assert_close(full.embedding, embedding, atol=1e-5, rtol=0)
    assert prediction.embedding is None


def test_coarse_path_is_the_shared_preprocessing(predictor, image, prediction):
    with torch.inference_mode():
        logits = predictor.coarse(coarse_input(image, predictor.coarse_size)[None])
        native = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(native.softmax(1)[0, 1].numpy(), prediction.coarse_probs, atol=1e-6)


def test_clinician_prompts_in_native_coordinates(predictor, image, embedding, prediction):
    box = [50.0, 20.0, 100.0, 65.0]
    boxed = predictor.predict(image, embedding=embedding, box=box)
    np.testing.assert_allclose(boxed.prompts["box"], box, atol=1e-3)
    assert "points" not in boxed.prompts  # clinician prompts replace the derived ones
    assert not np.allclose(boxed.refined_probs, prediction.refined_probs)
    np.testing.assert_allclose(boxed.coarse_probs, prediction.coarse_probs)  # coarse is untouched

    pointed = predictor.predict(image, embedding=embedding, points=[[70, 40], [5, 5]], point_labels=[1, 0])
    np.testing.assert_allclose(pointed.prompts["points"], [[70, 40], [5, 5]], atol=1e-3)
    assert pointed.prompts["point_labels"] == [1, 0]
    assert predictor.predict(image, embedding=embedding, points=[[70, 40]]).prompts["point_labels"] == [1]


def test_coordinate_mapping_follows_the_geometry():
    geometry = Geometry(height=90, width=130, size=256)
    rh, rw = geometry.resized_hw
    corner = native_to_refiner_coords(torch.tensor([[130.0, 90.0]]), geometry)
    torch.testing.assert_close(corner, torch.tensor([[float(rw), float(rh)]]))
    back = refiner_to_native_coords(corner, geometry)
    torch.testing.assert_close(back, torch.tensor([[130.0, 90.0]]))


def test_bad_inputs(predictor, image, embedding):
    with pytest.raises(ValueError, match="point labels"):
        predictor.predict(image, embedding=embedding, points=[[1, 2]], point_labels=[1, 0])
    with pytest.raises(ValueError, match="without points"):
        predictor.predict(image, embedding=embedding, point_labels=[1])
    with pytest.raises(ValueError, match="box"):
        predictor.predict(image, embedding=embedding, box=[1, 2, 3])
    with pytest.raises(ValueError, match="embedding"):
        predictor.predict(image, embedding=torch.zeros(2, 256, 64, 64))


def test_concurrent_predictions_are_independent(predictor, fast_refiner_encoder):
    images = [_image(), _image(70, 100), _image(), _image(120, 80)]
    embeddings = [predictor.embed(im) for im in images]
    expected = [predictor.predict(im, embedding=em) for im, em in zip(images, embeddings, strict=True)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(
                lambda args: predictor.predict(args[0], embedding=args[1]),
                zip(images, embeddings, strict=True),
            )
        )
    for got, want in zip(results, expected, strict=True):
        assert got.refined_probs.shape == want.refined_probs.shape
        np.testing.assert_allclose(got.refined_probs, want.refined_probs, atol=1e-5)


def test_default_is_an_untrained_bundle(monkeypatch, tmp_path):
    monkeypatch.setattr(inference, "DEFAULT_BUNDLE_PATH", tmp_path / "absent.pt")
    default = Predictor.from_bundle(None)
    assert default.model_version.endswith("-untrained") and default.untrained
    assert default.config.refiner.backbone == "litemedsam"


def test_bad_bundle_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        Predictor.from_bundle(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(BundleError):
        Predictor.from_bundle(tmp_path / "junk.pt")


def test_empty_coarse_mask_is_not_refined_and_skips_the_encoder(
    predictor, image, monkeypatch, no_lesion_coarse
):
    monkeypatch.setattr(predictor, "coarse", no_lesion_coarse)
    calls = []
    monkeypatch.setattr(predictor.refiner, "encode", lambda images: calls.append(images) or None)
    prediction = predictor.predict(image)
    assert not calls  # no lesion to refine: the image encoder is not run
    assert prediction.embedding is None
    assert prediction.refined_probs.max() < 0.5 and prediction.coarse_probs.max() < 0.5
    np.testing.assert_array_equal(prediction.refined_probs, prediction.coarse_probs)
    assert prediction.iou == 0.0 and prediction.prompts == {}


def test_refine_empty_coarse_setting_and_clinician_prompts_still_refine(
    predictor, image, embedding, monkeypatch, no_lesion_coarse
):
    monkeypatch.setattr(predictor, "coarse", no_lesion_coarse)
    with_box = predictor.predict(image, embedding=embedding, box=[40, 20, 100, 60])
    assert with_box.prompts["box"] is not None  # a clinician prompt always reaches the refiner
    assert not np.array_equal(with_box.refined_probs, with_box.coarse_probs)
    monkeypatch.setattr(predictor.refiner.cfg, "refine_empty_coarse", True)
    forced = predictor.predict(image, embedding=embedding)
    assert {"points", "point_labels", "box"} <= set(forced.prompts)


def test_a_blank_frame_has_no_lesion_and_runs_no_network(predictor, image, monkeypatch):
    from training.data.transforms import full_scale, is_blank

    assert full_scale(np.zeros((4, 4), np.uint8)) == 255
    assert full_scale(np.full((4, 4), 3000, np.uint16)) == 4095  # 12-bit data in 16-bit words
    assert full_scale(np.full((4, 4), 0.5, np.float32)) == 1.0
    rng = np.random.default_rng(0)
    faint = np.clip(rng.normal(20, 1.0, (60, 80)), 0, 255).astype(np.uint8)  # std ≈ 1 of 255
    assert is_blank(np.zeros((60, 80), np.uint8), 0.01) and is_blank(faint, 0.01)
    assert not is_blank(image, 0.01) and not is_blank(np.zeros((60, 80), np.uint8), 0.0)

    calls = []
    monkeypatch.setattr(predictor.coarse, "forward", lambda *a: calls.append("coarse"))
    monkeypatch.setattr(predictor.refiner, "encode", lambda *a: calls.append("encoder"))
    for frame in (np.zeros((60, 80), np.uint8), np.zeros((60, 80, 3), np.uint8), faint):
        result = predictor.predict(frame)
        assert result.coarse_probs.shape == (60, 80) and not result.coarse_mask().any()
        assert not result.refined_mask().any() and result.iou == 0.0 and result.embedding is None
    assert calls == []
    with pytest.raises(ValueError, match="point_labels given without points"):
        predictor.predict(np.zeros((60, 80), np.uint8), point_labels=[1])


def test_a_blank_frame_with_clinician_prompts_is_refined_as_asked(predictor):
    black = np.zeros((60, 80), np.uint8)
    result = predictor.predict(black, box=[10, 10, 40, 40])
    assert result.prompts.get("box") is not None  # the refiner ran on the clinician's box
    off = predictor.config.model_copy(deep=True)
    off.refiner.blank_image_std = 0.0
    unguarded = Predictor(predictor.coarse, predictor.refiner, off, model_version="x").predict(black)
    assert "coarse" in unguarded.timings_ms  # rule off: the networks run
