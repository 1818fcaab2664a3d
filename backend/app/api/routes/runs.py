"""Training runs: launch, list, watch, cancel and resume; the run request's JSON schema.

Every route requires the admin token (:data:`~backend.app.api.deps.AdminDep`). Runs are
stored first, then enqueued on the ``gpu`` queue by name (``worker.celery_app.enqueue_run``),
so the API never imports the training code and a worker started later still finds them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from backend.app.api.deps import (
    ADMIN_RESPONSES,
    NOT_FOUND_RESPONSE,
    AdminDep,
    OffsetQuery,
    RunIdPath,
    SettingsDep,
)
from backend.app.core.settings import Settings
from backend.app.db import crud
from backend.app.db.models import Run, RunStatus
from backend.app.db.session import init_db, session_scope
from backend.app.schemas.runs import (
    EpochMetricRead,
    EvaluationRead,
    FoldRead,
    RunCreate,
    RunList,
    RunMetrics,
    RunRead,
    RunSummary,
    run_request_schema,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["runs"], responses=ADMIN_RESPONSES)


def get_db(settings: SettingsDep) -> Iterator[Session]:
    """A request-scoped session on the run store (migrated on first use)."""
    init_db(settings)
    with session_scope(settings) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def _validation_error(errors: list[dict[str, Any]]) -> RequestValidationError:
    return RequestValidationError(errors)


def _body_errors(exc: ValidationError, prefix: tuple[str, ...] = ("body",)) -> list[dict[str, Any]]:
    """Pydantic errors of the merged config as FastAPI 422 entries (JSON-safe)."""
    out = []
    for error in exc.errors(include_url=False):
        entry = {"type": error["type"], "loc": (*prefix, *error["loc"]), "msg": error["msg"]}
        if "input" in error:
            entry["input"] = error["input"] if isinstance(error["input"], str | int | float | bool) else None
        if error.get("ctx"):
            entry["ctx"] = {k: str(v) for k, v in error["ctx"].items()}
        out.append(entry)
    return out


def _path_error(loc: tuple[str, ...], path: Path, msg: str) -> dict[str, Any]:
    return {"type": "path", "loc": ("body", *loc), "msg": msg, "input": str(path)}


def _check_paths(body: RunCreate, settings: Settings) -> None:
    """422 for dataset roots and input files that do not exist (or lie outside datasets_root)."""
    errors: list[dict[str, Any]] = []
    given = body.model_dump(exclude_unset=True)
    root_loc: tuple[str, ...] = ("root",) if body.root is not None else ("data", "root")
    roots = [(root_loc, Path(body.root if body.root is not None else body.data.root).expanduser())]
    if body.data.pool_root is not None:
        roots.append((("data", "pool_root"), Path(body.data.pool_root).expanduser()))
    for loc, root in roots:
        if not root.is_dir():
            errors.append(_path_error(loc, root, "dataset root does not exist or is not a folder"))
        elif settings.datasets_root is not None:
            # Saved corrections are a dataset too, wherever their folder is.
            allowed = [Path(settings.datasets_root).expanduser().resolve()]
            allowed.append(Path(settings.corrections_dir).expanduser().resolve())
            if not any(root.resolve().is_relative_to(folder) for folder in allowed):
                errors.append(_path_error(loc, root, f"dataset root must lie under {allowed[0]}"))
    if body.with_corrections and not (Path(settings.corrections_dir).expanduser() / "meta").is_dir():
        errors.append(
            {
                "type": "value_error",
                "loc": ("body", "with_corrections"),
                "msg": "no corrections have been saved on this server yet (POST /api/corrections)",
                "input": True,
            }
        )
    if body.with_corrections and body.data.pool_dataset is not None:
        errors.append(
            {
                "type": "value_error",
                "loc": ("body", "with_corrections"),
                "msg": "with_corrections and data.pool_dataset both name the pooled dataset: give one",
                "input": True,
            }
        )
    files = {
        ("data", "split_file"): (given.get("data") or {}).get("split_file"),
        ("refiner", "checkpoint"): (given.get("refiner") or {}).get("checkpoint"),
        ("coarse", "pretrained_npz"): (given.get("coarse") or {}).get("pretrained_npz"),
    }
    for loc, value in files.items():
        if value is not None and not Path(value).expanduser().is_file():
            errors.append(_path_error(loc, Path(value), "file does not exist"))
    if errors:
        raise _validation_error(errors)


def _init_bundle_path(session: Session, model_id: int | None) -> Path | None:
    """The bundle of the model version a fine-tuning run starts from (422 when it is unknown)."""
    if model_id is None:
        return None
    version = crud.get_model_version(session, model_id)
    if version is None or not Path(version.bundle_path).is_file():
        what = "does not exist" if version is None else "has no bundle file"
        error = {"type": "value_error", "loc": ("body", "init_model_id"), "input": model_id}
        raise _validation_error([{**error, "msg": f"model version {model_id} {what}"}])
    return Path(version.bundle_path)


def _run_or_404(session: Session, settings: Settings, run_id: int) -> Run:
    """The run, with a dead worker's run reported as ``lost``; 404 when it does not exist."""
    run = crud.get_run(session, run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} does not exist")
    crud.refresh_lost(session, run, lost_after_s=settings.run_lost_after_s)
    return run


