"""Tolerant carry-over of the patient and study attributes that results copy from their sources.

highdicom builds the SEG and the SR from the first source image: it parses Patient's Birth Date,
Patient's Sex, Study Date and Study Time (``DA('ZQCA1234')`` raises ``ValueError:
invalid literal for int() with base 10: 'ZQCA'``: a job failure whose reason quotes the birth
date), then copies every root attribute of the source's Patient and Study modules as stored.
Real archives hold malformed values, so before highdicom sees a source header its copy is made
safe: each such attribute whose value breaks its VR (PS3.5 6.2: format, length, character
repertoire, value multiplicity, enumerated values, bytes that do not decode in the Specific
Character Set) is emptied when the attribute is Type 2 and left out otherwise. Nothing is
parsed into an exception, the outputs stay dciodvfy-clean, and only keywords (never values)
are reported.

Patient ID is the exception: the PACS files results under it, and a result with another (or no)
Patient ID than its images would be filed under another patient, so it is carried as stored
(the conformance gate checks that it equals the source's).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import warnings
from collections.abc import Iterator
from functools import lru_cache

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VM
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

KEPT_AS_STORED = frozenset({"PatientID", "StudyInstanceUID"})
"""Identity keys a PACS matches on: copied as stored (see the module doc)."""

TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type 2 attributes of the Patient, General Study and Patient Study modules (PS3.3 C.7.1.1,
C.7.2.1, C.7.2.2) that the SEG and SR encoders copy from the first source image."""

# Type 2 attributes of the Patient and Study modules highdicom reads or copies (PS3.3 C.7.1.1,
# C.7.2.1, C.7.2.2, C.7.1.3, C.7.2.3); used when the module tables are unavailable.
_TYPE2_DEFAULT = frozenset(
    {
        *TYPE2_FROM_SOURCE,
        "ClinicalTrialProtocolName",
        "ClinicalTrialSiteID",
        "ClinicalTrialSiteName",
        "ClinicalTrialTimePointID",
    }
)
_FALLBACK_KEYWORDS = _TYPE2_DEFAULT | {
    "PatientBirthTime",
    "OtherPatientNames",
    "PatientComments",
    "IssuerOfPatientID",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "ConsultingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
}

# Enumerated values (PS3.3) of the coded-string attributes in those modules.
_ENUMERATED = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "SmokingStatus": frozenset({"YES", "NO", "UNKNOWN"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "TypeOfPatientID": frozenset({"TEXT", "RFID", "BARCODE"}),
    "LongitudinalTemporalEventType": frozenset({"ENROLLMENT", "BASELINE"}),
    "PregnancyStatus": frozenset({1, 2, 3, 4}),
}

_FORMAT = {
    "DA": re.compile(r"\d{4}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])"),
    "TM": re.compile(r"([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?"),
    "DT": re.compile(
        r"\d{4}((0[1-9]|1[0-2])((0[1-9]|[12]\d|3[01])(([01]\d|2[0-3])"
        r"([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"
    ),
    "AS": re.compile(r"\d{3}[DWMY]"),
    "CS": re.compile(r"[A-Z0-9 _]*"),
    "DS": re.compile(r" *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)? *"),
    "IS": re.compile(r" *[+-]?\d+ *"),
    "UI": re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*"),
    "AE": re.compile(r"[\x20-\x7e]*"),
    "UR": re.compile(r"[\x21-\x7e]*"),
}
# Maximum value lengths (PS3.5 Table 6.2-1), in characters; PN is per component group.
_MAX_LEN = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 16,
    "UI": 64,
}
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_STRING_VRS = frozenset({*_FORMAT, "LO", "SH", "PN", "UC", *_TEXT_VRS})
# Control characters: none in any string value, except ESC (ISO 2022 code extensions) and, in
# the text VRs, the format effectors (PS3.5 6.1.3).
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_DECODE_FAILED = "\ufffd"


@contextlib.contextmanager
def _quiet_reading() -> Iterator[None]:
    """pydicom's reading checks warn with the value in the message; these reads are checks."""
    before = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = before


@lru_cache(maxsize=64)
def carried_attributes(sop_class_uid: str) -> dict[str, str]:
    """Keyword -> module type ("1", "2", "3", "1C"...) of every root attribute of the Patient and
    Study modules of ``sop_class_uid``: what highdicom copies from a source of that class."""
    try:  # highdicom's own tables, the ones its copy uses (not a public API: fall back safely)
        from highdicom._standard_utils import (
            get_iod_module_map,
            get_module_attribute_map,
            get_sop_class_iod_map,
        )

        iod = get_sop_class_iod_map()[sop_class_uid]
        modules = [m["key"] for m in get_iod_module_map()[iod] if m["ie"] in ("Patient", "Study")]
        attributes = get_module_attribute_map()
        found = {
            str(item["keyword"]): str(item["type"])
            for module in modules
            for item in attributes[module]
            if len(item["path"]) == 0
        }
    except Exception:
        found = {}
    return found or {k: ("2" if k in _TYPE2_DEFAULT else "3") for k in _FALLBACK_KEYWORDS}


