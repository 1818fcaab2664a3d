"""The processes docker compose starts, started as local processes against real Redis + PostgreSQL.

migrate (`ultrarefiner db-upgrade`) → api (`ultrarefiner serve`) → worker (`python -m worker`)
→ ui (`python -m frontend.app`), each with the environment compose gives it (minus the container
paths). Then the user's path over HTTP: launch a tiny run, see it finish, activate its model,
call `/segment` and get masks from the activated model.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from training.config import SHARED_DATA_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUSI = SHARED_DATA_ROOT / "BUSI"
TOKEN = "compose-path-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = BUSI / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _compose_command(service: str) -> list[str]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return compose["services"][service]["command"]


class Processes:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process for {url} exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture
def stack(tmp_path, postgres_url, redis_db_url):
    """Migrate, api, worker and ui as compose would run them, on free local ports."""
    api_port, ui_port = _free_port(), _free_port()
    queue_suffix = uuid.uuid4().hex[:6]
    env = {
        **os.environ,
        "DATABASE_URL": postgres_url,
        "REDIS_URL": redis_db_url,
        "ADMIN_TOKEN": TOKEN,
        "MODELS_DIR": str(tmp_path / "models"),
        "RUNS_DIR": str(tmp_path / "runs"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_QUEUE": f"gpu-{queue_suffix}",
        "OMP_NUM_THREADS": "1",
    }
    processes = Processes(tmp_path)
    try:
        migrate = processes.start("migrate", [sys.executable, "-m", "backend.cli", "db-upgrade"], env)
        assert migrate.wait(timeout=120) == 0, processes.log("migrate")

        serve = _compose_command("api")
        assert serve[:2] == ["ultrarefiner", "serve"]
        api_argv = [sys.executable, "-m", "backend.cli", *serve[1:]]
        api_argv[api_argv.index("--port") + 1] = str(api_port)
        api_argv[api_argv.index("--host") + 1] = "127.0.0.1"
        api = processes.start("api", api_argv, env)

        worker_command = _compose_command("worker")
        assert worker_command[:4] == ["celery", "-A", "worker.celery_app", "worker"]
        worker_argv = [sys.executable, "-m", "celery", *worker_command[1:]]
        worker_argv[worker_argv.index("-Q") + 1] = env["WORKER_QUEUE"]
        worker_argv += ["--pool", "solo", "-n", f"compose-{queue_suffix}@%h"]
        processes.start("worker", worker_argv, env)

        ui_command = _compose_command("ui")
        ui_argv = [sys.executable, *ui_command[1:]]
        ui_argv[ui_argv.index("--port") + 1] = str(ui_port)
        ui_argv[ui_argv.index("--host") + 1] = "127.0.0.1"
        ui = processes.start("ui", ui_argv, {**env, "API_URL": f"http://127.0.0.1:{api_port}"})

        _wait_http(f"http://127.0.0.1:{api_port}/ready", api, timeout=240)
        _wait_http(f"http://127.0.0.1:{ui_port}/", ui, timeout=240)
        yield f"http://127.0.0.1:{api_port}", processes
    finally:
        processes.stop_all()


def _mask(b64_png: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64_png)))) > 0


def test_launch_finish_activate_segment(stack):
    api_url, processes = stack
    client = httpx.Client(base_url=api_url, timeout=120)
    before = client.post("/segment", files={"file": (IMAGE.name, IMAGE.read_bytes(), "image/png")})
    assert before.status_code == 200, before.text

    body = {
        "config_name": "compact",
        "phases": ["coarse"],
        "dataset": "busi",
        "root": str(BUSI),
        "folds": 2,
        "epochs": 1,
        "data": {"limit": 12},
        "coarse": {"batch_size": 4},
        "transunet": {"img_size": 64, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 32},
    }
    launched = client.post("/api/runs", json=body, headers=AUTH)
    assert launched.status_code == 201, launched.text
    run_id = launched.json()["id"]

    deadline, progress_seen = time.monotonic() + 600, []
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{run_id}", headers=AUTH).json()
        progress_seen.append(run["progress"] or 0.0)
        if run["status"] in {"succeeded", "failed", "cancelled", "lost"}:
            break
        time.sleep(1)
    assert run["status"] == "succeeded", (run, processes.log("worker"))
    assert progress_seen == sorted(progress_seen) and progress_seen[-1] == pytest.approx(1.0)

    metrics = client.get(f"/api/runs/{run_id}/metrics", headers=AUTH).json()
    assert {f["fold"] for f in metrics["folds"]} == {0, 1}
    assert any(e["split"] == "test" and e["n_images"] > 0 for e in metrics["evaluations"])

    models = client.get("/api/models", headers=AUTH).json()["items"]
    produced = [m for m in models if m["run_id"] == run_id]
    assert len(produced) == 1
    activated = client.post(f"/api/models/{produced[0]['id']}/activate", headers=AUTH)
    assert activated.status_code == 200, activated.text
    assert client.get("/api/models", headers=AUTH).json()["active_id"] == produced[0]["id"]

    after = client.post("/segment", files={"file": (IMAGE.name, IMAGE.read_bytes(), "image/png")})
    assert after.status_code == 200, after.text
    result = after.json()
    assert result["model_version"] != before.json()["model_version"]
    assert not result["model_version"].endswith("-untrained")
    with Image.open(IMAGE) as image:
        assert (result["width"], result["height"]) == image.size
    assert _mask(result["refined"]["mask_png"]).shape == (result["height"], result["width"])
