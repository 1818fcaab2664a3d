"""`/segment` end to end: real BUSI images, synthetic DICOMs, DICOM SEG, every bad input, the queue.

The app serves the untrained bundle (random TransUNet + the real LiteMedSAM refiner). Tests of the
plumbing (formats, DICOM kinds, errors, batch, logs) also swap the frozen image encoder for the
cheap stand-in of ``tests/conftest.py`` (``fast_refiner_encoder``); the BUSI, cache, overlay and
ONNX tests run the real encoder.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from imaging_fixtures import BUSI_ROOT, PATIENT_NAME, gradient, make_dicom, png_bytes
from PIL import Image

from backend.app.core.settings import Settings
from backend.app.main import create_app


def busi_images(n: int, label: str = "benign") -> list[Path]:
    paths = sorted(p for p in (BUSI_ROOT / label).glob("*.png") if "_mask" not in p.name)
    if len(paths) < n:
        pytest.skip("BUSI is not available")
    return paths[:n]


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    from training.checkpoints import build_untrained_bundle, save_bundle

    path = tmp_path_factory.mktemp("bundle") / "untrained.pt"
    save_bundle(path, build_untrained_bundle())
    return path


def make_settings(tmp_path: Path, bundle_path: Path, **overrides) -> Settings:
    values = dict(
        model_path=bundle_path,
        database_url=f"sqlite:///{tmp_path / 'store.sqlite'}",
        max_upload_mb=2.0,
        max_image_pixels=4_000_000,
        max_concurrency=2,
        max_queue=4,
        embedding_cache_items=8,
        onnx_cache_dir=tmp_path / "onnx",
        inference_engine="torch",  # the default (auto) has its own test below
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def client(bundle_path, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("api"), bundle_path)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post_image(client, data: bytes, filename="image.png", content_type="image/png", params=None, form=None):
    return client.post("/segment", files={"file": (filename, data, content_type)}, params=params, data=form)


def decode_mask(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image) > 0


# ----------------------------------------------------------------------------- liveness, readiness


def test_health_ready_metrics_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["model_version"].endswith("-untrained")
    assert ready["inference_engine"] == "torch" and ready["store"] is True
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["format"] == "binary"
    assert "example" in body["schema"]["properties"]["points"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "ultrarefiner_segment_queue_depth" in metrics.text


# ----------------------------------------------------------------------------- BUSI through /segment


def test_busi_image_coarse_and_refined(client):
    path = busi_images(1)[0]
    response = post_image(client, path.read_bytes(), filename=path.name)
    assert response.status_code == 200, response.text
    body = response.json()
    with Image.open(path) as image:
        assert (body["width"], body["height"]) == image.size
    assert body["model_version"].endswith("-untrained")
    for key in ("coarse", "refined"):
        mask = decode_mask(body[key]["mask_png"])
        assert mask.shape == (body["height"], body["width"])
        assert body[key]["area_px"] == int(mask.sum())
        assert body[key]["area_mm2"] is None  # PNG: spacing unknown
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert body[key]["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        else:
            assert body[key]["bbox"] is None
    assert body["coarse"]["iou_pred"] is None
    assert isinstance(body["refined"]["iou_pred"], float)
    assert set(body["timings_ms"]) >= {
        "decode",
        "preprocess",
        "coarse",
        "encoder",
        "decoder",
        "encode_response",
        "total",
    }
    assert body["prompts"]["source"] == "coarse"
    assert response.headers["X-Model-Version"] == body["model_version"]


def test_repeated_image_uses_embedding_cache_and_new_prompts(client):
    path = busi_images(2)[1]
    data = path.read_bytes()
    first = post_image(client, data).json()
    assert first["embedding_cached"] is False
    second = post_image(client, data, form={"points": json.dumps([[120, 100, 1], [5, 5, 0]])}).json()
    assert second["embedding_cached"] is True
    assert second["prompts"]["source"] == "clinician"
    assert second["prompts"]["point_labels"] == [1, 0]
    assert second["timings_ms"]["encoder"] < first["timings_ms"]["encoder"] / 5
    third = post_image(client, data, params={"box": json.dumps([50, 40, 200, 160])}).json()
    assert third["embedding_cached"] is True
    assert third["prompts"]["box"] == pytest.approx([50, 40, 200, 160], abs=1.0)


def test_no_coarse_lesion_skips_the_encoder_until_prompts_need_it(bundle_path, tmp_path, no_lesion_coarse):
    from training.inference import Predictor

    predictor = Predictor.from_bundle(bundle_path)
    predictor.coarse = no_lesion_coarse
    app = create_app(make_settings(tmp_path, bundle_path))
    with TestClient(app) as api:
        app.state.model_holder.set_predictor(predictor)
        encodes = []
        encode = predictor.refiner.encode
        predictor.refiner.encode = lambda images: encodes.append(1) or encode(images)
        data = busi_images(1, "normal")[0].read_bytes()
        lookups = cache_lookups()
        first = post_image(api, data).json()
        assert encodes == [] and first["refined"]["area_px"] == 0 and first["embedding_cached"] is False
        assert len(app.state.model_holder.cache) == 0  # nothing computed, nothing cached
        assert cache_lookups() - lookups == Counter(unused=1)  # not a miss: the encoder was not needed
        point = {"points": json.dumps([[100, 80, 1]])}
        second = post_image(api, data, form=point).json()  # a clinician prompt: now it is encoded
        assert (
            encodes == [1]
            and second["embedding_cached"] is False
            and second["prompts"]["source"] == "clinician"
        )
        third = post_image(api, data, form=point).json()
        assert encodes == [1] and third["embedding_cached"] is True
        assert third["refined"]["mask_png"] == second["refined"]["mask_png"]
        assert cache_lookups() - lookups == Counter(unused=1, miss=1, hit=1)


def cache_lookups() -> Counter:
    """The server's ``ultrarefiner_embedding_cache_total`` counters (process-wide) by result."""
    from prometheus_client import REGISTRY

    return Counter(
        {
            result: REGISTRY.get_sample_value("ultrarefiner_embedding_cache_total", {"result": result}) or 0.0
            for result in ("hit", "miss", "unused")
        }
    )


