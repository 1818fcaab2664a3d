"""FastAPI dependencies (``Annotated`` aliases) shared by every route.

* :data:`SettingsDep` — the :class:`~backend.app.core.settings.Settings` of the running app.
* :data:`ModelHolderDep` — the :class:`~backend.app.model_holder.ModelHolder` (hot-swappable predictor).
* :data:`ApiKeyDep` — when ``settings.api_key`` is set, requires header ``X-API-Key``.
* :data:`AdminDep` — requires ``Authorization: Bearer <admin_token>``.

Authentication must be answered **before** the request body is read or validated (a caller
without credentials gets 401, never a 422 that reveals the body schema). FastAPI parses bodies
before it solves dependencies, so the app also installs :class:`AuthGateMiddleware`, which runs
the same checks for every route whose dependency tree contains :func:`require_admin` or
:func:`require_api_key`, before the route sees the request. The dependencies stay on the routes
so that the OpenAPI schema documents the security schemes, and so that a route mounted in an app
without the middleware is still protected.

Usage in a router::

    def create_run(_: AdminDep, body: RunCreate): ...                  # or
    router = APIRouter(prefix="/runs", dependencies=[RequireAdmin])
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from backend.app.core.settings import Settings, get_settings
from backend.app.db.models import MAX_ID
from backend.app.model_holder import ModelHolder

API_KEY_HEADER = "X-API-Key"

_api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, scheme_name="ApiKey")
_bearer_scheme = HTTPBearer(auto_error=False, scheme_name="AdminBearer")


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (``create_app(settings)``), else the environment's."""
    settings = getattr(request.app.state, "settings", None)
    return settings if settings is not None else get_settings()


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_model_holder(request: Request) -> ModelHolder:
    holder = getattr(request.app.state, "model_holder", None)
    if holder is None or not holder.loaded:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the model is not loaded yet; retry shortly",
            headers={"Retry-After": "5"},
        )
    return holder


ModelHolderDep = Annotated[ModelHolder, Depends(get_model_holder)]


def _same_secret(given: str | None, expected: str) -> bool:
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def check_api_key(settings: Settings, given: str | None) -> None:
    """Raise 401 unless ``settings.api_key`` is unset or equals ``given``."""
    if settings.api_key is None or not settings.api_key.get_secret_value():
        return
    if not _same_secret(given, settings.api_key.get_secret_value()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"missing or invalid API key (header {API_KEY_HEADER})",
            headers={"WWW-Authenticate": "ApiKey"},
        )


ADMIN_DISABLED = (
    "the admin routes are disabled: no admin token is configured. Set ADMIN_TOKEN (environment or "
    ".env) to a long random string, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))', "
    "and restart; `ultrarefiner serve` and `ultrarefiner start` generate one when it is unset"
)


