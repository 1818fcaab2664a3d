"""Corrections: masks a user accepted or corrected, saved (opt-in, per save) as training data.

:func:`save_correction` stores one decoded image (frame) and its mask: the files under
``settings.corrections_dir`` — ``images/<key>.png`` (the decoded frame, 8-bit), ``masks/<key>.png``
(0/255) and ``meta/<key>.json`` — and one row in the store. Each file is written to a temporary
name and renamed into place; the ``meta`` file goes last and is what makes a pair complete for
the ``corrections`` dataset (``training/data/datasets.py``), so a server stopped mid-save leaves
no half pair. If the row cannot be written, the new files are removed again.

DICOM input keeps no header: the image file holds pixels only, and the row and meta file keep a
SHA-256 of the source's SOPInstanceUID (to recognise the same instance), never the UID or any
patient attribute. ``settings.corrections_keep_dicom`` additionally keeps the original file
(``dicom/<key>.dcm``) for sites that want it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.app.db.models import Correction, utcnow
from backend.app.imaging import DecodedImage, ImageError, mask_to_png, to_display_png

#: Share of a mask's pixels that may lie between its two levels (antialiased or JPEG edges).
MAX_INTERMEDIATE_FRACTION = 0.02
MASK_SOURCES = ("refined", "corrected")


class DuplicateCorrection(Exception):
    """The image (frame) is saved already; ``existing`` is its row."""

    def __init__(self, existing: Correction) -> None:
        super().__init__(f"correction {existing.id} holds this image already")
        self.existing = existing


def decode_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A mask file for an image of ``shape`` (H, W) → bool H×W; :class:`ImageError` (422) when it
    is not an image, has another size, or is not binary-ish.

    The size is read from the header and checked before any pixel is decoded: a mask must have
    its image's size, so a file declaring a huge canvas (a decompression bomb) is refused unread."""
    import struct

    from PIL import Image, UnidentifiedImageError

    height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as image:
            if (image.height, image.width) != (height, width):
                raise ImageError(
                    f"the mask is {image.width}×{image.height} pixels but the image is {width}×{height}"
                )
            image.load()
            gray = np.asarray(image.convert("L"))
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, raised while reading the header
        raise ImageError("the mask declares more pixels than any image this server accepts", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError):
        raise ImageError("the mask could not be read as an image (PNG, JPEG, BMP or TIFF)") from None
    if gray.shape != (height, width):  # a decoder that delivered other than its header said
        raise ImageError("the mask could not be read as an image (PNG, JPEG, BMP or TIFF)")
    low, high = int(gray.min()), int(gray.max())
    if high == low:
        return np.full((height, width), high > 0)
    intermediate = float(((gray != low) & (gray != high)).mean())
    if intermediate > MAX_INTERMEDIATE_FRACTION:
        raise ImageError(
            f"the mask is not binary: {intermediate:.0%} of its pixels are neither background nor lesion"
        )
    return gray > (low + high) / 2


def image_key(decoded: DecodedImage) -> str:
    """The key of a saved image: the hash of its decoded pixels (the frame, not the file)."""
    return decoded.pixel_hash()


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path`` (flushed to disk); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


@dataclass(frozen=True)
class CorrectionFiles:
    root: Path
    key: str

    @property
    def stem(self) -> str:
        return self.key[:24]

    @property
    def image(self) -> Path:
        return self.root / "images" / f"{self.stem}.png"

    @property
    def mask(self) -> Path:
        return self.root / "masks" / f"{self.stem}.png"

    @property
    def meta(self) -> Path:
        return self.root / "meta" / f"{self.stem}.json"

    @property
    def dicom(self) -> Path:
        return self.root / "dicom" / f"{self.stem}.dcm"

    def remove(self) -> None:
        for path in (self.meta, self.mask, self.image, self.dicom):  # meta first: incomplete at once
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def files_of(root: Path, correction: Correction) -> CorrectionFiles:
    return CorrectionFiles(Path(root), correction.image_key)


def save_correction(
    session: Session,
    root: Path,
    decoded: DecodedImage,
    mask: np.ndarray,
    *,
    mask_source: str,
    model_version: str | None,
    prompts: dict[str, Any] | None,
    replace: bool = False,
    keep_dicom: bool = False,
    source_bytes: bytes | None = None,
) -> Correction:
    """Store ``decoded`` with ``mask`` (files, then the row; see the module doc) and return the row
    (not committed). :class:`DuplicateCorrection` when the image is saved already and not
    ``replace``.

    Every file is first written to a temporary name; the row is flushed; only then are the files
    renamed into place, the meta file last. A failure before the renames (a full disk, a
    concurrent save of the same image) leaves the folder as it was."""
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {', '.join(MASK_SOURCES)}")
    if mask.shape != (decoded.height, decoded.width):
        size = f"{mask.shape[1]}×{mask.shape[0]}"
        raise ImageError(f"the mask is {size} pixels but the image is {decoded.width}×{decoded.height}")
    key = image_key(decoded)
    existing = session.scalar(select(Correction).where(Correction.image_key == key))
    if existing is not None and not replace:
        raise DuplicateCorrection(existing)
    uid_hash = None
    if decoded.kind == "dicom" and decoded.dataset is not None and decoded.dataset.get("SOPInstanceUID"):
        uid_hash = hashlib.sha256(str(decoded.dataset.SOPInstanceUID).encode()).hexdigest()
    files = CorrectionFiles(Path(root), key)
    meta = {
        "image_key": key,
        "width": decoded.width,
        "height": decoded.height,
        "frame": decoded.frame,
        "source_kind": decoded.kind,
        "mask_source": mask_source,
        "model_version": model_version,
        "lesion_px": int(mask.sum()),
        "sop_instance_uid_sha256": uid_hash,
    }
    contents = [(files.image, to_display_png(decoded.pixels)), (files.mask, mask_to_png(mask))]
    if keep_dicom and decoded.kind == "dicom" and source_bytes is not None:
        contents.append((files.dicom, source_bytes))
    contents.append((files.meta, json.dumps(meta, indent=1).encode()))  # last: completes the pair
    temps: list[tuple[Path, Path]] = []
    try:
        for final, data in contents:
            temps.append((_write_temp(final, data), final))
        row = existing or Correction(image_key=key)
        row.source_kind = decoded.kind
        row.width, row.height, row.frame = decoded.width, decoded.height, decoded.frame
        row.lesion_px = int(mask.sum())
        row.mask_source = mask_source
        row.model_version = (model_version or None) and model_version[:255]
        row.prompts = prompts or {}
        row.sop_instance_uid_sha256 = uid_hash
        row.deidentified = not (keep_dicom and decoded.kind == "dicom")
        row.updated_at = utcnow()
        if existing is None:
            session.add(row)
        session.flush()  # a concurrent save of the same image fails here, before any file moved
        for temp, final in temps:
            os.replace(temp, final)
        return row
    finally:
        for temp, _ in temps:  # whatever was not moved into place
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def delete_correction(session: Session, root: Path, correction: Correction) -> None:
    """Remove the row and its files (meta first, so the pair stops counting at once)."""
    files_of(root, correction).remove()
    session.delete(correction)
    session.flush()


def list_corrections(session: Session, *, limit: int = 100, offset: int = 0) -> list[Correction]:
    statement = select(Correction).order_by(Correction.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(statement))


def count_corrections(session: Session) -> int:
    from sqlalchemy import func

    return int(session.scalar(select(func.count()).select_from(Correction)) or 0)
