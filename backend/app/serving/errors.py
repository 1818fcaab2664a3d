"""The error a ``/segment`` request is answered with (status, JSON detail, headers)."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from backend.app.imaging import ImageError
from backend.app.metrics import SEGMENT_ERRORS

log = logging.getLogger(__name__)


class SegmentError(Exception):
    """A request problem answered with ``status_code`` and a JSON ``{"detail": ...}``."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def error_response(error: SegmentError | ImageError) -> JSONResponse:
    """The JSON answer to a refused request; a 4xx (bad input, not load) is also logged on one
    line with its detail, which names what was wrong and never holds patient data."""
    SEGMENT_ERRORS.labels(status=str(error.status_code)).inc()
    if 400 <= error.status_code < 500:
        log.info("rejected a segmentation request: %d (%s)", error.status_code, error.detail)
    return JSONResponse(
        {"detail": error.detail}, status_code=error.status_code, headers=getattr(error, "headers", None)
    )
