"""DICOM uploads through pydicom: photometric interpretations, LUTs, frames, pixel spacing, the
transfer syntax named in every refusal, and the native decoders kept from taking the process
down (GDCM only in a child process, see :mod:`.gdcm_isolation`; a Rust decoder's panic is a 422)."""

from __future__ import annotations

import io
import logging

import numpy as np

from backend.app.imaging import gdcm_isolation
from backend.app.imaging.base import (
    PROCESS_EXITS,
    DecodedImage,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    has_part10_marker,
    to_uint8_rgb,
)

log = logging.getLogger(__name__)

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
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_part10_marker(data))
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
    if n_frames < 1:
        raise ImageError("the DICOM attribute NumberOfFrames is invalid (it must be a positive integer)")
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
    if syntax == ENCAPSULATED_UNCOMPRESSED:
        syntax = _unwrap_encapsulated_uncompressed(ds, rows * columns, n_frames)
    _assume_missing_pixel_attributes(ds, photometric)
    _check_pixel_module(ds, rows * columns, n_frames, syntax, photometric)

    try:
        array = _frame_array(ds, data, syntax, index if n_frames > 1 else None)
        if n_frames > 1 and array.ndim >= 3 and array.shape[0] == 1 and array.shape[1:3] != (rows, columns):
            array = array[0]
        if array.shape[:2] != (rows, columns):
            raise ImageError("the DICOM pixel data does not match Rows and Columns (a frame of another size)")
        if photometric == "PALETTE COLOR":
            array = to_uint8_rgb(_palette(array, ds, apply_color_lut))
        elif array.ndim == 3:
            # RGB (YBR_* are converted to RGB by pydicom's decoder).
            array = to_uint8_rgb(array[..., :3])
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
        if _all_decoders_failed(exc, syntax):
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
    except BaseException as exc:
        # Truncated pixel data, bad LUTs, plugin errors … and the panic of a decoder written in
        # Rust (pylibjpeg-rle), which PyO3 raises as ``PanicException``, a BaseException.
        if isinstance(exc, PROCESS_EXITS):
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


def _check_pixel_module(ds, frame_pixels: int, n_frames: int, syntax, photometric: str) -> None:
    """The Image Pixel module's attributes that decoding relies on, each refused by name with the
    values the standard allows (PS3.3 C.7.6.3), never with the value sent; for native (uncompressed)
    pixel data, that it holds at least the bytes they describe; for compressed pixel data, that it
    holds at least NumberOfFrames fragments."""
    n_pixels = frame_pixels * n_frames

    def value(keyword: str, default=None):
        try:
            raw = ds.get(keyword, default)
            return None if raw is None or raw == "" else int(raw)
        except (TypeError, ValueError):
            raise ImageError(f"the DICOM attribute {keyword} is not an integer") from None

    samples = value("SamplesPerPixel", 1)
    bits = value("BitsAllocated")
    stored = value("BitsStored", bits)
    representation = value("PixelRepresentation", 0)
    planar = value("PlanarConfiguration", 0) if samples == 3 else 0  # only colour data has one
    checks = [
        ("SamplesPerPixel", samples in (1, 3), "1 or 3"),
        (
            "BitsAllocated",
            bits == 1 or (bits is not None and bits % 8 == 0 and 8 <= bits <= 64),
            "1 or a multiple of 8 up to 64",
        ),
        (
            "BitsStored",
            stored is not None and bits is not None and 1 <= stored <= bits,
            "between 1 and BitsAllocated",
        ),
        ("PixelRepresentation", representation in (0, 1), "0 (unsigned) or 1 (signed)"),
        ("PlanarConfiguration", planar in (0, 1), "0 or 1"),
    ]
    for keyword, valid, allowed in checks:
        if not valid:
            raise ImageError(f"the DICOM attribute {keyword} is invalid (it must be {allowed})")
    if "PixelData" not in ds:
        return
    if syntax.is_compressed:
        _check_frame_count(ds, n_frames)
        return
    try:
        held = len(ds["PixelData"].value)
    except (TypeError, ValueError, KeyError):
        return  # pydicom's own decoder says what is wrong
    # YBR_FULL_422 native data holds two samples a pixel (chroma shared by pairs of pixels).
    per_pixel = 2 if samples == 3 and photometric == "YBR_FULL_422" else samples
    needed = (n_pixels * per_pixel + 7) // 8 if bits == 1 else n_pixels * per_pixel * (bits // 8)
    if held < needed:
        raise ImageError(
            "the DICOM pixel data is shorter than Rows × Columns × NumberOfFrames × SamplesPerPixel × "
            "BitsAllocated describe: the file is truncated, or one of those attributes is wrong"
        )


