"""What every part of the upload decoder shares: the kinds of file, the errors (each carrying the
HTTP status to answer), the decoded frame, and the silencing of decoder logs."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ImageKind = Literal["png", "jpeg", "bmp", "tiff", "dicom"]

#: Content types accepted for each kind (informative; the bytes decide, not the header).
CONTENT_TYPES: dict[str, ImageKind] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/bmp": "bmp",
    "image/x-ms-bmp": "bmp",
    "image/tiff": "tiff",
    "application/dicom": "dicom",
}


def silence_decoder_logs() -> None:
    """Keep decoder chatter out of the logs: pydicom/highdicom/Pillow messages and warnings can
    quote header values (patient names, IDs). Idempotent; called at import and by the app."""
    for name in ("pydicom", "highdicom", "PIL"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL)
        logger.propagate = False
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom|PIL)(\.|$)")
    warnings.filterwarnings("ignore", module=r"backend\.app\.(imaging(\.\w+)?|dicom_seg)$")
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


#: Exceptions that stop the process, never an input's fault: a decoder guard catching every other
#: ``BaseException`` (a native decoder's PyO3 ``PanicException`` is one) lets these through.
PROCESS_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)


class ImageError(ValueError):
    """An upload that cannot be segmented; ``status_code`` is the HTTP status to answer."""

    status_code = 422

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code


class UnsupportedImageError(ImageError):
    status_code = 415


class ImageTooLargeError(ImageError):
    status_code = 413


@dataclass
class DecodedImage:
    """One decoded frame.

    ``pixels`` is ``H×W`` (uint8, uint16 or float32 after a modality/VOI LUT) or ``H×W×3`` uint8
    RGB. ``pixel_spacing_mm`` is (row spacing, column spacing) in mm, None when unknown.
    ``dataset`` is the parsed DICOM header (pixel data dropped) for DICOM input, else None.
    """

    pixels: np.ndarray
    kind: ImageKind
    frame: int = 0
    n_frames: int = 1
    pixel_spacing_mm: tuple[float, float] | None = None
    dataset: object | None = field(default=None, repr=False)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def pixel_hash(self) -> str:
        """SHA-256 of the decoded pixels (dtype + shape + bytes): the embedding-cache key."""
        array = np.ascontiguousarray(self.pixels)
        digest = hashlib.sha256()
        digest.update(f"{array.dtype.str}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
        return digest.hexdigest()


def sniff_kind(data: bytes) -> ImageKind | None:
    """The image kind from the magic bytes, or None.

    DICOM is tested first: its 128-byte preamble is free-form and is legally (and commonly, in
    files written by dcmtk and GDCM) a TIFF header, so ``DICM`` at offset 128 decides.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    return None


def to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    """Colour pixels of any integer depth → uint8 (16-bit data scaled from its full range)."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    high = float(array.max()) or 1.0
    scale = 255.0 / (65535.0 if high > 255 else 255.0)
    return np.clip(array * scale, 0, 255).astype(np.uint8)
