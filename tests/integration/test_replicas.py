"""Several API replicas sharing one store: a model activated through one replica is served by
all of them (each follows the store's active model), with real bundles and real model loading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backend.app.core.settings import Settings
from backend.app.db import crud
from backend.app.db.session import init_db, session_scope
from backend.app.main import create_app

pytestmark = pytest.mark.timeout(300)

TOKEN = "replica-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def register(settings: Settings, path: Path) -> int:
    with session_scope(settings) as session:
        return crud.register_model_version(
            session, bundle_path=path, sha256=crud.file_sha256(path), metrics={"test": {}}
        ).id


def activate_in_store(settings: Settings, version_id: int) -> None:
    with session_scope(settings) as session:
        crud.activate_model_version(session, version_id)
        session.commit()


def served_path(client: TestClient) -> Path | None:
    return client.app.state.model_holder.served.path


def wait_until_served(client: TestClient, path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while served_path(client) != path:
        assert time.monotonic() < deadline, f"still serving {served_path(client)}, expected {path}"
        time.sleep(0.1)


def test_activation_reaches_every_replica(tmp_path, caplog):
    from training.checkpoints import build_untrained_bundle, save_bundle

    models = tmp_path / "models"
    models.mkdir()
    first, second, broken = models / "first.pt", models / "second.pt", models / "broken.pt"
    for index, path in enumerate((first, second)):  # distinct content: the store is content-addressed
        bundle = build_untrained_bundle()
        bundle["metrics"] = {"replica_test_bundle": index}
        save_bundle(path, bundle)
    broken.write_bytes(b"not a bundle")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'store.sqlite'}",
        admin_token=TOKEN,
        models_dir=models,
        runs_dir=tmp_path / "runs",
        cache_dir=tmp_path / "cache",
        embedded_broker_dir=tmp_path / "broker",
        redis_url=None,
        active_model_poll_s=0.2,
        inference_engine="torch",  # the engines have their own tests
    )
    init_db(settings)
    ids = {path.name: register(settings, path) for path in (first, second, broken)}
    assert len(set(ids.values())) == 3
    pinned = settings.model_copy(update={"model_path": second})

    with (
        TestClient(create_app(settings)) as one,
        TestClient(create_app(settings)) as two,
        TestClient(create_app(pinned)) as fixed,
    ):
        assert served_path(one) is None and served_path(two) is None  # the shipped default
        response = one.post(f"/api/models/{ids['first.pt']}/activate", headers=AUTH)
        assert response.status_code == 200, response.text
        assert served_path(one) == first  # the receiving replica at once
        wait_until_served(two, first)  # the other one within a poll
        assert two.app.state.model_holder.served.source == "store"
        assert two.get("/ready").json()["ready"] is True
        time.sleep(0.5)  # a replica pinned to a bundle by MODEL_PATH never follows the store
        assert served_path(fixed) == second and fixed.app.state.model_holder.served.source == "settings"

        # A bundle that cannot be loaded becomes active in the store (e.g. its file was replaced
        # after activation): the replicas keep serving what they have and say why, once.
        activate_in_store(settings, ids["broken.pt"])
        deadline = time.monotonic() + 30
        while "broken.pt could not be loaded" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.1)
        time.sleep(1.0)  # several more polls
        assert served_path(one) == first and served_path(two) == first
        assert caplog.text.count("broken.pt could not be loaded") == 2  # once per replica

        # They go on following: activating through the other replica reaches the first.
        response = two.post(f"/api/models/{ids['second.pt']}/activate", headers=AUTH)
        assert response.status_code == 200, response.text
        wait_until_served(one, second)
