"""`ultrarefiner start` (the README's run command): API + worker + UI, URLs printed, Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_start_runs_three_services_and_ctrl_c_stops_them(tmp_path):
    api_port, ui_port = _free_port(), _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"ADMIN_TOKEN", "REDIS_URL", "DATABASE_URL"}
    }
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}",
        "EMBEDDED_BROKER_DIR": str(tmp_path / "broker"),
        "RUNS_DIR": str(tmp_path / "runs"),
        "MODELS_DIR": str(tmp_path / "models"),
        "OMP_NUM_THREADS": "1",
    }
    log_path = tmp_path / "start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "start", "--api-port", str(api_port)]
            + ["--ui-port", str(ui_port)],
            env=env,
            cwd=tmp_path,  # no .env here: the command must make its own admin token
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "Press Ctrl-C to stop." not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "start did not report ready"
            time.sleep(1)
        output = log_path.read_text(errors="replace")
        assert f"http://127.0.0.1:{ui_port}/" in output and f"http://127.0.0.1:{api_port}/docs" in output
        token = re.search(r"Admin token \(this session\): (\S+)", output).group(1)
        assert token != "change-me" and len(token) >= 24

        api = f"http://127.0.0.1:{api_port}"
        ready = httpx.get(f"{api}/ready", timeout=10).json()
        assert ready["ready"] is True
        # A new user gets the fast engine (auto), not eager torch.
        assert ready["inference_engine"] in ("openvino-bf16", "onnx-int8")
        assert httpx.get(f"{api}/api/runs", timeout=10).status_code == 401
        signed_in = httpx.get(f"{api}/api/runs", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert signed_in.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=10).status_code == 200

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for port in (api_port, ui_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=3)


def test_serve_without_admin_token_generates_one_and_never_accepts_a_placeholder(tmp_path):
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if key not in {"ADMIN_TOKEN", "DATABASE_URL"}}
    env |= {"DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}", "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--engine", "torch"],
            env=env,
            cwd=tmp_path,  # no .env here
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 200
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "serve did not become ready"
            try:
                if httpx.get(f"{api}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        output = log_path.read_text(errors="replace")
        tokens = re.findall(r"admin token for this server process: (\S+)", output)
        assert len(tokens) == 1 and len(tokens[0]) >= 24, output[-2000:]
        for placeholder in ("change-me", "change-me-to-a-long-random-string"):
            headers = {"Authorization": f"Bearer {placeholder}"}
            assert httpx.get(f"{api}/api/runs", headers=headers, timeout=10).status_code == 401
        headers = {"Authorization": f"Bearer {tokens[0]}"}
        assert httpx.get(f"{api}/api/runs", headers=headers, timeout=10).status_code == 200
        assert httpx.get(f"{api}/api/runs/{2**40}", headers=headers, timeout=10).status_code == 422
        # The project's own log lines reach the console beside uvicorn's: what is served, and
        # one line per rejected request. The vendored TinyViT's timm warnings do not.
        deadline = time.monotonic() + 10
        while "rejected GET /api/runs/" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-2000:]
            time.sleep(0.2)
        output = log_path.read_text(errors="replace")
        assert "backend.app.model_holder: serving model" in output and "engine torch" in output
        assert "FutureWarning" not in output, output[-2000:]
        assert output.count(tokens[0]) == 1  # printed once, never logged again
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
