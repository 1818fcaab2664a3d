"""``/api/corrections``: save an image and its mask as ground truth, list, view, replace, delete.

Against the real app (SQLite store in a temp folder, files under a temp corrections folder).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import corrections as store
from backend.app.core.settings import Settings
from backend.app.db.session import session_scope
from backend.app.main import create_app
from tests.imaging_fixtures import BUSI_ROOT, PATIENT_NAME, make_dicom

TOKEN = "corrections-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = BUSI_ROOT / "benign" / "benign (10).png"
MASK = BUSI_ROOT / "benign" / "benign (10)_mask.png"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'store.sqlite'}",
        admin_token=TOKEN,
        corrections_dir=tmp_path / "corrections",
        runs_dir=tmp_path / "runs",
        inference_engine="torch",
    )


@pytest.fixture
def client(settings) -> TestClient:
    return TestClient(create_app(settings))  # no lifespan: no model is needed to save


def _save(client, image: bytes, mask: bytes, **form) -> object:
    files = {"file": ("scan.png", image, "application/octet-stream"), "mask": ("mask.png", mask, "image/png")}
    return client.post(
        "/api/corrections", files=files, data={k: str(v) for k, v in form.items()}, headers=AUTH
    )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _bmp_declaring(width: int, height: int) -> bytes:
    """A tiny 8-bit BMP whose header claims ``width``×``height`` pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="BMP")
    data = bytearray(buffer.getvalue())
    data[18:26] = width.to_bytes(4, "little") + height.to_bytes(4, "little")
    return bytes(data)


def test_save_list_view_replace_and_delete(client, settings):
    prompts = {"points": [[100, 120, 0]], "box": [10, 60, 250, 270]}
    response = _save(
        client, IMAGE.read_bytes(), MASK.read_bytes(), mask_source="corrected",
        model_version="compact-litemedsam-x", prompts=json.dumps(prompts),
    )  # fmt: skip
    assert response.status_code == 201, response.text
    saved = response.json()
    assert saved["mask_source"] == "corrected" and saved["prompts"] == prompts
    assert saved["model_version"] == "compact-litemedsam-x" and saved["deidentified"] is True
    with Image.open(MASK) as original_mask:
        truth = np.asarray(original_mask.convert("L")) > 0
    assert saved["lesion_px"] == int(truth.sum())

    listing = client.get("/api/corrections", headers=AUTH).json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == saved["id"]
    assert listing["folder"] == str(settings.corrections_dir)
    mask_png = client.get(f"/api/corrections/{saved['id']}/mask.png", headers=AUTH)
    assert mask_png.status_code == 200 and mask_png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(mask_png.content))) > 0, truth)
    image_png = client.get(f"/api/corrections/{saved['id']}/image.png", headers=AUTH)
    with Image.open(IMAGE) as original:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image_png.content))), np.asarray(original))

    # The same image again: refused unless replace=true.
    again = _save(client, IMAGE.read_bytes(), MASK.read_bytes())
    assert again.status_code == 409 and "replace=true" in again.json()["detail"]
    empty = _png(np.zeros(truth.shape, np.uint8))
    replaced = _save(client, IMAGE.read_bytes(), empty, replace="true", mask_source="refined")
    assert replaced.status_code == 201 and replaced.json()["id"] == saved["id"]
    assert replaced.json()["lesion_px"] == 0 and replaced.json()["mask_source"] == "refined"
    assert client.get("/api/corrections", headers=AUTH).json()["total"] == 1

    files = list((settings.corrections_dir).rglob("*"))
    assert {p.parent.name for p in files if p.is_file()} == {"images", "masks", "meta"}
    assert client.delete(f"/api/corrections/{saved['id']}", headers=AUTH).status_code == 204
    assert not [p for p in settings.corrections_dir.rglob("*") if p.is_file()]
    assert client.get(f"/api/corrections/{saved['id']}", headers=AUTH).status_code == 404
    assert client.delete(f"/api/corrections/{saved['id']}", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("mask", "status", "words"),
    [
        (lambda: _png(np.zeros((10, 12), np.uint8)), 422, "12×10 pixels but the image is"),
        (lambda: IMAGE.read_bytes(), 422, "not binary"),
        (lambda: b"not an image", 422, "could not be read as an image"),
        # bombs: refused from the header, never decoded (beyond Pillow's own limit: 413)
        (lambda: _bmp_declaring(12_000, 12_000), 422, "12000×12000 pixels but the image is"),
        (lambda: _bmp_declaring(20_000, 20_000), 413, "declares more pixels"),
    ],
)
def test_bad_masks_are_4xx_naming_the_problem_and_store_nothing(client, settings, mask, status, words):
    response = _save(client, IMAGE.read_bytes(), mask())
    assert response.status_code == status and words in response.json()["detail"]
    assert client.get("/api/corrections", headers=AUTH).json()["total"] == 0
    assert not settings.corrections_dir.exists() or not any(settings.corrections_dir.rglob("*.png"))


