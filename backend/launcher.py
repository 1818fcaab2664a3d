"""`ultrarefiner start`: API, worker and UI as local processes on the embedded defaults.

The same three services that docker compose runs, without Docker: SQLite, the embedded broker
(unless ``REDIS_URL`` is set) and the shipped default model. Prints the URLs; Ctrl-C (or the
death of any one service) stops all of them cleanly.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


@dataclass
class Service:
    name: str
    argv: list[str]
    ready_url: str | None = None
    process: subprocess.Popen | None = None


def build_services(host: str, api_port: int, ui_port: int) -> list[Service]:
    python = sys.executable
    api_url = f"http://{host}:{api_port}"
    return [
        Service(
            "api",
            [python, "-m", "backend.cli", "serve", "--host", host, "--port", str(api_port)],
            ready_url=f"{api_url}/ready",
        ),
        Service(
            "worker",
            # One job at a time on the `gpu` queue (worker/__main__.py).
            [python, "-m", "worker"],
        ),
        Service(
            "ui",
            [python, "-m", "frontend.app", "--host", host, "--port", str(ui_port), "--api-url", api_url],
            ready_url=f"http://{host}:{ui_port}/",
        ),
    ]


def _wait_ready(service: Service, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if service.process is not None and service.process.poll() is not None:
            return False
        try:
            if httpx.get(service.ready_url, timeout=2).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def stop_all(services: list[Service], timeout: float = 15.0) -> None:
    running = [s for s in services if s.process is not None and s.process.poll() is None]
    for service in running:
        service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for service in running:
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


def start(
    host: str = "127.0.0.1", api_port: int = 8000, ui_port: int = 7860, ready_timeout: float = 300
) -> int:
    from backend.app.core.settings import Settings

    env = dict(os.environ)
    # Never run with a placeholder token: without ADMIN_TOKEN (environment or .env), make one.
    token_generated = Settings().admin_token is None
    if token_generated:
        env["ADMIN_TOKEN"] = secrets.token_urlsafe(24)
    services = build_services(host, api_port, ui_port)
    stopping = False

    def _stop(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True

    # Ctrl-C reaches the whole process group at once: a service may exit on it before this
    # process has run its own handler, so SIGINT sets the same flag as SIGTERM and an exit seen
    # just after a stop request is part of the stop, not an error.
    previous = signal.signal(signal.SIGTERM, _stop)
    previous_int = signal.signal(signal.SIGINT, _stop)
    try:
        for service in services:
            service.process = subprocess.Popen(service.argv, env=env)
        deadline = time.monotonic() + ready_timeout
        for service in services:
            if service.ready_url and not _wait_ready(service, deadline):
                print(f"error: {service.name} did not become ready; stopping.", file=sys.stderr)
                return 1
        print("\nUltraRefiner Studio is running:")
        print(f"  Admin UI : http://{host}:{ui_port}/")
        print(f"  API      : http://{host}:{api_port}/docs")
        print(
            "  Worker   : Celery queue 'gpu' ("
            + ("Redis" if env.get("REDIS_URL") else "embedded broker")
            + ")"
        )
        if token_generated:
            print(f"  Admin token (this session): {env['ADMIN_TOKEN']}")
        print("Press Ctrl-C to stop.\n", flush=True)
        while not stopping:
            for service in services:
                code = service.process.poll()
                if code is not None:
                    time.sleep(0.5)  # a stop signal delivered with the child's exit lands here
                    if stopping:
                        break
                    print(f"error: {service.name} exited with code {code}; stopping.", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("Stopping …", flush=True)
        stop_all(services)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
