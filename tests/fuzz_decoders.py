"""Mutation fuzzing of the upload decoders and of the DICOM SEG built from an upload; prints JSON.

``--target image`` (default): :func:`backend.app.imaging.decode_image`, what ``/segment`` and
``/api/corrections`` read an upload with. ``--target mask``:
:func:`backend.app.corrections.decode_mask`, the corrected mask saved beside it (seeds: a binary
mask in PNG, BMP, TIFF, GIF, WebP and JPEG). ``--target seg``: what ``/segment?format=dicom-seg``
does with a DICOM upload (decoding, then :func:`backend.app.dicom_seg.build_dicom_seg`), on files
whose header *values* are changed instead of their bytes: one to four attributes a SEG copies or
reads (patient, study, geometry, frames, character set, de-identification, compression) removed
or set to values of the wrong form, written again with pydicom. With ``--validate`` every SEG is
checked by ``dciodvfy`` (Debian's dicom3tools), and a SEG with an error that is not about one of
the source's own UIDs (which the SEG must copy as they are) is a finding too.

Seeds: a BUSI image saved as PNG, JPEG, BMP, TIFF and WebP, and every DICOM file pydicom ships
(all its transfer syntaxes, written by dcmtk, GDCM and scanners). Each case flips bytes, truncates,
or overwrites four bytes near the header of one seed, and is decoded in *this* process: an
outcome other than a decoded image or an :class:`~backend.app.imaging.ImageError` with a 4xx
status is a finding, and a native decoder that aborts the process shows as this script's death
(run it as a child, as ``tests/unit/test_decoder_fuzz.py`` does). Before each case the script
writes the case's number on stderr, so the parent knows which one killed it.

    python tests/fuzz_decoders.py [--iterations 300] [--seed 0] [--target image|mask|seg] [--validate]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUSI_IMAGE = REPO_ROOT.parent / "shared" / "data" / "BUSI" / "Dataset_BUSI_with_GT" / "benign"
BUSI_IMAGE = BUSI_IMAGE / "benign (1).png"


def seeds() -> list[tuple[str, bytes]]:
    import pydicom.data
    from PIL import Image

    cases: list[tuple[str, bytes]] = []
    if BUSI_IMAGE.is_file():
        with Image.open(BUSI_IMAGE) as image:
            gray = image.convert("L")
            for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP"):
                buffer = io.BytesIO()
                gray.save(buffer, fmt)
                cases.append((f"busi.{fmt.lower()}", buffer.getvalue()))
    folder = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(folder.glob("*.dcm")):
        if path.stat().st_size <= 2_000_000:
            cases.append((path.name, path.read_bytes()))
    return cases


MASK_SHAPE = (120, 160)


def mask_seeds() -> list[tuple[str, bytes]]:
    import numpy as np
    from PIL import Image

    mask = np.zeros(MASK_SHAPE, dtype=np.uint8)
    mask[30:80, 40:100] = 255
    cases = []
    for fmt in ("PNG", "BMP", "TIFF", "GIF", "WEBP", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, fmt)
        cases.append((f"mask.{fmt.lower()}", buffer.getvalue()))
    return cases


def dicom_seeds() -> list[tuple[str, bytes]]:
    """pydicom's and pydicom-data's DICOM images of at most 2 MB (every toolkit and syntax)."""
    import pydicom.data

    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store

        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:  # pydicom-data is a dev dependency
        pass
    return [
        (path.name, path.read_bytes())
        for folder in folders
        for path in sorted(folder.glob("*.dcm"))
        if path.stat().st_size <= 2_000_000
    ]


#: Header attributes a SEG copies from its source or reads to place it (patient, study, series,
#: geometry, frames, character set, de-identification, compression, clinical trial), and those
#: decoding reads (the pixel module, the modality and VOI transforms, the palette).
HEADER_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight", "OtherPatientIDs", "IssuerOfPatientID", "PatientIdentityRemoved",
    "DeidentificationMethod", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialSubjectID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "SOPClassUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
    "ReferringPhysicianName", "SeriesNumber", "SeriesDescription", "InstanceNumber", "Modality",
    "Manufacturer", "InstitutionName", "ContentDate", "ContentTime", "AcquisitionDateTime",
    "TimezoneOffsetFromUTC", "SpecificCharacterSet", "FrameOfReferenceUID", "ImagePositionPatient",
    "ImageOrientationPatient", "PatientOrientation", "PatientPosition", "PixelSpacing",
    "ImagerPixelSpacing", "PixelAspectRatio", "SliceThickness", "NumberOfFrames",
    "FrameIncrementPointer", "FrameTime", "SequenceOfUltrasoundRegions",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence", "ImageType", "Laterality", "ImageLaterality",
    "BodyPartExamined", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "BurnedInAnnotation", "AnatomicRegionSequence",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PlanarConfiguration", "PhotometricInterpretation", "WindowCenter",
    "WindowWidth", "VOILUTFunction", "VOILUTSequence", "RescaleSlope", "RescaleIntercept",
    "RescaleType", "ModalityLUTSequence", "RedPaletteColorLookupTableDescriptor",
)  # fmt: skip
#: Values of the wrong form for most of them: empty, separators, out of range, wrong kind, too
#: long, bytes beyond ASCII, character-set terms, enumerated values of other attributes.
BAD_VALUES = (
    "", " ", "\\", "\x00", "abc", "1\\2\\3", "-1", "0", "1e309", "nan", "99999999999999999999",
    "19991399", "99xx", "\u00ff\u00ff", "A" * 70, "1.2.3", "0.0.0", "-0.5\\0.5", "1\\0\\0\\0\\1\\0",
    "YES", "NO", "01", "ISO_IR 100", "ISO_IR 192", "\\ISO 2022 IR 87", "ISO 2022 IR 13",
)  # fmt: skip


#: Integers of the wrong size for the pixel module's binary attributes.
BAD_INTEGERS = (0, 1, 2, 3, 7, 12, 16, 17, 33, 255, 65535)


def tag_keyword(tag) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or ""


def mutate_header(data: bytes, rng: random.Random) -> bytes | None:
    """``data`` (a DICOM file) with one to four header attributes removed or given a bad value;
    ``None`` when pydicom cannot write the result (a value it refuses for its VR)."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for _ in range(rng.randint(1, 4)):
            present = [e for e in ds if e.tag != 0x7FE00010 and e.tag.group != 0x0002]
            choice = rng.random()
            if present and choice < 0.2:
                del ds[rng.choice(present).tag]
                continue
            target, tag = ds, tag_for_keyword(rng.choice(HEADER_KEYWORDS))
            items = [item for e in ds.iterall() if e.VR == "SQ" for item in e.value if len(item)]
            if items and choice < 0.35:  # inside a sequence item (ultrasound regions, codes, groups)
                target = rng.choice(items)
                inner = [e for e in target if e.VR != "SQ"]
                if inner and rng.random() < 0.3:
                    del target[rng.choice(inner).tag]
                    continue
                if inner:
                    tag = rng.choice(inner).tag
            vr = target[tag].VR if tag in target else dictionary_VR(tag)
            if vr == "SQ":
                value = pydicom.Sequence([pydicom.Dataset() for _ in range(rng.randint(0, 2))])
            elif vr in ("US", "SS", "UL", "SL", "US or SS", "US or SS or OW"):
                value = rng.choice(BAD_INTEGERS)
                if "PaletteColorLookupTableDescriptor" in tag_keyword(tag):
                    value = [value, rng.choice(BAD_INTEGERS), rng.choice((8, 16, 0, 33))]
                vr = "US" if vr.startswith("US") else vr
            elif vr in ("FD", "FL"):
                value = rng.choice((float("nan"), float("inf"), -1.0, 0.0, 1e300))
            elif vr in ("AT", "OB", "OW", "OF", "OD", "OL", "UN"):
                value = b"\x00\x01"  # binary: two odd bytes
            elif vr == "UI":
                # Blank or several values, which a SEG cannot reference (a 422); one UID of an odd
                # form is referenced as it is, so the validator's objections to it are the source's.
                value = rng.choice(("", " ", "\\", "1.2.3\\1.2.4"))
            else:
                value = rng.choice(BAD_VALUES)
            target.add(DataElement(tag, vr, value))
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - a value pydicom will not write is no upload
        return None
    return buffer.getvalue()