def test_bad_requests(client):
    assert client.post("/api/corrections", files={"file": ("a.png", IMAGE.read_bytes())}).status_code == 401
    only_image = client.post("/api/corrections", files={"file": ("a.png", IMAGE.read_bytes())}, headers=AUTH)
    assert only_image.status_code == 422 and "'mask'" in only_image.json()["detail"]
    bad_source = _save(client, IMAGE.read_bytes(), MASK.read_bytes(), mask_source="guess")
    assert bad_source.status_code == 422 and "mask_source" in bad_source.json()["detail"]
    bad_prompts = _save(client, IMAGE.read_bytes(), MASK.read_bytes(), prompts="{not json")
    assert bad_prompts.status_code == 400
    not_image = _save(client, b"plain text" * 50, MASK.read_bytes())
    assert not_image.status_code == 415


def test_dicom_is_stored_deidentified_unless_asked(client, settings, tmp_path):
    data = make_dicom(frames=3, pixel_spacing=(0.1, 0.1))
    source = pydicom.dcmread(io.BytesIO(data))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    response = _save(client, data, _png(mask), frame=1)
    assert response.status_code == 201, response.text
    assert response.json()["frame"] == 1 and response.json()["source_kind"] == "dicom"
    for path in settings.corrections_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert PATIENT_NAME.encode() not in content and str(source.SOPInstanceUID).encode() not in content
            assert b"PID-12345" not in content
    meta = json.loads(next(settings.corrections_dir.glob("meta/*.json")).read_text())
    assert len(meta["sop_instance_uid_sha256"]) == 64 and meta["frame"] == 1

    keep = settings.model_copy(update={"corrections_keep_dicom": True, "corrections_dir": tmp_path / "kept"})
    kept = TestClient(create_app(keep))
    response = _save(kept, data, _png(mask), frame=2)
    assert response.status_code == 201 and response.json()["deidentified"] is False
    assert next((tmp_path / "kept").glob("dicom/*.dcm")).read_bytes() == data


@pytest.fixture
def meta_write_fails(monkeypatch):
    """The disk fills up at the last file of a save (the meta file that completes a pair)."""
    real_write = store._write_temp

    def fail_on_meta(path, data):
        if path.parent.name == "meta":
            raise OSError("disk full")
        return real_write(path, data)

    return lambda: monkeypatch.setattr(store, "_write_temp", fail_on_meta)


def test_a_failure_mid_save_leaves_no_half_pair(settings, meta_write_fails):
    from backend.app.db.session import init_db
    from backend.app.imaging import decode_image

    init_db(settings)
    decoded = decode_image(IMAGE.read_bytes())
    mask = store.decode_mask(MASK.read_bytes(), (decoded.height, decoded.width))
    meta_write_fails()
    with pytest.raises(OSError), session_scope(settings) as session:
        store.save_correction(
            session,
            settings.corrections_dir,
            decoded,
            mask,
            mask_source="refined",
            model_version=None,
            prompts={},
        )
    assert not [p for p in settings.corrections_dir.rglob("*") if p.is_file()]
    with session_scope(settings) as session:
        assert store.count_corrections(session) == 0


def test_saved_corrections_are_the_corrections_dataset(client, settings):
    from training.data.datasets import list_samples, load_mask

    names = ["benign (10).png", "benign (11).png", "malignant (5).png"]
    for name in names:
        folder = "malignant" if name.startswith("malignant") else "benign"
        image = BUSI_ROOT / folder / name
        mask = BUSI_ROOT / folder / name.replace(".png", "_mask.png")
        assert _save(client, image.read_bytes(), mask.read_bytes()).status_code == 201
    empty = _png(np.zeros((48, 64), np.uint8))
    cine = make_dicom(frames=2)
    assert _save(client, cine, empty, frame=0).status_code == 201
    assert _save(client, cine, empty, frame=1).status_code == 201  # another frame of the same instance

    samples = list_samples("corrections", settings.corrections_dir)
    assert len(samples) == 5
    assert sorted(s.label for s in samples) == ["lesion"] * 3 + ["normal"] * 2
    groups = [s.group for s in samples if s.group]
    assert len(groups) == 2 and len(set(groups)) == 1  # two frames of one DICOM: one group
    masks = [load_mask(s) for s in samples if s.label == "lesion"]
    assert all(m.dtype == bool and m.any() for m in masks)

    # A half-written pair (no meta file yet) is not a sample.
    next(settings.corrections_dir.glob("meta/*.json")).unlink()
    assert len(list_samples("corrections", settings.corrections_dir)) == 4


def test_a_failed_replacement_keeps_the_saved_pair(client, settings, meta_write_fails):
    assert _save(client, IMAGE.read_bytes(), MASK.read_bytes()).status_code == 201
    before = {p: p.read_bytes() for p in settings.corrections_dir.rglob("*") if p.is_file()}
    meta_write_fails()
    empty = _png(np.zeros((585, 683), np.uint8))
    response = _save(client, IMAGE.read_bytes(), empty, replace="true")
    assert response.status_code == 507 and "nothing was saved" in response.json()["detail"]
    assert client.get("/api/corrections", headers=AUTH).json()["items"][0]["lesion_px"] > 0
    after = {p: p.read_bytes() for p in settings.corrections_dir.rglob("*") if p.is_file()}
    assert after == before  # the old image, mask and meta, nothing half-replaced, no temp files
