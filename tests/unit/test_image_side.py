"""``refiner.image_side``: the image placed smaller inside the square refiner input, the same way in
training (sample store, phase-2a masks, embeddings), evaluation and serving, and kept in the bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from training.checkpoints import adopt_init_architecture, build_untrained_bundle, load_bundle, save_bundle
from training.config import RefinerConfig
from training.data.embedding_cache import EmbeddingCache
from training.data.mask_augment import augment_mask, to_mask_space
from training.data.transforms import Geometry, refiner_input
from training.inference import Predictor
from training.pipeline import run_training


def test_the_geometry_places_the_image_at_its_side_and_maps_back():
    geometry = Geometry(height=100, width=200, size=256, image_side=128)
    assert geometry.long_side == 128 and geometry.resized_hw == (64, 128)
    assert Geometry(height=100, width=200, size=256).resized_hw == (128, 256)
    valid = geometry.valid_mask()
    assert valid.shape == (1, 1, 256, 256) and int(valid.sum()) == 64 * 128
    native = torch.zeros(1, 1, 100, 200)
    native[..., 20:60, 50:150] = 1
    square = geometry.to_refiner(native)
    assert square.shape == (1, 1, 256, 256) and float(square[..., 64:, :].abs().sum()) == 0
    assert float(square[..., :, 128:].abs().sum()) == 0
    back = geometry.from_refiner(square) >= 0.5
    assert (back == (native >= 0.5)).float().mean() > 0.98
    # A lower-resolution refiner map (the 64² decoder output) maps back the same way.
    low = torch.nn.functional.interpolate(square, size=(64, 64), mode="bilinear", align_corners=False)
    assert ((geometry.from_refiner(low) >= 0.5) == (native >= 0.5)).float().mean() > 0.95
    with pytest.raises(ValueError, match="image_side"):
        Geometry(height=10, width=10, size=256, image_side=300)


def test_the_refiner_input_is_zero_outside_the_placed_image():
    image = np.random.default_rng(1).integers(1, 255, (100, 200), dtype=np.uint8)
    tensor, geometry = refiner_input(image, "litemedsam", 128)
    assert geometry.resized_hw == (64, 128) and tensor.shape == (3, 256, 256)
    assert float(tensor[:, 64:, :].abs().sum()) == 0 and float(tensor[:, :, 128:].abs().sum()) == 0
    assert float(tensor[:, :64, :128].std()) > 0.1
    default, _ = refiner_input(image, "litemedsam")
    assert float(default[:, 64:128, :].abs().sum()) > 0  # the whole side without it


def test_config_bounds_follow_the_backbone():
    assert RefinerConfig().image_side is None
    assert RefinerConfig(backbone="sam_vit_b", image_side=512).image_side == 512
    # The whole input side is the default geometry, spelt one way (None) wherever it is recorded.
    assert RefinerConfig(image_side=256).image_side is None
    assert RefinerConfig(backbone="sam_vit_b", image_side=1024).image_side is None
    assert RefinerConfig(backbone="sam_vit_b", image_side=256).image_side == 256
    for bad in (300, 50, 170):  # past the 256 input, below 56 px, not a multiple of 4
        with pytest.raises(ValidationError, match="image_side"):
            RefinerConfig(image_side=bad)


def test_augmented_masks_sit_where_the_refiner_places_the_image():
    mask = np.zeros((100, 200), dtype=bool)
    mask[30:70, 80:160] = True
    square, valid = to_mask_space(mask, 256, 128)
    assert int(valid.sum()) == 64 * 128 and not square[64:].any() and not square[:, 128:].any()
    assert square[21:44, 53:101].all() and not square[:18].any() and not square[:, :50].any()  # ×0.64
    for entry in augment_mask(mask, 4, np.random.default_rng(0), image_side=128):
        assert entry.soft.shape == (256, 256)
        assert entry.soft[80:].max() < 0.5 and entry.soft[:, 140:].max() < 0.5


def test_embedding_keys_name_the_image_side(tmp_path):
    cache = EmbeddingCache(tmp_path)
    image = np.full((20, 30), 7, dtype=np.uint8)
    assert cache.key(image, "litemedsam") != cache.key(image, "litemedsam-side168")


def test_a_run_at_a_smaller_image_side_trains_ships_and_serves_it(tiny_training_config, fast_refiner_encoder):
    cfg = tiny_training_config(phases=["coarse", "augment", "refiner"], refiner={"image_side": 128})
    summary = run_training(cfg)
    run = cfg.output_dir
    assert json.loads((run / "augment" / "summary.json").read_text())["image_side"] == 128
    masks = sorted((run / "augment" / "masks").glob("*.npz"))
    assert masks and all(int(np.load(path)["image_side"]) == 128 for path in masks)
    soft = np.stack([np.load(path)["soft"] for path in masks])
    assert soft[..., 150:, :].max() < 128 and soft[..., :, 150:].max() < 128  # nothing past the image

    bundle = load_bundle(summary["bundle_path"])
    assert bundle["config"]["refiner"]["image_side"] == 128
    predictor = Predictor.from_bundle(summary["bundle_path"])
    assert predictor.refiner.image_side == 128
    image = np.random.default_rng(2).integers(0, 255, (90, 120), dtype=np.uint8)
    prediction = predictor.predict(image, box=[10, 10, 80, 60])
    assert prediction.refined_probs.shape == (90, 120)

    # Phase 2a's masks were made for 128: a refiner phase at the whole side refuses them.
    whole = tiny_training_config(phases=["refiner"], output_dir=run.parent / "whole")
    shutil.copytree(run / "augment", whole.output_dir / "augment")
    with pytest.raises(ValueError, match="made for refiner.image_side 128"):
        run_training(whole)


def test_fine_tuning_keeps_an_explicit_image_side_and_else_takes_the_bundles(tmp_path, tiny_training_config):
    start = tmp_path / "start.pt"
    save_bundle(start, build_untrained_bundle(tiny_training_config(), seed=3))
    assert adopt_init_architecture(tiny_training_config(init_from=start)).refiner.image_side is None
    smaller = tiny_training_config(init_from=start, refiner={"image_side": 168})
    assert adopt_init_architecture(smaller).refiner.image_side == 168

    at_168 = tmp_path / "at168.pt"
    save_bundle(at_168, build_untrained_bundle(tiny_training_config(refiner={"image_side": 168}), seed=3))
    assert adopt_init_architecture(tiny_training_config(init_from=at_168)).refiner.image_side == 168
    # An explicit whole side (stored as None) is still the user's choice, not the bundle's 168.
    whole = tiny_training_config(init_from=at_168, refiner={"image_side": 256})
    assert adopt_init_architecture(whole).refiner.image_side is None
