"""``/health`` (liveness), ``/ready`` (model loaded) and Prometheus ``/metrics``.

The Prometheus metric objects of the API live here (one process-wide registry), so every module
that records a metric imports it from this file.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from backend.app.schemas.segment import HealthResponse, ReadyResponse

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

REQUESTS = Counter(
    "ultrarefiner_http_requests_total",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
)
REQUEST_LATENCY = Histogram(
    "ultrarefiner_http_request_duration_seconds",
    "HTTP request latency by route template (including queueing).",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "ultrarefiner_segment_stage_seconds",
    "Segmentation latency per stage (decode, preprocess, coarse, encoder, decoder, "
    "encode_response, total, queue).",
    ["stage"],
    buckets=(0.001, 0.005, *_LATENCY_BUCKETS),
)
QUEUE_DEPTH = Gauge("ultrarefiner_segment_queue_depth", "Segmentation requests waiting for a worker slot.")
IN_FLIGHT = Gauge("ultrarefiner_segment_in_flight", "Segmentations being computed.")
REJECTED = Counter(
    "ultrarefiner_segment_rejected_total", "Requests refused with 503 because the queue was full."
)
EMBEDDING_CACHE = Counter(
    "ultrarefiner_embedding_cache_total",
    "Embedding cache lookups by result: hit, miss (the encoder ran) or unused (nothing to refine).",
    ["result"],
)
SEGMENT_ERRORS = Counter(
    "ultrarefiner_segment_errors_total", "Rejected segmentation inputs by status.", ["status"]
)

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="Liveness")
def health() -> HealthResponse:
    """The process is up (answers even while the model is loading)."""
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Readiness: the model is loaded",
    responses={503: {"model": ReadyResponse, "description": "The model is not loaded yet."}},
)
def ready(request: Request):
    """200 with the served ``model_version`` once the model is loaded, else 503."""
    state = request.app.state
    holder = getattr(state, "model_holder", None)
    served = holder.served if holder is not None else None
    admission = getattr(state, "admission", None)
    body = ReadyResponse(
        ready=served is not None,
        model_version=served.model_version if served else None,
        model_source=served.source if served else None,
        untrained=bool(getattr(served.predictor, "untrained", False)) if served else None,
        inference_engine=served.engine if served else None,
        store=bool(getattr(state, "store_ready", False)),
        embedding_cache_items=len(holder.cache) if holder is not None else 0,
        queue_depth=admission.queued if admission is not None else 0,
        in_flight=admission.running if admission is not None else 0,
    )
    if served is None:
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
def metrics() -> Response:
    """Request counts and latencies per route, per segmentation stage, queue depth, cache hits."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