def _codecs(ds: Dataset) -> list[str]:
    charset = ds.get("SpecificCharacterSet") or "ISO_IR 6"
    try:
        codecs = convert_encodings(charset)
    except Exception:
        return []
    # pydicom decodes the default repertoire as Latin-1; only ASCII is allowed there.
    return ["ascii" if c in ("iso8859", "iso_ir_6", "ISO_IR 6") else c for c in codecs]


def _vm_ok(keyword: str, count: int) -> bool:
    try:
        vm = dictionary_VM(keyword)
    except KeyError:
        return True
    return count <= int(vm) if vm.isdigit() else True


def _string_problem(vr: str, text: str, codecs: list[str]) -> str | None:
    if _DECODE_FAILED in text:
        return "bytes that do not decode in the character set"
    if (_TEXT_CONTROL if vr in _TEXT_VRS else _CONTROL).search(text):
        return "control characters"
    if len(codecs) == 1:
        try:
            text.encode(codecs[0])
        except (UnicodeError, LookupError):
            return "characters outside the character set"
    if vr == "PN":
        groups = text.split("=")
        if len(groups) > 3 or any(len(g) > _MAX_LEN["PN"] or g.count("^") > 4 for g in groups):
            return "not a valid person name"
        return None
    limit = _MAX_LEN.get(vr)
    if limit is not None and len(text) > limit:
        return "longer than its VR allows"
    pattern = _FORMAT.get(vr)
    if pattern is not None and text.strip(" ") and not pattern.fullmatch(text.rstrip(" ")):
        return f"not a valid {vr}"
    if vr == "DA" and text.strip():
        try:
            dt.datetime.strptime(text.strip(), "%Y%m%d")
        except ValueError:
            return "not a calendar date"
    if vr == "IS" and text.strip() and not -(2**31) <= int(text) < 2**31:
        return "outside the IS range"
    return None


def element_problem(elem: DataElement, codecs: list[str]) -> str | None:
    """Why ``elem`` (already decoded) breaks its VR, or None. Never names the value."""
    value = elem.value
    if value is None or value == "":
        return None
    if elem.VR == "SQ":
        for item in value:
            for child in item:
                if element_problem(child, codecs) is not None:
                    return "an item holds a malformed value"
        return None
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if not _vm_ok(elem.keyword, len(values)):
        return "too many values"
    allowed = _ENUMERATED.get(elem.keyword)
    if allowed is not None and any(v not in allowed for v in values):
        return "not one of the enumerated values"
    if elem.VR in _STRING_VRS:
        for v in values:
            problem = _string_problem(elem.VR, str(v), codecs)
            if problem is not None:
                return problem
    return None


def carry_safely(ds: Dataset) -> list[str]:
    """Empty (Type 2) or remove (other types) every malformed carried attribute of ``ds``, in place.

    ``ds`` is a copy of a source header (its Patient and Study modules will be copied into a
    result). Returns the keywords that were changed (never their values).
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    changed: list[str] = []
    with _quiet_reading():
        codecs = _codecs(ds)
        for keyword, module_type in carried_attributes(sop_class).items():
            if keyword in KEPT_AS_STORED or keyword not in ds:
                continue
            try:
                problem = _raw_problem(ds, keyword, codecs)
                if problem is None:
                    problem = element_problem(ds[keyword], codecs)
            except Exception:  # a value pydicom cannot even convert
                problem = "cannot be decoded"
            if problem is None:
                continue
            changed.append(keyword)
            if module_type.startswith("2"):
                vr = ds[keyword].VR if keyword in ds else "SQ"
                setattr(ds, keyword, DicomSequence() if vr == "SQ" else "")
            else:
                delattr(ds, keyword)
        if "SpecificCharacterSet" in ds and not _charset_ok(ds):
            # highdicom refuses it (unknown, empty, or a lone code extension). The values were
            # decoded above with pydicom's fallback; write them as UTF-8, or in the default
            # repertoire when the attribute was empty (non-ASCII values were left out above).
            for keyword in carried_attributes(sop_class):
                if keyword in ds:
                    _ = ds[keyword].value
            if ds.SpecificCharacterSet:
                ds.SpecificCharacterSet = "ISO_IR 192"
            else:
                del ds.SpecificCharacterSet
            changed.append("SpecificCharacterSet")
    return changed


def _raw_problem(ds: Dataset, keyword: str, codecs: list[str]) -> str | None:
    """Bytes as stored that do not decode in the character set (pydicom would decode them with
    replacement characters, or as Latin-1 for person names, and write different bytes)."""
    raw = ds.get_item(keyword)
    value = getattr(raw, "value", None)
    if (
        not isinstance(raw, RawDataElement)
        or not isinstance(value, bytes)
        or raw.VR not in _STRING_VRS
    ):
        return None
    if len(codecs) != 1 or b"\x1b" in value:
        return None  # ISO 2022 code extensions: pydicom's decoder is the judge
    try:
        value.decode(codecs[0])
    except (UnicodeError, LookupError):
        return "bytes that do not decode in the character set"
    return None


def _charset_ok(ds: Dataset) -> bool:
    from highdicom.valuerep import _check_specific_character_set

    try:
        _check_specific_character_set(ds.SpecificCharacterSet)
    except Exception:
        return False
    return bool(_codecs(ds))
