"""Drawing masks over images and comparing them, in memory (PIL + numpy only).

Nothing here touches the disk: uploads are read from the bytes Gradio hands over, overlays are
returned as arrays. Only :func:`write_mask_png` writes, and only when the user asks to download.
"""

from __future__ import annotations

import io
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

#: RGB colours of the overlays.
COARSE_COLOR = (255, 140, 0)  # orange
REFINED_COLOR = (0, 200, 90)  # green
TRUTH_COLOR = (255, 255, 0)  # yellow contour

#: Longest side of the overlays shown in the browser (the masks keep their full size).
DISPLAY_MAX_SIDE = 768


def load_image(data: bytes) -> np.ndarray:
    """Image bytes → H×W×3 uint8 RGB for display (16-bit and gray images are rescaled)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, dtype=np.float32)
            lo, hi = float(array.min()), float(array.max())
            scaled = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
            return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a bool mask, ``width`` pixels thick (inside the mask)."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = image.filter(ImageFilter.MinFilter(2 * max(1, width) + 1))
    return mask & ~(np.asarray(eroded) > 0)


def overlay(
    image_rgb: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int],
    *,
    alpha: float = 0.35,
    truth: np.ndarray | None = None,
    max_side: int | None = DISPLAY_MAX_SIDE,
) -> np.ndarray:
    """The image with ``mask`` filled (``alpha``) and outlined in ``color``; ``truth`` outlined
    yellow (:func:`combined` with one layer and no prompts)."""
    return combined(image_rgb, [(mask, color)], alpha=alpha, truth=truth, max_side=max_side)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks of the same shape; both empty → 1.0."""
    pred = pred.astype(bool)
    truth = truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & truth).sum()) / total


def safe_stem(filename: str | None, fallback: str = "image") -> str:
    stem = Path(filename or "").stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")
    return stem[:80] or fallback


def write_mask_png(png: bytes, directory: Path | None, name: str) -> Path:
    """Write mask PNG bytes as ``name`` under ``directory`` (a fresh temp dir when ``None``)."""
    folder = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="ultrarefiner-masks-"))
    path = folder / name
    path.write_bytes(png)
    return path


#: Share of pixels that may lie between a mask's two levels (JPEG ringing, antialiased edges).
MAX_INTERMEDIATE_FRACTION = 0.02


class MaskError(ValueError):
    """A ground-truth mask that does not fit its image; the message names the problem."""


def load_truth_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask for an image of ``shape`` (H, W) → bool H×W, or :class:`MaskError`.

    Refused, never silently fixed: a mask of another size than the image, and one that is not
    binary-ish (more than :data:`MAX_INTERMEDIATE_FRACTION` of its pixels between its darkest and
    brightest level — an ultrasound image sent as its own mask, say).
    """
    height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as image:
            if (image.height, image.width) != (height, width):  # from the header, nothing decoded
                raise MaskError(
                    f"the ground-truth mask is {image.width}×{image.height} pixels but the image is "
                    f"{width}×{height}: upload the mask made for this image"
                )
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                gray = np.asarray(image.convert("RGBA").convert("L"))
            else:
                gray = np.asarray(image.convert("L"))
    except MaskError:
        raise
    except Image.DecompressionBombError as exc:
        raise MaskError("the ground-truth mask declares far more pixels than the image has") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as exc:
        raise MaskError("the ground-truth mask is not an image this UI can read") from exc
    if gray.shape != (height, width):
        raise MaskError("the ground-truth mask is not an image this UI can read")
    low, high = int(gray.min()), int(gray.max())
    if high > low:
        intermediate = float(((gray != low) & (gray != high)).mean())
        if intermediate > MAX_INTERMEDIATE_FRACTION:
            raise MaskError(
                f"the ground-truth mask is not binary: {intermediate:.0%} of its pixels are neither "
                "background nor lesion (is it the ultrasound image itself?)"
            )
        return gray > (low + high) / 2
    return np.zeros((height, width), dtype=bool) if high == 0 else np.ones((height, width), dtype=bool)


def scale_for_display(height: int, width: int, max_side: int | None = DISPLAY_MAX_SIDE) -> float:
    """The factor :func:`overlay` shrinks an image by (1.0 when it fits)."""
    if max_side and max(height, width) > max_side:
        return max_side / max(height, width)
    return 1.0


def combined(
    image_rgb: np.ndarray,
    layers: list[tuple[np.ndarray, tuple[int, int, int]]],
    *,
    alpha: float = 0.35,
    truth: np.ndarray | None = None,
    points: list[tuple[float, float, int]] | None = None,
    box: list[float] | None = None,
    corner: tuple[float, float] | None = None,
    max_side: int | None = DISPLAY_MAX_SIDE,
) -> np.ndarray:
    """The image with several masks (filled at ``alpha``, outlined), the ground truth outlined and
    the clinician's prompts drawn: lesion points green, background points red, the box and a
    pending box corner white. Coordinates are native pixels; the result is scaled like
    :func:`overlay`."""
    height, width = image_rgb.shape[:2]
    line = max(1, round(max(height, width) / 300))
    out = image_rgb.astype(np.float32).copy()
    for mask, color in layers:
        if mask.shape != (height, width):
            raise ValueError(f"mask {mask.shape} does not match image {image_rgb.shape[:2]}")
        tint = np.asarray(color, dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * tint
        out[contour(mask, line)] = tint
    if truth is not None and truth.shape == (height, width):
        out[contour(truth, line)] = np.asarray(TRUTH_COLOR, dtype=np.float32)
    result = out.clip(0, 255).astype(np.uint8)
    from PIL import ImageDraw

    canvas = Image.fromarray(result)
    draw = ImageDraw.Draw(canvas)
    radius = max(3, round(max(height, width) / 120))
    if box:
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 255), width=line + 1)
    if corner:
        cx, cy = corner
        draw.line([cx - 2 * radius, cy, cx + 2 * radius, cy], fill=(255, 255, 255), width=line + 1)
        draw.line([cx, cy - 2 * radius, cx, cy + 2 * radius], fill=(255, 255, 255), width=line + 1)
    for x, y, label in points or []:
        fill = (40, 220, 80) if label == 1 else (235, 50, 50)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255))
    scale = scale_for_display(height, width, max_side)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = canvas.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(canvas)
