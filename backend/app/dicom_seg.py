"""DICOM Segmentation (SEG) output for DICOM input, built with highdicom.

A BINARY Segmentation instance that references the source image (its SOPInstanceUID, and the
frame for multi-frame images), in a new series of the source study, with one segment per mask:
``coarse`` (TransUNet) and ``refined`` (refiner), or only ``refined``.
"""

from __future__ import annotations

import copy
import io
import logging
import re
from typing import Literal

import numpy as np

from backend.app.imaging import DecodedImage, ImageError
from backend.app.seg_source import seg_ready

log = logging.getLogger(__name__)

SegmentChoice = Literal["both", "refined"]
MANUFACTURER = "UltraRefiner Studio"
# A patient-space SEG holds one (mostly empty) mask frame per source frame, so its array grows with
# the source's frame count; above this many mask pixels the image-space SEG of the one segmented
# frame, which is also valid, is built instead (e.g. 2 segments × 244 frames of 512×512).
MAX_PATIENT_SPACE_VOXELS = 128_000_000


def build_dicom_seg(
    decoded: DecodedImage,
    coarse_mask: np.ndarray,
    refined_mask: np.ndarray,
    *,
    model_version: str,
    segments: SegmentChoice = "both",
) -> bytes:
    """DICOM SEG Part 10 bytes for the masks (``H×W`` bool) of ``decoded`` (a DICOM frame)."""
    if decoded.kind != "dicom" or decoded.dataset is None:
        raise ImageError("format=dicom-seg needs a DICOM upload (the input is not DICOM)", 415)
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = decoded.dataset
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = source.get(keyword)
        if not value:
            raise ImageError(f"the source DICOM lacks {keyword}; a Segmentation cannot reference it", 422)
        if not isinstance(value, str) or not value.strip():
            # Several values (or blank ones) where one UID belongs; a single UID of an odd form
            # (a root of 999, a hash) is referenced as it is.
            raise ImageError(
                f"the source DICOM's {keyword} is not one UID; a Segmentation cannot reference it", 422
            )

    masks = (
        [("refined", refined_mask)]
        if segments == "refined"
        else [("coarse", coarse_mask), ("refined", refined_mask)]
    )
    descriptions = []
    for number, (label, _) in enumerate(masks, start=1):
        algorithm = hd.AlgorithmIdentificationSequence(
            name=f"UltraRefiner {label}",
            version=model_version[:64],
            family=codes.cid7162.ArtificialIntelligence,
        )
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{label} lesion",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )

    stacked = np.stack([mask.astype(bool) for _, mask in masks], axis=-1)  # H×W×S
    original_class = str(source.SOPClassUID)
    if original_class == _SEGMENTATION_STORAGE:
        raise ImageError("the source DICOM is itself a Segmentation; a SEG references an image", 422)

    def build(header, pixel_array: np.ndarray):
        try:
            return hd.seg.Segmentation(
                source_images=[header],
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=_series_number(header),
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name="UltraRefiner",
                software_versions=model_version[:64],
                device_serial_number="0",
                series_description="UltraRefiner lesion segmentation",
                content_label=_content_label(header),
                omit_empty_frames=bool(pixel_array.any()),
            )
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            log.info("DICOM SEG: highdicom refused the header (%s)", type(error).__name__)
            return None

    n_frames = max(1, decoded.n_frames)
    ready = seg_ready(source)  # what highdicom copies, valid; the geometry is judged on it too
    seg = None
    if n_frames * stacked.size > MAX_PATIENT_SPACE_VOXELS:
        log.info("DICOM SEG: NumberOfFrames is too large for a patient-space SEG; built in image space")
    elif _has_patient_geometry(ready):
        # In patient space: one mask frame per source frame, only the segmented one non-empty
        # (empty frames omitted).
        pixel_array = np.zeros((n_frames, *stacked.shape), dtype=bool)
        pixel_array[decoded.frame] = stacked
        seg = build(ready, pixel_array)
    if seg is None:
        # In image space: 2-D and cine ultrasound (no position in patient space, at most a
        # FrameOfReferenceUID), headers whose geometry highdicom refuses, SOP classes it does not
        # know, sources with too many frames. Built from an image-space view of the header, then
        # every reference is pointed at the source's real SOP class and, for a multi-frame source,
        # at the segmented frame.
        seg = build(_image_space_view(ready), stacked[None])
        if seg is None:
            raise ImageError("a DICOM Segmentation could not be built for this source image", 422)
        _reference_source(seg, original_class, decoded.frame + 1 if n_frames > 1 else None)
    _patient_orientation(seg, decoded.dataset)
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def _has_patient_geometry(source) -> bool:
    """Whether the source places its frames in a frame of reference completely enough for a SEG
    in patient space: the plane position, orientation, spacing and thickness of a classic image
    (each the right count of finite numbers; spacing and thickness positive), or the functional
    groups of an enhanced multi-frame one."""
    if "FrameOfReferenceUID" not in source:
        return False
    if any("PlanePositionSequence" in group for group in _functional_groups(source)):
        return True
    from backend.app.imaging.dicom import positive_pair

    position = _finite_numbers(source.get("ImagePositionPatient"), 3)
    orientation = _finite_numbers(source.get("ImageOrientationPatient"), 6)
    thickness = _finite_numbers(source.get("SliceThickness"), 1)
    return (
        position is not None
        and orientation is not None
        and positive_pair(source.get("PixelSpacing")) is not None
        and thickness is not None
        and thickness[0] > 0
    )


