"""Decode uploaded images (PNG, JPEG, BMP, TIFF, DICOM) into arrays, safely and in memory.

Everything here works on bytes already held in memory: nothing is written to disk and nothing
about the image or the patient is logged. Each problem with the input raises an
:class:`ImageError` whose ``status_code`` is the HTTP answer (413 too large, 415 unsupported
type, 422 undecodable) and whose ``detail`` names the problem without echoing any content.

* Raster formats go through Pillow. The header is read first and the pixel count checked
  against the per-request ``max_pixels`` **before** any pixel is decoded (decompression bombs);
  Pillow's own global guard (:data:`PIL.Image.MAX_IMAGE_PIXELS`) is left untouched.
* DICOM goes through pydicom: MONOCHROME1 (inverted), MONOCHROME2, RGB, YBR_FULL and
  YBR_FULL_422 (converted to RGB), PALETTE COLOR, 8/16-bit; the Modality LUT (rescale) and the
  VOI LUT / window are applied when present; multi-frame images decode only the requested
  frame. The pixel spacing in mm comes from PixelSpacing, else ImagerPixelSpacing, else the
  SequenceOfUltrasoundRegions PhysicalDeltaX/Y (in cm).
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from backend.app import gdcm_isolation

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

_PIL_FORMATS: dict[str, ImageKind] = {
    "PNG": "png",
    "JPEG": "jpeg",
    "BMP": "bmp",
    "DIB": "bmp",
    "TIFF": "tiff",
}


def silence_decoder_logs() -> None:
    """Keep decoder chatter out of the logs: pydicom/highdicom/Pillow messages and warnings can
    quote header values (patient names, IDs). Idempotent; called at import and by the app."""
    for name in ("pydicom", "highdicom", "PIL"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL)
        logger.propagate = False
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom|PIL)(\.|$)")
    warnings.filterwarnings("ignore", module=r"backend\.app\.(imaging|dicom_seg)$")
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


# --------------------------------------------------------------------------- raster (Pillow)


def decode_raster(data: bytes, *, frame: int | None = None, max_pixels: int = 40_000_000) -> DecodedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # Our own per-request limit is checked below (Pillow's global warning is silenced).
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image dimensions exceed the decompression-bomb limit ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(
            "the file could not be identified as an image (corrupt or truncated header)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageError(f"the image header could not be read ({type(exc).__name__})") from None

    with image:
        kind = _PIL_FORMATS.get(image.format or "")
        if kind is None:
            raise UnsupportedImageError(f"unsupported image format {image.format!r}", 415)
        width, height = image.size
        if width < 2 or height < 2:
            raise ImageError(f"image is too small: {width}×{height} pixels (at least 2×2)")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}×{height} = {width * height} pixels, above the limit of {max_pixels} "
                "(decompression-bomb guard)"
            )
        n_frames = int(getattr(image, "n_frames", 1) or 1)
        index = 0 if frame is None else frame
        if index >= n_frames:
            raise ImageError(f"frame {index} is out of range: the image has {n_frames} frame(s)")
        try:
            if index:
                image.seek(index)
                if image.size[0] * image.size[1] > max_pixels:
                    raise ImageTooLargeError(f"frame {index} exceeds the pixel limit of {max_pixels}")
            image.load()
            if kind in ("jpeg", "tiff"):
                image = ImageOps.exif_transpose(image)
            pixels = _pil_to_array(image)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"image exceeds the decompression-bomb limit ({exc})") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as exc:
            raise ImageError(
                f"the {kind.upper()} image data could not be decoded: "
                f"truncated or corrupt ({type(exc).__name__})"
            ) from None
    return DecodedImage(pixels=pixels, kind=kind, frame=index, n_frames=n_frames)


def _pil_to_array(image) -> np.ndarray:
    mode = image.mode
    if mode in ("L",):
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode in ("I", "F"):
        return np.asarray(image).astype(np.float32)
    if mode in ("LA", "La"):
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    if mode == "P":
        # Palette images: gray palettes stay gray, others become RGB.
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return _collapse_gray(rgb)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return _collapse_gray(rgb)


def _collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """An RGB array whose channels are equal (typical ultrasound PNGs) → H×W gray."""
    if (
        rgb.ndim == 3
        and np.array_equal(rgb[..., 0], rgb[..., 1])
        and np.array_equal(rgb[..., 0], rgb[..., 2])
    ):
        return np.ascontiguousarray(rgb[..., 0])
    return np.ascontiguousarray(rgb)


# --------------------------------------------------------------------------- DICOM (pydicom)

_SUPPORTED_PHOTOMETRIC = {
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "PALETTE COLOR",
    "YBR_RCT",
    "YBR_ICT",
}


def read_dicom_header(data: bytes):
    """Parse a DICOM file held in memory (pixel data kept as raw bytes, not decoded)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=sniff_kind(data) != "dicom")
    except InvalidDicomError:
        raise ImageError("the file is not a valid DICOM Part 10 file") from None
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        raise ImageError(
            f"the DICOM file could not be parsed: truncated or corrupt ({type(exc).__name__})"
        ) from None
    _drop_unreadable(ds)
    return ds


