"""Drawing masks over images and comparing them, in memory (PIL + numpy only).

Nothing here touches the disk: uploads are read from the bytes Gradio hands over, overlays are
returned as arrays. Only :func:`write_mask_png` writes, and only when the user asks to download.
"""

from __future__ import annotations

import io
import re
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


def load_mask(data: bytes, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Mask image bytes → bool H×W (any non-zero pixel is lesion).

    With ``shape`` (H, W), a mask of another size is resized (nearest) to it.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            gray = image.convert("RGBA").convert("L")
        else:
            gray = image.convert("L")
        if shape is not None and gray.size != (shape[1], shape[0]):
            gray = gray.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        return np.asarray(gray) > 0


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
    """The image with ``mask`` filled (``alpha``) and outlined in ``color``; ``truth`` outlined yellow."""
    if mask.shape != image_rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image_rgb.shape[:2]}")
    height, width = mask.shape
    scale = 1.0
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
    line = max(1, round(max(height, width) / 300))
    out = image_rgb.astype(np.float32).copy()
    tint = np.asarray(color, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    out[contour(mask, line)] = tint
    if truth is not None and truth.shape == mask.shape:
        out[contour(truth, line)] = np.asarray(TRUTH_COLOR, dtype=np.float32)
    result = out.clip(0, 255).astype(np.uint8)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        result = np.asarray(Image.fromarray(result).resize(size, Image.Resampling.LANCZOS))
    return result


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
