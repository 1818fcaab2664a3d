"""``/health`` (liveness), ``/ready`` (model loaded) and Prometheus ``/metrics``.

The metric objects themselves live in :mod:`backend.app.metrics`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.app.schemas.segment import HealthResponse, ReadyResponse

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
