"""Latency and throughput of ``POST /segment`` against a running server; prints JSON.

    python benchmarks/segment_latency.py --url http://127.0.0.1:8000 --n 20 --concurrency 2
    python benchmarks/segment_latency.py --url ... --n 20 --repeat-image   # same image, new prompts
    python benchmarks/segment_latency.py --url ... --concurrency 50 --duration 60  # soak test

Without ``--repeat-image`` every request carries a *new* image (one pixel changed per request, so
the server's embedding cache misses); with it the same image is sent with a new clinician point
each time, which measures the cached-embedding path. Client latency is wall time per request;
the server's own per-stage timings (``timings_ms``) are summarised too.

``--duration S`` is the soak mode: ``--concurrency`` clients each send requests back to back for
S seconds (``--n`` is ignored); the server's resident memory is read from its Prometheus
``/metrics`` (``process_resident_memory_bytes``) every few seconds and reported as start / max /
end, so a leak or an unbounded cache shows as a rising series.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from training.machine import describe

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE_DIR = REPO_ROOT.parent / "shared" / "data" / "BUSI" / "Dataset_BUSI_with_GT" / "benign"


def default_image() -> Path:
    images = sorted(p for p in DEFAULT_IMAGE_DIR.glob("*.png") if "_mask" not in p.name)
    if not images:
        raise SystemExit(f"no --image given and no BUSI image under {DEFAULT_IMAGE_DIR}")
    return images[0]


def variant(pixels: np.ndarray, index: int) -> bytes:
    """PNG bytes of ``pixels`` with one pixel changed: a distinct image for the server's cache."""
    changed = pixels.copy()
    flat = changed.reshape(-1, *changed.shape[2:]) if changed.ndim == 3 else changed.reshape(-1)
    position = index % flat.shape[0]
    bumped = flat[position].astype(np.int64) + 1 + index // flat.shape[0]
    flat[position] = (bumped % 256).astype(flat.dtype)
    buffer = io.BytesIO()
    Image.fromarray(changed).save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def server_rss_mb(client: httpx.Client, base: str) -> float | None:
    """The server process's resident memory (MiB) from its Prometheus metrics, if exported."""
    try:
        text = client.get(f"{base}/metrics").text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return round(float(line.split()[1]) / 2**20, 1)
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="Base URL of the API, e.g. http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=20, help="Requests to send (after --warmup).")
    parser.add_argument("--concurrency", type=int, default=1, help="Requests in flight at once.")
    parser.add_argument("--image", type=Path, help="Image to send (default: the first BUSI benign image).")
    parser.add_argument("--repeat-image", action="store_true", help="Same image each time, new prompts.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed requests first.")
    parser.add_argument("--api-key", help="X-API-Key header.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Per-request timeout (s).")
    parser.add_argument("--duration", type=float, help="Soak mode: every client loops for S seconds.")
    parser.add_argument(
        "--memory-every", type=float, default=5.0, help="Soak mode: memory sample period (s)."
    )
    args = parser.parse_args(argv)

    path = args.image or default_image()
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        pixels = np.asarray(image.convert("L") if image.mode not in ("L", "RGB") else image).copy()
    height, width = pixels.shape[:2]
    rng = np.random.default_rng(0)
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    base = args.url.rstrip("/")
    counter = {"next": 0}
    lock = threading.Lock()

    def payload(index: int) -> tuple[bytes, dict]:
        if args.repeat_image:
            x, y = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
            return raw, {"points": json.dumps([[round(x, 1), round(y, 1), 1]])}
        return variant(pixels, index + 7919), {}

    client = httpx.Client(timeout=args.timeout, headers=headers)
    ready = client.get(f"{base}/ready").json()

    def one(index: int) -> dict:
        data, form = payload(index)
        started = time.perf_counter()
        try:
            response = client.post(
                f"{base}/segment", files={"file": (path.name, data, "image/png")}, data=form
            )
            elapsed = (time.perf_counter() - started) * 1000.0
            if response.status_code != 200:
                return {"ok": False, "status": response.status_code, "ms": elapsed}
            body = response.json()
            return {
                "ok": True,
                "ms": elapsed,
                "server": body["timings_ms"],
                "cached": body["embedding_cached"],
            }
        except httpx.HTTPError as error:
            return {
                "ok": False,
                "status": type(error).__name__,
                "ms": (time.perf_counter() - started) * 1000.0,
            }

    def next_index() -> int:
        with lock:
            counter["next"] += 1
            return counter["next"]

    if args.repeat_image:
        one(0)  # the image's embedding is cached from here on
    for _ in range(args.warmup):
        one(next_index())

    memory: list[tuple[float, float | None]] = []
    started = time.perf_counter()
    if args.duration is None:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            results = list(pool.map(lambda _: one(next_index()), range(args.n)))
    else:
        deadline = started + args.duration

        def client_loop(_: int) -> list[dict]:
            done = []
            while time.perf_counter() < deadline:
                done.append(one(next_index()))
            return done

        stop = threading.Event()

        def sample_memory() -> None:
            while True:
                memory.append((time.perf_counter() - started, server_rss_mb(client, base)))
                if stop.wait(args.memory_every):
                    return

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            results = [r for batch in pool.map(client_loop, range(args.concurrency)) for r in batch]
        stop.set()
        sampler.join()
        memory.append((time.perf_counter() - started, server_rss_mb(client, base)))
    wall = time.perf_counter() - started
    client.close()

    ok = [r for r in results if r["ok"]]
    latencies = [r["ms"] for r in ok]
    stages: dict[str, list[float]] = {}
    for r in ok:
        for stage, value in r["server"].items():
            stages.setdefault(stage, []).append(value)
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    report = {
        "client_machine": describe(),  # where this client ran: the server's when the URL is local
        "url": base,
        "model_version": ready.get("model_version"),
        "inference_engine": ready.get("inference_engine"),
        "image": path.name,
        "width": width,
        "height": height,
        "repeat_image": args.repeat_image,
        "n": len(results),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "wall_s": wall,
        "ok": len(ok),
        "errors": errors,
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "mean": statistics.fmean(latencies) if latencies else None,
            "min": min(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
        },
        "throughput_rps": len(ok) / wall if wall > 0 else None,
        "embedding_cached_fraction": (sum(r["cached"] for r in ok) / len(ok)) if ok else None,
        "server_stage_p50_ms": {stage: percentile(values, 50) for stage, values in stages.items()},
    }
    readings = [mb for _, mb in memory if mb is not None]
    if readings:
        report["server_rss_mb"] = {
            "start": readings[0],
            "max": max(readings),
            "end": readings[-1],
            "samples": [[round(t, 1), mb] for t, mb in memory],
        }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
