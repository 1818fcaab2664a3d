"""The source header a DICOM SEG is built from: what highdicom copies out of it must be valid.

highdicom copies the patient and study attributes of the source image into the Segmentation and
refuses some that are missing or malformed (no PatientID, a StudyDate of month 13, a PatientSex
of ``Q``, an unknown SpecificCharacterSet); others it copies as they are, and DICOM's validator
then fails the SEG (an AccessionNumber of 64 characters, a SeriesNumber beyond 2^31 − 1).
Scanner exports and anonymisers write such values. :func:`seg_ready` returns a copy of the
header in which

* every top-level text attribute whose value is not valid for its value representation, or that
  holds several values where the dictionary allows one, is left empty (UIDs are never touched:
  the SEG must reference the source by them, as they are);
* the type-2 attributes highdicom reads unconditionally are present (empty when the source has
  none), and a PatientSex other than M, F or O is empty;
* a SpecificCharacterSet highdicom does not take as it is (unknown terms, ``ISO_IR 6``, code
  extensions such as the ``\\ISO 2022 IR 87`` of Japanese exports) becomes UTF-8 (``ISO_IR 192``):
  pydicom has already decoded the text, so the SEG is written in a character set that holds it;
* a source that says its patient identity was removed but not how gets the DeidentificationMethod
  ``Not stated in the source image`` (type 1C once PatientIdentityRemoved is YES);
* a PixelSpacing or ImagerPixelSpacing that is not two positive finite numbers is removed
  (serving ignores such a spacing too: no area in mm²).

One log line names the attributes changed, never their values.
"""

from __future__ import annotations

import copy
import logging

log = logging.getLogger(__name__)

#: Patient and study attributes highdicom reads from the source without a default (all type 2).
REQUIRED_TYPE_2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
#: Value representations checked: the text ones. Binary numbers are always valid; UIDs are kept;
#: sequences, bulk data and the pixel module (validated by decoding) are not copied as text.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
_IS_RANGE = 2**31 - 1


def seg_ready(source):
    """A copy of ``source`` (a pydicom dataset, pixel data dropped) that highdicom can build a
    valid SEG from; the original is left as it is."""
    view = copy.deepcopy(source)
    changed = [element.keyword or str(element.tag) for element in list(view) if _blank_if_invalid(element)]
    for keyword in REQUIRED_TYPE_2:
        if keyword not in view:
            setattr(view, keyword, None)
    if str(view.get("PatientSex") or "") not in ("", "M", "F", "O"):
        view.PatientSex = None
        changed.append("PatientSex")
    if (
        str(view.get("PatientIdentityRemoved") or "").upper() == "YES"
        and not view.get("DeidentificationMethod")
        and not view.get("DeidentificationMethodCodeSequence")
    ):
        # Type 1C once identity is said removed; the source does not say how, and neither can we.
        view.DeidentificationMethod = "Not stated in the source image"
        changed.append("DeidentificationMethod")
    character_set = view.get("SpecificCharacterSet")
    if _writable_character_set(character_set) != character_set:
        view.SpecificCharacterSet = "ISO_IR 192"
        changed.append("SpecificCharacterSet")
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in view and not _usable_spacing(view, keyword):
            del view[keyword]
            changed.append(keyword)
    if changed:
        log.info(
            "DICOM SEG: %d source attribute(s) not valid as they were, left empty or re-encoded: %s",
            len(changed),
            ", ".join(sorted(set(changed))),
        )
    return view


def _blank_if_invalid(element) -> bool:
    """Empty ``element`` when one of its values is invalid for its VR; whether it was."""
    from pydicom import config
    from pydicom.valuerep import DA, DT, TM, validate_value

    if element.VR not in _TEXT_VRS or element.tag.group in (0x0002, 0x0028) or element.is_empty:
        return False
    if element.keyword in ("SpecificCharacterSet", "ImagerPixelSpacing"):
        return False  # handled on their own (PixelSpacing is in group 0028, skipped above)
    values = element.value if element.VM > 1 else [element.value]
    if element.VM > 1 and _single_valued(element.tag):
        element.value = None  # e.g. a backslash inside a StudyDescription: two values where one is allowed
        return True
    try:
        for value in values:
            if value is None or value == "":
                continue
            text = str(value)
            validate_value(element.VR, text, config.RAISE)
            if element.VR == "DA":
                DA(text)
            elif element.VR == "TM":
                TM(text)
            elif element.VR == "DT":
                DT(text)
            elif element.VR == "IS" and not -_IS_RANGE <= int(float(text)) <= _IS_RANGE:
                raise ValueError("IS out of range")
    except (ValueError, TypeError, OverflowError):
        element.value = None
        return True
    return False


def _single_valued(tag) -> bool:
    from pydicom.datadict import dictionary_VM

    try:
        return dictionary_VM(tag) == "1"
    except KeyError:  # a private or unknown attribute: nothing to hold it to
        return False


def _writable_character_set(value):
    """``value`` when highdicom writes a SEG with it unchanged (absent, or one plain character
    set it lists), else ``"ISO_IR 192"``."""
    from highdicom.enum import SpecificCharacterSetValues

    terms = [value] if isinstance(value, str) else list(value or [])
    terms = [str(term).strip() for term in terms]
    if not any(terms):
        return value
    plain = {member.value for member in SpecificCharacterSetValues if not member.value.startswith("ISO 2022")}
    return value if len(terms) == 1 and terms[0] in plain else "ISO_IR 192"


def _usable_spacing(view, keyword: str) -> bool:
    from backend.app.imaging.dicom import positive_pair

    try:
        return positive_pair(view.get(keyword)) is not None
    except (TypeError, ValueError, OverflowError):  # a value pydicom cannot even convert
        return False
