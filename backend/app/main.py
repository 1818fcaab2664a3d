"""The FastAPI application: ``create_app(settings) -> FastAPI``.

The lifespan initialises the run store (``init_db``) and loads the served model once:
``settings.model_path`` if set, else the store's active model, else the shipped default
(``Predictor.from_bundle(None)``, an untrained bundle when none is shipped). No Redis or broker
is needed to serve. ``uvicorn backend.app.main:app`` or ``ultrarefiner serve`` runs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.app.api.deps import AuthGateMiddleware, route_table
from backend.app.api.routes import health, segment
from backend.app.core.settings import Settings, get_settings
from backend.app.metrics import REQUEST_LATENCY, REQUESTS
from backend.app.model_holder import ModelHolder
from backend.app.serving.admission import Admission

log = logging.getLogger("backend.app")

API_DESCRIPTION = """
UltraRefiner Studio: breast-ultrasound lesion segmentation. A TransUNet proposes a **coarse**
mask; a SAM-family refiner, prompted from that mask (or by a clinician's points/box), returns a
**refined** mask.

* `POST /segment` — one image (PNG, JPEG, BMP, TIFF or DICOM) → both masks as JSON, an overlay
  PNG (`format=png`) or a DICOM Segmentation (`format=dicom-seg`, DICOM input).
* `POST /segment/batch` — several images, one result or error each.
* `GET /health`, `GET /ready`, `GET /metrics` (Prometheus).

Errors are JSON `{"detail": "..."}`. Uploads are held in memory only: never logged or stored.
"""


def _optional_router(module: str):
    """``router`` of an optional route module (written by another package owner), or None."""
    import importlib

    try:
        return importlib.import_module(module).router
    except ModuleNotFoundError as error:
        if error.name and module.startswith(error.name):
            return None
        raise


def _init_store(settings: Settings) -> tuple[bool, Path | None]:
    """``init_db`` and the active model's bundle path; the API still serves without a store."""
    try:
        from backend.app.db.session import init_db
    except ModuleNotFoundError:
        return False, None
    try:
        factory = init_db(settings)
    except Exception as error:
        log.error("the run store could not be initialised (%s); serving without it", type(error).__name__)
        return False, None
    _register_shipped_model(factory)
    try:
        from backend.app.db.crud import get_active_model_path

        with factory() as session:
            return True, get_active_model_path(session)
    except Exception as error:
        log.error("the active model could not be looked up (%s)", type(error).__name__)
        return True, None


def shipped_model_metrics(record: Path) -> dict:
    """What the models list shows of the shipped model: its ``models/default.json`` record
    (name, test Dice, per-fold validation Dice), without the per-image rows."""
    import json

    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    metrics: dict = {key: data[key] for key in ("model_version", "dataset", "coarse_folds") if key in data}
    test = data.get("test")
    if isinstance(test, dict):
        metrics["test"] = {key: value for key, value in test.items() if key != "per_image"}
    return metrics


def _register_shipped_model(factory) -> None:
    """List the shipped ``models/default.pt`` in the store (once), so it can be rolled back to."""
    from training.checkpoints import DEFAULT_BUNDLE_PATH

    if not DEFAULT_BUNDLE_PATH.is_file():
        return
    try:
        from backend.app.db.crud import ensure_shipped_model

        with factory() as session:
            ensure_shipped_model(
                session, DEFAULT_BUNDLE_PATH, shipped_model_metrics(DEFAULT_BUNDLE_PATH.with_suffix(".json"))
            )
            session.commit()
    except Exception as error:  # noqa: BLE001 - listing the default must not stop the API
        log.error("the shipped model could not be listed in the store (%s)", type(error).__name__)


def _active_model_path(settings: Settings) -> Path | None:
    from backend.app.db.crud import get_active_model_path
    from backend.app.db.session import session_scope

    with session_scope(settings) as session:
        return get_active_model_path(session)


async def follow_active_model(app: FastAPI, settings: Settings, active_at_start: Path | None) -> None:
    """Keep this replica serving the store's active model.

    ``POST /api/models/{id}/activate`` hot-swaps the replica that receives it; every other API
    replica sharing the store sees the store's active model change within
    ``settings.active_model_poll_s`` and loads it. Only a *change* of the store's value triggers a
    load, so a replica that is itself activating (loaded, not yet committed) is left alone, and a
    bundle that fails to load is tried once per activation (the replica keeps its current model).
    """
    holder: ModelHolder = app.state.model_holder
    last_seen = active_at_start
    while True:
        await anyio.sleep(settings.active_model_poll_s)
        try:
            active = await anyio.to_thread.run_sync(_active_model_path, settings)
        except Exception as error:  # noqa: BLE001 - a store outage must not end the follower
            log.warning("the active model could not be looked up (%s)", type(error).__name__)
            continue
        if active == last_seen:
            continue
        last_seen = active
        served = holder.served
        if active is None or (served is not None and served.path == active):
            continue
        log.info("the store's active model changed; loading %s", active.name)
        try:
            await anyio.to_thread.run_sync(partial(holder.load, active, source="store"))
        except Exception as error:  # noqa: BLE001 - keep serving the current model
            log.error("the active model %s could not be loaded (%s)", active.name, type(error).__name__)


def _lifespan(settings: Settings):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from backend.app.imaging import silence_decoder_logs

        silence_decoder_logs()
        store_ready, active_path = await anyio.to_thread.run_sync(_init_store, settings)
        app.state.store_ready = store_ready
        holder: ModelHolder = app.state.model_holder
        if not holder.loaded:  # a test may have installed a predictor already
            await anyio.to_thread.run_sync(holder.load_initial, active_path)
        follow = store_ready and settings.model_path is None and settings.active_model_poll_s > 0
        async with anyio.create_task_group() as tasks:
            if follow and isinstance(holder, ModelHolder):
                tasks.start_soon(follow_active_model, app, settings, active_path)
            yield
            tasks.cancel_scope.cancel()

    return lifespan


class MetricsMiddleware:
    """Prometheus request count and latency per route template (pure ASGI)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        application = scope.get("app")
        template = None
        if application is not None:
            template, _ = route_table(application).lookup(scope.get("method", ""), scope.get("path", ""))
        label = template or "<other>"
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method = scope.get("method", "")
            REQUESTS.labels(route=label, method=method, status=str(status["code"])).inc()
            REQUEST_LATENCY.labels(route=label, method=method).observe(time.perf_counter() - started)


def _log_rejected(request: Request, status_code: int, what: str) -> None:
    """One line per rejected request: method, route, status and the names of what was wrong
    (never the values sent)."""
    log.info("rejected %s %s: %d (%s)", request.method, request.url.path, status_code, what)


async def _validation_error(request: Request, exc: RequestValidationError):
    """Segment routes answer ``{"detail": "<field>: <problem>"}``; others keep FastAPI's format."""
    fields = sorted(
        {".".join(str(part) for part in error.get("loc", ())) or "request" for error in exc.errors()}
    )
    _log_rejected(request, 422, "invalid " + ", ".join(fields[:8]))
    if not request.url.path.startswith("/segment"):
        # FastAPI's format (loc, msg, type, ctx) without the value that was sent ("input"): an
        # error names the field, never echoes what it held.
        errors = [{key: value for key, value in error.items() if key != "input"} for error in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "body"))
        problems.append(f"{where}: {error.get('msg', 'invalid value')}")
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    if 400 <= exc.status_code < 500:
        _log_rejected(request, exc.status_code, "http error")
    return await http_exception_handler(request, exc)


