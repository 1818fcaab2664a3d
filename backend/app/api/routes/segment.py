"""``POST /segment`` and ``POST /segment/batch``: coarse and refined lesion masks.

The multipart body is read here, from the request stream, into memory with a hard size limit
(``Content-Length`` checked first, then the bytes counted while streaming): an upload is never
spooled to a temporary file, and nothing about it is logged. Decoding and inference run in worker
threads bounded by ``settings.max_concurrency``; at most ``settings.max_queue`` requests wait for
a slot, and beyond that the answer is 503 with ``Retry-After``.

A server-side LRU keyed by a hash of the decoded pixels keeps image embeddings, so sending the same
image again with new clinician prompts skips the image encoder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from backend.app.api.deps import ModelHolderDep, RequireApiKey, SettingsDep
from backend.app.api.routes.health import (
    EMBEDDING_CACHE,
    IN_FLIGHT,
    QUEUE_DEPTH,
    REJECTED,
    SEGMENT_ERRORS,
    STAGE_LATENCY,
)
from backend.app.imaging import DecodedImage, ImageError, decode_image, mask_bbox, mask_to_png, sniff_kind
from backend.app.schemas.segment import (
    BatchItem,
    BatchResponse,
    ErrorResponse,
    MaskResult,
    PromptsUsed,
    SegmentResponse,
    StageTimings,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Room for the multipart envelope and the small text fields on top of the file limit.
_ENVELOPE_BYTES = 256 * 1024
_MAX_FIELD_BYTES = 64 * 1024
_MAX_PARTS = 256

OutputFormat = Literal["json", "png", "dicom-seg"]
SegmentsChoice = Literal["both", "refined"]


# ============================================================================ errors and admission


class SegmentError(Exception):
    """A request problem answered with ``status_code`` and a JSON ``{"detail": ...}``."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def error_response(error: SegmentError | ImageError) -> JSONResponse:
    SEGMENT_ERRORS.labels(status=str(error.status_code)).inc()
    return JSONResponse(
        {"detail": error.detail}, status_code=error.status_code, headers=getattr(error, "headers", None)
    )


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


# ============================================================================ multipart reading


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)


