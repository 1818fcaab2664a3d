import numpy as np
import pytest
import torch

from training.config import TransUNetConfig
from training.modeling.transunet import (
    TransUNet,
    build_transunet,
    count_parameters,
    estimate_gflops,
    load_vit_npz,
)

TINY = TransUNetConfig(
    img_size=32,
    resnet_units=(1, 1, 1),
    resnet_width=8,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    mlp_dim=64,
    decoder_channels=(32, 16, 8, 8),
)


def test_forward_shapes_tiny_and_compact():
    torch.manual_seed(0)
    model = build_transunet(TINY)
    logits = model(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 2, 32, 32)
    compact = build_transunet(TransUNetConfig.named("compact")).eval()
    with torch.no_grad():
        assert compact(torch.rand(1, 1, 224, 224)).shape == (1, 2, 224, 224)


def test_fewer_skips_and_backward():
    model = TransUNet(TINY.model_copy(update={"n_skip": 1}))
    logits = model(torch.rand(2, 1, 32, 32))
    logits.mean().backward()
    assert model.resnet.root.conv.weight.grad is not None


def test_full_config_size_matches_paper():
    with torch.device("meta"):
        full = TransUNet(TransUNetConfig.named("full"))
    # TransUNet R50-ViT-B/16 has about 105M parameters.
    assert 100e6 < count_parameters(full) < 110e6


def test_compact_is_much_cheaper():
    compact = TransUNetConfig.named("compact")
    assert compact.num_layers >= 4
    with torch.device("meta"):
        n_compact = count_parameters(TransUNet(compact))
    assert n_compact < 10e6
    gflops_tiny = estimate_gflops(TINY)
    assert 0 < gflops_tiny < estimate_gflops(compact) < 10


