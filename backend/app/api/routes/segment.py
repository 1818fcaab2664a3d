"""``POST /segment`` and ``POST /segment/batch``: coarse and refined lesion masks.

Routes only: the request is admitted (:mod:`backend.app.serving.admission`), its multipart body
read into memory (:mod:`~backend.app.serving.multipart`), turned into jobs
(:mod:`~backend.app.serving.jobs`) and segmented in a worker thread
(:mod:`~backend.app.serving.service`); the OpenAPI texts are in
:mod:`backend.app.api.segment_openapi`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from backend.app.api.deps import ModelHolderDep, RequireApiKey, SettingsDep
from backend.app.api.segment_openapi import BATCH_BODY, ERROR_RESPONSES, SEGMENT_200, SEGMENT_BODY
from backend.app.imaging import ImageError
from backend.app.metrics import STAGE_LATENCY
from backend.app.schemas.segment import BatchResponse, SegmentResponse
from backend.app.serving.admission import admitted
from backend.app.serving.errors import SegmentError, error_response
from backend.app.serving.jobs import OutputFormat, SegmentsChoice, batch_jobs, single_job
from backend.app.serving.multipart import read_parts
from backend.app.serving.service import run_batch, run_job

router = APIRouter(tags=["segment"], dependencies=[RequireApiKey])


@router.post(
    "/segment",
    response_model=SegmentResponse,
    summary="Coarse and refined lesion masks of one image",
    responses={200: SEGMENT_200, **ERROR_RESPONSES},
    openapi_extra={"requestBody": SEGMENT_BODY},
)
async def segment(
    request: Request,
    response: Response,
    holder: ModelHolderDep,
    settings: SettingsDep,
    format: Annotated[
        OutputFormat,
        Query(description="json (default), png (contour overlay) or dicom-seg (DICOM input only)."),
    ] = "json",
    frame: Annotated[
        int | None, Query(ge=0, description="Frame of a multi-frame DICOM/TIFF (0-based).")
    ] = None,
    points: Annotated[
        str | None, Query(description="JSON [[x, y, label], ...] (native pixels); the form field wins.")
    ] = None,
    box: Annotated[
        str | None, Query(description="JSON [x0, y0, x1, y1] (native pixels); the form field wins.")
    ] = None,
    segments: Annotated[
        SegmentsChoice, Query(description="DICOM SEG content: both masks or the refined one only.")
    ] = "both",
    include_image: Annotated[
        bool, Query(description="JSON only: add the decoded frame as an 8-bit PNG (image_png), for display.")
    ] = False,
):
    """Segment one ultrasound image: the TransUNet **coarse** mask and the refiner's **refined** mask.

    Send the image as multipart part `file`. Optional clinician prompts (`points`, `box`, native
    pixel coordinates) replace the prompts derived from the coarse mask. A repeated image reuses its
    cached embedding (`embedding_cached: true`), so new prompts on the same image are fast.
    """
    try:
        async with admitted(request) as admission:
            parts = await read_parts(request, settings, settings.max_upload_mb)
            result, queue_ms = await admission.run(
                run_job,
                holder,
                settings,
                single_job(parts, settings, format, segments, frame, points, box, include_image),
            )
    except (SegmentError, ImageError) as error:
        return error_response(error)

    result.response.timings_ms.queue = round(queue_ms, 2)
    STAGE_LATENCY.labels(stage="queue").observe(queue_ms / 1000.0)
    headers = {
        "X-Model-Version": result.response.model_version,
        "X-Embedding-Cached": str(result.response.embedding_cached).lower(),
    }
    if format == "png":
        return Response(result.payload, media_type="image/png", headers=headers)
    if format == "dicom-seg":
        headers["Content-Disposition"] = 'attachment; filename="segmentation.dcm"'
        return Response(result.payload, media_type="application/dicom", headers=headers)
    response.headers.update(headers)
    return result.response


@router.post(
    "/segment/batch",
    response_model=BatchResponse,
    summary="Coarse and refined masks of several images",
    responses=ERROR_RESPONSES,
    openapi_extra={"requestBody": BATCH_BODY},
)
async def segment_batch(
    request: Request,
    holder: ModelHolderDep,
    settings: SettingsDep,
    frame: Annotated[int | None, Query(ge=0, description="Frame of multi-frame files (0-based).")] = None,
):
    """Segment several images (parts `files`): one result or one error per file, in order.

    A file that cannot be decoded does not fail the batch: its item carries the status code and
    detail that `/segment` would have answered.
    """
    try:
        async with admitted(request) as admission:
            parts = await read_parts(request, settings, settings.max_batch_upload_mb, file_part="files")
            items, _ = await admission.run(run_batch, holder, settings, batch_jobs(parts, settings, frame))
    except (SegmentError, ImageError) as error:
        return error_response(error)
    n_ok = sum(1 for item in items if item.status_code == 200)
    return BatchResponse(
        model_version=holder.model_version or "", items=items, n_ok=n_ok, n_failed=len(items) - n_ok
    )
