"""OpenAPI descriptions of ``/segment`` and ``/segment/batch`` (answers and multipart bodies)."""

from __future__ import annotations

from typing import Any

from backend.app.schemas.segment import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
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

SEGMENT_BODY = {
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

BATCH_BODY = {
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

SEGMENT_200 = {
    "description": "Masks as JSON (default), an overlay PNG (format=png) or a DICOM SEG (format=dicom-seg).",
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
    },
}
