"""The factorised mask decoder the graph engines export is SAM's ``predict_masks``, computed with
less work: same masks and IoU predictions for any number of prompt tokens and any dense prompt."""

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from test_refiner import tiny_refiner

from backend.app.engines.factorised_decoder import FactorisedMaskDecoder, max_factorised_prompt_tokens
from backend.app.engines.onnx_export import _MaskDecoderGraph
from training.config import RefinerConfig


def litemedsam_sized_decoder() -> MaskDecoder:
    """A random decoder of LiteMedSAM's (and SAM ViT-B's) shape: 256 wide, 8 heads, depth 2."""
    torch.manual_seed(3)
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    ).eval()


def inputs(dim: int, side: int, tokens: int) -> tuple[torch.Tensor, ...]:
    grid = (1, dim, side, side)
    return torch.randn(grid), torch.randn(grid), torch.randn(1, tokens, dim), torch.randn(grid)


@pytest.mark.parametrize("tokens", [0, 1, 2, 5, 11, 12, 30])
def test_same_masks_as_sam_for_any_token_count(tokens):
    decoder = litemedsam_sized_decoder()
    example = inputs(256, 16, tokens)
    with torch.no_grad():
        want_masks, want_iou = _MaskDecoderGraph(decoder)(*example)
        got_masks, got_iou = FactorisedMaskDecoder(decoder)(*example)
    assert got_masks.shape == want_masks.shape == (1, 4, 64, 64)
    assert got_iou.shape == want_iou.shape == (1, 4)
    scale = float(want_masks.abs().max())
    assert scale > 0.1  # a real signal, not all zeros
    assert float((got_masks - want_masks).abs().max()) <= 1e-5 * scale
    assert torch.allclose(got_iou, want_iou, atol=1e-5)


def test_same_masks_as_sam_for_the_toy_decoder_and_several_prompt_sets():
    decoder = tiny_refiner(RefinerConfig(pretrained=False)).mask_decoder.eval()
    torch.manual_seed(4)
    grid = (1, 32, 16, 16)
    example = (torch.randn(grid), torch.randn(grid), torch.randn(2, 3, 32), torch.randn(2, 32, 16, 16))
    with torch.no_grad():
        # One image, two prompt sets: SAM repeats the image per set, the factorised form broadcasts.
        want = _MaskDecoderGraph(decoder)(*example)
        got = FactorisedMaskDecoder(decoder)(*example)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-6)


def test_factorised_only_while_it_does_less_attention_work():
    # SAM: 8 heads, internal width 128 → 16 tokens a head; 5 are the IoU and mask tokens.
    assert max_factorised_prompt_tokens(litemedsam_sized_decoder()) == 11
    # The toy decoder: 2 heads, internal width 16 → 8 tokens; 5 output tokens.
    assert max_factorised_prompt_tokens(tiny_refiner(RefinerConfig(pretrained=False)).mask_decoder) == 3


def test_refuses_an_upscaling_it_cannot_rewrite():
    decoder = litemedsam_sized_decoder()
    decoder.output_upscaling[0] = torch.nn.ConvTranspose2d(256, 64, kernel_size=3, stride=2)
    with torch.no_grad(), pytest.raises(ValueError, match="2×2 stride-2"):
        FactorisedMaskDecoder(decoder)(*inputs(256, 8, 2))


@pytest.mark.parametrize("engine", ["onnx", "openvino", "openvino-bf16"])
def test_both_decoder_graphs_of_litemedsam_size_load_and_agree_in_every_runtime(tmp_path, engine):
    """At LiteMedSAM's real sizes (64×64 embedding): OpenVINO 2026.4 in bf16 refused the first
    export of the factorised graph on a Zen 4 CPU ("data.size() == OC"), which the toy-sized
    engine tests did not show; the server then fell back to torch."""
    pytest.importorskip("onnx")
    from backend.app.engines import ENGINES, cpu_has_native_bf16
    from backend.app.engines.onnx_export import DECODER_INPUTS, onnx_decoder_path

    if engine.startswith("openvino"):
        pytest.importorskip("openvino")
    if engine == "openvino-bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    decoder = litemedsam_sized_decoder()
    example = inputs(256, 64, 2)
    with torch.no_grad():
        want_masks, want_iou = _MaskDecoderGraph(decoder)(*example)
    feed = {name: tensor.numpy() for name, tensor in zip(DECODER_INPUTS, example, strict=True)}
    scale = float(want_masks.abs().max())
    # bf16 keeps 8 significant bits: a relative error of a few 1e-2 on random weights.
    tolerance = 5e-2 if engine == "openvino-bf16" else 1e-5
    for factorised in (False, True):
        path = onnx_decoder_path(decoder, 256, 64, tmp_path, factorised=factorised)
        session = ENGINES[engine]().session(path, 2)
        masks, iou = session.run(None, feed)
        assert masks.shape == tuple(want_masks.shape) == (1, 4, 256, 256)
        assert float(abs(torch.from_numpy(masks) - want_masks).max()) <= tolerance * scale
        iou_scale = max(1.0, float(want_iou.abs().max()))
        assert float(abs(torch.from_numpy(iou) - want_iou).max()) <= tolerance * iou_scale
