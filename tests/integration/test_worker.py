"""A REAL Celery worker process running the REAL training pipeline, driven over the HTTP API.

* Redis + PostgreSQL: launch a tiny run, watch progress rise, kill the worker (SIGKILL) mid-run,
  restart it — the run is reported ``lost`` — resume it: it finishes from its checkpoints with
  every earlier row kept; folds, epoch metrics, the baseline-vs-refined test evaluation and the
  registered model are in the store; activating the model hot-swaps the served model.
* One job at a time: a second run waits ``queued``; cancel stops a running run within a step.
* The embedded broker (no server) with a real worker process and the SQLite store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from backend.app.core.settings import Settings
from backend.app.db import crud
from backend.app.db.models import EpochMetric, Evaluation, FoldResult
from backend.app.db.session import init_db, session_scope
from training.config import SHARED_DATA_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "worker-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUSI = SHARED_DATA_ROOT / "BUSI"
TERMINAL = {"succeeded", "failed", "cancelled"}


def tiny_run(**overrides) -> dict:
    """~30 s on 2 CPU cores: 12 BUSI images, 2 folds, a tiny compact TransUNet."""
    body = {
        "config_name": "compact",
        "phases": ["coarse"],
        "dataset": "busi",
        "root": str(BUSI),
        "folds": 2,
        "epochs": 2,
        "device": "auto",
        "data": {"limit": 12},
        "coarse": {"batch_size": 4},
        "transunet": {"img_size": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 32},
    }
    body.update(overrides)
    return body


class WorkerProcess:
    """``celery -A worker.celery_app worker -Q gpu -c 1 --pool=solo`` as a subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str):
        self.env, self.log_path, self.name = env, log_path, name
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                "gpu",
                "-c",
                "1",
                "--pool=solo",
                "-n",
                self.name,
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the worker exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log()[-20000:]:
                return self
            time.sleep(0.3)
        raise AssertionError(f"the worker did not become ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._offset)
            return handle.read().decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no acks, no state written."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Teardown: the whole process group, at once (a warm shutdown would finish the run)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def embedding_cache(tmp_path_factory) -> Path:
    """One image-embedding cache for the module's runs (keys include backbone and preprocessing)."""
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    """Factory of worker processes; every one is killed at teardown."""
    started: list[WorkerProcess] = []

    def make(settings: Settings, log_path: Path, name: str) -> WorkerProcess:
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url,
            "RUNS_DIR": str(settings.runs_dir),
            "MODELS_DIR": str(settings.models_dir),
            "CACHE_DIR": str(settings.cache_dir),
            "EMBEDDED_BROKER_DIR": str(settings.embedded_broker_dir),
            "ADMIN_TOKEN": TOKEN,
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("REDIS_URL", None)
        if settings.redis_url:
            env["REDIS_URL"] = settings.redis_url
        worker = WorkerProcess(env, log_path, name)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()


def make_settings(tmp_path: Path, database_url: str, redis_url: str | None, cache_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        admin_token=TOKEN,
        runs_dir=tmp_path / "runs",
        models_dir=tmp_path / "models",
        cache_dir=cache_dir,
        embedded_broker_dir=tmp_path / "broker",
    )


def api(settings: Settings) -> TestClient:
    from backend.app.main import create_app

    return TestClient(create_app(settings))  # no lifespan: the served model loads on activation


def wait_for(
    client: TestClient,
    run_id: int,
    until: Callable[[dict], bool],
    timeout: float,
    seen: list[dict] | None = None,
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/api/runs/{run_id}", headers=AUTH).json()
        if seen is not None:
            seen.append(run)
        if until(run):
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never reached the expected state; last: {run}")
        time.sleep(0.25)


def row_ids(settings: Settings, run_id: int) -> dict[str, list[int]]:
    with session_scope(settings) as session:
        return {
            model.__tablename__: list(
                session.scalars(select(model.id).where(model.run_id == run_id).order_by(model.id))
            )
            for model in (EpochMetric, FoldResult, Evaluation)
        }


@pytest.mark.postgres
@pytest.mark.redis
def test_kill_restart_lost_resume_with_redis_and_postgres(
    tmp_path, postgres_url, redis_db_url, workers, embedding_cache
):
    settings = make_settings(tmp_path, postgres_url, redis_db_url, embedding_cache)
    init_db(settings)
    client = api(settings)
    name = f"gpu-{uuid.uuid4().hex[:8]}@%h"
    worker = workers(settings, tmp_path / "worker.log", name).start()

    # Five epochs per fold leave the poll below time to catch the run mid-way on a fast machine.
    response = client.post("/api/runs", json=tiny_run(epochs=5), headers=AUTH)
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]

    # Progress rises while the folds train; kill the worker once an epoch is stored.
    seen: list[dict] = []

    def first_epoch_stored(run: dict) -> bool:
        if run["status"] != "running":
            return run["status"] in TERMINAL
        return bool(client.get(f"/api/runs/{run_id}/metrics", headers=AUTH).json()["epochs"])

    running = wait_for(client, run_id, first_epoch_stored, 240, seen)
    assert running["status"] == "running", worker.log()
    assert running["worker_pid"] == worker.pid and running["device"] == "cpu"
    # Usually fold 0; a fast machine may already be in fold 1 by the time the poll sees the epoch.
    assert running["phase"] == "coarse" and running["fold"] in (0, 1)
    progress = [r["progress"] for r in seen if r["status"] == "running"]
    assert progress == sorted(progress) and 0 < progress[-1] < 1
    assert running["progress_pct"] == pytest.approx(100 * running["progress"], abs=0.1)
    worker.kill()
    before = row_ids(settings, run_id)
    assert before["epoch_metrics"], "an epoch was stored before the kill"

    # The restarted worker reports the run it no longer runs as lost.
    restarted = workers(settings, tmp_path / "worker2.log", name).start()
    lost = client.get(f"/api/runs/{run_id}", headers=AUTH).json()
    assert lost["status"] == "lost", restarted.log()
    assert "resume" in lost["error"] and "Traceback" not in lost["error"]

    resumed = client.post(f"/api/runs/{run_id}/resume", headers=AUTH)
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    done = wait_for(client, run_id, lambda r: r["status"] in TERMINAL, 300)
    assert done["status"] == "succeeded", (done, restarted.log()[-4000:])
    assert (done["progress"], done["attempt"], done["error"]) == (1.0, 2, None)
    assert done["worker_pid"] == restarted.pid
    assert "attempt 2 started" in done["log_tail"] and "resume=True" in done["log_tail"]

    # No rows lost: everything stored before the kill is still there, with the rest added.
    after = row_ids(settings, run_id)
    for table, ids in before.items():
        assert set(ids) <= set(after[table]), table
    metrics = client.get(f"/api/runs/{run_id}/metrics", headers=AUTH).json()
    assert sorted((e["fold"], e["epoch"]) for e in metrics["epochs"]) == [
        (fold, epoch) for fold in (0, 1) for epoch in range(5)
    ]
    assert all(e["losses"] and e["lr"] is not None for e in metrics["epochs"])
    assert sorted(f["fold"] for f in metrics["folds"]) == [0, 1]
    assert all(f["best_epoch"] in range(5) and f["val_dice"] is not None for f in metrics["folds"])
    (test_eval,) = [e for e in metrics["evaluations"] if e["split"] == "test"]
    assert test_eval["dataset"] == "busi" and test_eval["n_images"] >= 1
    assert test_eval["dice_coarse"] is not None and test_eval["dice_refined"] is not None
    assert test_eval["delta"] == pytest.approx(test_eval["dice_refined"] - test_eval["dice_coarse"])

    # The bundle is registered (content-addressed copy in models_dir) and can be served.
    models = client.get("/api/models", headers=AUTH).json()["items"]
    (model,) = [m for m in models if m["run_id"] == run_id]
    assert Path(model["bundle_path"]).parent == settings.models_dir
    assert model["sha256"] == crud.file_sha256(Path(done["bundle_path"]))
    assert model["metrics"]["test"]["dice_refined"] == pytest.approx(test_eval["dice_refined"])
    activated = client.post(f"/api/models/{model['id']}/activate", headers=AUTH)
    assert activated.status_code == 200, activated.text
    served = client.app.state.model_holder.served
    assert served is not None and served.path == Path(model["bundle_path"])
    assert served.model_version == model["metrics"]["model_version"]
    with session_scope(settings) as session:
        assert crud.get_active_model_path(session) == Path(model["bundle_path"])
        assert session.scalar(select(func.count(EpochMetric.id)).where(EpochMetric.run_id == run_id)) == 10


@pytest.mark.postgres
@pytest.mark.redis
def test_second_run_queues_and_cancel_stops_within_a_step(
    tmp_path, postgres_url, redis_db_url, workers, embedding_cache
):
    settings = make_settings(tmp_path, postgres_url, redis_db_url, embedding_cache)
    init_db(settings)
    client = api(settings)
    worker = workers(settings, tmp_path / "worker.log", f"gpu-{uuid.uuid4().hex[:8]}@%h").start()

    first = client.post("/api/runs", json=tiny_run(epochs=20), headers=AUTH).json()["id"]
    second = client.post("/api/runs", json=tiny_run(), headers=AUTH).json()["id"]
    wait_for(client, first, lambda r: r["status"] == "running" and r["progress"] > 0, 240)
    assert client.get(f"/api/runs/{second}", headers=AUTH).json()["status"] == "queued"

    # A queued run is cancelled at once; its message is dropped by the worker later.
    assert client.post(f"/api/runs/{second}/cancel", headers=AUTH).json()["status"] == "cancelled"
    flagged = client.post(f"/api/runs/{first}/cancel", headers=AUTH).json()
    assert flagged["status"] == "running" and flagged["cancel_requested"]
    cancelled = wait_for(client, first, lambda r: r["status"] in TERMINAL, 60)
    assert cancelled["status"] == "cancelled", worker.log()[-4000:]
    assert cancelled["error"] == "cancelled by the user"
    # Stopped within a step of the request: far from the 20 epochs asked for.
    assert cancelled["progress"] < 0.5
    # The worker now takes the cancelled run's message and drops it.
    deadline = time.monotonic() + 60
    while f"run {second} (attempt 1) was not claimable" not in worker.log():
        assert time.monotonic() < deadline, worker.log()[-4000:]
        time.sleep(0.25)
    skipped = client.get(f"/api/runs/{second}", headers=AUTH).json()
    assert skipped["status"] == "cancelled" and skipped["started_at"] is None
    # The cancelled run resumes from its checkpoint.
    assert client.post(f"/api/runs/{first}/resume", headers=AUTH).json()["attempt"] == 2
    client.post(f"/api/runs/{first}/cancel", headers=AUTH)


def test_embedded_broker_with_a_real_worker(tmp_path, workers, embedding_cache):
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'var' / 'store.sqlite'}", None, embedding_cache
    )
    client = api(settings)
    worker = workers(settings, tmp_path / "worker.log", f"gpu-{uuid.uuid4().hex[:8]}@%h").start()
    run_id = client.post("/api/runs", json=tiny_run(epochs=1), headers=AUTH).json()["id"]
    done = wait_for(client, run_id, lambda r: r["status"] in TERMINAL, 300)
    assert done["status"] == "succeeded", worker.log()[-4000:]
    metrics = client.get(f"/api/runs/{run_id}/metrics", headers=AUTH).json()
    assert len(metrics["epochs"]) == 2 and len(metrics["folds"]) == 2
    assert any(e["split"] == "test" for e in metrics["evaluations"])
    assert [m["run_id"] for m in client.get("/api/models", headers=AUTH).json()["items"]] == [run_id]
