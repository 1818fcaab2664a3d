"""PNG, JPEG, BMP and TIFF uploads through Pillow: the pixel count is checked against the request's
limit from the header, before any pixel is decoded (decompression bombs)."""

from __future__ import annotations

import io
import struct

import numpy as np

from backend.app.imaging.base import (
    DecodedImage,
    ImageError,
    ImageKind,
    ImageTooLargeError,
    UnsupportedImageError,
)

_PIL_FORMATS: dict[str, ImageKind] = {
    "PNG": "png",
    "JPEG": "jpeg",
    "BMP": "bmp",
    "DIB": "bmp",
    "TIFF": "tiff",
}


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
        values = np.asarray(image).astype(np.float32)
        if not np.isfinite(values).all():  # a float TIFF can hold NaN or ±infinity; no scan does
            raise ImageError("the image holds NaN or infinite pixel values")
        return values
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
