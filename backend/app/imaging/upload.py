"""The decoder's entry point: uploaded bytes → the kind the bytes say → the raster or DICOM decoder."""

from __future__ import annotations

from backend.app.imaging.base import DecodedImage, ImageError, UnsupportedImageError, sniff_kind
from backend.app.imaging.dicom import decode_dicom
from backend.app.imaging.raster import decode_raster


def decode_image(
    data: bytes,
    *,
    frame: int | None = None,
    max_pixels: int = 40_000_000,
    content_type: str | None = None,
    filename: str | None = None,
) -> DecodedImage:
    """Decode an uploaded file (bytes) into one :class:`DecodedImage` frame.

    ``frame`` selects a frame of a multi-frame DICOM or multi-page TIFF (0-based, default 0).
    ``content_type``/``filename`` only help to recognise DICOM files written without the
    128-byte preamble; the bytes themselves decide the format.
    """
    if not data:
        raise ImageError("the uploaded file is empty", 422)
    if frame is not None and frame < 0:
        raise ImageError(f"frame must be >= 0, got {frame}", 422)
    kind = sniff_kind(data)
    if kind is None and _looks_like_dicom_hint(content_type, filename):
        kind = "dicom"
    if kind is None:
        raise UnsupportedImageError(
            "unsupported file type: expected PNG, JPEG, BMP, TIFF or DICOM (Part 10) data", 415
        )
    if kind == "dicom":
        return decode_dicom(data, frame=frame, max_pixels=max_pixels)
    return decode_raster(data, frame=frame, max_pixels=max_pixels)


def _looks_like_dicom_hint(content_type: str | None, filename: str | None) -> bool:
    ct = (content_type or "").split(";")[0].strip().lower()
    name = (filename or "").lower()
    return ct == "application/dicom" or name.endswith((".dcm", ".dicom"))