def check_admin(settings: Settings, authorization: str | None) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <settings.admin_token>``; 503 when the server
    has no admin token (unset or a placeholder: never accepted)."""
    if settings.admin_token is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=ADMIN_DISABLED)
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _same_secret(token.strip(), settings.admin_token.get_secret_value()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid admin token (header Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_api_key(
    settings: SettingsDep, api_key: Annotated[str | None, Depends(_api_key_scheme)] = None
) -> None:
    check_api_key(settings, api_key)


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)] = None,
) -> None:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    check_admin(settings, header)


#: The largest id the store can hold (``db.models.MAX_ID``); larger values are a 422 naming the
#: bound, never a database overflow.
MAX_RECORD_ID = MAX_ID
#: The largest offset: ``OFFSET`` takes a signed 64-bit integer in SQLite and PostgreSQL.
MAX_OFFSET = 2**63 - 1

RunIdPath = Annotated[int, Path(ge=1, le=MAX_RECORD_ID, description="Run id.")]
ModelIdPath = Annotated[int, Path(ge=1, le=MAX_RECORD_ID, description="Model version id.")]
RecordIdPath = Annotated[int, Path(ge=1, le=MAX_RECORD_ID, description="Record id.")]
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Rows to skip.")]

#: OpenAPI answers of every admin route (``APIRouter(responses=ADMIN_RESPONSES)``), and of those
#: that address one record.
ADMIN_RESPONSES: dict[int | str, dict] = {
    401: {"description": "Missing or invalid admin token (Authorization: Bearer <ADMIN_TOKEN>)."},
    503: {"description": "The server has no admin token configured (ADMIN_TOKEN unset)."},
}
NOT_FOUND_RESPONSE: dict[int | str, dict] = {404: {"description": "No record with this id."}}

#: Parameter style: ``def route(_: AdminDep, ...)``.
AdminDep = Annotated[None, Depends(require_admin)]
#: Router style: ``APIRouter(dependencies=[RequireAdmin])``.
RequireAdmin = Depends(require_admin)

#: Parameter style: ``def route(_: ApiKeyDep, ...)``.
ApiKeyDep = Annotated[None, Depends(require_api_key)]
#: Router style: ``APIRouter(dependencies=[RequireApiKey])``.
RequireApiKey = Depends(require_api_key)


# --------------------------------------------------------------------------- auth before the body

_SCHEME_REQUIREMENT = {"AdminBearer": "admin", "ApiKey": "api_key"}


class RouteTable:
    """(method, path template) of every operation of an app, with the credentials it requires.

    Built from the app's OpenAPI schema (a public, stable FastAPI API): the security schemes of
    :func:`require_admin` (``AdminBearer``) and :func:`require_api_key` (``ApiKey``) appear in the
    ``security`` of each operation that depends on them, however the router was included.
    """

    def __init__(self, app) -> None:
        import re

        self.entries: list[tuple[str, re.Pattern[str], str, frozenset[str]]] = []
        try:
            schema = app.openapi()
        except Exception as error:  # a broken schema must not take every route down
            logging.getLogger(__name__).error(
                "OpenAPI schema unavailable (%s): auth falls back to route dependencies", type(error).__name__
            )
            return
        for template, operations in (schema.get("paths") or {}).items():
            pattern = re.compile("^" + _template_regex(template) + "$")
            for method, operation in operations.items():
                if not isinstance(operation, dict):
                    continue
                needs = {
                    _SCHEME_REQUIREMENT[name]
                    for requirement in operation.get("security") or []
                    for name in requirement
                    if name in _SCHEME_REQUIREMENT
                }
                self.entries.append((method.upper(), pattern, template, frozenset(needs)))

    def lookup(self, method: str, path: str) -> tuple[str | None, frozenset[str]]:
        """(path template, requirements) of the operation answering ``method path``."""
        template_found = None
        for entry_method, pattern, template, needs in self.entries:
            if pattern.match(path):
                if entry_method == method or (method == "HEAD" and entry_method == "GET"):
                    return template, needs
                template_found = template_found or template
        return template_found, frozenset()


def _template_regex(template: str) -> str:
    import re

    out, position = [], 0
    for match in re.finditer(r"\{([^}:]+)(?::([^}]+))?\}", template):
        out.append(re.escape(template[position : match.start()]))
        out.append(".+" if match.group(2) == "path" else "[^/]+")
        position = match.end()
    out.append(re.escape(template[position:]))
    return "".join(out)


def route_table(app) -> RouteTable:
    """The app's :class:`RouteTable`, built once (after all routers are included)."""
    table = getattr(app.state, "route_table", None)
    if table is None:
        table = app.state.route_table = RouteTable(app)
    return table


class AuthGateMiddleware:
    """Answer 401 for protected operations before the body is read (pure ASGI middleware).

    FastAPI reads and validates a request body before it solves dependencies, so a dependency
    alone would let an unauthenticated caller see 422 body errors. This middleware runs
    :func:`check_admin` / :func:`check_api_key` for every operation whose dependencies include
    :func:`require_admin` / :func:`require_api_key` (routes hidden from the schema keep only the
    dependency check).
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        application = scope.get("app")
        if application is not None:
            _, needs = route_table(application).lookup(scope.get("method", ""), scope.get("path", ""))
            if needs:
                from starlette.datastructures import Headers
                from starlette.responses import JSONResponse

                settings = getattr(application.state, "settings", None) or get_settings()
                headers = Headers(scope=scope)
                try:
                    if "admin" in needs:
                        check_admin(settings, headers.get("authorization"))
                    if "api_key" in needs:
                        check_api_key(settings, headers.get(API_KEY_HEADER))
                except HTTPException as error:
                    response = JSONResponse(
                        {"detail": error.detail}, status_code=error.status_code, headers=error.headers
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