async def read_multipart(request: Request, *, limit_bytes: int, file_limit_bytes: int) -> list[Part]:
    """Stream-parse a ``multipart/form-data`` body into memory, enforcing every size limit."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise SegmentError(
            415, "the request body must be multipart/form-data with the image in a part named 'file'"
        )
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise SegmentError(400, "the multipart/form-data content type has no valid boundary")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise SegmentError(400, "invalid Content-Length header") from None
        if declared_bytes > limit_bytes:
            raise SegmentError(
                413, f"the upload is {declared_bytes} bytes, above the limit of {limit_bytes} bytes"
            )

    parts: list[Part] = []
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[str, bytes] = {}
    current: Part | None = None
    problem: list[SegmentError] = []

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).decode("latin-1").lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal current
        disposition, params = parse_options_header(headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            problem.append(
                SegmentError(400, "a multipart part lacks a form-data Content-Disposition with a name")
            )
            current = Part(name="", filename=None, content_type=None)
            return
        filename = params.get(b"filename")
        ctype = headers.get("content-type")
        current = Part(
            name=params[b"name"].decode("utf-8", "replace"),
            filename=filename.decode("utf-8", "replace") if filename is not None else None,
            content_type=ctype.decode("latin-1") if ctype else None,
        )
        if len(parts) >= _MAX_PARTS:
            problem.append(SegmentError(413, f"too many multipart parts (more than {_MAX_PARTS})"))
        parts.append(current)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if current is None:
            return
        current.data.extend(data[start:end])
        is_file = current.filename is not None or current.name in ("file", "files")
        limit = file_limit_bytes if is_file else _MAX_FIELD_BYTES
        if len(current.data) > limit and not problem:
            what = "file" if is_file else f"form field {current.name!r}"
            problem.append(SegmentError(413, f"the {what} is larger than the limit of {limit} bytes"))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
        max_header_count=16,
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit_bytes:
                raise SegmentError(413, f"the upload is larger than the limit of {limit_bytes} bytes")
            if chunk:
                parser.write(chunk)
            if problem:
                raise problem[0]
        parser.finalize()
    except SegmentError:
        raise
    except Exception as error:  # python-multipart raises its own errors on malformed bodies
        raise SegmentError(400, f"malformed multipart/form-data body ({type(error).__name__})") from None
    if problem:
        raise problem[0]
    if received == 0:
        raise SegmentError(
            400, "the request body is empty: send the image as multipart/form-data part 'file'"
        )
    return parts


def _field(parts: list[Part], name: str) -> str | None:
    for part in parts:
        if part.name == name and part.filename is None:
            try:
                return part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise SegmentError(400, f"form field {name!r} is not UTF-8 text") from None
    return None


def _frame(query_value: int | None, parts: list[Part]) -> int | None:
    form_value = _field(parts, "frame")
    if form_value is None or form_value.strip() == "":
        return query_value
    try:
        value = int(form_value.strip())
    except ValueError:
        raise SegmentError(422, "frame must be a non-negative integer") from None
    if value < 0:
        raise SegmentError(422, "frame must be a non-negative integer")
    return value


# ============================================================================ prompts


@dataclass
class ClinicianPrompts:
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    box: list[float] | None = None

    @property
    def given(self) -> bool:
        return self.points is not None or self.box is not None


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_points(raw: str | None, max_points: int) -> tuple[list[list[float]], list[int]] | None:
    """``[[x, y, label], ...]`` (label 1 lesion / 0 background; ``[x, y]`` means label 1)."""
    if raw is None or raw.strip() == "":
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise SegmentError(400, "points is not valid JSON: expected [[x, y, label], ...]") from None
    if not isinstance(value, list) or not value:
        raise SegmentError(422, "points must be a non-empty JSON list [[x, y, label], ...]")
    if len(value) > max_points:
        raise SegmentError(422, f"too many points: {len(value)} (at most {max_points})")
    points: list[list[float]] = []
    labels: list[int] = []
    for index, item in enumerate(value):
        if not isinstance(item, list) or len(item) not in (2, 3) or not all(_finite_number(v) for v in item):
            raise SegmentError(422, f"points[{index}] must be [x, y] or [x, y, label] with finite numbers")
        label = item[2] if len(item) == 3 else 1
        if label not in (0, 1):
            raise SegmentError(422, f"points[{index}] label must be 1 (lesion) or 0 (background)")
        points.append([float(item[0]), float(item[1])])
        labels.append(int(label))
    return points, labels


def parse_box(raw: str | None) -> list[float] | None:
    """``[x0, y0, x1, y1]`` in native pixels."""
    if raw is None or raw.strip() == "":
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise SegmentError(400, "box is not valid JSON: expected [x0, y0, x1, y1]") from None
    if not isinstance(value, list) or len(value) != 4 or not all(_finite_number(v) for v in value):
        raise SegmentError(422, "box must be a JSON list [x0, y0, x1, y1] of 4 finite numbers")
    x0, y0, x1, y1 = (float(v) for v in value)
    if x0 == x1 or y0 == y1:
        raise SegmentError(422, "box has zero width or height")
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def check_prompt_ranges(prompts: ClinicianPrompts, width: int, height: int) -> None:
    if prompts.points is not None:
        for index, (x, y) in enumerate(prompts.points):
            if not (0 <= x <= width and 0 <= y <= height):
                raise SegmentError(
                    422, f"points[{index}] = ({x:g}, {y:g}) is outside the {width}×{height} image"
                )
    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise SegmentError(422, f"box {prompts.box} is outside the {width}×{height} image")


# ============================================================================ one segmentation


@dataclass
class Job:
    data: bytes
    filename: str | None
    content_type: str | None
    frame: int | None
    prompts: ClinicianPrompts
    output: OutputFormat = "json"
    segments: SegmentsChoice = "both"


@dataclass
class JobResult:
    response: SegmentResponse
    payload: bytes | None = None  # PNG overlay or DICOM SEG bytes


def _decode(job: Job, max_pixels: int) -> DecodedImage:
    try:
        return decode_image(
            job.data,
            frame=job.frame,
            max_pixels=max_pixels,
            content_type=job.content_type,
            filename=job.filename,
        )
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("the image is too large to decode in memory", 413) from None
    except Exception as error:  # an unexpected decoder failure is still a bad input, never a 500
        log.warning("image decoder failed unexpectedly (%s)", type(error).__name__)
        raise ImageError(f"the image could not be decoded ({type(error).__name__})", 422) from None


def _mask_result(
    mask: np.ndarray, spacing: tuple[float, float] | None, iou: float | None, *, encode: bool = True
) -> MaskResult:
    area = int(mask.sum())
    if iou is not None and not math.isfinite(iou):
        iou = None
    return MaskResult(
        mask_png=base64.b64encode(mask_to_png(mask)).decode("ascii") if encode else "",
        area_px=area,
        area_mm2=round(area * spacing[0] * spacing[1], 4) if spacing else None,
        bbox=mask_bbox(mask),
        iou_pred=iou,
    )


def run_job(holder, settings, job: Job) -> JobResult:
    """Decode, segment and encode one image (runs in a worker thread)."""
    started = time.perf_counter()
    decoded = _decode(job, settings.max_image_pixels)
    decode_ms = (time.perf_counter() - started) * 1000.0
    check_prompt_ranges(job.prompts, decoded.width, decoded.height)
    if job.output == "dicom-seg" and decoded.kind != "dicom":
        raise SegmentError(415, "format=dicom-seg needs a DICOM upload; this file is " + decoded.kind.upper())

    served = holder.snapshot()
    predictor = served.predictor
    mark = time.perf_counter()
    key = holder.embedding_key(served, decoded.pixel_hash())
    hash_ms = (time.perf_counter() - mark) * 1000.0
    embedding = holder.cache.get(key)
    cached = embedding is not None
    try:
        # The coarse model runs first: on an image where it finds no lesion (and no clinician
        # prompt asks for one) the image encoder is not run at all; its embedding is computed,
        # and cached, when a later request with prompts needs it.
        prompts = job.prompts
        prediction = predictor.predict(
            decoded.pixels,
            embedding=embedding,
            points=prompts.points,
            point_labels=prompts.point_labels,
            box=prompts.box,
        )
        if prediction.embedding is not None:
            holder.cache.put(key, prediction.embedding)
        # "unused": nothing to refine, so the encoder was not needed (not a miss).
        outcome = "hit" if cached else "miss" if prediction.embedding is not None else "unused"
        EMBEDDING_CACHE.labels(result=outcome).inc()
    except ValueError as error:  # the model refused this input (shape, prompts)
        log.warning("the model rejected an input (%s)", type(error).__name__)
        raise SegmentError(422, f"the model could not process this image ({type(error).__name__})") from None

    mark = time.perf_counter()
    coarse_mask = prediction.coarse_probs >= 0.5
    refined_mask = prediction.refined_probs >= 0.5
    spacing = decoded.pixel_spacing_mm
    used = prediction.prompts or {}
    response = SegmentResponse(
        model_version=served.model_version,
        width=decoded.width,
        height=decoded.height,
        frame=decoded.frame,
        n_frames=decoded.n_frames,
        pixel_spacing_mm=list(spacing) if spacing else None,
        coarse=_mask_result(coarse_mask, spacing, None, encode=job.output == "json"),
        refined=_mask_result(refined_mask, spacing, float(prediction.iou), encode=job.output == "json"),
        prompts=PromptsUsed(
            points=used.get("points"),
            point_labels=used.get("point_labels"),
            box=used.get("box"),
            source="clinician" if job.prompts.given else "coarse",
        ),
        timings_ms=StageTimings(
            decode=0, preprocess=0, coarse=0, encoder=0, decoder=0, encode_response=0, total=0
        ),
        embedding_cached=cached,
    )
    payload = None
    if job.output == "png":
        from backend.app.imaging import overlay_png

        payload = overlay_png(decoded.pixels, coarse_mask, refined_mask)
    elif job.output == "dicom-seg":
        from backend.app.dicom_seg import build_dicom_seg

        payload = build_dicom_seg(
            decoded, coarse_mask, refined_mask, model_version=served.model_version, segments=job.segments
        )
    encode_ms = (time.perf_counter() - mark) * 1000.0

    model_ms = prediction.timings_ms
    timings = StageTimings(
        decode=round(decode_ms, 2),
        preprocess=round(model_ms.get("preprocess", 0.0) + hash_ms, 2),
        coarse=round(model_ms.get("coarse", 0.0), 2),
        encoder=round(model_ms.get("encoder", 0.0), 2),
        decoder=round(model_ms.get("decoder", 0.0), 2),
        encode_response=round(encode_ms, 2),
        total=round((time.perf_counter() - started) * 1000.0, 2),
    )
    response.timings_ms = timings
    for stage, value in timings.model_dump().items():
        if stage != "queue":
            STAGE_LATENCY.labels(stage=stage).observe(value / 1000.0)
    return JobResult(response=response, payload=payload)


def run_batch(holder, settings, jobs: list[tuple[int, Job]]) -> list[BatchItem]:
    items = []
    for index, job in jobs:
        try:
            result = run_job(holder, settings, job)
            items.append(
                BatchItem(index=index, filename=job.filename, status_code=200, result=result.response)
            )
        except (SegmentError, ImageError) as error:
            SEGMENT_ERRORS.labels(status=str(error.status_code)).inc()
            items.append(
                BatchItem(
                    index=index, filename=job.filename, status_code=error.status_code, detail=error.detail
                )
            )
    return items


# ============================================================================ routes

router = APIRouter(tags=["segment"], dependencies=[RequireApiKey])

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed multipart body or prompt JSON."},
    401: {
        "model": ErrorResponse,
        "description": "Missing or invalid X-API-Key (when the server requires one).",
    },
    413: {"model": ErrorResponse, "description": "Upload or image dimensions above the limits."},
    415: {"model": ErrorResponse, "description": "Not multipart, or not PNG/JPEG/BMP/TIFF/DICOM data."},
    422: {"model": ErrorResponse, "description": "Undecodable image, no pixel data, bad frame or prompts."},
    503: {"model": ErrorResponse, "description": "Queue full (see Retry-After) or model not loaded."},
}

_SEGMENT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "PNG, JPEG, BMP, TIFF or DICOM (Part 10) image.",
                    },
                    "frame": {"type": "integer", "minimum": 0, "description": "Frame of a multi-frame file."},
                    "points": {
                        "type": "string",
                        "description": "JSON [[x, y, label], ...] in native pixels "
                        "(label 1 lesion, 0 background).",
                        "example": "[[250, 180, 1], [40, 40, 0]]",
                    },
                    "box": {
                        "type": "string",
                        "description": "JSON [x0, y0, x1, y1] in native pixels.",
                        "example": "[200, 130, 320, 230]",
                    },
                },
            },
            "encoding": {
                "file": {"contentType": "image/png, image/jpeg, image/bmp, image/tiff, application/dicom"}
            },
        }
    },
}

_BATCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "format": "binary"},
                        "description": "Several images (PNG, JPEG, BMP, TIFF or DICOM).",
                    },
                    "frame": {"type": "integer", "minimum": 0},
                },
            }
        }
    },
}

_SEGMENT_200 = {
    "description": "Masks as JSON (default), an overlay PNG (format=png) or a DICOM SEG (format=dicom-seg).",
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _limit(megabytes: float) -> int:
    return int(megabytes * MIB)


def _single_job(parts, settings, format, segments, frame, points, box) -> Job:
    """The one image of a ``/segment`` request (with its clinician prompts) as a :class:`Job`."""
    files = [p for p in parts if p.name == "file"]
    if not files:
        raise SegmentError(422, "missing multipart part 'file' with the image")
    if len(files) > 1:
        raise SegmentError(422, "send exactly one part 'file' (use /segment/batch for several images)")
    upload = files[0]
    point_prompt = parse_points(_field(parts, "points") or points, settings.max_points)
    job = Job(
        data=bytes(upload.data),
        filename=upload.filename,
        content_type=upload.content_type,
        frame=_frame(frame, parts),
        prompts=ClinicianPrompts(
            points=point_prompt[0] if point_prompt else None,
            point_labels=point_prompt[1] if point_prompt else None,
            box=parse_box(_field(parts, "box") or box),
        ),
        output=format,
        segments=segments,
    )
    upload.data.clear()
    if format == "dicom-seg" and job.data and sniff_kind(job.data) not in (None, "dicom"):
        raise SegmentError(415, "format=dicom-seg needs a DICOM upload; this file is not DICOM")
    return job


@asynccontextmanager
async def _admitted(request: Request) -> AsyncIterator[Admission]:
    """A slot of the request admission (503 ``SegmentError`` when the queue is full), released on exit."""
    admission: Admission = request.app.state.admission
    admission.enter()
    try:
        yield admission
    finally:
        admission.leave()


async def _read_parts(request: Request, settings, total_mb: float) -> list:
    """The multipart parts: at most ``total_mb`` in all, each file at most ``max_upload_mb``."""
    return await read_multipart(
        request,
        limit_bytes=_limit(total_mb) + _ENVELOPE_BYTES,
        file_limit_bytes=_limit(settings.max_upload_mb),
    )


def _batch_jobs(parts, settings, frame) -> list[tuple[int, Job]]:
    """The images of a ``/segment/batch`` request as indexed :class:`Job` s."""
    uploads = [p for p in parts if p.name in ("files", "file")]
    if not uploads:
        raise SegmentError(422, "missing multipart parts 'files' with the images")
    if len(uploads) > settings.max_batch_files:
        raise SegmentError(413, f"too many files: {len(uploads)} (at most {settings.max_batch_files})")
    frame_value = _frame(frame, parts)
    jobs = [
        (
            index,
            Job(
                data=bytes(part.data),
                filename=part.filename,
                content_type=part.content_type,
                frame=frame_value,
                prompts=ClinicianPrompts(),
            ),
        )
        for index, part in enumerate(uploads)
    ]
    for part in uploads:
        part.data.clear()
    return jobs


@router.post(
    "/segment",
    response_model=SegmentResponse,
    summary="Coarse and refined lesion masks of one image",
    responses={200: _SEGMENT_200, **_ERROR_RESPONSES},
    openapi_extra={"requestBody": _SEGMENT_BODY},
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
):
    """Segment one ultrasound image: the TransUNet **coarse** mask and the refiner's **refined** mask.

    Send the image as multipart part `file`. Optional clinician prompts (`points`, `box`, native
    pixel coordinates) replace the prompts derived from the coarse mask. A repeated image reuses its
    cached embedding (`embedding_cached: true`), so new prompts on the same image are fast.
    """
    try:
        async with _admitted(request) as admission:
            parts = await _read_parts(request, settings, settings.max_upload_mb)
            result, queue_ms = await admission.run(
                run_job, holder, settings, _single_job(parts, settings, format, segments, frame, points, box)
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
    responses=_ERROR_RESPONSES,
    openapi_extra={"requestBody": _BATCH_BODY},
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
        async with _admitted(request) as admission:
            parts = await _read_parts(request, settings, settings.max_batch_upload_mb)
            items, _ = await admission.run(run_batch, holder, settings, _batch_jobs(parts, settings, frame))
    except (SegmentError, ImageError) as error:
        return error_response(error)
    n_ok = sum(1 for item in items if item.status_code == 200)
    return BatchResponse(
        model_version=holder.model_version or "", items=items, n_ok=n_ok, n_failed=len(items) - n_ok
    )