def _tiny_npz(path, cfg: TransUNetConfig, pos_grid: int) -> dict[str, np.ndarray]:
    """A synthetic R50+ViT npz in the public TensorFlow layout for the tiny config."""
    rng = np.random.default_rng(0)
    w, hidden, heads = cfg.resnet_width, cfg.hidden_size, cfg.num_heads

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    weights = {
        "conv_root/kernel": rand(7, 7, 3, w),
        "gn_root/scale": rand(w),
        "gn_root/bias": rand(w),
        "embedding/kernel": rand(1, 1, 16 * w, hidden),
        "embedding/bias": rand(hidden),
        "cls": rand(1, 1, hidden),
        "Transformer/posembed_input/pos_embedding": rand(1, pos_grid * pos_grid + 1, hidden),
        "Transformer/encoder_norm/scale": rand(hidden),
        "Transformer/encoder_norm/bias": rand(hidden),
        "head/kernel": rand(hidden, 10),
    }
    in_ch = w
    for block, mult in zip((1, 2, 3), (1, 2, 4), strict=True):
        mid, out = w * mult, w * mult * 4
        prefix = f"block{block}/unit1"
        weights[f"{prefix}/conv1/kernel"] = rand(1, 1, in_ch, mid)
        weights[f"{prefix}/conv2/kernel"] = rand(3, 3, mid, mid)
        weights[f"{prefix}/conv3/kernel"] = rand(1, 1, mid, out)
        for gn, ch in (("gn1", mid), ("gn2", mid), ("gn3", out), ("gn_proj", out)):
            weights[f"{prefix}/{gn}/scale"] = rand(ch)
            weights[f"{prefix}/{gn}/bias"] = rand(ch)
        weights[f"{prefix}/conv_proj/kernel"] = rand(1, 1, in_ch, out)
        in_ch = out
    for layer in range(cfg.num_layers):
        root = f"Transformer/encoderblock_{layer}"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            weights[f"{root}/{norm}/scale"] = rand(hidden)
            weights[f"{root}/{norm}/bias"] = rand(hidden)
        attention = f"{root}/MultiHeadDotProductAttention_1"
        for name in ("query", "key", "value"):
            weights[f"{attention}/{name}/kernel"] = rand(hidden, heads, hidden // heads)
            weights[f"{attention}/{name}/bias"] = rand(heads, hidden // heads)
        weights[f"{attention}/out/kernel"] = rand(heads, hidden // heads, hidden)
        weights[f"{attention}/out/bias"] = rand(hidden)
        weights[f"{root}/MlpBlock_3/Dense_0/kernel"] = rand(hidden, cfg.mlp_dim)
        weights[f"{root}/MlpBlock_3/Dense_0/bias"] = rand(cfg.mlp_dim)
        weights[f"{root}/MlpBlock_3/Dense_1/kernel"] = rand(cfg.mlp_dim, hidden)
        weights[f"{root}/MlpBlock_3/Dense_1/bias"] = rand(hidden)
    np.savez(path, **weights)
    return weights


@pytest.mark.parametrize("pos_grid", [2, 3])  # same grid (2×2 at 32 px) and a resized one
def test_load_vit_npz_copies_the_npz_values(tmp_path, pos_grid):
    path = tmp_path / "R50+ViT-B_16.npz"
    weights = _tiny_npz(path, TINY, pos_grid)
    model = build_transunet(TINY)
    decoder_before = model.segmentation_head.weight.detach().clone()
    loaded = load_vit_npz(model, path)
    assert "position_embeddings" in loaded and len(loaded) > 50

    def same(tensor, array):
        return torch.allclose(tensor.detach(), torch.from_numpy(np.ascontiguousarray(array)))

    assert same(model.resnet.root.conv.weight, weights["conv_root/kernel"].transpose(3, 2, 0, 1))
    assert same(model.resnet.root.gn.weight, weights["gn_root/scale"])
    unit = model.resnet.body.block2.unit1
    assert same(unit.conv2.weight, weights["block2/unit1/conv2/kernel"].transpose(3, 2, 0, 1))
    assert same(unit.downsample.weight, weights["block2/unit1/conv_proj/kernel"].transpose(3, 2, 0, 1))
    assert same(unit.gn_proj.bias, weights["block2/unit1/gn_proj/bias"])
    assert same(model.patch_embeddings.weight, weights["embedding/kernel"].transpose(3, 2, 0, 1))
    attention = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
    hidden = TINY.hidden_size
    assert same(model.blocks[1].attn.query.weight, weights[f"{attention}/query/kernel"].reshape(hidden, -1).T)
    assert same(model.blocks[1].attn.query.bias, weights[f"{attention}/query/bias"].reshape(-1))
    assert same(model.blocks[1].attn.out.weight, weights[f"{attention}/out/kernel"].reshape(-1, hidden).T)
    assert same(
        model.blocks[0].ffn.fc1.weight, weights["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].T
    )
    assert same(
        model.blocks[0].attention_norm.weight, weights["Transformer/encoderblock_0/LayerNorm_0/scale"]
    )
    assert same(model.encoder_norm.bias, weights["Transformer/encoder_norm/bias"])
    posemb = weights["Transformer/posembed_input/pos_embedding"][:, 1:]
    if pos_grid == 2:
        assert same(model.position_embeddings, posemb)
    else:
        assert model.position_embeddings.shape == (1, 4, hidden)
        assert not torch.allclose(model.position_embeddings, torch.zeros(1, 4, hidden))
    assert torch.equal(model.segmentation_head.weight, decoder_before)  # decoder untouched
    assert torch.isfinite(model(torch.rand(1, 1, 32, 32))).all()


def test_load_vit_npz_errors(tmp_path):
    model = build_transunet(TINY)
    with pytest.raises(FileNotFoundError):
        load_vit_npz(model, tmp_path / "missing.npz")
    path = tmp_path / "wrong.npz"
    _tiny_npz(path, TINY.model_copy(update={"resnet_width": 16}), 2)
    with pytest.raises(ValueError, match="shape"):
        load_vit_npz(model, path)