def _drop_unreadable(ds) -> None:
    """Convert every element now, dropping those that cannot be read (an unknown value
    representation, a corrupt length, …) instead of letting the first later access fail: pydicom
    parses values lazily, so a broken element would otherwise surface wherever it is read (the
    SEG writer, the spacing), long after decoding said the file was fine. A dropped element that
    decoding needs is then reported as missing, by name."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
            items = list(element.value) if element.VR == "SQ" else []
        except Exception:
            del ds[tag]
            continue
        for item in items:
            _drop_unreadable(item)


def decode_dicom(data: bytes, *, frame: int | None = None, max_pixels: int = 40_000_000) -> DecodedImage:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    gdcm_isolation.keep_gdcm_out_of_process()  # GDCM aborts the process on some corrupt data
    ds = read_dicom_header(data)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError("the DICOM file has no pixel data (PixelData is missing)")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedImageError("float DICOM pixel data is not supported", 415)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError, KeyError):
        raise ImageError(
            "the DICOM image attributes are missing or invalid "
            "(Rows, Columns, BitsAllocated, PhotometricInterpretation)"
        ) from None
    if rows < 2 or columns < 2:
        raise ImageError(f"the DICOM image is too small: {columns}×{rows} pixels")
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"DICOM frame is {columns}×{rows} = {rows * columns} pixels, above the limit of {max_pixels}"
        )
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        # The value is not echoed: header values are the sender's data, not ours to repeat.
        raise UnsupportedImageError(
            "unsupported DICOM PhotometricInterpretation (supported: "
            + ", ".join(sorted(_SUPPORTED_PHOTOMETRIC))
            + ")",
            415,
        )
    index = 0 if frame is None else frame
    if index >= n_frames:
        raise ImageError(f"frame {index} is out of range: the DICOM image has {n_frames} frame(s)")
    syntax = _transfer_syntax(ds)

    try:
        array = _frame_array(ds, data, syntax, index if n_frames > 1 else None)
        if n_frames > 1 and array.ndim >= 3 and array.shape[0] == 1 and array.shape[1:3] != (rows, columns):
            array = array[0]
        if array.shape[:2] != (rows, columns):
            raise ValueError("unexpected pixel array shape")
        if photometric == "PALETTE COLOR":
            array = apply_color_lut(array, ds)
            array = _to_uint8_rgb(array)
        elif array.ndim == 3:
            # RGB (YBR_* are converted to RGB by pydicom's decoder).
            array = _to_uint8_rgb(array[..., :3])
        else:
            array = _apply_gray_luts(array, ds, index, apply_modality_lut, apply_voi_lut)
            if photometric == "MONOCHROME1":
                array = _invert(array)
    except ImageError:
        raise
    except NotImplementedError:
        raise UnsupportedImageError(
            f"the DICOM transfer syntax {_syntax_label(syntax)} cannot be decoded here", 415
        ) from None
    except RuntimeError as exc:
        # pydicom 3: every installed decoder of this (compressed) syntax failed on the data.
        if syntax.is_compressed and "plugins" in str(exc):
            raise UnsupportedImageError(
                f"the DICOM pixel data in transfer syntax {_syntax_label(syntax)} could not be decoded "
                "by any installed decoder (a variant they do not support, or corrupt data)",
                415,
            ) from None
        raise ImageError(
            f"the DICOM pixel data could not be decoded: truncated or inconsistent ({type(exc).__name__})"
        ) from None
    except MemoryError:
        raise ImageTooLargeError("the DICOM pixel data is too large to decode") from None
    except Exception as exc:  # truncated pixel data, bad LUTs, plugin errors ...
        raise ImageError(
            f"the DICOM pixel data could not be decoded: truncated or inconsistent ({type(exc).__name__})"
        ) from None
    except BaseException as exc:
        # A decoder written in Rust (pylibjpeg-rle) panics on some corrupt data, and PyO3 raises
        # that as ``PanicException``, a BaseException: the upload's problem, not the server's.
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise ImageError(
            f"the DICOM pixel data could not be decoded: truncated or inconsistent ({type(exc).__name__})"
        ) from None

    # Keep the header for DICOM-SEG output, without the (potentially large) pixel data.
    for keyword in ("PixelData",):
        if keyword in ds:
            del ds[keyword]
    return DecodedImage(
        pixels=np.ascontiguousarray(array),
        kind="dicom",
        frame=index,
        n_frames=n_frames,
        pixel_spacing_mm=dicom_pixel_spacing_mm(ds),
        dataset=ds,
    )


def _frame_array(ds, data: bytes, syntax, index: int | None) -> np.ndarray:
    """pydicom's in-process decoders, then GDCM in a child process when every one of them failed
    on compressed data (:mod:`backend.app.gdcm_isolation`); their error when that fails too."""
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index)
    except RuntimeError as exc:
        if not (syntax.is_compressed and "plugins" in str(exc)):
            raise
        array = gdcm_isolation.decode_frame(data, index, syntax)
        if array is None:
            raise
        return array


def _syntax_label(syntax) -> str:
    """``'JPEG Lossless, … (1.2.840.10008.1.2.4.70)'``: a registered syntax's name and UID.

    Only registered (public) transfer syntaxes are named; a private or malformed UID is not
    echoed back.
    """
    from pydicom.uid import AllTransferSyntaxes

    if str(syntax) in AllTransferSyntaxes:
        return f"{syntax.name} ({syntax})"
    return "(unregistered TransferSyntaxUID)"


def _native_syntax(ds):
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    if implicit:
        return ImplicitVRLittleEndian if little else None
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _transfer_syntax(ds):
    """The file's transfer syntax, with 415 when no installed decoder can read it."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    value = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if not value:
        # A file without (complete) file meta: the encoding pydicom read the data set in is the
        # only one it can have, as its pixel data is native (encapsulated data needs the meta).
        syntax = _native_syntax(ds)
        if syntax is None:
            raise ImageError("the DICOM file meta information lacks TransferSyntaxUID")
        ds.file_meta.TransferSyntaxUID = syntax
        value = syntax
    syntax = UID(str(value))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedImageError(
            f"the DICOM transfer syntax {_syntax_label(syntax)} has no pixel data decoder here; "
            "re-export the image uncompressed or as JPEG / JPEG-LS / JPEG 2000 / RLE",
            415,
        ) from None
    if not decoder.is_available:
        raise UnsupportedImageError(
            f"the DICOM transfer syntax {_syntax_label(syntax)} cannot be decoded: none of its decoder "
            "plugins is installed",
            415,
        )
    return syntax