def _enqueue(session: Session, settings: Settings, run: Run, *, resume: bool) -> None:
    """Send the run's task after its row is committed; on a broker failure the run fails."""
    from worker.celery_app import enqueue_run

    session.commit()
    try:
        task_id = enqueue_run(settings, run.id, attempt=run.attempt, resume=resume)
    except Exception as exc:  # noqa: BLE001 - any broker failure is reported the same way
        log.exception("could not enqueue run %s", run.id)
        crud.finish_run(session, run.id, RunStatus.failed, error=f"could not reach the task queue: {exc}")
        session.commit()
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"the task queue is unavailable: {exc}"
        ) from exc
    crud.set_task_id(session, run.id, task_id)
    session.commit()
    session.refresh(run)


@router.get("/config/schema", summary="JSON schema of the run request (admin form)")
def config_schema(_: AdminDep) -> dict[str, Any]:
    return run_request_schema()


@router.post("/runs", status_code=status.HTTP_201_CREATED, response_model=RunRead, summary="Launch a run")
def create_run(_: AdminDep, body: RunCreate, settings: SettingsDep, session: SessionDep) -> Run:
    _check_paths(body, settings)
    init_from = _init_bundle_path(session, body.init_model_id)
    try:
        config = body.to_training_config(
            output_dir=Path(settings.runs_dir) / "pending",
            cache_dir=settings.cache_dir,
            init_from=init_from,
            corrections_dir=Path(settings.corrections_dir),
        )
    except ValidationError as exc:
        raise _validation_error(_body_errors(exc)) from exc
    run = crud.create_run(session, config.model_dump(mode="json"), runs_dir=Path(settings.runs_dir))
    _enqueue(session, settings, run, resume=False)
    return run


@router.get("/runs", response_model=RunList, summary="List runs, newest first")
def list_runs(
    _: AdminDep,
    settings: SettingsDep,
    session: SessionDep,
    status_: Annotated[RunStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: OffsetQuery = 0,
) -> RunList:
    crud.mark_lost_runs(session, lost_after_s=settings.run_lost_after_s)
    session.commit()
    status_value = status_.value if status_ is not None else None
    runs = crud.list_runs(session, status=status_value, limit=limit, offset=offset)
    return RunList(
        items=[RunSummary.model_validate(run) for run in runs],
        total=crud.count_runs(session, status=status_value),
    )


@router.get(
    "/runs/{run_id}",
    response_model=RunRead,
    summary="A run: status, phase, fold, epoch, progress, ETA",
    responses=NOT_FOUND_RESPONSE,
)
def get_run(_: AdminDep, run_id: RunIdPath, settings: SettingsDep, session: SessionDep) -> Run:
    run = _run_or_404(session, settings, run_id)
    return run


@router.get(
    "/runs/{run_id}/metrics",
    response_model=RunMetrics,
    summary="Epoch metrics, folds, evaluations",
    responses=NOT_FOUND_RESPONSE,
)
def get_run_metrics(_: AdminDep, run_id: RunIdPath, settings: SettingsDep, session: SessionDep) -> RunMetrics:
    run = _run_or_404(session, settings, run_id)
    return RunMetrics(
        run_id=run.id,
        status=run.status,
        epochs=[EpochMetricRead.model_validate(row) for row in crud.epoch_metrics(session, run.id)],
        folds=[FoldRead.model_validate(row) for row in crud.fold_results(session, run.id)],
        evaluations=[EvaluationRead.model_validate(row) for row in crud.evaluations(session, run.id)],
    )


@router.post(
    "/runs/{run_id}/cancel",
    response_model=RunRead,
    summary="Cancel a run (within one step)",
    responses={**NOT_FOUND_RESPONSE, 409: {"description": "The run has already ended."}},
)
def cancel_run(_: AdminDep, run_id: RunIdPath, settings: SettingsDep, session: SessionDep) -> Run:
    run = _run_or_404(session, settings, run_id)
    try:
        crud.request_cancel(session, run)
    except crud.StateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    return run


@router.post(
    "/runs/{run_id}/resume",
    response_model=RunRead,
    summary="Resume from the last checkpoint",
    responses={
        **NOT_FOUND_RESPONSE,
        409: {"description": "The run cannot be resumed in its state."},
        503: {"description": "The task queue is unavailable (or no admin token is configured)."},
    },
)
def resume_run(_: AdminDep, run_id: RunIdPath, settings: SettingsDep, session: SessionDep) -> Run:
    run = _run_or_404(session, settings, run_id)
    try:
        crud.prepare_resume(session, run)
    except crud.StateError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    _enqueue(session, settings, run, resume=True)
    return run