def _assume_missing_pixel_attributes(ds, photometric: str) -> None:
    """Type-1 Image Pixel attributes some exports leave out, set to the one value the rest of the
    header implies (pydicom's decoders need them, and would fail with an AttributeError):
    SamplesPerPixel from the PhotometricInterpretation, BitsStored = BitsAllocated,
    PixelRepresentation 0 (unsigned), PlanarConfiguration 0 (colour by pixel). For native pixel
    data the length check that follows still holds the file to what they describe. One log line
    names the attributes assumed, never a value."""
    assumed = []
    if "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = (
            1 if photometric.startswith("MONOCHROME") or photometric == "PALETTE COLOR" else 3
        )
        assumed.append("SamplesPerPixel")
    if "BitsStored" not in ds:
        ds.BitsStored = ds.BitsAllocated
        assumed.append("BitsStored")
    if "PixelRepresentation" not in ds:
        ds.PixelRepresentation = 0
        assumed.append("PixelRepresentation")
    try:
        colour = int(ds.SamplesPerPixel) == 3
    except (TypeError, ValueError):
        colour = False  # refused by name in _check_pixel_module
    if colour and "PlanarConfiguration" not in ds:
        ds.PlanarConfiguration = 0
        assumed.append("PlanarConfiguration")
    if assumed:
        log.info(
            "DICOM: missing pixel attributes assumed from the rest of the header: %s", ", ".join(assumed)
        )


