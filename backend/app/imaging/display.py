"""Output images of a decoded frame: what a viewer shows, masks as PNG, the contour overlay."""

from __future__ import annotations

import io

import numpy as np

from backend.app.imaging.base import to_uint8_rgb


def to_display_uint8(pixels: np.ndarray) -> np.ndarray:
    """Any decoded frame → ``H×W×3`` uint8 RGB for an overlay (min-max for non-8-bit gray)."""
    array = np.asarray(pixels)
    if array.ndim == 3:
        return array[..., :3] if array.dtype == np.uint8 else to_uint8_rgb(array[..., :3])
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
    # zlib level 1: a two-valued mask compresses nearly as well as at the default level 6 (2.4
    # against 1.4 kB for a 562×471 mask with one lesion) in 60 % of the time (0.8 against 1.25 ms
    # on a 2-core AMD EPYC Zen 4): 1 ms of every /segment answer, which carries two masks.
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(
        buffer, format="PNG", optimize=False, compress_level=1
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
