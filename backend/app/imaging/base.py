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


def has_part10_marker(data: bytes) -> bool:
    """``DICM`` at offset 128: a DICOM Part 10 file (preamble + file meta)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def sniff_kind(data: bytes) -> ImageKind | None:
    """The image kind from the magic bytes, or None.

    DICOM is tested first: its 128-byte preamble is free-form and is legally (and commonly, in
    files written by dcmtk and GDCM) a TIFF header, so ``DICM`` at offset 128 decides. A DICOM
    dataset written without the preamble (older toolkits, ``dcmconv --write-dataset``, PACS
    caches) has no magic at all; it is recognised last, by its structure
    (:func:`looks_like_raw_dataset`).
    """
    if has_part10_marker(data):
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM") and len(data) >= 26:
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if looks_like_raw_dataset(data):
        return "dicom"
    return None


#: Value representations of DICOM PS3.5 (explicit VR), and those with a reserved field and a
#: 4-byte length.
_VRS = frozenset(
    (
        b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN "
        b"SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    ).split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED_LENGTH = 0xFFFFFFFF


def looks_like_raw_dataset(data: bytes, elements: int = 4) -> bool:
    """Whether ``data`` starts like a DICOM dataset written without the Part 10 preamble.

    The first data element must be in the file-meta group (0002) or the identifying group (0008),
    where every dataset starts, and the first ``elements`` elements must parse — little-endian
    implicit or explicit VR, or big-endian explicit VR — with tags strictly ascending and lengths
    inside the data. Random bytes pass with a probability far below 1e-9; a PNG/JPEG/BMP/TIFF
    never reaches this test.
    """
    if len(data) < 8:
        return False
    return any(
        int.from_bytes(data[:2], order) in (0x0002, 0x0008) and _walks(data, order, explicit, elements)
        for order, explicit in (("little", True), ("little", False), ("big", True))
    )


def _walks(data: bytes, order: str, explicit: bool, elements: int) -> bool:
    def uint(start: int, size: int) -> int:
        return int.from_bytes(data[start : start + size], order)  # type: ignore[arg-type]

    offset, previous, seen = 0, -1, 0
    first_group = uint(0, 2)
    while seen < elements:
        if offset == len(data):
            return seen >= 2  # a tiny dataset that ended cleanly
        if offset + 8 > len(data):
            return False
        group = uint(offset, 2)
        tag = (group << 16) | uint(offset + 2, 2)
        if tag <= previous:
            return False
        if first_group == 0x0002 and group != 0x0002:
            return seen >= 1  # the file meta ended; the dataset may use another encoding
        if explicit:
            vr = data[offset + 4 : offset + 6]
            if vr not in _VRS:
                return False
            if vr in _LONG_VRS:
                if offset + 12 > len(data):
                    return False
                length, header = uint(offset + 8, 4), 12
            else:
                length, header = uint(offset + 6, 2), 8
        else:
            length, header = uint(offset + 4, 4), 8
        if length == _UNDEFINED_LENGTH:  # a sequence or encapsulated data: not walked into
            return seen >= 1
        offset += header + length
        if offset > len(data):
            return False
        previous, seen = tag, seen + 1
    return True


def to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    """Colour pixels of any integer depth → uint8 (16-bit data scaled from its full range)."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    high = float(array.max()) or 1.0
    scale = 255.0 / (65535.0 if high > 255 else 255.0)
    return np.clip(array * scale, 0, 255).astype(np.uint8)
