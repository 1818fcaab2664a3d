"""Synthetic test inputs shared by the unit and integration tests: images and ultrasound DICOM."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from training.config import SHARED_DATA_ROOT

BUSI_ROOT = SHARED_DATA_ROOT / "BUSI" / "Dataset_BUSI_with_GT"
PATIENT_NAME = "Doe^Jane-Secret"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"


def gradient(rows: int = 48, cols: int = 64, dtype=np.uint8, high: int = 255) -> np.ndarray:
    """A gray ramp with a bright disc (a synthetic 'lesion')."""
    yy, xx = np.mgrid[:rows, :cols]
    base = (xx / (cols - 1)) * high * 0.5
    disc = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (min(rows, cols) / 4) ** 2
    return (base + disc * high * 0.5).astype(dtype)


def make_dicom(
    kind: str = "MONOCHROME2",
    *,
    bits: int = 8,
    rows: int = 48,
    cols: int = 64,
    frames: int = 1,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    us_regions_cm: tuple[float, float] | None = None,
    with_pixels: bool = True,
    patient_name: str = PATIENT_NAME,
) -> bytes:
    """A synthetic ultrasound DICOM Part 10 file of the given photometric interpretation."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = US_MULTIFRAME_STORAGE if frames > 1 else US_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = "PID-12345"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "US"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "Synthetic"
    ds.Rows, ds.Columns = rows, cols
    if pixel_spacing:
        ds.PixelSpacing = list(pixel_spacing)
    if us_regions_cm:
        region = Dataset()
        region.RegionSpatialFormat = 1
        region.RegionDataType = 1
        region.RegionFlags = 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
        region.PhysicalUnitsXDirection = 3
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX, region.PhysicalDeltaY = us_regions_cm
        ds.SequenceOfUltrasoundRegions = [region]
    if not with_pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        return _to_bytes(ds)
    high = 255 if bits == 8 else 4095
    gray = np.stack([gradient(rows, cols, np.uint16, high) for _ in range(frames)])
    for index in range(frames):  # frames differ so a frame parameter is observable
        gray[index] = np.roll(gray[index], index * 3, axis=1)
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = 8 if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 33.3
    if kind in ("MONOCHROME1", "MONOCHROME2"):
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = kind
        values = high - gray if kind == "MONOCHROME1" else gray
        dtype = np.uint8 if bits == 8 else np.uint16
        pixel_bytes = values.astype(dtype).tobytes()
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        if rescale:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
            ds.RescaleType = "US"
    else:
        assert bits == 8, "colour test images are 8-bit"
        rgb = np.stack([gray, np.roll(gray, 5, axis=-1), gray[..., ::-1]], axis=-1).astype(np.uint8)
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = kind
        if kind == "RGB":
            pixel_bytes = rgb.tobytes()
        elif kind == "YBR_FULL":
            pixel_bytes = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in rgb]).tobytes()
        elif kind == "YBR_FULL_422":
            ybr = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in rgb]).astype(np.uint16)
            y = ybr[..., 0]
            cb = ((ybr[..., 0::2, 1] + ybr[..., 1::2, 1]) // 2).astype(np.uint8)
            cr = ((ybr[..., 0::2, 2] + ybr[..., 1::2, 2]) // 2).astype(np.uint8)
            packed = np.stack([y[..., 0::2], y[..., 1::2], cb, cr], axis=-1).astype(np.uint8)
            pixel_bytes = packed.tobytes()
        else:
            raise ValueError(kind)
    if len(pixel_bytes) % 2:
        pixel_bytes += b"\x00"
    ds.PixelData = pixel_bytes
    return _to_bytes(ds)


def with_attributes(data: bytes, *, item_of: str | None = None, **attributes) -> bytes:
    """The DICOM file ``data`` with these attributes set (``None``: removed): top-level ones, or
    those of the first item of the sequence ``item_of``."""
    ds = pydicom.dcmread(io.BytesIO(data))
    target = ds if item_of is None else ds[item_of].value[0]
    for keyword, value in attributes.items():
        if value is None:
            if keyword in target:
                delattr(target, keyword)
        else:
            setattr(target, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()
