"""What the store cannot hold is a 4xx naming the field, on SQLite and on a real PostgreSQL.

PostgreSQL refuses what SQLite lets through: NUL characters in text, NaN and ±Infinity in JSON.
A request carrying them must be refused by the API (4xx, the field named, its value not echoed),
never reach the database as a 500.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app.core.settings import Settings
from backend.app.main import create_app

TOKEN = "store-limits-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(database_url, tmp_path) -> TestClient:
    settings = Settings(
        database_url=database_url,
        admin_token=TOKEN,
        corrections_dir=tmp_path / "corrections",
        runs_dir=tmp_path / "runs",
        embedded_broker_dir=tmp_path / "broker",
        redis_url=None,
        inference_engine="torch",
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pair(seed: int) -> tuple[bytes, bytes]:
    image = np.random.default_rng(seed).integers(0, 255, (48, 64), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    return _png(image), _png(mask)


def _save(client: TestClient, seed: int, **form) -> object:
    image, mask = _pair(seed)
    return client.post(
        "/api/corrections",
        files={"file": ("scan.png", image), "mask": ("mask.png", mask, "image/png")},
        data=form,
        headers=AUTH,
    )


@pytest.mark.parametrize(
    ("form", "status", "field"),
    [
        ({"model_version": "v" * 256}, 422, "model_version"),
        ({"model_version": "model\x00version"}, 422, "model_version"),
        ({"model_version": "model\nversion"}, 422, "model_version"),
        ({"prompts": '{"box": [NaN, 1, 2, 3]}'}, 400, "prompts"),
        ({"prompts": '{"scale": Infinity}'}, 400, "prompts"),
        ({"prompts": '{"scale": -Infinity}'}, 400, "prompts"),
        ({"prompts": '{"scale": 1e400}'}, 400, "prompts"),  # read as infinity
    ],
)
def test_correction_fields_no_store_can_hold_are_refused(client, form, status, field):
    before = client.get("/api/corrections", headers=AUTH).json()["total"]
    response = _save(client, 1, **form)
    assert response.status_code == status, response.text
    assert field in response.json()["detail"]
    assert client.get("/api/corrections", headers=AUTH).json()["total"] == before


def test_the_limits_themselves_are_stored(client):
    prompts = {"note": "a\u0000b", "box": [1, 2, 30, 40]}  # an escaped NUL inside JSON is JSON
    response = _save(client, 2, model_version="v" * 255, prompts=json.dumps(prompts), replace="true")
    assert response.status_code == 201, response.text
    saved = response.json()
    assert saved["model_version"] == "v" * 255 and saved["prompts"] == prompts
    assert client.delete(f"/api/corrections/{saved['id']}", headers=AUTH).status_code == 204


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("coarse", "lr"),
        ("refiner", "gate_init_bias"),
        ("refiner", "box_sigma"),
        ("finetune", "blend_max_fp_rise"),
    ],
)
def test_run_requests_with_non_finite_numbers_are_422_naming_the_field(client, section, field, value):
    # Python's json writes NaN/Infinity as these bare words, as many clients do.
    body = f'{{"phases": ["coarse"], "{section}": {{"{field}": {value}}}}}'
    before = client.get("/api/runs", headers=AUTH).json()["total"]
    response = client.post("/api/runs", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert ["body", section, field] in [error["loc"] for error in errors]
    assert all("input" not in error for error in errors)  # the field named, its value not echoed
    assert client.get("/api/runs", headers=AUTH).json()["total"] == before


def test_validation_errors_never_echo_what_was_sent(client):
    secret = "SECRET-VALUE-4711"
    response = client.post(
        "/api/runs", json={"phases": ["coarse"], "coarse": {"lrr": secret}, "dataset": secret}, headers=AUTH
    )
    assert response.status_code == 422
    assert secret not in response.text
    locs = [error["loc"] for error in response.json()["detail"]]
    assert ["body", "coarse", "lrr"] in locs and ["body", "dataset"] in locs
