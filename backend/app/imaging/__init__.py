"""Decode uploaded images (PNG, JPEG, BMP, TIFF, DICOM) into arrays, safely and in memory.

Modules: :mod:`.base` (kinds, errors, the decoded frame), :mod:`.upload` (bytes → decoder),
:mod:`.raster` (Pillow), :mod:`.dicom` (pydicom) with :mod:`.gdcm_isolation`, :mod:`.display`
(PNG outputs). Import the names from this package.

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

from backend.app.imaging.base import (
    CONTENT_TYPES,
    DecodedImage,
    ImageError,
    ImageKind,
    ImageTooLargeError,
    UnsupportedImageError,
    silence_decoder_logs,
    sniff_kind,
)
from backend.app.imaging.dicom import decode_dicom, dicom_pixel_spacing_mm, read_dicom_header
from backend.app.imaging.display import (
    mask_bbox,
    mask_to_png,
    overlay_png,
    to_display_png,
    to_display_uint8,
)
from backend.app.imaging.raster import decode_raster
from backend.app.imaging.upload import decode_image

__all__ = [
    "CONTENT_TYPES",
    "DecodedImage",
    "ImageError",
    "ImageKind",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "decode_dicom",
    "decode_image",
    "decode_raster",
    "dicom_pixel_spacing_mm",
    "mask_bbox",
    "mask_to_png",
    "overlay_png",
    "read_dicom_header",
    "silence_decoder_logs",
    "sniff_kind",
    "to_display_png",
    "to_display_uint8",
]

silence_decoder_logs()
