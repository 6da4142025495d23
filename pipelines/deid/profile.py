"""Header de-identification driven by DICOM PS3.15 Table E.1-1 (the Basic Application Level
Confidentiality Profile and its options), read from the machine-readable table in `ps315/`.

Every attribute of the input, at every depth of every sequence, gets one action:

- listed in the table: the action of the Basic Profile, or of an option chosen in params.yaml
  where that option's column has one (the most protective wins when two options disagree);
- private (odd group), overlay (60xx) or curve (50xx): removed;
- not listed: kept only if the platform needs it downstream (`KEEP_UNLISTED`: pixel
  description, calibrated regions, modality, device model); everything else is removed.

Actions: X remove, Z empty value, D dummy value (keyed pseudonym for the identifiers that must
stay linkable), U keyed UID, K keep, C clean (dates shifted by the per-patient offset, times
kept, text removed: "Clean Descriptors by removal"). The audit lists per output the tag, its
keyword, its path and the action, never a value.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from pipelines.errors import EXIT_USAGE, CbhError

TABLE = Path(__file__).with_name("ps315") / "confidentiality_profile_attributes.json"

# option name in params.yaml -> (column of Table E.1-1, CID 7050 code, code meaning)
OPTIONS: dict[str, tuple[str | None, str, str]] = {
    "clean_pixel_data": (None, "113101", "Clean Pixel Data Option"),
    "clean_graphics": ("cleanGraphOpt", "113103", "Clean Graphics Option"),
    "clean_structured_content": ("cleanStructContOpt", "113104", "Clean Structured Content Option"),
    "clean_descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
    "retain_longitudinal_full_dates": ("rtnLongFullDatesOpt", "113106",
                                       "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_longitudinal_modified_dates": ("rtnLongModifDatesOpt", "113107",
                                           "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("rtnPatCharsOpt", "113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_institution_identity": ("rtnInstIdOpt", "113112", "Retain Institution Identity Option"),
}
BASIC = ("113100", "Basic Application Confidentiality Profile")
PROFILE_NAME = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
METHOD = "PS3.15 E.1-1 Basic Profile + options (CID 7050 codes); cbh"   # LO: <= 64 chars
METHOD_BLANK_TEXT = "PS3.15 E.1-1 + options; text found by OCR blanked; cbh"   # no regions/template
PROTECTION = {"X": 5, "Z": 4, "D": 3, "U": 3, "C": 2, "K": 1}           # the most protective wins

# Identifiers replaced by a keyed pseudonym (the table's Z or D): linkable with the key only.
PSEUDONYMS = {"PatientID": "patient", "PatientName": "patient", "AccessionNumber": "accession",
              "StudyID": "study"}
# Where the table allows X or Z or D, these are kept present (empty or dummy) so the output stays a
# valid US Image (Type 2 attributes of the Patient and General Study modules); the rest is removed.
TYPE2 = {"PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyDate", "StudyTime"}
# Not in Table E.1-1 and needed downstream: kept. Every other unlisted attribute is removed.
KEEP_UNLISTED = frozenset({
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "Modality", "Manufacturer", "ManufacturerModelName",
    "SoftwareVersions", "SeriesNumber", "InstanceNumber", "PatientOrientation", "Laterality",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
    "NumberOfFrames", "FrameTime", "FrameIncrementPointer", "CineRate", "PixelSpacing",
    "PixelAspectRatio", "SequenceOfUltrasoundRegions", "RegionSpatialFormat", "RegionDataType",
    "RegionFlags", "RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1",
    "PhysicalUnitsXDirection", "PhysicalUnitsYDirection", "ReferencePixelX0", "ReferencePixelY0",
    "ReferencePixelPhysicalValueX", "ReferencePixelPhysicalValueY", "PhysicalDeltaX", "PhysicalDeltaY",
    "TransducerFrequency", "TransducerType", "PulseRepetitionFrequency",
})
# The image pixel module is rewritten from the cleaned pixels, never copied.
PIXEL_MODULE = frozenset({
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelData", "BurnedInAnnotation",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData", "PaletteColorLookupTableUID", "SmallestImagePixelValue",
    "LargestImagePixelValue", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
})
PIXEL_DATA = 0x7FE00010
# Added by de-identification itself (PS3.15 E.1.1 and the US Image IOD), never copied from the input.
WRITTEN = frozenset({"PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                     "LongitudinalTemporalInformationModified"})
DUMMY = {"PN": "ANONYMOUS", "LO": "REMOVED", "SH": "REMOVED", "CS": "REMOVED", "LT": "REMOVED",
         "ST": "REMOVED", "UT": "REMOVED", "UC": "REMOVED", "AE": "REMOVED", "DA": "19000101",
         "DT": "19000101000000", "TM": "000000", "AS": "000Y", "IS": "0", "DS": "0"}


class OptionError(CbhError, ValueError):
    """params.yaml asks for a profile option that does not exist or is not supported."""

    exit_code = EXIT_USAGE


class Keys(Protocol):
    """What the header pass needs from the pseudonymiser (pipelines.deid.core.Pseudonymizer)."""

    def uid(self, raw_uid: str) -> str: ...
    def pseudonym(self, kind: str, raw: str) -> str: ...
    def shift_date(self, date: dt.date, raw_patient: str) -> dt.date: ...


@lru_cache(maxsize=1)
def table() -> tuple[dict[str, str], ...]:
    """The 621 rows of Table E.1-1."""
    return tuple(json.loads(TABLE.read_text(encoding="utf-8")))


def _tag_of(row: dict[str, str]) -> int | None:
    """The tag as an int; None for the patterns: (50xx,xxxx) curves, (60xx,...) overlays and
    (gggg,eeee) private attributes, which HeaderPass removes by group."""
    text = row["tag"].strip("()").replace(",", "")
    try:
        return int(text, 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class Profile:
    """The Basic Profile plus chosen options, resolved to one action per listed tag."""

    options: tuple[str, ...]
    actions: dict[int, str] = field(repr=False, hash=False, compare=False)

    @property
    def codes(self) -> list[tuple[str, str]]:
        """CID 7050 codes of what is applied (Basic Profile first)."""
        return [BASIC] + [OPTIONS[o][1:] for o in self.options]

    @property
    def temporal(self) -> str:
        if "retain_longitudinal_full_dates" in self.options:
            return "UNMODIFIED"
        return "MODIFIED" if "retain_longitudinal_modified_dates" in self.options else "REMOVED"

    def record(self) -> dict[str, Any]:
        return {"profile": PROFILE_NAME, "options": [OPTIONS[o][2] for o in self.options],
                "codes": [c for c, _ in self.codes], "temporal": self.temporal,
                "private_attributes": "removed", "unlisted_attributes": "removed unless needed downstream",
                "descriptors": "cleaned by removal"}


def build_profile(options: tuple[str, ...] | list[str]) -> Profile:
    """Resolve the table's action per tag for these options; unknown options are refused."""
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise OptionError(f"params.yaml deid.options: unknown option(s) {unknown}; known: {sorted(OPTIONS)} "
                          "(retain_safe_private is not offered: private attributes are always removed)")
    if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(options):
        raise OptionError("params.yaml deid.options: full dates and modified dates exclude each other")
    ordered = tuple(o for o in OPTIONS if o in options)
    columns = [OPTIONS[o][0] for o in ordered if OPTIONS[o][0]]
    actions: dict[int, str] = {}
    for row in table():
        tag = _tag_of(row)
        if tag is None:
            continue                       # (50xx,xxxx) curves and (60xx,...) overlays: removed by group
        chosen = [row[c] for c in columns if row.get(c)]
        if chosen:
            actions[tag] = max(chosen, key=lambda a: PROTECTION[a[0]])
        else:
            actions[tag] = row["basicProfile"]
    return Profile(ordered, actions)