def _check_frame_count(ds, n_frames: int) -> None:
    """Compressed pixel data holds each frame in one fragment or more (PS3.5 A.4), so a
    NumberOfFrames above its number of fragments is wrong. Decoding one frame would not notice,
    but everything sized by the frame count (a DICOM SEG's frames) would."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    try:
        buffer = io.BytesIO(ds["PixelData"].value)
        parse_basic_offsets(buffer)
        fragments, _ = parse_fragments(buffer)
    except Exception:  # noqa: BLE001 - a broken encapsulation is the decoder's to report
        return
    if n_frames > fragments:
        raise ImageError(
            "the DICOM attribute NumberOfFrames is larger than the number of frames the compressed "
            "pixel data holds"
        )


def _frame_array(ds, data: bytes, syntax, index: int | None) -> np.ndarray:
    """pydicom's in-process decoders, then GDCM in a child process when every one of them failed
    on compressed data (:mod:`backend.app.imaging.gdcm_isolation`); their error when that fails too."""
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index)
    except RuntimeError as exc:
        if not _all_decoders_failed(exc, syntax):
            raise
        array = gdcm_isolation.decode_frame(data, index, syntax)
        if array is None:
            raise
        return array


def _all_decoders_failed(exc: RuntimeError, syntax) -> bool:
    """Whether pydicom 3 raised ``exc`` because every installed decoder of this compressed
    syntax failed on the data."""
    return syntax.is_compressed and "plugins" in str(exc)


#: Encapsulated Uncompressed Explicit VR Little Endian (PS3.5 A.4.11, added in 2023): native
#: pixel bytes, one fragment per frame. pydicom 3.0 has no decoder for it, nor its name.
ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
#: Public transfer syntaxes newer than pydicom's registry, by UID.
_NEWER_SYNTAXES = {ENCAPSULATED_UNCOMPRESSED: "Encapsulated Uncompressed Explicit VR Little Endian"}


def _syntax_label(syntax) -> str:
    """``'JPEG Lossless, … (1.2.840.10008.1.2.4.70)'``: a registered syntax's name and UID.

    Only registered (public) transfer syntaxes are named; a private or malformed UID is not
    echoed back.
    """
    from pydicom.uid import AllTransferSyntaxes

    if str(syntax) in AllTransferSyntaxes:
        return f"{syntax.name} ({syntax})"
    if str(syntax) in _NEWER_SYNTAXES:
        return f"{_NEWER_SYNTAXES[str(syntax)]} ({syntax})"
    return "(unregistered TransferSyntaxUID)"


def _unwrap_encapsulated_uncompressed(ds, frame_pixels: int, n_frames: int):
    """Encapsulated Uncompressed data → the native Explicit VR Little Endian pixel data it holds.

    Each frame is one fragment of native bytes (padded to an even length); they are joined into
    native PixelData and the data set is then decoded as Explicit VR Little Endian.
    """
    from pydicom.encaps import generate_frames
    from pydicom.uid import ExplicitVRLittleEndian

    label = _syntax_label(ENCAPSULATED_UNCOMPRESSED)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32):
        raise ImageError(f"the DICOM attribute BitsAllocated is not 8, 16 or 32 (transfer syntax {label})")
    frame_bytes = frame_pixels * samples * bits // 8
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=n_frames))
    except Exception as exc:  # pydicom raises ValueError/struct.error/… on a broken item table
        raise ImageError(
            f"the DICOM pixel data in transfer syntax {label} is not a valid encapsulated sequence "
            f"({type(exc).__name__})"
        ) from None
    if len(frames) != n_frames or any(len(frame) < frame_bytes for frame in frames):
        raise ImageError(
            f"the DICOM pixel data in transfer syntax {label} does not hold NumberOfFrames frames of "
            "Rows × Columns × SamplesPerPixel × BitsAllocated bits"
        )
    ds.PixelData = b"".join(frame[:frame_bytes] for frame in frames)
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ExplicitVRLittleEndian


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
    if syntax == ENCAPSULATED_UNCOMPRESSED:
        return syntax  # unwrapped into native data by the caller
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
    # A LUT that cannot be applied (a WindowWidth below 1, a NaN RescaleSlope: outside the
    # standard) is skipped with a log line naming it, not the values: the modality LUT is
    # linear and the VOI window a display choice, so the image stays usable without either.
    if has_modality:
        result = _lut_or_skip(result, lambda values: apply_modality_lut(values, ds), "modality LUT")
    if has_voi:
        result = _lut_or_skip(result, lambda values: apply_voi_lut(values, ds, index=0), "VOI LUT")
    return np.asarray(result, dtype=np.float32)


def _palette(array: np.ndarray, ds, apply_color_lut) -> np.ndarray:
    """The PALETTE COLOR frame as RGB; a palette without which the image cannot be shown is a 422
    naming its attributes."""
    try:
        return apply_color_lut(array, ds)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        raise ImageError(
            "the DICOM palette is missing or invalid (Red/Green/BluePaletteColorLookupTableDescriptor "
            "and …Data, or SegmentedRed/Green/BluePaletteColorLookupTableData)"
        ) from None


def _lut_or_skip(values: np.ndarray, apply, name: str) -> np.ndarray:
    try:
        with np.errstate(all="ignore"):  # overflow and NaN are checked below, not warned about
            result = np.asarray(apply(values), dtype=np.float32)
    except (ValueError, TypeError, ZeroDivisionError, IndexError, KeyError, AttributeError):
        result = None  # AttributeError: a LUT sequence whose item lacks its descriptor or data
    if result is None or result.shape != values.shape or not np.isfinite(result).all():
        log.info("DICOM %s skipped: its attributes are outside the standard", name)
        return np.asarray(values, dtype=np.float32)
    return result


def _invert(array: np.ndarray) -> np.ndarray:
    """MONOCHROME1 → MONOCHROME2 within the frame's own range (dtype kept)."""
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        return (high + low - array.astype(np.int64)).astype(array.dtype)
    low, high = float(array.min()), float(array.max())
    return (high + low - array).astype(np.float32)


def dicom_pixel_spacing_mm(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing/ImagerPixelSpacing/ultrasound regions."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        spacing = positive_pair(value)
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
            if units_x == 3 and units_y == 3 and _plausible_spacing(delta_y * 10.0, delta_x * 10.0):
                return (delta_y * 10.0, delta_x * 10.0)
    return None


#: Largest pixel spacing taken as real (mm): a metre per pixel is far beyond any image, and the
#: bound keeps an area in mm² finite (a spacing of 1e300 or inf once came back as a null area).
MAX_PIXEL_SPACING_MM = 1000.0


def _plausible_spacing(row: float, col: float) -> bool:
    return all(np.isfinite(value) and 0 < value <= MAX_PIXEL_SPACING_MM for value in (row, col))


def positive_pair(value) -> tuple[float, float] | None:
    """Two positive finite numbers up to :data:`MAX_PIXEL_SPACING_MM` from a spacing attribute's
    value, else ``None`` (missing, malformed, one value or three, zero, negative, NaN, infinite or
    absurdly large: treated as no spacing at all)."""
    try:
        if value is None or isinstance(value, str) or len(value) != 2:
            return None
        row, col = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    return (row, col) if _plausible_spacing(row, col) else None
