"""The serving engines (``backend.app.engines``): the exported coarse TransUNet, image
encoder and mask decoder give the torch outputs, for every prompt combination, and are exported
once per set of weights."""

import copy
from types import SimpleNamespace

import pytest
import torch
from test_refiner import SIDE, TINY_TRANSUNET, tiny_refiner

from backend.app.engines import AccelerationError, accelerate_predictor, cpu_has_native_bf16
from backend.app.engines.graph import OnnxCoarse, OnnxImageEncoder, OnnxMaskDecoder
from backend.app.engines.onnx_export import INT8_RECIPE, quantize_matmul_int8
from backend.app.engines.openvino_engine import OpenVinoSession
from training.config import RefinerConfig
from training.modeling.prompts import Prompts
from training.modeling.transunet import build_transunet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def lesion_probs(batch: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32), indexing="ij"
    )
    centres = [(24.0, 30.0), (40.0, 20.0)][:batch]
    probs = [torch.sigmoid(8.0 - ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()) for cx, cy in centres]
    return torch.stack(probs)[:, None]  # B×1×L×L


def tiny_coarse():
    torch.manual_seed(1)
    return build_transunet(TINY_TRANSUNET).eval()


def accelerated_predictor(refiner, engine: str, cache_dir, coarse=None):
    """What ``accelerate_predictor`` uses of a ``Predictor``, around copies of the networks."""
    predictor = SimpleNamespace(
        refiner=copy.deepcopy(refiner),
        coarse=copy.deepcopy(coarse if coarse is not None else tiny_coarse()),
        coarse_size=TINY_TRANSUNET.img_size,
        coarse_channels=TINY_TRANSUNET.in_channels,
        device="cpu",
    )
    return accelerate_predictor(predictor, engine, cache_dir)


def accelerated(refiner, engine: str, cache_dir):
    return accelerated_predictor(refiner, engine, cache_dir).refiner


def test_onnx_coarse_matches_torch(tmp_path):
    coarse = tiny_coarse()
    predictor = accelerated_predictor(tiny_refiner(RefinerConfig(pretrained=False)), "onnx", tmp_path, coarse)
    assert isinstance(predictor.coarse, OnnxCoarse)
    images = torch.rand(3, 1, TINY_TRANSUNET.img_size, TINY_TRANSUNET.img_size)
    with torch.inference_mode():
        assert torch.allclose(predictor.coarse(images), coarse(images), atol=1e-4)


@pytest.mark.parametrize(
    "prompt_flags",
    [
        {},  # point + negative point + box + dense mask prompt
        {"use_point": False, "use_negative_point": False, "use_box": False},  # mask prompt only: 0 tokens
        {"use_mask_prompt": False},
    ],
    ids=["all-prompts", "mask-only", "sparse-only"],
)
def test_onnx_refiner_matches_torch(tmp_path, prompt_flags):
    refiner = tiny_refiner(RefinerConfig(backbone="litemedsam", pretrained=False, **prompt_flags)).eval()
    fast = accelerated(refiner, "onnx", tmp_path)
    assert isinstance(fast.image_encoder, OnnxImageEncoder) and isinstance(fast.mask_decoder, OnnxMaskDecoder)

    images = torch.rand(2, 3, SIDE, SIDE)
    coarse = lesion_probs(2)
    with torch.inference_mode():
        embeddings = refiner.encode(images)
        assert torch.allclose(fast.encode(images), embeddings, atol=1e-4)
        for multimask in (True, False):
            want = refiner(embeddings, coarse, multimask_output=multimask)
            got = fast(embeddings, coarse, multimask_output=multimask)
            assert got.masks_logits.shape == want.masks_logits.shape == (2, 3 if multimask else 1, SIDE, SIDE)
            assert torch.allclose(got.refined_logits, want.refined_logits, atol=1e-3)
            assert torch.allclose(got.iou_pred, want.iou_pred, atol=1e-4)


