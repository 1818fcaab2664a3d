"""The segmentation of one job: decode, coarse + refined masks (embedding cache), encode.

Runs in a worker thread (:class:`~backend.app.serving.admission.Admission`). A server-side LRU
keyed by a hash of the decoded pixels keeps image embeddings, so the same image with new
clinician prompts skips the image encoder.
"""

from __future__ import annotations

import base64
import logging
import math
import time

import numpy as np

from backend.app.imaging import DecodedImage, ImageError, decode_image, mask_bbox, mask_to_png
from backend.app.imaging.base import PROCESS_EXITS
from backend.app.metrics import EMBEDDING_CACHE, SEGMENT_ERRORS, STAGE_LATENCY
from backend.app.schemas.segment import BatchItem, MaskResult, PromptsUsed, SegmentResponse, StageTimings
from backend.app.serving.errors import SegmentError
from backend.app.serving.jobs import Job, JobResult
from backend.app.serving.prompts import check_prompt_ranges

log = logging.getLogger(__name__)


def decode_upload(
    data: bytes,
    *,
    frame: int | None,
    max_pixels: int,
    content_type: str | None = None,
    filename: str | None = None,
) -> DecodedImage:
    """:func:`~backend.app.imaging.decode_image`, with any unexpected decoder failure turned into
    an :class:`ImageError` (a bad input, never a 500; only the exception type is logged)."""
    try:
        return decode_image(
            data, frame=frame, max_pixels=max_pixels, content_type=content_type, filename=filename
        )
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("the image is too large to decode in memory", 413) from None
    except BaseException as error:  # an unexpected decoder failure (a native panic too) is a bad input
        if isinstance(error, PROCESS_EXITS):
            raise
        log.warning("image decoder failed unexpectedly (%s)", type(error).__name__)
        raise ImageError(f"the image could not be decoded ({type(error).__name__})", 422) from None


def _decode(job: Job, max_pixels: int) -> DecodedImage:
    return decode_upload(
        job.data,
        frame=job.frame,
        max_pixels=max_pixels,
        content_type=job.content_type,
        filename=job.filename,
    )


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
    if job.include_image and job.output == "json":
        from backend.app.imaging import to_display_png

        response.image_png = base64.b64encode(to_display_png(decoded.pixels)).decode("ascii")
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