def _apply_gray_luts(array: np.ndarray, ds, index: int, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    has_modality = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if not has_modality and not has_voi:
        if array.dtype in (np.uint8, np.uint16):
            return array
        return array.astype(np.float32)
    result = array
    if has_modality:
        result = apply_modality_lut(result, ds)
    if has_voi:
        result = apply_voi_lut(result, ds, index=0)
    result = np.asarray(result, dtype=np.float32)
    if not np.isfinite(result).all():
        raise ImageError("the DICOM modality/VOI LUT produced non-finite values")
    return result


def _invert(array: np.ndarray) -> np.ndarray:
    """MONOCHROME1 → MONOCHROME2 within the frame's own range (dtype kept)."""
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        return (high + low - array.astype(np.int64)).astype(array.dtype)
    low, high = float(array.min()), float(array.max())
    return (high + low - array).astype(np.float32)


def _to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    high = float(array.max()) or 1.0
    scale = 255.0 / (65535.0 if high > 255 else 255.0)
    return np.clip(array * scale, 0, 255).astype(np.uint8)


def dicom_pixel_spacing_mm(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing/ImagerPixelSpacing/ultrasound regions."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        spacing = _positive_pair(value)
        if spacing is not None:
            return spacing
    regions = ds.get("SequenceOfUltrasoundRegions")
    if regions:
        for region in regions:
            try:
                units_x = int(region.get("PhysicalUnitsXDirection", 0))
                units_y = int(region.get("PhysicalUnitsYDirection", 0))
                delta_x = abs(float(region.get("PhysicalDeltaX", 0)))
                delta_y = abs(float(region.get("PhysicalDeltaY", 0)))
            except (TypeError, ValueError):
                continue
            # Code 3 = cm (PS3.3 C.8.5.5.1.15); convert to mm.
            if units_x == 3 and units_y == 3 and delta_x > 0 and delta_y > 0:
                return (delta_y * 10.0, delta_x * 10.0)
    return None


def _positive_pair(value) -> tuple[float, float] | None:
    try:
        if value is None or len(value) < 2:
            return None
        row, col = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
        return (row, col)
    return None


# --------------------------------------------------------------------------- output helpers


def to_display_uint8(pixels: np.ndarray) -> np.ndarray:
    """Any decoded frame → ``H×W×3`` uint8 RGB for an overlay (min-max for non-8-bit gray)."""
    array = np.asarray(pixels)
    if array.ndim == 3:
        return array[..., :3] if array.dtype == np.uint8 else _to_uint8_rgb(array[..., :3])
    if array.dtype != np.uint8:
        data = array.astype(np.float32)
        low, high = float(data.min()), float(data.max())
        data = (data - low) / (high - low) * 255.0 if high > low else np.zeros_like(data)
        array = data.astype(np.uint8)
    return np.repeat(array[..., None], 3, axis=2)


def to_display_png(pixels: np.ndarray) -> bytes:
    """A decoded frame as an 8-bit PNG (gray stays gray): what a viewer shows of it."""
    from PIL import Image

    rgb = to_display_uint8(pixels)
    gray = (
        rgb.ndim == 3
        and np.array_equal(rgb[..., 0], rgb[..., 1])
        and np.array_equal(rgb[..., 0], rgb[..., 2])
    )
    buffer = io.BytesIO()
    Image.fromarray(rgb[..., 0] if gray else rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_to_png(mask: np.ndarray) -> bytes:
    """``H×W`` boolean mask → 8-bit PNG bytes (0 background, 255 lesion)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(
        buffer, format="PNG", optimize=False
    )
    return buffer.getvalue()


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] (inclusive pixel indices) of a mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def overlay_png(pixels: np.ndarray, coarse: np.ndarray, refined: np.ndarray) -> bytes:
    """The image with the coarse (yellow) and refined (green) mask contours drawn on it, as PNG."""
    from PIL import Image
    from scipy import ndimage

    rgb = to_display_uint8(pixels).copy()
    thickness = max(1, round(max(rgb.shape[:2]) / 300))
    for mask, colour in ((coarse, (255, 200, 0)), (refined, (0, 255, 80))):
        if not mask.any():
            continue
        inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
        contour = mask & ~inner
        rgb[contour] = colour
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


silence_decoder_logs()