def test_clinician_points_of_any_count(tmp_path):
    """The decoder graphs take any number of prompt tokens (dynamic axis): few run on the
    factorised graph, more on the direct one, and both give the torch masks."""
    refiner = tiny_refiner(RefinerConfig(backbone="litemedsam", pretrained=False)).eval()
    fast = accelerated(refiner, "onnx", tmp_path)
    decoder = fast.mask_decoder
    # The toy decoder (2 heads, internal width 16, 4 output tokens + IoU token): up to 3 prompt tokens.
    assert decoder.factorised_up_to == 3
    # 1 point + SAM's padding point = 2 tokens; 4 points (no box, no padding) = 4 tokens.
    assert decoder.session_for(2) is decoder.factorised_session
    assert decoder.session_for(4) is decoder.session is not decoder.factorised_session
    embeddings = refiner.encode(torch.rand(1, 3, SIDE, SIDE))
    coarse = lesion_probs(1)
    with torch.inference_mode():
        for count in (1, 4):
            points = torch.rand(1, count, 2) * SIDE
            override = Prompts(points=points, point_labels=torch.ones(1, count, dtype=torch.long))
            want = refiner(embeddings, coarse, prompts_override=override)
            got = fast(embeddings, coarse, prompts_override=override)
            assert torch.allclose(got.refined_logits, want.refined_logits, atol=1e-3)