def _documented_openapi(app: FastAPI, settings: Settings):
    """The app's OpenAPI, describing the security this server actually applies: the ``/segment``
    API key (scheme and 401 answer) only when ``API_KEY`` is set."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        if settings.api_key is None or not settings.api_key.get_secret_value():
            _drop_security_scheme(schema, "ApiKey")
        app.openapi_schema = schema
        return schema

    return openapi


def _drop_security_scheme(schema: dict, name: str) -> None:
    for operations in (schema.get("paths") or {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "security" not in operation:
                continue
            kept = [req for req in operation["security"] if name not in req]
            if len(kept) == len(operation["security"]):
                continue
            if kept:
                operation["security"] = kept
            else:
                del operation["security"]
                # The only 401 such an operation could answer was the missing key.
                (operation.get("responses") or {}).pop("401", None)
    schemes = (schema.get("components") or {}).get("securitySchemes") or {}
    schemes.pop(name, None)


async def _unexpected_error(request: Request, exc: Exception):
    # Only the exception type is logged: messages of decoders may carry patient data.
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return JSONResponse(
        jsonable_encoder({"detail": f"internal error ({type(exc).__name__})"}), status_code=500
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Swagger UI and ReDoc from the installed fastapi-offline package: /docs works without internet.
    app = FastAPIOffline(
        title="UltraRefiner Studio API",
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=_lifespan(settings),
    )
    app.state.settings = settings
    app.state.store_ready = False
    app.state.model_holder = ModelHolder(settings)
    app.state.admission = Admission(settings.max_concurrency, settings.max_queue, settings.retry_after_s)

    app.include_router(health.router)
    app.include_router(segment.router)
    for module in (
        "backend.app.api.routes.runs",
        "backend.app.api.routes.models",
        "backend.app.api.routes.corrections",
    ):
        router = _optional_router(module)
        if router is not None:
            app.include_router(router)

    app.openapi = _documented_openapi(app, settings)
    if settings.admin_token is None:
        log.warning(
            "no ADMIN_TOKEN is configured (unset or a placeholder): "
            "the admin routes answer 503 until one is set"
        )

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    # Outermost first: metrics see every answer, including the gate's 401s.
    app.add_middleware(AuthGateMiddleware)
    app.add_middleware(MetricsMiddleware)
    return app


_default_app: FastAPI | None = None


def __getattr__(name: str):
    # `uvicorn backend.app.main:app` builds the app lazily (once) from the environment's settings.
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = create_app()
        return _default_app
    raise AttributeError(name)
