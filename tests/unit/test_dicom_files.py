"""DICOM written by real toolkits (dcmtk, GDCM, scanner exports in pydicom's test data and the
``pydicom-data`` package) decodes, and a SEG made from it passes DICOM's own validator.

The files are those that pydicom ships (``pydicom/data/test_files``) and that the ``pydicom-data``
package installs (``data_store/data``): nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from backend.app.dicom_seg import build_dicom_seg
from backend.app.imaging import ImageError, decode_image, sniff_kind
from tests.imaging_fixtures import PATIENT_NAME, make_dicom, with_attributes

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
try:
    import data_store

    EXTRA_FILES = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover - a dev dependency
    EXTRA_FILES = None


def _file(name: str) -> bytes:
    for folder in (PYDICOM_FILES, EXTRA_FILES):
        if folder is not None and (folder / name).is_file():
            return (folder / name).read_bytes()
    pytest.fail(f"test file {name} is not installed (pip install pydicom-data)")


# What each file must decode to: (rows, columns[, 3]). Chosen to cover every transfer syntax
# and photometric interpretation that ultrasound exports use, written by several toolkits.
MUST_DECODE = {
    "CT_small.dcm": (128, 128),  # preamble starts with a TIFF header (II*)
    "MR_small.dcm": (64, 64),  # likewise
    "MR_small_RLE.dcm": (64, 64),
    "MR_small_bigendian.dcm": (64, 64),
    "MR_small_implicit.dcm": (64, 64),
    "MR_small_jpeg_ls_lossless.dcm": (64, 64),
    "MR_small_jp2klossless.dcm": (64, 64),
    "examples_rgb_color.dcm": (240, 320, 3),  # RGB example with a TIFF preamble
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (768, 1024),  # JPEG Lossless process 14, SV1
    "JPEG-LL.dcm": (1024, 256),  # JPEG Lossless process 14, 16-bit
    "JPGExtended.dcm": (1024, 256),  # JPEG Extended, 12-bit
    "SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),
    "SC_rgb_jpeg_gdcm.dcm": (100, 100, 3),
    "SC_rgb_dcmtk_ebcynp_dcmd.dcm": (100, 100, 3),
    "SC_rgb_jls_lossy_line.dcm": (100, 100, 3),
    "SC_ybr_full_422_uncompressed.dcm": (100, 100, 3),
    "US1_J2KR.dcm": (480, 640, 3),  # ultrasound, JPEG 2000
    "US1_UNCR.dcm": (480, 640, 3),
    "gdcm-US-ALOKA-16.dcm": (480, 640, 3),  # ultrasound, written by GDCM
    "OBXXXX1A_rle_2frame.dcm": (600, 800, 3),
    "emri_small_jpeg_ls_lossless.dcm": (64, 64),
    "examples_palette.dcm": (350, 800, 3),
}


@pytest.mark.parametrize("name", sorted(MUST_DECODE))
def test_toolkit_files_decode(name):
    decoded = decode_image(_file(name))
    assert decoded.kind == "dicom"
    assert decoded.pixels.shape == MUST_DECODE[name]
    assert np.isfinite(decoded.pixels.astype(np.float64)).all()
    assert float(decoded.pixels.max()) > float(decoded.pixels.min())  # real content, not a blank


def test_every_installed_test_file_decodes_or_is_a_clean_4xx():
    folders = [PYDICOM_FILES] + ([EXTRA_FILES] if EXTRA_FILES is not None else [])
    files = sorted(p for folder in folders for p in folder.glob("*.dcm"))
    assert len(files) > 100
    decoded, decoded_without_name = 0, 0
    for path in files:
        try:
            decode_image(path.read_bytes(), filename=path.name)
            decoded += 1
        except ImageError as error:
            assert 400 <= error.status_code < 500, path.name
        try:  # the bytes alone decide: a raw dataset without preamble is recognised too
            decode_image(path.read_bytes())
            decoded_without_name += 1
        except ImageError as error:
            assert 400 <= error.status_code < 500, path.name
    assert decoded >= 120
    assert decoded_without_name == decoded


def test_dicom_is_recognised_before_a_tiff_preamble():
    data = bytearray(make_dicom())
    data[:8] = b"II*\x00\x08\x00\x00\x00"  # a TIFF header in the free-form preamble
    assert sniff_kind(bytes(data)) == "dicom"
    assert decode_image(bytes(data)).pixels.shape == (48, 64)


def _with_syntax(syntax: str, *, encapsulated: bool = True) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dicom()))
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    if encapsulated:
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "syntax, name",
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
        ("1.2.840.10008.1.2.4.102", "MPEG-4 AVC/H.264 High Profile / Level 4.1"),
        ("1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2"),
    ],
)
def test_a_syntax_without_decoder_is_415_naming_it(syntax, name):
    with pytest.raises(ImageError) as info:
        decode_image(_with_syntax(syntax))
    assert info.value.status_code == 415
    assert syntax in info.value.detail and name in info.value.detail
    assert "truncated" not in info.value.detail


def test_data_no_installed_decoder_reads_is_415_naming_the_syntax():
    # pydicom's own example that every installed JPEG decoder refuses.
    with pytest.raises(ImageError) as info:
        decode_image(_file("JPEG-lossy.dcm"))
    assert info.value.status_code == 415
    assert "JPEG Extended" in info.value.detail and "1.2.840.10008.1.2.4.51" in info.value.detail


def test_a_private_syntax_uid_is_not_echoed():
    with pytest.raises(ImageError) as info:
        decode_image(_with_syntax("1.2.3.4.5.999.SECRET".replace(".SECRET", ".77")))
    assert info.value.status_code == 415
    assert "1.2.3.4.5.999.77" not in info.value.detail


def test_header_values_are_not_echoed():
    ds = pydicom.dcmread(io.BytesIO(make_dicom()))
    ds.PhotometricInterpretation = "SECRETPHOTO"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageError) as info:
        decode_image(buffer.getvalue())
    assert info.value.status_code == 415
    assert "PhotometricInterpretation" in info.value.detail
    assert "SECRETPHOTO" not in info.value.detail and PATIENT_NAME not in info.value.detail


def test_a_file_without_file_meta_decodes_in_the_encoding_it_was_read_in():
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(io.BytesIO(make_dicom()))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)  # no preamble, no file meta
    assert decode_image(buffer.getvalue(), filename="scan.dcm").pixels.shape == (48, 64)


def _raw_dataset(data: bytes, *, little: bool, implicit: bool) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(io.BytesIO(data))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little, implicit
    write_dataset(buffer, ds)  # the dataset alone: no preamble, no "DICM", no file meta
    return buffer.getvalue()


@pytest.mark.parametrize(
    "little, implicit",
    [(True, True), (True, False), (False, False)],
    ids=["implicit-little", "explicit-little", "explicit-big"],
)
def test_a_dataset_without_preamble_is_recognised_by_its_structure(little, implicit):
    # Written so by older toolkits and PACS caches; uploaded as application/octet-stream under a
    # name without ".dcm", nothing but the bytes says it is DICOM. (8-bit pixels: pydicom's
    # write_dataset does not byte-swap OW data, so a 16-bit big-endian copy would be wrong.)
    part10 = make_dicom()
    raw = _raw_dataset(part10, little=little, implicit=implicit)
    assert raw[128:132] != b"DICM"
    assert sniff_kind(raw) == "dicom"
    decoded = decode_image(raw, filename="IM000001", content_type="application/octet-stream")
    assert decoded.kind == "dicom"
    np.testing.assert_array_equal(decoded.pixels, decode_image(part10).pixels)


def test_file_meta_without_preamble_is_recognised():
    part10 = make_dicom(bits=16)
    assert sniff_kind(part10[128:]) is None  # "DICM" itself is not a data element
    headless = part10[132:]  # starts at (0002,0000), explicit VR little endian
    assert headless[:2] == b"\x02\x00"
    np.testing.assert_array_equal(decode_image(headless).pixels, decode_image(part10).pixels)


@pytest.mark.parametrize("seed", range(4))
def test_bytes_that_only_start_like_a_dataset_are_refused_cleanly(seed):
    rng = np.random.default_rng(seed)
    noise = b"\x08\x00" + rng.bytes(4096)
    assert sniff_kind(noise) is None
    with pytest.raises(ImageError) as info:
        decode_image(noise)
    assert info.value.status_code == 415
    # A real dataset cut short: recognised by its first elements, then a clean 4xx, not a 500.
    truncated = _raw_dataset(make_dicom(), little=True, implicit=True)[: 200 + 40 * seed]
    assert sniff_kind(truncated) == "dicom"
    with pytest.raises(ImageError) as info:
        decode_image(truncated)
    assert 400 <= info.value.status_code < 500


def _encapsulated_uncompressed(data: bytes, *, drop_last_frame: bool = False) -> bytes:
    """The file in Encapsulated Uncompressed Explicit VR Little Endian: one native fragment per frame."""
    ds = pydicom.dcmread(io.BytesIO(data))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    size = len(ds.PixelData) // n_frames
    frames = [ds.PixelData[i * size : (i + 1) * size] for i in range(n_frames)]
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1.98")
    ds.PixelData = encapsulate(frames[:-1] if drop_last_frame else frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "source",
    [
        lambda: make_dicom(bits=16),
        lambda: make_dicom("RGB"),
        lambda: make_dicom(frames=3, bits=16),
    ],
    ids=["mono16", "rgb", "cine-mono16"],
)
def test_encapsulated_uncompressed_decodes_like_its_native_copy(source):
    native = source()
    wrapped = _encapsulated_uncompressed(native)
    n_frames = decode_image(native).n_frames
    for frame in range(n_frames):
        index = frame if n_frames > 1 else None
        np.testing.assert_array_equal(
            decode_image(wrapped, frame=index).pixels, decode_image(native, frame=index).pixels
        )


def test_encapsulated_uncompressed_missing_a_frame_is_422_naming_the_syntax():
    with pytest.raises(ImageError) as info:
        decode_image(_encapsulated_uncompressed(make_dicom(frames=3), drop_last_frame=True))
    assert info.value.status_code == 422
    assert "Encapsulated Uncompressed Explicit VR Little Endian (1.2.840.10008.1.2.1.98)" in info.value.detail
    assert "NumberOfFrames" in info.value.detail


# ----------------------------------------------------------------------------- SEG validation

DCIODVFY = shutil.which("dciodvfy")


def _dciodvfy_errors(content: bytes, tmp_path: Path) -> list[str]:
    if DCIODVFY is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian's dicom3tools) is not installed; scripts/test.sh installs it")
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    path = tmp_path / "seg.dcm"
    path.write_bytes(content)
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    assert any("Segmentation" in line for line in lines), lines[:5]  # it did check a SEG
    return [line for line in lines if line.startswith("Error")]


SEG_SOURCES = {
    "us-mono8": lambda: make_dicom(),
    "us-mono16-spacing": lambda: make_dicom(bits=16, pixel_spacing=(0.1, 0.1)),
    "us-regions": lambda: make_dicom(us_regions_cm=(0.01, 0.01)),
    "us-rgb": lambda: make_dicom("RGB"),
    "us-ybr": lambda: make_dicom("YBR_FULL"),
    "us-cine": lambda: make_dicom(frames=3),
    "us-cine-rgb": lambda: make_dicom("RGB", frames=2),
    "US1_UNCR.dcm": lambda: _file("US1_UNCR.dcm"),
    "gdcm-US-ALOKA-16.dcm": lambda: _file("gdcm-US-ALOKA-16.dcm"),
    "SC_rgb_2frame.dcm": lambda: _file("SC_rgb_2frame.dcm"),
    "CT_small.dcm": lambda: _file("CT_small.dcm"),
    # A malformed optional spacing is left out of the SEG (and of serving's mm²), not fatal.
    "us-spacing-nan": lambda: _with_spacing(["NaN", "0.1"]),
    "us-spacing-one-value": lambda: _with_spacing(["0.1"]),
    "us-spacing-zero": lambda: _with_spacing(["0", "0"]),
    # Header values written by scanners and anonymisers that highdicom refuses or the validator
    # fails: left empty in the SEG (never its UIDs, which the SEG must reference as they are).
    "no-patient-and-study-type-2": lambda: _with_header(
        PatientID=None, PatientName=None, PatientSex=None, StudyDate=None, StudyTime=None, StudyID=None
    ),
    "no-modality": lambda: _with_header(Modality=None),
    "malformed-dates-and-sex": lambda: _with_header(
        StudyDate="20261399", StudyTime="99xx", PatientBirthDate="abc", PatientSex="Q", PatientAge="abc"
    ),
    "too-long-values": lambda: _with_header(
        AccessionNumber="A" * 64, StudyID="S" * 40, SeriesNumber="99999999999999"
    ),
    "two-values-where-one-is-allowed": lambda: _with_header(StudyDescription="a\\b"),
    "unknown-character-set": lambda: _with_header(SpecificCharacterSet="ISO_IR 999"),
    "japanese-code-extensions": lambda: _with_header(
        SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎"
    ),
    # Found by fuzzing header values through the SEG path (each failed the validator before):
    "values-outside-their-enumeration": lambda: _with_header(
        PatientIdentityRemoved="MAYBE", LossyImageCompression="YES"
    ),
    "empty-deidentification-method": lambda: _with_header(DeidentificationMethod="\\"),
    "invalid-patient-orientation": lambda: _with_header(PatientOrientation="abc"),
    "incomplete-clinical-trial-subject": lambda: _with_header(ClinicalTrialSponsorName="A" * 70),
    "complete-clinical-trial-subject": lambda: _with_header(
        ClinicalTrialSponsorName="Sponsor", ClinicalTrialProtocolID="P-1", ClinicalTrialSubjectID="S-1"
    ),
    "latin-1-text-without-character-set": lambda: _with_header(InstitutionName="Clínica Ñuñoa"),
    "three-pixel-spacings": lambda: _with_spacing(["0.1", "0.1", "0.1"]),
    "lossy-jpeg-with-an-invalid-method": lambda: with_attributes(
        _file("SC_rgb_jpeg_dcmtk.dcm"), LossyImageCompression="01", LossyImageCompressionMethod="jpeg"
    ),
    "ct-with-unusable-slice-thickness": lambda: with_attributes(_file("CT_small.dcm"), SliceThickness="NaN"),
    # ... and inside sequence items that highdicom copies (CT_small's Other Patient IDs, the
    # procedure codes of a JPEG Lossless file written by a scanner):
    "other-patient-id-of-an-invalid-type": lambda: _with_item(
        "CT_small.dcm", "OtherPatientIDsSequence", TypeOfPatientID="-1"
    ),
    "other-patient-id-without-its-id": lambda: _with_item(
        "CT_small.dcm", "OtherPatientIDsSequence", PatientID=None
    ),
    "code-without-its-scheme": lambda: _with_item(
        "JPGLosslessP14SV1_1s_1f_8b.dcm", "ProcedureCodeSequence", CodingSchemeDesignator=None
    ),
    "modality-starting-with-a-digit": lambda: _with_header(Modality="0"),
    "empty-character-set": lambda: _with_header(SpecificCharacterSet=""),
    "frame-of-reference-without-position": lambda: _with_header(FrameOfReferenceUID="1.2.3.4"),
    "cine-frame-of-reference-without-position": lambda: _with_header(frames=3, FrameOfReferenceUID="1.2.3.4"),
    # Datasets without preamble or file meta (recognised by their structure).
    "raw-implicit-little": lambda: _raw_dataset(make_dicom(), little=True, implicit=True),
    "raw-explicit-little-rgb": lambda: _raw_dataset(make_dicom("RGB"), little=True, implicit=False),
    "encapsulated-uncompressed-cine": lambda: _encapsulated_uncompressed(make_dicom(frames=3)),
}


def _with_header(frames: int = 1, **attributes) -> bytes:
    """A synthetic ultrasound file with these header attributes set (None: removed)."""
    return with_attributes(make_dicom(frames=frames), **attributes)


def _with_item(name: str, sequence: str, **attributes) -> bytes:
    """Toolkit file ``name`` with these attributes set (None: removed) in the first item of
    its ``sequence``."""
    return with_attributes(_file(name), item_of=sequence, **attributes)


def _with_spacing(value: list[str]) -> bytes:
    return with_attributes(make_dicom(bits=16, pixel_spacing=(0.1, 0.1)), PixelSpacing=value)


@pytest.mark.parametrize("segments", ["both", "refined"])
@pytest.mark.parametrize("source", sorted(SEG_SOURCES))
def test_seg_passes_dciodvfy(source, segments, tmp_path):
    data = SEG_SOURCES[source]()
    decoded = decode_image(data, frame=1 if decode_image(data).n_frames > 1 else None)
    mask = np.zeros((decoded.height, decoded.width), bool)
    mask[decoded.height // 4 : decoded.height // 2, decoded.width // 4 : decoded.width // 2] = True
    empty = np.zeros_like(mask)
    content = build_dicom_seg(decoded, empty, mask, model_version="test-model", segments=segments)
    assert _dciodvfy_errors(content, tmp_path) == []
    seg = pydicom.dcmread(io.BytesIO(content))
    source_ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source_ds.SOPInstanceUID
    if decoded.n_frames > 1 and "ImagePositionPatient" not in source_ds:
        derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
        item = derivation.SourceImageSequence[0]
        if source_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1":  # US Multi-frame
            assert int(item.ReferencedFrameNumber) == 2
        else:
            assert "ReferencedFrameNumber" not in item


# --- native decoders that take the process down -------------------------------------------------
# Found by fuzzing uploads (byte flips of pydicom's test files): four changed bytes in a JPEG
# Baseline file make GDCM abort the interpreter (std::terminate on a gdcm::Exception), and four in
# an RLE file make pylibjpeg-rle panic (PyO3's PanicException, a BaseException).


def _patched(name: str, offset: int, replacement: bytes) -> bytes:
    data = bytearray(_file(name))
    data[offset : offset + len(replacement)] = replacement
    return bytes(data)


GDCM_ABORT = ("SC_rgb_jpeg.dcm", 972, bytes([0xFE, 0xA1, 0xC0, 0xBD]))
RLE_PANIC = ("rtdose_rle.dcm", 1897, bytes([137, 148, 243, 200]))


def test_gdcm_would_abort_the_process_so_it_never_decodes_in_it():
    pytest.importorskip("gdcm")
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGLSLossless

    # The hazard is real: GDCM in-process on this file kills the interpreter (SIGABRT).
    child = (
        "import io, sys, pydicom\n"
        "from pydicom.pixels import pixel_array\n"
        "pixel_array(pydicom.dcmread(io.BytesIO(sys.stdin.buffer.read())), decoding_plugin='gdcm')\n"
    )
    aborted = subprocess.run(
        [sys.executable, "-c", child], input=_patched(*GDCM_ABORT), capture_output=True, timeout=120
    )
    assert aborted.returncode not in (0, 1)  # killed by a signal, not a Python exception

    with pytest.raises(ImageError) as info:
        decode_image(_patched(*GDCM_ABORT))
    assert 400 <= info.value.status_code < 500  # and this process is still here to see it
    for syntax in (JPEGBaseline8Bit, JPEGLSLossless, JPEG2000):
        assert "gdcm" not in get_decoder(syntax).available_plugins


def test_gdcm_in_its_child_process_decodes_like_the_in_process_decoders():
    pytest.importorskip("gdcm")
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    from backend.app.imaging import gdcm_isolation

    decode_image(_file("SC_rgb_jpeg_gdcm.dcm"))  # GDCM leaves the process on first use
    expected = decode_image(_file("SC_rgb_jpeg_gdcm.dcm")).pixels.astype(int)
    frame = gdcm_isolation.decode_frame(_file("SC_rgb_jpeg_gdcm.dcm"), None, JPEGBaseline8Bit)
    assert frame is not None and frame.shape == expected.shape == (100, 100, 3)
    assert np.abs(frame.astype(int) - expected).max() <= 2  # libjpeg builds round YCbCr→RGB alike
    # RLE has no GDCM decoder in pydicom: nothing to try in a child
    assert not gdcm_isolation.can_decode(RLELossless)
    assert gdcm_isolation.decode_frame(_patched(*GDCM_ABORT), None, JPEGBaseline8Bit) is None


def test_a_decoder_panic_is_a_422_not_an_escaped_base_exception():
    with pytest.raises(ImageError) as info:
        decode_image(_patched(*RLE_PANIC))
    assert info.value.status_code == 422
    assert "PanicException" in info.value.detail


def test_an_element_that_cannot_be_read_is_dropped_at_decoding_not_raised_later():
    data = make_dicom()
    at = data.index(b"\x08\x00\x70\x00LO")  # Manufacturer (0008,0070), explicit VR "LO"
    broken = data[: at + 4] + b"U\x02" + data[at + 6 :]  # an unknown value representation
    with pytest.raises(NotImplementedError):  # what pydicom does on first access
        pydicom.dcmread(io.BytesIO(broken)).Manufacturer  # noqa: B018
    decoded = decode_image(broken)
    assert decoded.pixels.shape == (48, 64)
    assert "Manufacturer" not in decoded.dataset and "PatientName" in decoded.dataset
    mask = np.zeros((48, 64), dtype=bool)
    mask[10:30, 20:40] = True
    seg = build_dicom_seg(decoded, mask, mask, model_version="test")  # the header is safe to reuse
    assert seg is not None
    # the same for an element decoding needs: a clean 422 that names the attributes
    at = data.index(b"\x28\x00\x11\x00US")  # Columns (0028,0011)
    with pytest.raises(ImageError) as info:
        decode_image(data[: at + 4] + b"U\x02" + data[at + 6 :])
    assert info.value.status_code == 422 and "Columns" in info.value.detail


@pytest.mark.parametrize(
    "attributes, named",
    [
        ({"BitsAllocated": 12}, "BitsAllocated"),
        ({"BitsStored": 0}, "BitsStored"),
        ({"BitsStored": 20}, "BitsStored"),
        ({"SamplesPerPixel": 2}, "SamplesPerPixel"),
        ({"PixelRepresentation": 2}, "PixelRepresentation"),
        ({"Rows": 4000}, "Rows × Columns × NumberOfFrames"),  # more pixels than the data holds
        ({"NumberOfFrames": 999}, "Rows × Columns × NumberOfFrames"),
    ],
)
def test_an_inconsistent_pixel_module_is_422_naming_the_attribute_not_its_value(attributes, named):
    with pytest.raises(ImageError) as info:
        decode_image(with_attributes(make_dicom(), **attributes))
    assert info.value.status_code == 422
    assert named in info.value.detail and "truncated or inconsistent" not in info.value.detail
    for value in attributes.values():
        assert f" {value}" not in info.value.detail.replace("up to 64", "")


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_jp2klossless.dcm"])
@pytest.mark.parametrize("frames", [3, 10**11])
def test_more_frames_than_the_compressed_data_holds_is_422_naming_the_attribute(name, frames):
    # Found by fuzzing the SEG path: frame 1 of such a file decodes, and the SEG's per-frame array
    # (NumberOfFrames × Rows × Columns) was a 500.
    with pytest.raises(ImageError) as info:
        decode_image(with_attributes(_file(name), NumberOfFrames=str(frames)))
    assert info.value.status_code == 422 and "NumberOfFrames" in info.value.detail
    assert str(frames) not in info.value.detail
    header = pydicom.dcmread(io.BytesIO(_file(name)))
    assert decode_image(_file(name)).n_frames == int(header.get("NumberOfFrames", 1))  # as written: fine


def test_a_source_with_too_many_frames_for_a_patient_space_seg_gets_a_valid_image_space_one(
    monkeypatch, tmp_path
):
    import backend.app.dicom_seg as dicom_seg

    decoded = decode_image(_file("eCT_Supplemental.dcm"), frame=1)  # 2 frames with patient geometry
    mask = np.zeros((decoded.height, decoded.width), bool)
    mask[100:200, 100:200] = True
    in_patient_space = pydicom.dcmread(io.BytesIO(build_dicom_seg(decoded, mask, mask, model_version="t")))
    assert "PlanePositionSequence" in in_patient_space.PerFrameFunctionalGroupsSequence[0]
    monkeypatch.setattr(dicom_seg, "MAX_PATIENT_SPACE_VOXELS", 2 * decoded.height * decoded.width * 2 - 1)
    content = build_dicom_seg(decoded, mask, mask, model_version="t")
    assert _dciodvfy_errors(content, tmp_path) == []
    frame = pydicom.dcmread(io.BytesIO(content)).PerFrameFunctionalGroupsSequence[0]
    assert "PlanePositionSequence" not in frame
    assert int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber) == 2


MISSING_PIXEL_ATTRIBUTES = ["SamplesPerPixel", "BitsStored", "PixelRepresentation", "PlanarConfiguration"]


@pytest.mark.parametrize(
    "name", ["SC_rgb.dcm", "US1_J2KR.dcm", "CT_small.dcm", "SC_rgb_rle_32bit_2frame.dcm"]
)
@pytest.mark.parametrize(
    "missing", [[keyword] for keyword in MISSING_PIXEL_ATTRIBUTES] + [MISSING_PIXEL_ATTRIBUTES]
)
def test_a_missing_pixel_attribute_the_header_implies_is_assumed(name, missing):
    # Found by fuzzing header values: each was a 422 "truncated or inconsistent (AttributeError)".
    expected = decode_image(_file(name)).pixels
    decoded = decode_image(with_attributes(_file(name), **dict.fromkeys(missing)))
    np.testing.assert_array_equal(decoded.pixels, expected)


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
@pytest.mark.parametrize("value", ["\\", "1.2.3\\1.2.4"])
def test_a_seg_of_a_source_whose_uid_is_several_values_is_422_naming_it(keyword, value):
    decoded = decode_image(with_attributes(make_dicom(), **{keyword: value}))
    mask = np.ones((decoded.height, decoded.width), bool)
    with pytest.raises(ImageError) as info:
        build_dicom_seg(decoded, mask, mask, model_version="t")
    assert info.value.status_code == 422 and f"{keyword} is not one UID" in info.value.detail
    assert "1.2.3" not in info.value.detail


@pytest.mark.parametrize("keyword", ["ModalityLUTSequence", "VOILUTSequence"])
def test_a_lut_sequence_without_its_lut_is_skipped(keyword):
    # Found by fuzzing header values: an item without LUTDescriptor was a vague 422 (AttributeError).
    expected = decode_image(_file("MR_small.dcm")).pixels
    data = with_attributes(_file("MR_small.dcm"), **{keyword: pydicom.Sequence([pydicom.Dataset()])})
    assert decode_image(data).pixels.shape == expected.shape


@pytest.mark.parametrize(
    "change",
    [{"GreenPaletteColorLookupTableData": None}, {"RedPaletteColorLookupTableDescriptor": [7, 12, 0]}],
    ids=["data-missing", "descriptor-invalid"],
)
def test_a_broken_palette_is_422_naming_it(change):
    with pytest.raises(ImageError) as info:
        decode_image(with_attributes(_file("examples_palette.dcm"), **change))
    assert info.value.status_code == 422 and "palette is missing or invalid" in info.value.detail


def test_a_planar_configuration_is_only_read_from_colour_data():
    gray = with_attributes(make_dicom(), PlanarConfiguration=7)
    assert decode_image(gray).pixels.shape == (48, 64)  # gray: ignored
    with pytest.raises(ImageError, match="PlanarConfiguration is invalid"):
        decode_image(with_attributes(make_dicom("RGB"), PlanarConfiguration=7))


def test_a_seg_keeps_the_valid_patient_data_and_the_text_of_any_character_set():
    decoded = decode_image(
        _with_header(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎")
    )
    mask = np.zeros((decoded.height, decoded.width), bool)
    mask[10:20, 10:30] = True
    seg = pydicom.dcmread(io.BytesIO(build_dicom_seg(decoded, mask, mask, model_version="m")))
    assert str(seg.PatientName) == "Yamada^Tarou=山田^太郎" and seg.SpecificCharacterSet == "ISO_IR 192"
    assert (
        seg.PatientID == decoded.dataset.PatientID
        and seg.StudyInstanceUID == decoded.dataset.StudyInstanceUID
    )
    decoded = decode_image(_with_header(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Zoë"))
    seg = pydicom.dcmread(io.BytesIO(build_dicom_seg(decoded, mask, mask, model_version="m")))
    assert str(seg.PatientName) == "Müller^Zoë" and seg.SpecificCharacterSet == "ISO_IR 100"  # kept
    decoded = decode_image(_with_header(StudyDate="20261399", AccessionNumber="A" * 64))
    seg = pydicom.dcmread(io.BytesIO(build_dicom_seg(decoded, mask, mask, model_version="m")))
    assert seg.StudyDate == "" and seg.AccessionNumber == ""  # left empty, not made up
    assert decoded.dataset.StudyDate == "20261399"  # the decoded header itself is untouched


def _invalid_uid(line: str) -> bool:
    """A validator error about one of the source's own UIDs, which the SEG must copy as they are
    (pydicom's test data holds a few: a root of 999, a hexadecimal hash)."""
    return "UID" in line or "embedded numeric component" in line or "invalid data values" in line


def test_every_installed_toolkit_image_gets_a_seg_that_passes_the_validator(tmp_path):
    folders = [PYDICOM_FILES] + ([EXTRA_FILES] if EXTRA_FILES is not None else [])
    clean, refused, source_uids = [], [], []
    for path in sorted(p for folder in folders for p in folder.glob("*.dcm")):
        data = path.read_bytes()
        try:
            decoded = decode_image(data)
            if decoded.n_frames > 1:
                decoded = decode_image(data, frame=decoded.n_frames - 1)
        except ImageError:
            continue  # not an image this service decodes (covered above)
        mask = np.zeros((decoded.height, decoded.width), bool)
        mask[decoded.height // 4 : decoded.height // 2, decoded.width // 4 : decoded.width // 2] = True
        try:
            content = build_dicom_seg(decoded, mask, mask, model_version="m")
        except ImageError as error:
            # Only what a SEG cannot do without: the study to place it in, an image to reference.
            assert error.status_code == 422 and (
                "lacks StudyInstanceUID" in error.detail or "itself a" in error.detail
            )
            refused.append(path.name)
            continue
        errors = _dciodvfy_errors(content, tmp_path)
        if errors:
            assert all(_invalid_uid(line) for line in errors), (path.name, errors[:3])
            source_uids.append(path.name)
        else:
            clean.append(path.name)
    print(
        f"SEG census: {len(clean)} clean, {len(source_uids)} with invalid source UIDs, {len(refused)} refused"
    )
    assert len(clean) >= 110, (len(clean), refused, source_uids)
    assert len(source_uids) <= 3