def _resolve(combined: str, keyword: str, vr: str) -> str:
    """One letter for the table's combined forms (X/Z, X/D, Z/D, X/Z/D, X/Z/U*)."""
    letters = combined.replace("*", "").split("/")
    if keyword in PSEUDONYMS and set(letters) & {"Z", "D"}:
        return "D"                  # a keyed pseudonym: as protective as Z, and linkable with the key
    if len(letters) == 1:
        return letters[0]
    if keyword in TYPE2:
        return "Z" if "Z" in letters else "D"
    if "U" in letters and vr == "UI":
        return "U"
    return "X" if "X" in letters else letters[0]


@dataclass
class HeaderPass:
    """Applies a Profile to one dataset; `audit` lists what was done (no values)."""

    profile: Profile
    keys: Keys
    raw_patient: str
    audit: list[dict[str, str]] = field(default_factory=list)

    def run(self, ds: Dataset) -> Dataset:
        out = Dataset()
        self._walk(ds, out, "")
        return out

    def _note(self, path: str, tag: BaseTag, action: str) -> None:
        self.audit.append({"path": path, "tag": f"({tag.group:04X},{tag.element:04X})", "action": action})

    def _walk(self, src: Dataset, dst: Dataset, prefix: str) -> None:
        for key in sorted(src.keys()):
            if not prefix and key == PIXEL_DATA:
                continue            # rewritten from the cleaned pixels; never read here (it may be deferred)
            tag = Tag(key)
            keyword = keyword_for_tag(tag) or ""
            path = prefix + (keyword or f"({tag.group:04X},{tag.element:04X})")
            raw = src.get_item(tag, keep_deferred=True)      # the value is parsed only if it is kept
            action = self._action(tag, keyword, raw.VR or _dictionary_vr(tag))
            if action == "pixels" and not prefix:
                continue                          # rewritten from the cleaned pixels by the caller
            if action == "pixels":
                action = "X:unlisted"             # a pixel-module attribute inside a sequence
            if action[0] == "X":
                self._note(path, tag, action)     # removed: its value is never read
                continue
            self._apply(src[tag], tag, keyword, action, dst, path)

    def _action(self, tag: BaseTag, keyword: str, vr: str) -> str:
        if tag.is_private:
            return "X:private"
        if (tag.group & 0xFF00) in (0x5000, 0x6000) and tag.group % 2 == 0:
            return "X:overlay-or-curve"
        if keyword in PIXEL_MODULE or keyword in WRITTEN:
            return "pixels"
        listed = self.profile.actions.get(int(tag))
        if listed is not None:
            return _resolve(listed, keyword, vr)
        return "K" if keyword in KEEP_UNLISTED else "X:unlisted"

    def _apply(self, elem: DataElement, tag: BaseTag, keyword: str, action: str, dst: Dataset, path: str) -> None:
        vr = elem.VR
        letter = action[0]
        if letter == "X":
            self._note(path, tag, action)
            return
        if vr == "SQ" and letter in ("K", "C"):
            items = Sequence()
            for i, item in enumerate(elem.value or []):
                new = Dataset()
                self._walk(item, new, f"{path}[{i}].")
                items.append(new)
            dst.add_new(tag, "SQ", items)
            self._note(path, tag, letter)
            return
        if letter == "Z" or (vr == "SQ" and letter in ("D", "U")):
            dst.add_new(tag, vr, Sequence() if vr == "SQ" else None)
        elif letter == "D":
            if keyword in PSEUDONYMS:
                kind = PSEUDONYMS[keyword]     # the patient's pseudonym derives from the patient ID alone
                raw = self.raw_patient if kind == "patient" else str(elem.value or "").strip()
                if raw:
                    dst.add_new(tag, vr, self.keys.pseudonym(kind, raw))
                    letter = "D:keyed-pseudonym"
                else:                          # nothing to link: stays empty
                    dst.add_new(tag, vr, None)
                    letter = "Z"
            else:
                dst.add_new(tag, vr, DUMMY.get(vr, None))
        elif letter == "U":
            dst.add_new(tag, vr, _map_values(elem.value, self.keys.uid))
        elif letter == "K":
            dst.add_new(tag, vr, elem.value)
        elif letter == "C":
            letter = self._clean(elem, tag, vr, dst)
        self._note(path, tag, letter)

    def _clean(self, elem: DataElement, tag: BaseTag, vr: str, dst: Dataset) -> str:
        """C: dates shifted by the patient's keyed offset, times kept, anything else removed."""
        if vr in ("DA", "DT"):
            shifted = _map_values(elem.value, lambda v: _shift(v, vr, self.keys, self.raw_patient))
            if shifted is None or (isinstance(shifted, list) and None in shifted):
                return "X:unparsable-date"
            dst.add_new(tag, vr, shifted)
            return "C:date-shifted"
        if vr == "TM":
            dst.add_new(tag, vr, elem.value)
            return "C:time-kept"
        if vr == "UI":
            dst.add_new(tag, vr, _map_values(elem.value, self.keys.uid))
            return "U"
        return "X:cleaned-by-removal"


def _dictionary_vr(tag: BaseTag) -> str:
    """The data dictionary's VR (implicit-VR files carry none); '' for a tag it does not know."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _map_values(value: Any, fn) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _shift(value: str, vr: str, keys: Keys, raw_patient: str) -> str | None:
    text = value.strip()
    try:
        date = dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None
    new = keys.shift_date(date, raw_patient).strftime("%Y%m%d")
    return new if vr == "DA" else new + text[8:]