def test_exported_once_per_weights_and_only_the_encoder_is_int8(tmp_path):
    refiner = tiny_refiner(RefinerConfig(backbone="litemedsam", pretrained=False)).eval()
    accelerated(refiner, "onnx-int8", tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.onnx"))
    # coarse and both decoder forms in fp32; the encoder in fp32 and its int8 copy
    assert [f.split("-")[0] for f in files] == ["coarse", "decoder", "decoder", "encoder", "encoder"]
    assert files[2].startswith("decoder-factorised-")
    assert [f for f in files if f.endswith(f".int8-{INT8_RECIPE}.onnx")] == [files[3]]  # "i" before "o"
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")}

    accelerated(refiner, "onnx-int8", tmp_path)  # same weights: cached files reused as they are
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.onnx")} == stamps

    # A cache written by an earlier int8 recipe: its file is replaced, not kept beside the new one.
    (current,) = tmp_path.glob(f"encoder-*.int8-{INT8_RECIPE}.onnx")
    legacy = current.with_name(current.name.replace(f".int8-{INT8_RECIPE}.onnx", ".int8.onnx"))
    current.rename(legacy)
    accelerated(refiner, "onnx-int8", tmp_path)
    assert current.is_file() and not legacy.exists()
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == files

    tuned = copy.deepcopy(refiner)  # a fine-tuned decoder (same frozen encoder) gets its own file
    with torch.no_grad():
        tuned.mask_decoder.iou_token.weight.add_(1.0)
    accelerated(tuned, "onnx", tmp_path)
    names = {p.name for p in tmp_path.glob("*.onnx")}
    assert len(names) == 7 and len([n for n in names if n.startswith("decoder")]) == 4


# ---------------------------------------------------------------------------------------- OpenVINO
needs_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")


def test_int8_weights_are_per_channel_and_seven_bit(tmp_path):
    """The recipe that cannot saturate ``vpmaddubsw`` on AVX2-only CPUs: every quantised weight
    has its own zero point (and scale) per output channel, and its values span 7 bits (|w| <= 64,
    so two u8 x s8 products sum to at most 2 * 255 * 64 < 2**15); the int8 graph stays close."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).eval()
    tokens = torch.randn(1, 50, 32)  # tokens × channels, as in the encoder's blocks: MatMul nodes
    source = tmp_path / "mlp.onnx"
    torch.onnx.export(network, (tokens,), str(source), input_names=["x"], dynamo=False)
    quantised = quantize_matmul_int8(source, tmp_path / f"mlp.int8-{INT8_RECIPE}.onnx")

    graph = onnx.load(str(quantised)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    products = [node for node in graph.node if node.op_type == "MatMulInteger"]
    assert len(products) == 2
    for node in products:
        weights, weight_zero_points = initializers[node.input[1]], initializers[node.input[3]]
        assert weights.dtype.name == "int8" and int(abs(weights.astype("int32")).max()) <= 64
        assert weights.shape[1] > 1 and weight_zero_points.shape == (weights.shape[1],)
    session = ort.InferenceSession(str(quantised), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": tokens.numpy()})[0]
    want = network(tokens).detach().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_openvino_fp32_matches_torch(tmp_path):
    """OpenVINO runs the same exported graphs as ONNX Runtime; in fp32 it gives the torch outputs."""
    pytest.importorskip("openvino")
    coarse = tiny_coarse()
    refiner = tiny_refiner(RefinerConfig(backbone="litemedsam", pretrained=False)).eval()
    predictor = accelerated_predictor(refiner, "openvino", tmp_path, coarse)
    fast = predictor.refiner
    assert fast.image_encoder.session.precision == "f32"
    assert isinstance(fast.mask_decoder.session, OpenVinoSession)
    assert isinstance(fast.mask_decoder.factorised_session, OpenVinoSession)

    images = torch.rand(2, 3, SIDE, SIDE)
    coarse_images = torch.rand(2, 1, TINY_TRANSUNET.img_size, TINY_TRANSUNET.img_size)
    with torch.inference_mode():
        assert torch.allclose(predictor.coarse(coarse_images), coarse(coarse_images), atol=1e-4)
        embeddings = refiner.encode(images)
        assert torch.allclose(fast.encode(images), embeddings, atol=1e-4)
        want = refiner(embeddings, lesion_probs(2))
        got = fast(embeddings, lesion_probs(2))
        assert torch.allclose(got.refined_logits, want.refined_logits, atol=1e-3)
        for count in (1, 4):  # any number of prompt tokens (dynamic axis), on both decoder forms
            override = Prompts(points=torch.rand(1, count, 2) * SIDE, point_labels=torch.ones(1, count))
            want = refiner(embeddings[:1], lesion_probs(1), prompts_override=override)
            got = fast(embeddings[:1], lesion_probs(1), prompts_override=override)
            assert torch.allclose(got.refined_logits, want.refined_logits, atol=1e-3)
    # the fp32 ONNX files are shared with the ONNX Runtime engines: no int8 copy is made
    assert not list(tmp_path.glob("*.int8*.onnx")) and len(list(tmp_path.glob("*.onnx"))) == 4


@needs_bf16
def test_openvino_bf16_is_close_to_torch_and_thread_safe(tmp_path):
    pytest.importorskip("openvino")
    refiner = tiny_refiner(RefinerConfig(backbone="litemedsam", pretrained=False)).eval()
    fast = accelerated(refiner, "openvino-bf16", tmp_path)
    assert fast.image_encoder.session.precision == "bf16"
    images = torch.rand(4, 3, SIDE, SIDE)
    with torch.inference_mode():
        want = refiner.encode(images)
        got = fast.encode(images)
    relative = float((got - want).norm() / want.norm())
    assert 0 < relative < 0.05  # bf16: not bit-exact, but close (8-bit mantissa)

    # one infer request per thread: concurrent calls give each caller its own result
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda index: fast.encode(images[index : index + 1]), range(4)))
    for index, output in enumerate(outputs):
        assert torch.allclose(output, got[index : index + 1], atol=1e-5)


def test_auto_resolves_by_cpu(monkeypatch):
    from backend.app.engines import registry

    monkeypatch.setattr(registry, "cpu_has_native_bf16", lambda: True)
    assert registry.resolve_engine("auto") == "openvino-bf16"
    monkeypatch.setattr(registry, "cpu_has_native_bf16", lambda: False)
    assert registry.resolve_engine("auto") == "onnx-int8"
    assert registry.resolve_engine("onnx") == "onnx"  # an explicit engine is kept
    # on a GPU, auto is the engine that runs there (no "unavailable, serving with torch" warning)
    monkeypatch.setattr(registry, "cpu_has_native_bf16", lambda: True)
    assert registry.resolve_engine("auto", device="cuda:0") == "torch"
    assert registry.resolve_engine("auto", device="cpu") == "openvino-bf16"
    assert registry.resolve_engine("onnx-int8", device="cuda") == "onnx-int8"  # then refused by name
    with pytest.raises(registry.AccelerationError, match="CPU only"):
        registry.get_engine("onnx-int8", device="cuda").check_device("cuda")
    with pytest.raises(ValueError, match="known: torch, onnx"):
        registry.resolve_engine("tensorrt")


def test_one_engine_per_name_and_settings_accept_exactly_those():
    from typing import get_args

    from backend.app.core.settings import Settings
    from backend.app.engines import ENGINE_CHOICES, ENGINE_NAMES, ENGINES, Engine

    assert tuple(ENGINES) == ENGINE_NAMES
    assert all(issubclass(cls, Engine) and cls.name == name for name, cls in ENGINES.items())
    assert len({cls for cls in ENGINES.values()}) == len(ENGINES)
    annotation = Settings.model_fields["inference_engine"].annotation
    assert get_args(annotation) == ENGINE_CHOICES
    with pytest.raises(ValueError):
        Settings(inference_engine="tensorrt")


def test_openvino_bf16_refused_without_native_bf16(tmp_path, monkeypatch):
    """Where the CPU lacks bf16, OpenVINO would quietly compute in fp32: the engine says so instead."""
    openvino = pytest.importorskip("openvino")

    real_get_property = openvino.Core.get_property

    def no_bf16(self, device, name, *args):
        value = real_get_property(self, device, name, *args)
        return [cap for cap in value if cap != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else value

    monkeypatch.setattr(openvino.Core, "get_property", no_bf16)
    refiner = tiny_refiner(RefinerConfig(backbone="litemedsam", pretrained=False)).eval()
    with pytest.raises(AccelerationError, match="no native bf16"):
        accelerated(refiner, "openvino-bf16", tmp_path)


def test_a_runtime_that_cannot_load_the_factorised_decoder_keeps_the_engine(tmp_path, monkeypatch, caplog):
    """The factorised graph is an optimisation of the direct one: a runtime refusing it (as
    OpenVINO once did on a Zen 4 CPU) costs that speed-up only, not the engine (no torch fallback)."""
    from backend.app.engines.onnxruntime_engine import OnnxEngine

    refiner = tiny_refiner(RefinerConfig(backbone="litemedsam", pretrained=False)).eval()
    real_session = OnnxEngine.session

    def refuse_factorised(self, path, num_threads):
        if "factorised" in path.name:
            raise AccelerationError(f"ONNX Runtime could not load {path.name} (RuntimeError)")
        return real_session(self, path, num_threads)

    monkeypatch.setattr(OnnxEngine, "session", refuse_factorised)
    with caplog.at_level("WARNING", logger="backend.app.engines.graph"):
        fast = accelerated(refiner, "onnx", tmp_path)
    decoder = fast.mask_decoder
    assert isinstance(decoder, OnnxMaskDecoder)
    assert decoder.factorised_session is None and decoder.factorised_up_to == -1
    assert decoder.session_for(2) is decoder.session
    assert "could not load decoder-factorised" in caplog.text and "direct mask decoder" in caplog.text
    embeddings = refiner.encode(torch.rand(1, 3, SIDE, SIDE))
    with torch.inference_mode():
        want = refiner(embeddings, lesion_probs(1))
        got = fast(embeddings, lesion_probs(1))
    assert torch.allclose(got.refined_logits, want.refined_logits, atol=1e-3)
