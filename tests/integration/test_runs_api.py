"""The runs and models REST API: auth, validation, state transitions, enqueueing, hot swap."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from backend.app.core.settings import Settings
from backend.app.db import crud
from backend.app.db.models import Run
from backend.app.db.session import init_db, session_scope
from training.config import SHARED_DATA_ROOT, TransUNetConfig

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUSI = SHARED_DATA_ROOT / "BUSI"


def make_app(settings: Settings):
    from backend.app.main import create_app

    return create_app(settings)


@pytest.fixture
def settings(tmp_path) -> Settings:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'var' / 'store.sqlite'}",
        admin_token=TOKEN,
        runs_dir=tmp_path / "runs",
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        embedded_broker_dir=tmp_path / "broker",
        redis_url=None,
    )
    init_db(settings)
    return settings


class FakeHolder:
    def __init__(self, fail: bool = False):
        self.loaded: list[Path] = []
        self.fail = fail

    def load(self, path, **_kwargs):
        if self.fail:
            raise ValueError("not an ultrarefiner bundle")
        self.loaded.append(Path(path))
        return path


@pytest.fixture
def enqueued(monkeypatch) -> list[dict]:
    """Replaces the broker: records what the API enqueues."""
    import worker.celery_app

    calls: list[dict] = []

    def fake_enqueue(settings, run_id, *, attempt=1, resume=False):
        calls.append({"run_id": run_id, "attempt": attempt, "resume": resume})
        return f"task-{len(calls)}"

    monkeypatch.setattr(worker.celery_app, "enqueue_run", fake_enqueue)
    return calls


@pytest.fixture
def client(settings, enqueued) -> TestClient:
    app = make_app(settings)
    app.state.model_holder = FakeHolder()
    return TestClient(app)


def tiny_body(**overrides) -> dict:
    body = {
        "config_name": "compact",
        "phases": ["coarse"],
        "dataset": "busi",
        "root": str(BUSI),
        "folds": 2,
        "epochs": 1,
        "data": {"limit": 12},
        "transunet": {"img_size": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 32},
    }
    body.update(overrides)
    return body


# ----------------------------------------------------------------------------- auth


ROUTES = [
    ("GET", "/api/config/schema"),
    ("GET", "/api/runs"),
    ("POST", "/api/runs"),
    ("GET", "/api/runs/1"),
    ("GET", "/api/runs/1/metrics"),
    ("POST", "/api/runs/1/cancel"),
    ("POST", "/api/runs/1/resume"),
    ("GET", "/api/models"),
    ("POST", "/api/models/1/activate"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_requires_the_admin_token(client, method, path):
    assert client.request(method, path).status_code == 401
    wrong = client.request(method, path, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


HUGE_IDS = [2**31, 2**63, 10**30]  # ids are 32-bit INTEGER columns in PostgreSQL
HUGE_OFFSETS = [2**63, 2**63 - 1 + 10**6, 10**30]


@pytest.mark.parametrize(
    ("method", "template", "value", "bound"),
    [
        *[
            (method, template, value, "2147483647")
            for method, template in [
                ("GET", "/api/runs/{}"),
                ("GET", "/api/runs/{}/metrics"),
                ("POST", "/api/runs/{}/cancel"),
                ("POST", "/api/runs/{}/resume"),
                ("POST", "/api/models/{}/activate"),
                ("GET", "/api/corrections/{}"),
                ("DELETE", "/api/corrections/{}"),
            ]
            for value in HUGE_IDS
        ],
        *[("GET", "/api/runs?offset={}", value, "9223372036854775807") for value in HUGE_OFFSETS],
    ],
)
def test_ids_and_offsets_beyond_the_store_are_422_not_500(client, method, template, value, bound, caplog):
    with caplog.at_level("INFO", logger="backend.app"):
        response = client.request(method, template.format(value), headers=AUTH)
    assert response.status_code == 422, response.text
    assert f"less than or equal to {bound}" in response.text
    rejected = [r for r in caplog.records if r.getMessage().startswith("rejected ")]
    assert len(rejected) == 1 and "422" in rejected[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)  # one line, no traceback


def test_the_largest_storable_id_is_a_plain_404(client):
    largest = 2**31 - 1
    for method, path in [
        ("GET", f"/api/runs/{largest}"),
        ("GET", f"/api/runs/{largest}/metrics"),
        ("POST", f"/api/runs/{largest}/cancel"),
        ("POST", f"/api/runs/{largest}/resume"),
        ("POST", f"/api/models/{largest}/activate"),
        ("GET", f"/api/corrections/{largest}"),
    ]:
        assert client.request(method, path, headers=AUTH).status_code == 404, path
    page = client.get(f"/api/runs?offset={2**63 - 1}", headers=AUTH)
    assert page.status_code == 200 and page.json()["items"] == []


@pytest.mark.parametrize("placeholder", [None, "", "change-me", "change-me-to-a-long-random-string"])
def test_no_admin_token_or_a_placeholder_disables_the_admin_routes(tmp_path, placeholder):
    kwargs = {} if placeholder is None else {"admin_token": placeholder}
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 's.sqlite'}", runs_dir=tmp_path / "runs", **kwargs
    )
    assert settings.admin_token is None
    client = TestClient(make_app(settings))
    for token in ("change-me", "change-me-to-a-long-random-string", ""):
        response = client.get("/api/runs", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 503
        assert "ADMIN_TOKEN" in response.json()["detail"]


def test_openapi_documents_admin_answers_and_the_api_key_only_when_set(client, tmp_path):
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path.startswith("/api/"):
                assert "401" in operation["responses"], path
                assert operation["security"] == [{"AdminBearer": []}]
            if "{" in path:
                assert "404" in operation["responses"], path
            if path.startswith("/segment"):
                assert "security" not in operation and "401" not in operation["responses"]
    assert "ApiKey" not in schema["components"]["securitySchemes"]

    keyed = Settings(
        database_url=f"sqlite:///{tmp_path / 'k.sqlite'}", admin_token=TOKEN, api_key="secret-key"
    )
    keyed_schema = TestClient(make_app(keyed)).get("/openapi.json").json()
    segment = keyed_schema["paths"]["/segment"]["post"]
    assert segment["security"] == [{"ApiKey": []}] and "401" in segment["responses"]


def test_docs_are_served_without_internet(client):
    for page, asset_names in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc",))):
        html = client.get(page).text
        assert "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
        for name in asset_names:
            assert name in html
        for url in __import__("re").findall(r'(?:src|href)="(/[^"]+)"', html):
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_401_comes_before_body_validation(client, enqueued):
    for body in ({"folds": 1, "bogus": True}, "not json"):
        kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
        response = client.post("/api/runs", **kwargs)
        assert response.status_code == 401, response.text
        assert "folds" not in response.text
    assert enqueued == []


# ----------------------------------------------------------------------------- create + validation


def test_create_run_stores_the_merged_config_and_enqueues(client, settings, enqueued):
    response = client.post("/api/runs", json=tiny_body(coarse={"lr": 0.05}), headers=AUTH)
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["status"] == "queued" and run["progress"] == 0 and run["progress_pct"] == 0
    assert run["output_dir"] == str(settings.runs_dir / f"run-{run['id']:06d}")
    assert run["celery_task_id"] == "task-1"
    config = run["config"]
    assert config["output_dir"] == run["output_dir"] and config["cache_dir"] == str(settings.cache_dir)
    assert config["data"] | {"folds": 2, "limit": 12, "dataset": "busi"} == config["data"]
    assert config["coarse"]["epochs"] == 1 and config["coarse"]["lr"] == 0.05
    assert config["refiner_train"]["epochs"] == 1 and config["end_to_end"]["epochs"] == 1
    # transunet overrides apply on top of the named compact architecture
    assert config["transunet"]["hidden_size"] == 32
    compact = TransUNetConfig.named("compact")
    assert (
        config["transunet"]["resnet_width"] == compact.resnet_width
        and config["transunet"]["name"] == "compact"
    )
    assert enqueued == [{"run_id": run["id"], "attempt": 1, "resume": False}]


def test_section_epochs_win_over_the_shortcut(client):
    body = tiny_body(epochs=3, coarse={"epochs": 2})
    config = client.post("/api/runs", json=body, headers=AUTH).json()["config"]
    assert (config["coarse"]["epochs"], config["refiner_train"]["epochs"]) == (2, 3)


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"folds": 1}, ["body", "folds"]),
        ({"epochs": 0}, ["body", "epochs"]),
        ({"phases": ["coarse", "bogus"]}, ["body", "phases", 1]),
        ({"phases": []}, ["body", "phases"]),
        ({"phases": ["coarse", "coarse"]}, ["body", "phases"]),
        ({"dataset": "mnist"}, ["body", "dataset"]),
        ({"learning_rate": 0.1}, ["body", "learning_rate"]),
        ({"coarse": {"lr": -1}}, ["body", "coarse", "lr"]),
        ({"coarse": {"lr": 1e23}}, ["body", "coarse", "lr"]),  # would diverge at its first step
        ({"refiner_train": {"weight_decay": 5.0}}, ["body", "refiner_train", "weight_decay"]),
        ({"coarse": {"lrr": 0.1}}, ["body", "coarse", "lrr"]),
        ({"data": {"seed": -1}}, ["body", "data", "seed"]),  # numpy refuses it in the worker
        ({"data": {"seed": 2**32}}, ["body", "data", "seed"]),
        ({"coarse": {"folds_to_run": [-1]}}, ["body", "coarse", "folds_to_run", 0]),
        ({"transunet": {"in_channels": 0}}, ["body", "transunet", "in_channels"]),
        ({"refiner": {"backbone": "vit_h"}}, ["body", "refiner", "backbone"]),
        ({"augment": {"temperature_min": 9, "temperature_max": 2}}, ["body", "augment"]),
        ({"output_dir": "/etc"}, ["body", "output_dir"]),
        ({"root": "/no/such/dataset"}, ["body", "root"]),
        ({"root": None, "data": {"root": "/no/such/dataset"}}, ["body", "data", "root"]),
        ({"refiner": {"checkpoint": "/no/such/sam.pth"}}, ["body", "refiner", "checkpoint"]),
        # checked on the merged architecture: compact's hidden size is not divisible by 7 heads
        ({"transunet": {"num_heads": 7}}, ["body", "transunet"]),
    ],
)
def test_bad_requests_are_422_with_field_errors(client, enqueued, change, loc):
    body = tiny_body()
    body.pop("transunet")
    body.update(change)
    if body.get("root") is None:
        body.pop("root")
    response = client.post("/api/runs", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    locs = [error["loc"] for error in response.json()["detail"]]
    assert loc in locs, locs
    assert enqueued == []
    assert client.get("/api/runs", headers=AUTH).json()["total"] == 0


def test_dataset_roots_must_lie_under_datasets_root(settings, enqueued, tmp_path):
    settings.datasets_root = tmp_path / "allowed"
    (tmp_path / "allowed" / "busi").mkdir(parents=True)
    client = TestClient(make_app(settings))
    response = client.post("/api/runs", json=tiny_body(), headers=AUTH)
    assert response.status_code == 422
    assert "must lie under" in response.json()["detail"][0]["msg"]
    ok = client.post("/api/runs", json=tiny_body(root=str(tmp_path / "allowed" / "busi")), headers=AUTH)
    assert ok.status_code == 201, ok.text


def test_with_corrections_pools_the_servers_saved_corrections(settings, enqueued, tmp_path):
    settings.corrections_dir = tmp_path / "corrections"
    client = TestClient(make_app(settings))
    none_yet = client.post("/api/runs", json=tiny_body(with_corrections=True), headers=AUTH)
    assert none_yet.status_code == 422
    detail = none_yet.json()["detail"][0]
    assert detail["loc"] == ["body", "with_corrections"] and "no corrections" in detail["msg"]
    (settings.corrections_dir / "meta").mkdir(parents=True)
    response = client.post("/api/runs", json=tiny_body(with_corrections=True), headers=AUTH)
    assert response.status_code == 201, response.text
    data = response.json()["config"]["data"]
    assert data["pool_dataset"] == "corrections"
    assert Path(data["pool_root"]) == settings.corrections_dir and data["dataset"] == "busi"
    both = tiny_body(with_corrections=True, data={"pool_dataset": "busi", "pool_root": str(tmp_path)})
    twice = client.post("/api/runs", json=both, headers=AUTH)
    assert twice.status_code == 422 and "both name the pooled dataset" in twice.text
    missing = tiny_body(data={"pool_dataset": "corrections", "pool_root": str(tmp_path / "nope")})
    answer = client.post("/api/runs", json=missing, headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "data", "pool_root"]
    half = client.post("/api/runs", json=tiny_body(data={"pool_dataset": "corrections"}), headers=AUTH)
    assert half.status_code == 422 and "give both or neither" in half.text


def test_config_schema_is_generated_from_training_config(client):
    schema = client.get("/api/config/schema", headers=AUTH).json()
    properties = schema["properties"]
    assert {"dataset", "root", "config_name", "phases", "folds", "epochs"} <= set(properties)
    assert {"data", "transunet", "refiner", "coarse", "augment", "refiner_train", "end_to_end"} <= set(
        properties
    )
    coarse = schema["$defs"]["CoarseTrainConfig"]["properties"]
    assert coarse["lr"]["default"] == 0.01 and coarse["lr"]["exclusiveMinimum"] == 0
    assert coarse["lr"]["description"]
    assert (
        schema["x-transunet-presets"]["compact"]["hidden_size"]
        == TransUNetConfig.named("compact").hidden_size
    )
    assert "output_dir" not in properties


# ----------------------------------------------------------------------------- read, cancel, resume


def test_list_get_metrics_and_404(client, settings):
    first = client.post("/api/runs", json=tiny_body(), headers=AUTH).json()["id"]
    second = client.post("/api/runs", json=tiny_body(), headers=AUTH).json()["id"]
    listing = client.get("/api/runs", headers=AUTH).json()
    assert [item["id"] for item in listing["items"]] == [second, first] and listing["total"] == 2
    assert client.get("/api/runs?status=running", headers=AUTH).json()["total"] == 0
    assert client.get("/api/runs?status=bogus", headers=AUTH).status_code == 422
    with session_scope(settings) as session:
        crud.record_epoch(session, first, phase="coarse", fold=0, epoch=0, losses={"total": 0.3}, dice=0.5)
        crud.record_epoch(session, first, phase="refiner", fold=None, epoch=0, losses={"total": 0.2})
        crud.record_fold(
            session, first, phase="coarse", fold=0, best_epoch=0, checkpoint="c.pt", val_dice=0.5
        )
        crud.record_evaluation(
            session, first, dataset="busi", split="test", dice_coarse=0.6, dice_refined=0.7
        )
    metrics = client.get(f"/api/runs/{first}/metrics", headers=AUTH).json()
    assert [(e["phase"], e["fold"]) for e in metrics["epochs"]] == [("coarse", 0), ("refiner", None)]
    assert metrics["folds"][0]["best_epoch"] == 0
    assert metrics["evaluations"][0]["delta"] == pytest.approx(0.1)
    run = client.get(f"/api/runs/{first}", headers=AUTH).json()
    assert {"status", "phase", "fold", "epoch", "progress", "progress_pct", "eta_s", "error"} <= set(run)
    for path in ("/api/runs/999", "/api/runs/999/metrics"):
        assert client.get(path, headers=AUTH).status_code == 404
    for path in ("/api/runs/999/cancel", "/api/runs/999/resume"):
        assert client.post(path, headers=AUTH).status_code == 404


def test_cancel_and_resume(client, settings, enqueued):
    run_id = client.post("/api/runs", json=tiny_body(), headers=AUTH).json()["id"]
    assert client.post(f"/api/runs/{run_id}/resume", headers=AUTH).status_code == 409  # queued
    cancelled = client.post(f"/api/runs/{run_id}/cancel", headers=AUTH).json()
    assert cancelled["status"] == "cancelled"
    assert client.post(f"/api/runs/{run_id}/cancel", headers=AUTH).status_code == 409
    resumed = client.post(f"/api/runs/{run_id}/resume", headers=AUTH).json()
    assert (resumed["status"], resumed["attempt"], resumed["error"]) == ("queued", 2, None)
    assert enqueued[-1] == {"run_id": run_id, "attempt": 2, "resume": True}
    # A running run is only flagged; the worker stops it at its next step.
    with session_scope(settings) as session:
        assert crud.claim_run(session, run_id, attempt=2, hostname="gpu@x", pid=1)
    flagged = client.post(f"/api/runs/{run_id}/cancel", headers=AUTH).json()
    assert (flagged["status"], flagged["cancel_requested"]) == ("running", True)


def test_a_silent_worker_is_reported_lost(client, settings):
    run_id = client.post("/api/runs", json=tiny_body(), headers=AUTH).json()["id"]
    with session_scope(settings) as session:
        crud.claim_run(session, run_id, attempt=1, hostname="gpu@x", pid=1)
    assert client.get(f"/api/runs/{run_id}", headers=AUTH).json()["status"] == "running"
    with session_scope(settings) as session:
        session.execute(
            update(Run).where(Run.id == run_id).values(heartbeat_at=datetime.now(UTC) - timedelta(hours=1))
        )
    run = client.get(f"/api/runs/{run_id}", headers=AUTH).json()
    assert run["status"] == "lost" and "resume" in run["error"]
    assert client.post(f"/api/runs/{run_id}/resume", headers=AUTH).json()["status"] == "queued"


def test_unreachable_broker_fails_the_run_with_503(settings, monkeypatch):
    settings.redis_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    client = TestClient(make_app(settings))
    response = client.post("/api/runs", json=tiny_body(), headers=AUTH)
    assert response.status_code == 503
    (run,) = client.get("/api/runs", headers=AUTH).json()["items"]
    assert run["status"] == "failed" and "task queue" in run["error"]


@pytest.mark.redis
def test_enqueue_puts_one_message_on_the_gpu_queue(settings, redis_db_url):
    import redis

    settings.redis_url = redis_db_url
    client = TestClient(make_app(settings))
    run = client.post("/api/runs", json=tiny_body(), headers=AUTH).json()
    messages = redis.Redis.from_url(redis_db_url).lrange("gpu", 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "ultrarefiner.train_run"
    assert message["headers"]["id"] == run["celery_task_id"]


def test_embedded_broker_is_used_without_redis(settings):
    client = TestClient(make_app(settings))
    run = client.post("/api/runs", json=tiny_body(), headers=AUTH).json()
    files = list((settings.embedded_broker_dir / "queue").glob("*"))
    assert len(files) == 1 and run["celery_task_id"]


# ----------------------------------------------------------------------------- models


def _register(settings: Settings, tmp_path: Path, name: str) -> int:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(name.encode())
    with session_scope(settings) as session:
        return crud.register_model_version(
            session, bundle_path=path, sha256=crud.file_sha256(path), metrics={"dice": 0.7}
        ).id


def test_activate_hot_swaps_and_keeps_exactly_one_active(client, settings, tmp_path):
    first, second = _register(settings, tmp_path, "a"), _register(settings, tmp_path, "b")
    models = client.get("/api/models", headers=AUTH).json()
    assert [m["id"] for m in models["items"]] == [second, first] and models["active_id"] is None
    activated = client.post(f"/api/models/{first}/activate", headers=AUTH).json()
    assert activated["active"] and activated["activated_at"]
    client.post(f"/api/models/{second}/activate", headers=AUTH)
    assert client.app.state.model_holder.loaded == [tmp_path / "a.pt", tmp_path / "b.pt"]
    models = client.get("/api/models", headers=AUTH).json()
    assert models["active_id"] == second and sum(m["active"] for m in models["items"]) == 1
    with session_scope(settings) as session:
        assert crud.get_active_model_path(session) == tmp_path / "b.pt"
    assert client.post("/api/models/999/activate", headers=AUTH).status_code == 404


def test_a_bundle_that_fails_to_load_is_not_activated(client, settings, tmp_path):
    good, bad = _register(settings, tmp_path, "good"), _register(settings, tmp_path, "bad")
    client.post(f"/api/models/{good}/activate", headers=AUTH)
    client.app.state.model_holder.fail = True
    response = client.post(f"/api/models/{bad}/activate", headers=AUTH)
    assert response.status_code == 409 and "could not be loaded" in response.json()["detail"]
    assert client.get("/api/models", headers=AUTH).json()["active_id"] == good
    (tmp_path / "good.pt").unlink()
    assert client.post(f"/api/models/{good}/activate", headers=AUTH).status_code == 409
