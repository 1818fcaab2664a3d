"""Admission control: bounded concurrency with a bounded waiting queue.

Decoding and inference run in worker threads bounded by ``settings.max_concurrency``; at most
``settings.max_queue`` requests wait for a slot, and beyond that the answer is 503 with
``Retry-After`` (estimated from the moving mean compute time).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Request

from backend.app.metrics import IN_FLIGHT, QUEUE_DEPTH, REJECTED
from backend.app.serving.errors import SegmentError


class Admission:
    """Bounded concurrency with a bounded waiting queue (all counters live on the event loop)."""

    def __init__(self, max_concurrency: int, max_queue: int, retry_after_s: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.pending = 0  # admitted: reading the body, waiting or running
        self.running = 0
        self._limiter: anyio.CapacityLimiter | None = None
        self._limiter_loop: asyncio.AbstractEventLoop | None = None
        self._mean_s = 1.0  # moving average of the compute time (for Retry-After)

    @property
    def queued(self) -> int:
        return max(0, self.pending - self.running)

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # Created inside the running event loop (and again if the app moves to a new loop, as test
        # clients without a lifespan do).
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): one loop per process
            loop = None
        if self._limiter is None or (self._limiter_loop is not loop and self.running == 0):
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)
            self._limiter_loop = loop
        return self._limiter

    def retry_after(self) -> int:
        estimate = self._mean_s * (self.queued + 1) / self.max_concurrency
        return max(self.retry_after_s, math.ceil(estimate))

    def enter(self) -> None:
        if self.pending >= self.max_concurrency + self.max_queue:
            REJECTED.inc()
            raise SegmentError(
                503,
                f"the server is busy ({self.running} segmentations running, {self.queued} queued); "
                "retry later",
                headers={"Retry-After": str(self.retry_after())},
            )
        self.pending += 1
        self._publish()

    def leave(self) -> None:
        self.pending = max(0, self.pending - 1)
        self._publish()

    def _publish(self) -> None:
        QUEUE_DEPTH.set(self.queued)
        IN_FLIGHT.set(self.running)

    async def run(self, fn, *args) -> tuple[Any, float]:
        """Run ``fn(*args)`` in a worker thread once a slot is free; return (result, queue ms)."""
        waited = time.perf_counter()
        async with self.limiter:
            queue_ms = (time.perf_counter() - waited) * 1000.0
            self.running += 1
            self._publish()
            started = time.perf_counter()
            try:
                return await anyio.to_thread.run_sync(fn, *args), queue_ms
            finally:
                self.running -= 1
                elapsed = time.perf_counter() - started
                self._mean_s = 0.8 * self._mean_s + 0.2 * elapsed
                self._publish()


@asynccontextmanager
async def admitted(request: Request) -> AsyncIterator[Admission]:
    """A slot of the app's admission (503 ``SegmentError`` when the queue is full), released on exit."""
    admission: Admission = request.app.state.admission
    admission.enter()
    try:
        yield admission
    finally:
        admission.leave()
