"""Registered model versions: list them, activate one (store + hot swap of the served model)."""

from __future__ import annotations

import inspect
import logging
from functools import partial
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from backend.app.api.deps import ADMIN_RESPONSES, NOT_FOUND_RESPONSE, AdminDep, ModelIdPath
from backend.app.api.routes.runs import SessionDep
from backend.app.db import crud
from backend.app.schemas.runs import ModelList, ModelVersionRead

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["models"], responses=ADMIN_RESPONSES)


@router.get("/models", response_model=ModelList, summary="Registered model versions, newest first")
def list_models(_: AdminDep, session: SessionDep, request: Request) -> ModelList:
    versions = crud.list_model_versions(session)
    active = next((v.id for v in versions if v.active), None)
    items = [ModelVersionRead.model_validate(v) for v in versions]
    return ModelList(items=items, active_id=active, serving_id=_serving_id(request, items))


def _serving_id(request: Request, items: list[ModelVersionRead]) -> int | None:
    """The listed version this replica serves: by bundle path, or the shipped one for the default."""
    served = getattr(getattr(request.app.state, "model_holder", None), "served", None)
    if served is None:
        return None
    if served.path is not None:
        path = Path(served.path).resolve()
        return next((item.id for item in items if Path(item.bundle_path).resolve() == path), None)
    if served.source == "default":
        return next((item.id for item in items if item.shipped), None)
    return None


@router.post(
    "/models/{version_id}/activate",
    response_model=ModelVersionRead,
    summary="Make a model version the served one (exactly one is active)",
    responses={**NOT_FOUND_RESPONSE, 409: {"description": "The bundle is missing or does not load."}},
)
async def activate_model(
    _: AdminDep, version_id: ModelIdPath, request: Request, session: SessionDep
) -> ModelVersionRead:
    """Hot-swap the serving model to this version, then record it as the one active version.

    The bundle is loaded first (a bundle that fails to load changes nothing: 409), so no
    database lock is held while a model loads; if recording the activation then fails, the
    previously served model is loaded back.
    """
    version = await run_in_threadpool(crud.get_model_version, session, version_id)
    if version is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"model version {version_id} does not exist")
    path = Path(version.bundle_path)
    await run_in_threadpool(session.rollback)  # end the read; activation runs in its own transaction
    if not path.is_file():
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"the bundle of model {version_id} is missing: {path}"
        )
    holder = getattr(request.app.state, "model_holder", None)
    previous = getattr(holder, "served", None)
    if holder is not None:
        try:
            await _load(holder, path)
        except Exception as exc:  # noqa: BLE001 - a bad bundle must not become active
            log.exception("could not load model version %s from %s", version_id, path)
            raise HTTPException(
                status.HTTP_409_CONFLICT, detail=f"model {version_id} could not be loaded: {exc}"
            ) from exc
    else:
        log.warning("no model holder on the app: model %s activated in the store only", version_id)
    try:
        version = await run_in_threadpool(_activate, session, version_id)
    except Exception:
        if holder is not None and previous is not None:
            await _load(holder, previous.path, previous.source)  # path None: the shipped default
        raise
    return ModelVersionRead.model_validate(version)


async def _load(holder, path: Path | None, source: str = "store") -> None:
    if inspect.iscoroutinefunction(holder.load):
        await holder.load(path, source=source)
    else:
        await run_in_threadpool(partial(holder.load, path, source=source))


def _activate(session: Session, version_id: int):
    version = crud.activate_model_version(session, version_id)
    session.commit()
    return version