def test_overlay_png(client):
    path = busi_images(1)[0]
    response = post_image(client, path.read_bytes(), params={"format": "png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as overlay, Image.open(path) as source:
        assert overlay.size == source.size and overlay.mode == "RGB"


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_other_raster_formats(client, fmt, fast_refiner_encoder):
    response = post_image(client, png_bytes(gradient(60, 80), fmt), filename=f"x.{fmt.lower()}")
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (80, 60)


# ----------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="MONOCHROME1"),
        dict(kind="MONOCHROME2", bits=16, window=(1000, 600)),
        dict(kind="YBR_FULL_422"),
    ],
    ids=["mono1", "mono2-16bit-windowed", "ybr_full_422"],  # every kind is decoded in test_imaging
)
def test_dicom_kinds(client, kwargs, fast_refiner_encoder):
    response = post_image(client, make_dicom(**kwargs), filename="scan.dcm", content_type="application/dicom")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (64, 48)


def test_dicom_multiframe_and_area_mm2(client, fast_refiner_encoder):
    data = make_dicom(frames=3, us_regions_cm=(0.01, 0.02))
    response = post_image(client, data, content_type="application/dicom", params={"frame": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["frame"] == 2 and body["n_frames"] == 3
    assert body["pixel_spacing_mm"] == pytest.approx([0.2, 0.1])
    for key in ("coarse", "refined"):
        assert body[key]["area_mm2"] == pytest.approx(body[key]["area_px"] * 0.02, rel=1e-3)
    out_of_range = post_image(client, data, content_type="application/dicom", params={"frame": 3})
    assert out_of_range.status_code == 422 and "out of range" in out_of_range.json()["detail"]
    form_frame = post_image(client, data, content_type="application/dicom", form={"frame": "7"})
    assert form_frame.status_code == 422


def _parse_seg(content: bytes):
    # highdicom's reader wants SliceThickness in the pixel measures, which DICOM forbids for an
    # image without a frame of reference (2-D ultrasound); dciodvfy checks the SEG instead
    # (tests/unit/test_dicom_files.py).
    dataset = pydicom.dcmread(io.BytesIO(content))
    return dataset, dataset


def test_dicom_seg_output(client, fast_refiner_encoder):
    data = make_dicom(pixel_spacing=(0.1, 0.1))
    source = pydicom.dcmread(io.BytesIO(data))
    response = post_image(client, data, content_type="application/dicom", params={"format": "dicom-seg"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    dataset, seg = _parse_seg(response.content)
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert dataset.SegmentationType == "BINARY"
    referenced = dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert dataset.StudyInstanceUID == source.StudyInstanceUID
    assert [s.SegmentLabel for s in dataset.SegmentSequence] == ["coarse lesion", "refined lesion"]
    assert len(seg.SegmentSequence) == 2

    refined_only = post_image(
        client, data, content_type="application/dicom", params={"format": "dicom-seg", "segments": "refined"}
    )
    dataset, _ = _parse_seg(refined_only.content)
    assert [s.SegmentLabel for s in dataset.SegmentSequence] == ["refined lesion"]


def test_dicom_seg_multiframe_references_frame(client, fast_refiner_encoder):
    data = make_dicom(frames=3)
    source = pydicom.dcmread(io.BytesIO(data))
    response = post_image(
        client, data, content_type="application/dicom", params={"format": "dicom-seg", "frame": 1}
    )
    assert response.status_code == 200, response.text
    dataset, _ = _parse_seg(response.content)
    referenced = dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == source.SOPClassUID
    derivation = dataset.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert int(derivation.SourceImageSequence[0].ReferencedFrameNumber) == 2


def test_a_dicom_dataset_without_preamble_gets_a_seg(client, fast_refiner_encoder):
    # No "DICM", no file meta, no .dcm name, no DICOM content type: the bytes alone say DICOM.
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    source = pydicom.dcmread(io.BytesIO(make_dicom(pixel_spacing=(0.1, 0.1))))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, source)
    raw = buffer.getvalue()
    response = post_image(client, raw, filename="IM000001", content_type="application/octet-stream")
    assert response.status_code == 200, response.text
    response = post_image(
        client,
        raw,
        filename="IM000001",
        content_type="application/octet-stream",
        params={"format": "dicom-seg"},
    )
    assert response.status_code == 200, response.text
    dataset, _ = _parse_seg(response.content)
    referenced = dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_dicom_seg_for_non_dicom_is_415(client):
    response = post_image(client, png_bytes(gradient()), params={"format": "dicom-seg"})
    assert response.status_code == 415 and "DICOM" in response.json()["detail"]


# ----------------------------------------------------------------------------- bad input → 4xx


def _truncated_png() -> bytes:
    data = png_bytes(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")  # 16 Mpx > the 4 Mpx test limit
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data,params,form,status,words",
    [
        (b"", None, None, 422, "empty"),
        (b"hello, this is plain text and not an image" * 3, None, None, 415, "unsupported"),
        ("truncated", None, None, 422, "truncated"),
        ("bomb", None, None, 413, "limit"),
        ("no-pixels", None, None, 422, "no pixel data"),
        ("dicom", {"frame": 1}, None, 422, "out of range"),
        ("png", {"frame": -1}, None, 422, "frame"),
        ("png", None, {"points": "[[1, 2"}, 400, "not valid JSON"),
        ("png", None, {"points": "[[1, 2, 5]]"}, 422, "label"),
        ("png", None, {"points": "[[1e9, 2, 1]]"}, 422, "outside"),
        ("png", None, {"points": '{"x": 1}'}, 422, "list"),
        ("png", None, {"box": "[1, 2, 3]"}, 422, "box"),
        ("png", None, {"box": "[0, 0, 500, 10]"}, 422, "outside"),
        ("png", {"box": "not json"}, None, 400, "box"),
        ("png", {"format": "gif"}, None, 422, "format"),
    ],
)
def test_bad_inputs(client, data, params, form, status, words, fast_refiner_encoder):
    payloads = {
        "truncated": _truncated_png,
        "bomb": _bomb_png,
        "no-pixels": lambda: make_dicom(with_pixels=False),
        "dicom": make_dicom,
        "png": lambda: png_bytes(gradient()),
    }
    if isinstance(data, str):
        data = payloads[data]()
    response = post_image(client, data, params=params, form=form)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words.lower() in detail.lower()


def test_unexpected_decoder_error_is_422_and_logs_only_the_type(client, monkeypatch, caplog):
    from backend.app.serving import service

    def explode(*args, **kwargs):
        raise RuntimeError(f"decoder crashed while reading {PATIENT_NAME}")

    monkeypatch.setattr(service, "decode_image", explode)
    caplog.set_level(logging.DEBUG)
    response = post_image(client, png_bytes(gradient()))
    assert response.status_code == 422
    assert "RuntimeError" in response.json()["detail"] and PATIENT_NAME not in response.json()["detail"]
    assert "RuntimeError" in caplog.text and PATIENT_NAME not in caplog.text


def test_not_multipart_is_415(client):
    response = client.post("/segment", content=png_bytes(gradient()), headers={"content-type": "image/png"})
    assert response.status_code == 415


def test_missing_file_part_is_422(client):
    response = client.post("/segment", files={"image": ("x.png", png_bytes(gradient()), "image/png")})
    assert response.status_code == 422 and "'file'" in response.json()["detail"]


def test_malformed_multipart_is_400(client):
    response = client.post(
        "/segment",
        content=b"--abc\r\nContent-Disposition: form-data\r\n\r\nxx\r\n--abc--\r\n",
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )
    assert response.status_code == 400


def test_oversized_upload_content_length_is_413(client):
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (3 * 1024 * 1024)  # limit is 2 MiB
    response = post_image(client, big)
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_oversized_upload_streamed_is_413(client):
    boundary = "b0undary"

    def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(40):  # 40 × 128 KiB = 5 MiB, without a Content-Length header
            yield b"\x00" * (128 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/segment", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413


def test_uploads_never_touch_disk(client, monkeypatch, fast_refiner_encoder):
    import tempfile

    def refuse(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    big = png_bytes(np.random.default_rng(2).integers(0, 255, (700, 700), dtype=np.uint8))
    assert len(big) > 1024 * 1024 / 4
    assert post_image(client, big).status_code == 200


# ----------------------------------------------------------------------------- batch


def test_batch_per_file_results_and_errors(client, fast_refiner_encoder):
    good = busi_images(1)[0].read_bytes()
    files = [
        ("files", ("a.png", good, "image/png")),
        ("files", ("b.txt", b"not an image at all" * 5, "text/plain")),
        ("files", ("c.dcm", make_dicom(with_pixels=False), "application/dicom")),
        ("files", ("d.dcm", make_dicom("MONOCHROME2"), "application/dicom")),
    ]
    response = client.post("/segment/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["status_code"] for item in body["items"]] == [200, 415, 422, 200]
    assert body["n_ok"] == 2 and body["n_failed"] == 2
    assert body["items"][0]["result"]["embedding_cached"] in (True, False)
    assert "no pixel data" in body["items"][2]["detail"]
    assert client.post("/segment/batch", files={"other": ("x", b"y")}).status_code == 422
    # A body that is not multipart names the part each route reads.
    refused = client.post("/segment/batch", json={"files": []})
    assert refused.status_code == 415 and "part named 'files'" in refused.json()["detail"]
    refused = client.post("/segment", json={"file": []})
    assert refused.status_code == 415 and "part named 'file'" in refused.json()["detail"]
    good_part = {"file": ("a.png", good, "image/png")}
    refused = client.post("/segment", files=good_part, headers={"Content-Encoding": "gzip"})
    assert refused.status_code == 415 and "Content-Encoding" in refused.json()["detail"]


# ----------------------------------------------------------------------------- logs, auth, queue


def test_no_patient_data_in_logs(client, caplog, fast_refiner_encoder):
    caplog.set_level(logging.DEBUG)
    data = make_dicom(pixel_spacing=(0.1, 0.1))
    assert post_image(client, data, content_type="application/dicom").status_code == 200
    assert post_image(client, data, params={"format": "dicom-seg"}).status_code == 200
    assert post_image(client, data[: len(data) - 300]).status_code == 422
    assert post_image(client, make_dicom(with_pixels=False)).status_code == 422
    assert post_image(client, data, filename=f"{PATIENT_NAME}.dcm", params={"frame": 5}).status_code == 422
    text = caplog.text
    assert PATIENT_NAME not in text and "Doe" not in text and "PID-12345" not in text
    assert "rejected a segmentation request: 422 (frame 5 is out of range" in text  # what, not whose


def test_api_key_and_admin_token_answer_401_before_the_body(bundle_path, tmp_path, fast_refiner_encoder):
    settings = make_settings(tmp_path, bundle_path, api_key="k3y", admin_token="adm1n")
    with TestClient(create_app(settings)) as api:
        image = {"file": ("x.png", png_bytes(gradient()), "image/png")}
        assert api.post("/segment", files=image).status_code == 401
        assert api.post("/segment", files=image, headers={"X-API-Key": "wrong"}).status_code == 401
        # 401 even when the body is garbage: authentication comes before the body.
        garbage = api.post("/segment", content=b"\x00garbage", headers={"content-type": "application/json"})
        assert garbage.status_code == 401
        assert api.post("/segment", files=image, headers={"X-API-Key": "k3y"}).status_code == 200
        assert api.get("/health").status_code == 200
        admin_routes = [
            (method.upper(), path)
            for path, operations in api.get("/openapi.json").json()["paths"].items()
            for method, operation in operations.items()
            if any("AdminBearer" in requirement for requirement in operation.get("security", []))
        ]
        posts = [path for method, path in admin_routes if method == "POST" and "{" not in path]
        if not posts:
            pytest.skip("no admin POST route is mounted yet")
        invalid_body = api.post(posts[0], content=b"{not json", headers={"content-type": "application/json"})
        assert invalid_body.status_code == 401
        wrong = api.post(posts[0], json={}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        authorised = api.post(posts[0], content=b"{not json", headers={"Authorization": "Bearer adm1n"})
        assert authorised.status_code != 401


class BlockingPredictor:
    """A stand-in predictor whose ``predict`` blocks until released (to fill the queue)."""

    model_version = "blocking-test"
    untrained = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def predict(self, image, *, embedding=None, points=None, point_labels=None, box=None):
        from training.inference import Prediction

        self.entered.set()
        self.release.wait(30)
        height, width = np.asarray(image).shape[:2]
        probs = np.zeros((height, width), np.float32)
        probs[: height // 2] = 1
        timings = {"preprocess": 0.1, "coarse": 0.1, "encoder": 0.0, "decoder": 0.1, "total": 0.3}
        return Prediction(coarse_probs=probs, refined_probs=probs, iou=0.5, timings_ms=timings)


def test_queue_full_answers_503_with_retry_after(tmp_path, bundle_path):
    settings = make_settings(tmp_path, bundle_path, max_concurrency=1, max_queue=0)
    app = create_app(settings)
    predictor = BlockingPredictor()
    app.state.model_holder.set_predictor(predictor)  # the lifespan then keeps it
    with TestClient(app) as api:
        image = {"file": ("x.png", png_bytes(gradient()), "image/png")}
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(response=api.post("/segment", files=image)))
        worker.start()
        try:
            assert predictor.entered.wait(20)
            busy = api.post("/segment", files=image)
            assert busy.status_code == 503
            assert int(busy.headers["Retry-After"]) >= 1
            assert "busy" in busy.json()["detail"]
            assert api.get("/ready").json()["in_flight"] == 1
        finally:
            predictor.release.set()
            worker.join(30)
        assert first["response"].status_code == 200
        assert first["response"].json()["model_version"] == "blocking-test"
        time.sleep(0.05)
        assert api.post("/segment", files=image).status_code == 200  # the slot is free again


def test_hot_swap_keeps_serving(client, bundle_path, fast_refiner_encoder):
    holder = client.app.state.model_holder
    before = holder.served.generation
    served = holder.load(bundle_path)
    assert served.generation == before + 1 and len(holder.cache) == 0
    assert post_image(client, png_bytes(gradient())).status_code == 200


@pytest.mark.slow
def test_onnx_engine(bundle_path, tmp_path):
    """The ONNX Runtime encoder + mask decoder give (nearly) the masks of torch."""
    pytest.importorskip("onnxruntime")
    path = busi_images(1)[0]
    data = path.read_bytes()
    results = {}
    for engine in ("torch", "onnx"):
        settings = make_settings(tmp_path, bundle_path, inference_engine=engine)
        with TestClient(create_app(settings)) as api:
            ready = api.get("/ready").json()
            results[engine] = post_image(api, data).json()
            results[engine + "-ready"] = ready
    try:
        import onnx  # noqa: F401
    except ImportError:
        assert results["onnx-ready"]["inference_engine"] == "torch"  # clean fallback
        return
    assert results["onnx-ready"]["inference_engine"] == "onnx"
    exported = {p.name.split("-")[0] for p in (tmp_path / "onnx").glob("*.onnx")}
    assert exported == {"coarse", "encoder", "decoder"}  # all three run in ONNX Runtime
    torch_mask = decode_mask(results["torch"]["refined"]["mask_png"])
    onnx_mask = decode_mask(results["onnx"]["refined"]["mask_png"])
    union = (torch_mask | onnx_mask).sum()
    dice = 2 * (torch_mask & onnx_mask).sum() / max(1, torch_mask.sum() + onnx_mask.sum())
    assert union == 0 or dice > 0.98


@pytest.mark.slow
def test_auto_engine_serves_the_engine_it_resolves_to(bundle_path, tmp_path):
    """``INFERENCE_ENGINE=auto``: OpenVINO bf16 on a CPU with native bf16, else ONNX Runtime int8;
    /ready names the engine actually serving, and its masks agree with torch's."""
    from backend.app.engines import cpu_has_native_bf16

    data = busi_images(1)[0].read_bytes()
    masks = {}
    for engine in ("torch", "auto"):
        with TestClient(create_app(make_settings(tmp_path, bundle_path, inference_engine=engine))) as api:
            ready = api.get("/ready").json()
            masks[engine] = decode_mask(post_image(api, data).json()["refined"]["mask_png"])
    assert ready["inference_engine"] == ("openvino-bf16" if cpu_has_native_bf16() else "onnx-int8")
    both = masks["torch"].sum() + masks["auto"].sum()
    assert both == 0 or 2 * (masks["torch"] & masks["auto"]).sum() / both > 0.95


def test_the_default_engine_is_auto_everywhere():
    """A new user gets the fast engine: Settings, `serve`/`start` (which read Settings) and compose."""
    import yaml

    from backend.app.core.settings import Settings as FreshSettings
    from training.config import REPO_ROOT

    assert FreshSettings.model_fields["inference_engine"].default == "auto"
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["api"]["environment"]["INFERENCE_ENGINE"] == "${INFERENCE_ENGINE:-auto}"


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_black_frame_gets_no_lesion(client, mode):
    """A blank frame is answered with empty coarse and refined masks, 200, before any network runs
    (without the rule, the shipped model marks 34 % of a black 120×90 frame as lesion)."""
    black = Image.new(mode, (120, 90))
    buffer = io.BytesIO()
    black.save(buffer, format="PNG")
    response = post_image(client, buffer.getvalue())
    assert response.status_code == 200, response.text
    body = response.json()
    for name in ("coarse", "refined"):
        assert body[name]["area_px"] == 0
        assert not decode_mask(body[name]["mask_png"]).any()


def test_dicom_that_kills_native_decoders_is_a_4xx_and_the_server_goes_on(client):
    # Found by fuzzing (tests/unit/test_dicom_files.py): GDCM aborts the process on the first file,
    # pylibjpeg-rle panics on the second. Both are answered; the server stays up.
    from pydicom.data import get_testdata_file

    def patched(name: str, offset: int, replacement: bytes) -> bytes:
        data = bytearray(Path(get_testdata_file(name)).read_bytes())
        data[offset : offset + len(replacement)] = replacement
        return bytes(data)

    for data, status in (
        (patched("SC_rgb_jpeg.dcm", 972, bytes([0xFE, 0xA1, 0xC0, 0xBD])), 415),
        (patched("rtdose_rle.dcm", 1897, bytes([137, 148, 243, 200])), 422),
    ):
        response = post_image(client, data, filename="scan.dcm", content_type="application/dicom")
        assert response.status_code == status, response.text
        assert "could not be decoded" in response.json()["detail"]
    assert client.get("/health").status_code == 200
