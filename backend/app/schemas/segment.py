"""Response models of ``/segment``, ``/segment/batch``, ``/health`` and ``/ready``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_MASK_EXAMPLE = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAAAAABX3VL4AAAADklEQVR4nGP4z8DAwMAAAA0AAf9N1BS9AAAAAElFTkSuQmCC"
)


class MaskResult(BaseModel):
    """One binary lesion mask at the original image size."""

    mask_png: str = Field(
        ...,
        description="Base64 8-bit PNG at the original width×height: 255 lesion, 0 background.",
        examples=[_MASK_EXAMPLE],
    )
    area_px: int = Field(..., ge=0, description="Lesion area in pixels.", examples=[5321])
    area_mm2: float | None = Field(
        None,
        description="Lesion area in mm² when the pixel spacing is known (DICOM PixelSpacing or "
        "ultrasound regions), else null.",
        examples=[42.6],
    )
    bbox: list[int] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="[x0, y0, x1, y1] inclusive pixel bounds of the mask, null when it is empty.",
        examples=[[120, 88, 231, 170]],
    )
    iou_pred: float | None = Field(
        None,
        description="The refiner's predicted IoU of this mask (null for the coarse mask).",
        examples=[0.91],
    )


class StageTimings(BaseModel):
    model_config = ConfigDict(extra="allow")

    decode: float = Field(..., description="Upload → pixels (ms).")
    preprocess: float = Field(..., description="Resizing/normalisation for both networks (ms).")
    coarse: float = Field(..., description="TransUNet forward (ms).")
    encoder: float = Field(..., description="Refiner image encoder (ms); ~0 on an embedding-cache hit.")
    decoder: float = Field(..., description="Prompt encoder + mask decoder + resampling (ms).")
    encode_response: float = Field(..., description="Masks → PNG/base64 (ms).")
    total: float = Field(..., description="Whole request processing, excluding queueing (ms).")
    queue: float = Field(0.0, description="Time spent waiting for a free worker slot (ms).")


class PromptsUsed(BaseModel):
    points: list[list[float]] | None = Field(None, description="Points [x, y] (native pixels).")
    point_labels: list[int] | None = Field(None, description="1 lesion, 0 background.")
    box: list[float] | None = Field(None, description="[x0, y0, x1, y1] (native pixels).")
    source: str = Field(
        ..., description="'clinician' (points/box given) or 'coarse' (derived from the mask)."
    )


class SegmentResponse(BaseModel):
    """Coarse (TransUNet) and refined (SAM-family refiner) lesion masks of one image."""

    model_version: str = Field(..., examples=["compact-litemedsam-20250101T120000Z"])
    width: int = Field(..., ge=1, examples=[562])
    height: int = Field(..., ge=1, examples=[471])
    frame: int = Field(0, ge=0, description="Frame that was segmented (multi-frame DICOM/TIFF).")
    n_frames: int = Field(1, ge=1, description="Frames in the uploaded file.")
    pixel_spacing_mm: list[float] | None = Field(
        None, description="[row, column] spacing in mm, when known.", examples=[[0.08, 0.08]]
    )
    coarse: MaskResult
    refined: MaskResult
    prompts: PromptsUsed | None = None
    timings_ms: StageTimings
    embedding_cached: bool = Field(
        ...,
        description="True when the image embedding came from the server cache (false also when the "
        "encoder was not needed: no coarse lesion and no clinician prompt).",
    )
    image_png: str | None = Field(
        None,
        description="With include_image=true: the segmented frame as an 8-bit PNG (base64), as the "
        "server decoded it (DICOM LUTs applied, MONOCHROME1 inverted), for display.",
    )


class BatchItem(BaseModel):
    """The result of one file of a batch: ``result`` or an ``error`` (status + detail)."""

    index: int = Field(..., ge=0, description="Position of the file in the request.")
    filename: str | None = Field(None, description="The part's filename as sent by the client.")
    status_code: int = Field(..., description="200, or the status a single /segment would have answered.")
    result: SegmentResponse | None = None
    detail: str | None = Field(None, description="Why this file failed.")


class BatchResponse(BaseModel):
    model_version: str
    items: list[BatchItem]
    n_ok: int
    n_failed: int


class ErrorResponse(BaseModel):
    detail: str = Field(..., examples=["the uploaded file is empty"])


class HealthResponse(BaseModel):
    status: str = Field("ok", examples=["ok"])


class ReadyResponse(BaseModel):
    ready: bool
    model_version: str | None = Field(None, examples=["compact-litemedsam-untrained"])
    model_source: str | None = Field(None, description="settings, store, default or explicit.")
    untrained: bool | None = None
    inference_engine: str | None = Field(None, examples=["torch"])
    store: bool = Field(..., description="Whether the run store was initialised.")
    embedding_cache_items: int = 0
    queue_depth: int = 0
    in_flight: int = 0
