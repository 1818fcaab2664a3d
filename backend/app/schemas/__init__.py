"""Pydantic request/response models of the API."""

from backend.app.schemas.segment import (
    BatchItem,
    BatchResponse,
    ErrorResponse,
    HealthResponse,
    MaskResult,
    PromptsUsed,
    ReadyResponse,
    SegmentResponse,
    StageTimings,
)

__all__ = [
    "BatchItem",
    "BatchResponse",
    "ErrorResponse",
    "HealthResponse",
    "MaskResult",
    "PromptsUsed",
    "ReadyResponse",
    "SegmentResponse",
    "StageTimings",
]
