"""Corrections: save a mask as ground truth (``POST /api/corrections``), list, view, delete.

Nothing is stored without this explicit request (admin token). The body is read into memory
with the same limits as ``/segment``; the image is decoded by the same decoder; the mask must
have the image's size and be binary. A second save of the same image (frame) is a 409 unless
``replace=true``.
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from backend.app import corrections as store
from backend.app.api.deps import (
    ADMIN_RESPONSES,
    NOT_FOUND_RESPONSE,
    AdminDep,
    OffsetQuery,
    RecordIdPath,
    SettingsDep,
)
from backend.app.api.routes.runs import SessionDep
from backend.app.db.models import Correction
from backend.app.imaging import ImageError
from backend.app.schemas.corrections import CorrectionList, CorrectionRead
from backend.app.serving.errors import SegmentError
from backend.app.serving.multipart import form_field, frame_field, read_parts
from backend.app.serving.service import decode_upload

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["corrections"], responses=ADMIN_RESPONSES)

_SAVE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "mask"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The image or DICOM."},
                    "mask": {"type": "string", "format": "binary", "description": "Binary mask, same size."},
                    "frame": {"type": "integer", "minimum": 0},
                    "mask_source": {"type": "string", "enum": list(store.MASK_SOURCES)},
                    "model_version": {"type": "string"},
                    "prompts": {"type": "string", "description": "JSON of the prompts that made the mask."},
                    "replace": {"type": "boolean"},
                },
            }
        }
    },
}


def _one(parts, name: str) -> bytes:
    found = [part for part in parts if part.name == name]
    if not found:
        raise SegmentError(422, f"missing multipart part '{name}'")
    if len(found) > 1:
        raise SegmentError(422, f"send exactly one part '{name}'")
    return bytes(found[0].data)


def _prompts(raw: str | None) -> dict:
    if raw is None or not raw.strip():
        return {}

    def no_constant(name: str):  # NaN, Infinity: Python reads them, JSON (and PostgreSQL) does not
        raise ValueError(name)

    def finite(text: str) -> float:  # 1e400 would be read as infinity
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(text)
        return number

    try:
        value = json.loads(raw, parse_constant=no_constant, parse_float=finite)
    except (ValueError, RecursionError):
        raise SegmentError(400, "prompts is not valid JSON") from None
    if not isinstance(value, dict) or len(raw) > 16_384:
        raise SegmentError(422, "prompts must be a JSON object of at most 16 KiB")
    return value


#: Longest ``model_version`` stored (the column's size).
MAX_MODEL_VERSION = 255


def _model_version(raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if len(value) > MAX_MODEL_VERSION or not value.isprintable():
        raise SegmentError(
            422, f"model_version must be printable text of at most {MAX_MODEL_VERSION} characters"
        )
    return value


def _correction_or_404(session, correction_id: int) -> Correction:
    row = session.get(Correction, correction_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"correction {correction_id} does not exist")
    return row


@router.post(
    "/corrections",
    status_code=status.HTTP_201_CREATED,
    response_model=CorrectionRead,
    summary="Save an image and its accepted or corrected mask as ground truth",
    responses={
        409: {"description": "This image (frame) is saved already; send replace=true to replace it."},
        413: {"description": "Upload above the limits."},
        415: {"description": "Not an image or DICOM this server decodes."},
        422: {"description": "Mask of another size, not binary, or a bad field."},
        507: {"description": "The corrections folder could not be written; nothing was saved."},
    },
    openapi_extra={"requestBody": _SAVE_BODY},
)
async def save_correction(_: AdminDep, request: Request, settings: SettingsDep, session: SessionDep):
    try:
        parts = await read_parts(request, settings, 2 * settings.max_upload_mb)
        image_bytes, mask_bytes = _one(parts, "file"), _one(parts, "mask")
        frame = frame_field(None, parts)
        mask_source = (form_field(parts, "mask_source") or "corrected").strip()
        if mask_source not in store.MASK_SOURCES:
            raise SegmentError(422, f"mask_source must be one of: {', '.join(store.MASK_SOURCES)}")
        replace = (form_field(parts, "replace") or "").strip().lower() in ("1", "true", "yes")
        model_version = _model_version(form_field(parts, "model_version"))
        prompts = _prompts(form_field(parts, "prompts"))
        decoded = await run_in_threadpool(
            partial(decode_upload, image_bytes, frame=frame, max_pixels=settings.max_image_pixels)
        )
        mask = await run_in_threadpool(store.decode_mask, mask_bytes, (decoded.height, decoded.width))
    except (SegmentError, ImageError) as error:
        raise HTTPException(error.status_code, detail=error.detail) from None

    def save() -> Correction:
        try:
            row = store.save_correction(
                session,
                settings.corrections_dir,
                decoded,
                mask,
                mask_source=mask_source,
                model_version=model_version,
                prompts=prompts,
                replace=replace,
                keep_dicom=settings.corrections_keep_dicom,
                source_bytes=image_bytes,
            )
            session.commit()
        except BaseException:
            session.rollback()
            raise
        session.refresh(row)
        return row

    try:
        row = await run_in_threadpool(save)
    except store.DuplicateCorrection as duplicate:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"this image is saved already as correction {duplicate.existing.id}; "
            "send replace=true to replace its mask",
        ) from None
    except OSError as error:  # the folder is full or not writable: nothing was moved into place
        log.error("a correction could not be written (%s)", type(error).__name__)
        raise HTTPException(
            status.HTTP_507_INSUFFICIENT_STORAGE,
            detail=f"the corrections folder could not be written ({type(error).__name__}); nothing was saved",
        ) from None
    except IntegrityError:  # the same image saved by a concurrent request a moment earlier
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail="this image is being saved by another request; retry with replace=true",
        ) from None
    except ImageError as error:
        raise HTTPException(error.status_code, detail=error.detail) from None
    log.info("saved correction %s (%s mask)", row.id, row.mask_source)
    return CorrectionRead.model_validate(row)


@router.get("/corrections", response_model=CorrectionList, summary="Saved corrections, newest first")
def list_corrections(
    _: AdminDep,
    settings: SettingsDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: OffsetQuery = 0,
) -> CorrectionList:
    rows = store.list_corrections(session, limit=limit, offset=offset)
    return CorrectionList(
        items=[CorrectionRead.model_validate(row) for row in rows],
        total=store.count_corrections(session),
        folder=str(settings.corrections_dir),
    )


@router.get(
    "/corrections/{correction_id}",
    response_model=CorrectionRead,
    summary="One saved correction",
    responses=NOT_FOUND_RESPONSE,
)
def get_correction(_: AdminDep, correction_id: RecordIdPath, session: SessionDep) -> CorrectionRead:
    return CorrectionRead.model_validate(_correction_or_404(session, correction_id))


@router.get(
    "/corrections/{correction_id}/{part}.png",
    summary="The saved image or mask as PNG",
    responses={**NOT_FOUND_RESPONSE, 200: {"content": {"image/png": {}}}},
    response_class=Response,
)
def correction_file(
    _: AdminDep, correction_id: RecordIdPath, part: str, settings: SettingsDep, session: SessionDep
) -> Response:
    if part not in ("image", "mask"):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="ask for image.png or mask.png")
    files = store.files_of(settings.corrections_dir, _correction_or_404(session, correction_id))
    path = files.image if part == "image" else files.mask
    if not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"the {part} file of correction {correction_id} is missing"
        )
    return Response(path.read_bytes(), media_type="image/png")


@router.delete(
    "/corrections/{correction_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a saved correction (row and files)",
    responses=NOT_FOUND_RESPONSE,
)
def delete_correction(
    _: AdminDep, correction_id: RecordIdPath, settings: SettingsDep, session: SessionDep
) -> Response:
    store.delete_correction(session, settings.corrections_dir, _correction_or_404(session, correction_id))
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
