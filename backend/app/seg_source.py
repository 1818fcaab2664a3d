"""The source header a DICOM SEG is built from: what highdicom copies out of it must be valid.

highdicom copies the patient and study attributes of the source image into the Segmentation and
refuses some that are missing or malformed (no PatientID, a StudyDate of month 13, a PatientSex
of ``Q``, an unknown SpecificCharacterSet); others it copies as they are, and DICOM's validator
then fails the SEG (an AccessionNumber of 64 characters, a SeriesNumber beyond 2^31 − 1).
Scanner exports and anonymisers write such values. :func:`seg_ready` returns a copy of the
header in which

* every top-level text attribute whose value is not valid for its value representation, or that
  holds several values where the dictionary allows one, is left empty (UIDs are never touched:
  the SEG must reference the source by them, as they are), and a sequence holding such a value at
  any depth is removed (:func:`_invalid_sequences`);
* the type-2 attributes highdicom reads unconditionally are present (empty when the source has
  none), and a PatientSex other than M, F or O is empty;
* a SpecificCharacterSet highdicom does not take as it is (unknown terms, ``ISO_IR 6``, code
  extensions such as the ``\\ISO 2022 IR 87`` of Japanese exports), or one that cannot hold the
  text (none declared, with bytes beyond ASCII), becomes UTF-8 (``ISO_IR 192``): pydicom has
  already decoded the text, so the SEG is written in a character set that holds it;
* a PatientIdentityRemoved other than YES or NO, and a lossy-compression ratio or method that is
  not valid, are removed; a LossyImageCompression other than 00 or 01 becomes 01 when the file's
  transfer syntax is lossy, else highdicom's 00 (:func:`_enumerated_values`);
* a Clinical Trial Subject module without its type-1 values is removed whole, and a complete one
  gets its type-2 attributes (:func:`_clinical_trial_subject`);
* a source that says its patient identity was removed but not how gets the DeidentificationMethod
  ``Not stated in the source image`` (type 1C once PatientIdentityRemoved is YES), and an empty
  DeidentificationMethod is removed;
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
    changed += _invalid_sequences(view)
    for keyword in REQUIRED_TYPE_2:
        if keyword not in view:
            setattr(view, keyword, None)
    if str(view.get("PatientSex") or "") not in ("", "M", "F", "O"):
        view.PatientSex = None
        changed.append("PatientSex")
    changed += _enumerated_values(view)
    changed += _clinical_trial_subject(view)
    if "DeidentificationMethod" in view and _blank(view.DeidentificationMethod):
        del view.DeidentificationMethod  # type 1C: present only with a value
        changed.append("DeidentificationMethod")
    if (
        str(view.get("PatientIdentityRemoved") or "").upper() == "YES"
        and not view.get("DeidentificationMethod")
        and not view.get("DeidentificationMethodCodeSequence")
    ):
        # Type 1C once identity is said removed; the source does not say how, and neither can we.
        view.DeidentificationMethod = "Not stated in the source image"
        changed.append("DeidentificationMethod")
    if "SpecificCharacterSet" in view and _blank(view.SpecificCharacterSet):
        del view.SpecificCharacterSet  # present but empty: the default repertoire, as when absent
        changed.append("SpecificCharacterSet")
    character_set = view.get("SpecificCharacterSet")
    if _writable_character_set(character_set) != character_set or not _text_fits(view, character_set):
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
    if _invalid(element):
        element.value = None
        return True
    return False


def _invalid(element) -> bool:
    """Whether a text ``element`` holds a value invalid for its VR, or several values where the
    dictionary allows one (e.g. a backslash inside a StudyDescription). The pixel module (group
    0028, validated by decoding), SpecificCharacterSet and ImagerPixelSpacing are judged on their
    own."""
    from pydicom import config
    from pydicom.valuerep import DA, DT, TM, validate_value

    if element.VR not in _TEXT_VRS or element.tag.group in (0x0002, 0x0028) or element.is_empty:
        return False
    if element.keyword in ("SpecificCharacterSet", "ImagerPixelSpacing"):
        return False
    if element.VM > 1 and _single_valued(element.tag):
        return True
    values = element.value if element.VM > 1 else [element.value]
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
        return True
    return False


#: Groups whose sequences are not checked here: file meta, the pixel module (LUTs, palettes:
#: decoding's), the functional groups (highdicom reads their geometry, judged in dicom_seg).
_UNCHECKED_SEQUENCE_GROUPS = (0x0002, 0x0028, 0x5200)
#: Items of these sequences need these attributes with a value (the Patient module's
#: Other Patient IDs: PatientID and TypeOfPatientID, both type 1).
_ITEM_REQUIRED = {"OtherPatientIDsSequence": ("PatientID", "TypeOfPatientID")}


def _invalid_sequences(view) -> list[str]:
    """Top-level sequences that highdicom may copy into the SEG (patient, study, series) in
    which any value, however deep, is invalid for its VR are removed whole (they are optional
    there, and an item cannot be mended without knowing its macro); items of a sequence in
    :data:`_ITEM_REQUIRED` without their required values are dropped."""
    removed = []
    for element in list(view):
        if element.VR != "SQ" or element.tag.group in _UNCHECKED_SEQUENCE_GROUPS:
            continue
        required = _ITEM_REQUIRED.get(element.keyword, ())
        items = [item for item in element.value if all(not _blank(item.get(k)) for k in required)]
        if len(items) != len(element.value) or any(_holds_invalid(item) for item in items):
            if items and not any(_holds_invalid(item) for item in items):
                element.value = items
            else:
                del view[element.tag]
            removed.append(element.keyword or str(element.tag))
    return removed


def _holds_invalid(item) -> bool:
    """Whether a sequence item holds an invalid value at any depth, or is an incomplete coded
    entry (PS3.3 8.8: CodeMeaning, a code value and, but for a URN code, its scheme)."""
    codes = ("CodeValue", "LongCodeValue", "URNCodeValue")
    if any(keyword in item for keyword in (*codes, "CodeMeaning")):
        if _blank(item.get("CodeMeaning")) or all(_blank(item.get(keyword)) for keyword in codes):
            return True
        if _blank(item.get("URNCodeValue")) and _blank(item.get("CodingSchemeDesignator")):
            return True
    for element in item:
        if element.VR == "SQ":
            if any(_holds_invalid(inner) for inner in element.value):
                return True
        elif _invalid(element):
            return True
    return False


#: LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5) of the compressed transfer syntaxes.
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    **{f"1.2.840.10008.1.2.4.{n}": "ISO_13818_2" for n in (100, 101)},
    **{f"1.2.840.10008.1.2.4.{n}": "ISO_14496_10" for n in (102, 103, 104, 105, 106)},
    **{f"1.2.840.10008.1.2.4.{n}": "ISO_23008_2" for n in (107, 108)},
}
#: The syntaxes whose pixel data has been through lossy compression: all of the above but JPEG
#: 2000, which may be lossless too (the LossyImageCompression is then left to highdicom's 00).
_LOSSY_SYNTAXES = frozenset(_LOSSY_METHODS) - {"1.2.840.10008.1.2.4.91"}


def _enumerated_values(view) -> list[str]:
    """The source attributes highdicom copies into the SEG whose values the standard enumerates:
    one that holds none of them is removed (PatientIdentityRemoved, the lossy-compression
    ratio and method: type 3) or restated (LossyImageCompression, type 1 in the SEG: ``01`` when
    the file's transfer syntax is lossy, else highdicom's ``00``); a ``01`` without a method gets
    the method of the file's transfer syntax where it names one. PixelSpacing and the rest of
    group 0028 are left to decoding; these are not read there."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    changed = []
    removed = view.get("PatientIdentityRemoved")
    if removed is not None and str(removed).strip().upper() not in ("YES", "NO"):
        del view.PatientIdentityRemoved
        changed.append("PatientIdentityRemoved")
    meta = getattr(view, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if "LossyImageCompression" in view and str(view.LossyImageCompression).strip() not in ("00", "01"):
        if syntax in _LOSSY_SYNTAXES:
            view.LossyImageCompression = "01"
        else:
            del view.LossyImageCompression
        changed.append("LossyImageCompression")
    for keyword, vr in (("LossyImageCompressionRatio", "DS"), ("LossyImageCompressionMethod", "CS")):
        if keyword not in view:
            continue
        element = view[keyword]
        try:
            values = list(element.value) if element.VM > 1 else [element.value]
            if _blank(element.value):
                raise ValueError("empty")
            for value in values:
                validate_value(vr, str(value), config.RAISE)
                if vr == "DS":
                    float(value)  # a DS string that is no number raises
        except (ValueError, TypeError, OverflowError):
            del view[keyword]
            changed.append(keyword)
    method = _LOSSY_METHODS.get(syntax)
    lossy = str(view.get("LossyImageCompression", "")).strip() == "01"
    if lossy and "LossyImageCompressionMethod" not in view and method is not None:
        view.LossyImageCompressionMethod = method  # type 1C in the SEG once it is 01
        changed.append("LossyImageCompressionMethod")
    return changed


#: The Clinical Trial Subject module (PS3.3 C.7.1.3): sponsor and protocol ID are type 1, a
#: subject ID or reading ID type 1C (one of them), protocol name, site ID and site name type 2.
_TRIAL_REQUIRED = ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID")
_TRIAL_SUBJECT = ("ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID")
_TRIAL_TYPE_2 = ("ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName")
_TRIAL_MODULE = (
    *_TRIAL_REQUIRED,
    *_TRIAL_SUBJECT,
    *_TRIAL_TYPE_2,
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
)


def _clinical_trial_subject(view) -> list[str]:
    """highdicom copies the source's Clinical Trial Subject module; a module without its type-1
    values (or whose values were left empty above as invalid) is removed whole, a complete one gets
    its missing type-2 attributes, empty."""
    present = [keyword for keyword in _TRIAL_MODULE if keyword in view]
    if not present:
        return []
    complete = all(not _blank(view.get(keyword)) for keyword in _TRIAL_REQUIRED) and any(
        not _blank(view.get(keyword)) for keyword in _TRIAL_SUBJECT
    )
    if not complete:
        for keyword in present:
            del view[keyword]
        return present
    added = [keyword for keyword in _TRIAL_TYPE_2 if keyword not in view]
    for keyword in added:
        setattr(view, keyword, None)
    approval = "ClinicalTrialProtocolEthicsCommitteeApprovalNumber"
    if approval in view and _blank(view.get("ClinicalTrialProtocolEthicsCommitteeName")):
        del view[approval]  # type 1C on the committee's name being present
        added.append(approval)
    return added


def _blank(value) -> bool:
    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, (list, MultiValue)) else [value]
    return all(item is None or not str(item).strip(" \x00") for item in values)


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


#: Text value representations whose characters the character set must hold.
_CHARACTER_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def _text_fits(view, character_set) -> bool:
    """Whether every top-level text value can be written in ``character_set`` (one plain term, or
    none: the default repertoire, ASCII). pydicom reads bytes of an undeclared character set as
    Latin-1, so a file that declares none may hold text the default repertoire cannot."""
    from pydicom.charset import python_encoding

    terms = [character_set] if isinstance(character_set, str) else list(character_set or [])
    terms = [str(term).strip() for term in terms]
    if len(terms) > 1:
        return True  # code extensions are re-encoded as UTF-8 above
    codec = "ascii" if not terms or terms[0] in ("", "ISO_IR 6") else python_encoding.get(terms[0])
    if codec is None:
        return True
    for element in view:
        if element.VR not in _CHARACTER_VRS or element.is_empty:
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                str(value).encode(codec)
        except UnicodeEncodeError:
            return False
    return True


def _usable_spacing(view, keyword: str) -> bool:
    from backend.app.imaging.dicom import positive_pair

    try:
        return positive_pair(view.get(keyword)) is not None
    except (TypeError, ValueError, OverflowError):  # a value pydicom cannot even convert
        return False