def _finite_numbers(value, count: int) -> list[float] | None:
    """``count`` finite numbers from a DS attribute's value, else ``None``."""
    if value is None or value == "":
        return None
    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = [float(item) for item in values]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _series_number(source) -> int:
    """The source's SeriesNumber + 1000 (the SEG's own series beside it), within IS's range."""
    try:
        number = int(source.get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        return 1000
    return number if 1 <= number <= 2**31 - 1 else 1000


def _content_label(source) -> str:
    """``<Modality>_SEG`` as highdicom names it (``US_SEG``), ``LESION_SEG`` without a usable
    Modality (a CS value of at most 16 characters that starts with a letter)."""
    modality = str(source.get("Modality") or "").strip()
    label = f"{modality}_SEG"
    if re.fullmatch(r"[A-Z][A-Z0-9_]{0,15}", label):
        return label
    return "LESION_SEG"


_US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
#: Image storage SOP classes that are single-frame by definition (PS3.3): a reference to one of
#: their instances never names a frame, even when a file of that class carries NumberOfFrames.
_SINGLE_FRAME_CLASSES = frozenset(
    "1.2.840.10008.5.1.4.1.1." + suffix
    for suffix in (
        "1",  # CR
        "1.1",
        "1.1.1",
        "1.2",
        "1.2.1",
        "1.3",
        "1.3.1",  # DX, MG, IO
        "2",
        "4",
        "6",
        "6.1",
        "7",
        "128",  # CT, MR, US (retired and current), SC, PET
        "77.1.1",
        "77.1.2",
        "77.1.3",
        "77.1.4",  # VL endoscopic, microscopic, slide, photographic
    )
)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


#: What an image-space SEG must not copy: frames, timing and the position in patient space.
_PATIENT_SPACE_AND_FRAMES = (
    "NumberOfFrames",
    "FrameIncrementPointer",
    "FrameTime",
    "FrameTimeVector",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


def _image_space_view(source):
    """A copy of the header that highdicom takes as one 2-D image without a position in patient
    space: of the Ultrasound Image class for ultrasound, of Secondary Capture otherwise."""
    view = copy.deepcopy(source)
    for keyword in _PATIENT_SPACE_AND_FRAMES:
        if keyword in view:
            del view[keyword]
    thickness = _finite_numbers(view.get("SliceThickness"), 1)
    if "SliceThickness" in view and (thickness is None or thickness[0] <= 0):
        del view.SliceThickness  # highdicom copies it into the pixel measures, where it must hold one
    view.SOPClassUID = _US_IMAGE_STORAGE if str(source.get("Modality", "")) == "US" else _SECONDARY_CAPTURE
    return view


def _reference_source(seg, original_class: str, frame_number: int | None) -> None:
    """Point every reference at the source instance's real SOP class and, for a multi-frame
    source (``frame_number``, 1-based), the derivation of each mask frame at the segmented frame.

    ReferencedFrameNumber belongs to the image references of the derivation (the Image SOP
    Instance Reference macro of SourceImageSequence), not to the series/instance list of the
    Common Instance Reference module, where the validator rejects it.
    """
    for series in seg.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedInstanceSequence", []):
            item.ReferencedSOPClassUID = original_class
    names_frames = frame_number is not None and original_class not in _SINGLE_FRAME_CLASSES
    for group in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in group.get("DerivationImageSequence", []):
            for item in derivation.get("SourceImageSequence", []):
                item.ReferencedSOPClassUID = original_class
                if names_frames:
                    item.ReferencedFrameNumber = frame_number


def _patient_orientation(seg, source) -> None:
    """PatientOrientation (General Image module) is type 2C: required, possibly empty, when the
    image carries no orientation in patient space — no PlaneOrientationSequence, as in 2-D
    ultrasound, with or without a FrameOfReferenceUID. Copied from the source image where it has
    a valid one, else present and empty."""
    if "PatientOrientation" in seg or _has_plane_orientation(seg):
        return
    value = source.get("PatientOrientation") if source is not None else None
    seg.PatientOrientation = value if _valid_patient_orientation(value) else None


def _valid_patient_orientation(value) -> bool:
    """Two values (the row and the column direction), each letters of L, R, A, P, H and F
    (PS3.3 C.7.6.1.1.1); anything else is left out of the SEG, where the attribute may be empty."""
    values = [str(item).strip() for item in value] if value is not None and not isinstance(value, str) else []
    return len(values) == 2 and all(item and set(item) <= set("LRAPHF") for item in values)


def _has_plane_orientation(seg) -> bool:
    return any("PlaneOrientationSequence" in group for group in _functional_groups(seg))


def _functional_groups(dataset) -> list:
    """The shared and the per-frame functional group items of a multi-frame dataset."""
    return list(dataset.get("SharedFunctionalGroupsSequence", [])) + list(
        dataset.get("PerFrameFunctionalGroupsSequence", [])
    )