def own_uid_error(line: str) -> bool:
    """A validator error about one of the source's own UIDs, copied into the SEG as they are."""
    return "UID" in line or "embedded numeric component" in line or "invalid data values" in line


def seg_errors(content: bytes) -> list[str]:
    """``dciodvfy``'s errors on a SEG, except those about the source's own UIDs."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(content)
        handle.flush()
        result = subprocess.run(
            ["dciodvfy", handle.name], capture_output=True, text=True, errors="replace", timeout=60
        )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error") and not own_uid_error(line)]


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    choice = rng.random()
    if choice < 0.4:
        for _ in range(rng.randint(1, 20)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif choice < 0.7:
        del out[rng.randrange(1, len(out)) :]
    else:
        at = rng.randrange(min(len(out), 2000))
        out[at : at + 4] = rng.randbytes(4)
    return bytes(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=("image", "mask", "seg"), default="image")
    parser.add_argument("--validate", action="store_true", help="seg: check every SEG with dciodvfy")
    args = parser.parse_args(argv)
    if args.validate and shutil.which("dciodvfy") is None:
        parser.error("--validate needs dciodvfy (Debian's dicom3tools)")

    import warnings

    import numpy as np

    from backend.app.corrections import decode_mask
    from backend.app.dicom_seg import build_dicom_seg
    from backend.app.imaging import ImageError, decode_image, silence_decoder_logs
    from backend.app.serving.service import decode_upload

    silence_decoder_logs()
    logging.disable(logging.INFO)  # the SEG's one line per changed header: not this report's
    warnings.simplefilter("ignore")  # pydicom's warnings on the values this script writes
    rng = random.Random(args.seed)
    cases = {"image": seeds, "mask": mask_seeds, "seg": dicom_seeds}[args.target]()
    outcomes = {"decoded": 0, "4xx": 0}
    if args.target == "seg":
        outcomes["unwritable"] = 0
    findings: list[dict] = []
    for iteration in range(args.iterations):
        name, data = cases[rng.randrange(len(cases))]
        mutated = mutate_header(data, rng) if args.target == "seg" else mutate(data, rng)
        if mutated is None:
            outcomes["unwritable"] += 1
            continue
        print(f"case {iteration} {name}", file=sys.stderr, flush=True)
        is_dicom = name.endswith(".dcm")
        try:
            if args.target == "mask":
                decode_mask(mutated, MASK_SHAPE)
            elif args.target == "seg":
                decoded = decode_upload(mutated, frame=None, max_pixels=40_000_000)
                mask = np.zeros((decoded.height, decoded.width), dtype=bool)
                mask[: max(1, decoded.height // 2), : max(1, decoded.width // 2)] = True
                content = build_dicom_seg(decoded, mask, mask, model_version="fuzz")
                errors = seg_errors(content) if args.validate else []
                if errors:
                    findings.append({"case": iteration, "seed_file": name, "validator": errors[:3]})
            else:
                decode_image(mutated, content_type="application/dicom" if is_dicom else None, filename=name)
            outcomes["decoded"] += 1
        except ImageError as error:
            if 400 <= error.status_code < 500:
                outcomes["4xx"] += 1
            else:
                findings.append({"case": iteration, "seed_file": name, "status": error.status_code})
        except BaseException as error:  # noqa: B036 - anything else is what the fuzzer looks for
            if isinstance(error, KeyboardInterrupt):
                raise
            findings.append({"case": iteration, "seed_file": name, "exception": type(error).__name__})
    report = {
        "target": args.target,
        "iterations": args.iterations,
        "seed": args.seed,
        "seed_files": len(cases),
        **outcomes,
        "findings": findings,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
