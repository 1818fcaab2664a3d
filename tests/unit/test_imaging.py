"""Decoding of uploads: raster formats, every DICOM photometric kind, and every bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from imaging_fixtures import (
    BUSI_ROOT,
    PATIENT_NAME,
    gradient,
    make_dicom,
    png_bytes,
    with_attributes,
)
from PIL import Image

from backend.app import imaging
from backend.app.imaging import ImageError, decode_image


def first_busi_image() -> Path:
    paths = sorted(p for p in (BUSI_ROOT / "benign").glob("*.png") if "_mask" not in p.name)
    if not paths:
        pytest.skip("BUSI is not available")
    return paths[0]


# ----------------------------------------------------------------------------- raster


@pytest.mark.parametrize("fmt,kind", [("PNG", "png"), ("JPEG", "jpeg"), ("BMP", "bmp"), ("TIFF", "tiff")])
def test_raster_formats_decode(fmt, kind):
    array = gradient()
    decoded = decode_image(png_bytes(array, fmt))
    assert decoded.kind == kind
    assert decoded.pixels.shape == array.shape
    assert decoded.pixel_spacing_mm is None
    if fmt != "JPEG":
        np.testing.assert_array_equal(decoded.pixels, array)


def test_rgb_png_keeps_colour_and_gray_rgb_collapses():
    gray = gradient()
    rgb = np.stack([gray, gray[::-1], gray], axis=-1)
    assert decode_image(png_bytes(rgb)).pixels.shape == (*gray.shape, 3)
    gray_rgb = np.stack([gray, gray, gray], axis=-1)
    assert decode_image(png_bytes(gray_rgb)).pixels.shape == gray.shape


def test_16bit_png():
    array = gradient(dtype=np.uint16, high=60000)
    decoded = decode_image(png_bytes(array))
    assert decoded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(decoded.pixels, array)


def test_busi_png_decodes():
    path = first_busi_image()
    decoded = decode_image(path.read_bytes())
    with Image.open(path) as image:
        assert (decoded.width, decoded.height) == image.size


def test_multipage_tiff_frame():
    pages = [Image.fromarray(np.full((20, 30), value, np.uint8)) for value in (10, 200)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    data = buffer.getvalue()
    assert decode_image(data, frame=1).pixels.max() == 200
    assert decode_image(data).n_frames == 2
    with pytest.raises(ImageError) as info:
        decode_image(data, frame=2)
    assert info.value.status_code == 422 and "out of range" in info.value.detail


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_non_finite_pixels_is_a_422(bad):
    values = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="TIFF")
    assert decode_image(buffer.getvalue()).pixels.dtype == np.float32  # finite: decoded
    values[3, 4] = bad
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="TIFF")
    with pytest.raises(ImageError) as info:
        decode_image(buffer.getvalue())
    assert info.value.status_code == 422 and "NaN or infinite" in info.value.detail


def test_pixel_hash_depends_on_pixels_only():
    a = decode_image(png_bytes(gradient()))
    b = decode_image(png_bytes(gradient(), optimize=True))
    c = decode_image(png_bytes(gradient()[::-1].copy()))
    assert a.pixel_hash() == b.pixel_hash() != c.pixel_hash()


# ----------------------------------------------------------------------------- bad raster input


def test_empty_is_422():
    with pytest.raises(ImageError) as info:
        decode_image(b"")
    assert info.value.status_code == 422 and "empty" in info.value.detail


def test_non_image_is_415():
    with pytest.raises(ImageError) as info:
        decode_image(b"%PDF-1.7 this is not an image at all" * 10)
    assert info.value.status_code == 415


def test_gif_is_415():
    with pytest.raises(ImageError) as info:
        decode_image(png_bytes(gradient(), "GIF"))
    assert info.value.status_code == 415


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_truncated_is_422(fmt):
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), fmt)
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.status_code == 422


def test_decompression_bomb_is_413_before_decoding():
    # A 10000×10000 PNG of zeros compresses to a few kB: the header alone must stop it.
    image = Image.new("L", (10_000, 10_000))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with pytest.raises(ImageError) as info:
        decode_image(buffer.getvalue(), max_pixels=1_000_000)
    assert info.value.status_code == 413 and "pixels" in info.value.detail
    assert Image.MAX_IMAGE_PIXELS not in (None, 1_000_000)  # global guard untouched


def test_huge_header_beyond_pillow_guard_is_413():
    # Forge a PNG header claiming 100000×100000 pixels (Pillow raises DecompressionBombError).
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    data = b"\x89PNG\r\n\x1a\n"
    for body in (chunk, idat):
        data += struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=10**12)
    assert info.value.status_code == 413


def test_one_pixel_image_is_422():
    with pytest.raises(ImageError) as info:
        decode_image(png_bytes(np.zeros((1, 1), np.uint8)))
    assert info.value.status_code == 422


# ----------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize("bits", [8, 16])
def test_monochrome2(bits):
    decoded = decode_image(make_dicom("MONOCHROME2", bits=bits))
    assert decoded.kind == "dicom" and decoded.pixels.shape == (48, 64)
    expected = gradient(48, 64, np.uint16, 255 if bits == 8 else 4095)
    np.testing.assert_array_equal(decoded.pixels.astype(np.int64), expected.astype(np.int64))
    assert decoded.dataset is not None and "PixelData" not in decoded.dataset


@pytest.mark.parametrize("bits", [8, 16])
def test_monochrome1_is_inverted(bits):
    mono1 = decode_image(make_dicom("MONOCHROME1", bits=bits)).pixels.astype(np.float64)
    mono2 = decode_image(make_dicom("MONOCHROME2", bits=bits)).pixels.astype(np.float64)
    # MONOCHROME1 stores high - value; after inversion bright stays bright.
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("kind", ["RGB", "YBR_FULL", "YBR_FULL_422"])
def test_colour_dicoms_become_rgb(kind):
    decoded = decode_image(make_dicom(kind))
    assert decoded.pixels.shape == (48, 64, 3) and decoded.pixels.dtype == np.uint8
    reference = decode_image(make_dicom("RGB")).pixels.astype(np.int64)
    # Colour conversion and 4:2:2 chroma subsampling are lossy by a few levels.
    assert np.abs(decoded.pixels.astype(np.int64) - reference).mean() < 8


def test_window_and_rescale_are_applied():
    plain = decode_image(make_dicom("MONOCHROME2", bits=16)).pixels
    windowed = decode_image(make_dicom("MONOCHROME2", bits=16, window=(1000, 400))).pixels
    assert windowed.dtype == np.float32
    # Values below the window clip to the bottom, above it to the top.
    assert windowed[plain < 800].max() == windowed.min()
    assert windowed[plain > 1200].min() == windowed.max()
    rescaled = decode_image(make_dicom("MONOCHROME2", bits=16, rescale=(2.0, -100.0))).pixels
    np.testing.assert_allclose(rescaled, plain.astype(np.float32) * 2 - 100)


@pytest.mark.parametrize(
    "attributes",
    [
        {"WindowWidth": "0"},  # the standard wants ≥ 1
        {"WindowWidth": "NaN"},
        {"RescaleSlope": "NaN"},
        {"RescaleSlope": "1e400"},
        {"RescaleIntercept": "NaN"},
    ],
    ids=lambda attributes: ",".join(f"{k}={v}" for k, v in attributes.items()),
)
def test_a_lut_outside_the_standard_is_skipped_not_fatal(attributes, caplog):
    base = make_dicom("MONOCHROME2", bits=16, window=(1000, 400), rescale=(2.0, -100.0))
    plain = decode_image(make_dicom("MONOCHROME2", bits=16)).pixels.astype(np.float32)
    with caplog.at_level("INFO", logger="backend.app.imaging.dicom"):
        decoded = decode_image(with_attributes(base, **attributes))
    assert decoded.pixels.dtype == np.float32 and np.isfinite(decoded.pixels).all()
    if "WindowWidth" in attributes:  # the rescale stays, the window goes
        np.testing.assert_allclose(decoded.pixels, plain * 2 - 100)
    else:  # the rescale goes; the window (set for rescaled values) still clips
        assert decoded.pixels.shape == plain.shape
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped and all("NaN" not in m and "1e400" not in m for m in skipped)


def test_multiframe_frame_parameter():
    data = make_dicom("MONOCHROME2", frames=3)
    frame0 = decode_image(data).pixels
    frame2 = decode_image(data, frame=2)
    assert frame2.n_frames == 3 and frame2.frame == 2
    np.testing.assert_array_equal(frame2.pixels, np.roll(frame0, 6, axis=1))
    with pytest.raises(ImageError) as info:
        decode_image(data, frame=3)
    assert info.value.status_code == 422 and "out of range" in info.value.detail


def test_single_frame_out_of_range():
    with pytest.raises(ImageError) as info:
        decode_image(make_dicom(), frame=1)
    assert info.value.status_code == 422


def test_no_pixel_data_is_422():
    with pytest.raises(ImageError) as info:
        decode_image(make_dicom(with_pixels=False))
    assert info.value.status_code == 422 and "no pixel data" in info.value.detail


def test_truncated_dicom_is_422():
    data = make_dicom("MONOCHROME2", bits=16)
    for cut in (140, len(data) // 2, len(data) - 100):
        with pytest.raises(ImageError) as info:
            decode_image(data[:cut])
        assert info.value.status_code == 422
        assert PATIENT_NAME not in info.value.detail


def test_a_non_positive_number_of_frames_is_a_422_naming_the_attribute():
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(io.BytesIO(make_dicom(frames=2)))
    ds[0x00280008] = DataElement(0x00280008, "IS", "-1")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    with pytest.raises(ImageError) as info:
        decode_image(buffer.getvalue())
    assert info.value.status_code == 422 and "NumberOfFrames" in info.value.detail
    assert "-1" not in info.value.detail  # the attribute is named, its value is not echoed


def test_dicom_frame_too_large_is_413():
    with pytest.raises(ImageError) as info:
        decode_image(make_dicom(rows=100, cols=100), max_pixels=5000)
    assert info.value.status_code == 413


def test_pixel_spacing_sources():
    assert decode_image(make_dicom(pixel_spacing=(0.1, 0.2))).pixel_spacing_mm == (0.1, 0.2)
    spacing = decode_image(make_dicom(us_regions_cm=(0.02, 0.03))).pixel_spacing_mm
    assert spacing == pytest.approx((0.3, 0.2))  # (row = ΔY, column = ΔX) in mm
    assert decode_image(make_dicom()).pixel_spacing_mm is None
    # A malformed spacing counts as none (no area in mm²), never as an error.
    for bad in (
        ["NaN", "0.1"],
        ["0.1"],
        ["0", "0"],
        ["-1", "0.1"],
        ["0.1"] * 3,
        ["1e300", "1e300"],
        ["inf", "1"],
    ):
        data = with_attributes(make_dicom(pixel_spacing=(0.1, 0.1)), PixelSpacing=bad)
        assert decode_image(data).pixel_spacing_mm is None, bad
    # An absurd spacing is no spacing, and the ultrasound regions are read instead.
    data = with_attributes(make_dicom(us_regions_cm=(0.02, 0.03)), PixelSpacing=["1e300", "1e300"])
    assert decode_image(data).pixel_spacing_mm == pytest.approx((0.3, 0.2))


@pytest.mark.parametrize("delta", [float("inf"), float("nan"), 1e300, 0.0, -0.0])
def test_an_ultrasound_region_of_absurd_size_is_no_spacing(delta):
    # An infinite PhysicalDeltaX came back as pixel_spacing_mm [0.1, null], 1e300 as a null area.
    ds = pydicom.dcmread(io.BytesIO(make_dicom(us_regions_cm=(0.01, 0.01))))
    ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaX = delta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    assert decode_image(buffer.getvalue()).pixel_spacing_mm is None


def test_dicom_without_preamble_hint():
    data = make_dicom()
    # Not a Part 10 preamble: only the filename tells; a garbage body must still be a clean 422.
    with pytest.raises(ImageError) as info:
        decode_image(b"garbage-not-dicom" * 20, filename="scan.dcm")
    assert info.value.status_code == 422
    assert decode_image(data, filename="scan.dcm").kind == "dicom"


# ----------------------------------------------------------------------------- helpers


def test_mask_helpers_and_overlay():
    mask = np.zeros((30, 40), bool)
    mask[5:10, 7:20] = True
    assert imaging.mask_bbox(mask) == [7, 5, 19, 9]
    assert imaging.mask_bbox(np.zeros((3, 3), bool)) is None
    with Image.open(io.BytesIO(imaging.mask_to_png(mask))) as image:
        assert image.size == (40, 30) and image.mode == "L"
        assert (np.asarray(image) > 0).sum() == mask.sum()
    overlay = imaging.overlay_png(gradient(30, 40), mask, np.roll(mask, 3, axis=0))
    with Image.open(io.BytesIO(overlay)) as image:
        assert image.size == (40, 30) and image.mode == "RGB"
