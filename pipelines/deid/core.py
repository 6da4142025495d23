"""De-identification of ultrasound DICOM and PNG/JPEG scans.

Headers follow DICOM PS3.15 Table E.1-1 (pipelines/deid/profile.py): the Basic Profile plus
the options of params.yaml, applied at every depth; private, overlay and curve elements and
every unlisted attribute the platform does not need are removed. Identifiers that must stay
linkable become keyed pseudonyms (HMAC-SHA256 with the secret key); dates move by a
per-patient offset derived from the key, so intervals between a patient's exams survive.
Pixels outside the calibrated ultrasound regions (or a device template's) are blanked, and
OCR verifies the result (pipelines/deid/ocr.py). What was done is recorded in the output as
PS3.15 asks (PatientIdentityRemoved, DeidentificationMethod and its CID 7050 codes,
LongitudinalTemporalInformationModified, BurnedInAnnotation NO).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from pipelines.deid import profile as P
from pipelines.deid.ocr import (  # noqa: F401
    DEFAULT_ALLOWED,
    DEFAULT_VOCABULARY,
    OcrSettings,
    OcrUnavailable,
    residual_text,
    shown_grey,
    text_boxes,
)
from pipelines.deid.ocr import available as ocr_available  # noqa: F401
from pipelines.deid.ocr import missing as ocr_missing  # noqa: F401
from pipelines.errors import EXIT_UNAVAILABLE, CbhError, UsageError
from pipelines.imaging import scan as S
from pipelines.imaging.scan import ScanError, decode, region_mask, regions

DEFAULT_OPTIONS = ("clean_pixel_data", "clean_descriptors", "retain_longitudinal_modified_dates",
                   "retain_device_identity")

def profile_record(options: tuple[str, ...] = DEFAULT_OPTIONS) -> dict[str, object]:
    """The profile and options applied, as every de-identification report states them."""
    return P.build_profile(options).record()


# the `no_template` setting that blanks the text OCR finds, and the pixel method it records;
# what it blanks: words of 2+ letters or digits read at 50+ (speckle reads as gibberish below)
BLANK_TEXT = "blank-text"
BLANK_MIN_CHARS, BLANK_MIN_CONFIDENCE = 2, 50.0


class DeidError(ScanError):
    """A scan cannot be de-identified safely; `code` is the quarantine reason code."""


class MissingKeyError(CbhError):
    """The pseudonymisation key is not available."""

    exit_code = EXIT_UNAVAILABLE


class WeakKeyError(UsageError):
    """The pseudonymisation key is too short, or its file is readable by others."""


# HMAC-SHA256 keys: 32 characters (128 bits as hex) at least; a guessable key lets anyone
# recompute every pseudonym from a name list
MIN_KEY_CHARS = 32


def _strong(key: str, source: str, what: str = "pseudonymisation key") -> bytes:
    if len(key) < MIN_KEY_CHARS:
        raise WeakKeyError(f"{source}: the {what} has {len(key)} characters, fewer than the "
                           f"{MIN_KEY_CHARS} it needs (make one with `openssl rand -hex 32`)")
    return key.encode()


def load_key(env_name: str, key_file: Path | None, create: bool = False,
             what: str = "pseudonymisation key") -> bytes:
    """The secret key: the environment variable, else the key file (created only when `create`;
    refused when others may read it). At least MIN_KEY_CHARS characters either way."""
    value = os.environ.get(env_name, "").strip()
    if value:
        return _strong(value, env_name, what)
    if key_file is not None and key_file.is_file():
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise WeakKeyError(f"{key_file}: mode {mode:04o} lets others read the {what}; "
                               f"`chmod 600 {key_file}`, or set {env_name}")
        return _strong(key_file.read_text(encoding="utf-8").strip(), str(key_file), what)
    if not create or key_file is None:
        raise MissingKeyError(
            f"{env_name} is not set: de-identification needs the secret pseudonymisation key "
            f"(export {env_name}=..., or run `make demo`, which creates {key_file} for the demo)")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    secret = hashlib.sha256(os.urandom(64)).hexdigest()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
        fh.flush()
        os.fsync(fh.fileno())            # a key lost to a crash would orphan everything made with it
    dir_fd = os.open(key_file.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return secret.encode()


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, consistent pseudonyms and date shifts; irreversible without the key."""

    key: bytes
    max_shift_days: int = 365

    def _mac(self, kind: str, value: str) -> str:
        return hmac.new(self.key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    def patient(self, raw_id: str) -> str:
        return "P" + self._mac("patient", raw_id.strip())[:16]

    def image(self, raw: str) -> str:
        return "I" + self._mac("image", raw)[:20]

    def pseudonym(self, kind: str, raw: str) -> str:
        """Keyed replacement of an identifier that must stay linkable (PatientID, AccessionNumber, StudyID)."""
        if kind == "patient":
            return self.patient(raw)
        return kind[0].upper() + self._mac(kind, raw.strip())[:15]         # fits SH (16 characters)

    def sample(self, kind: str, raw: str) -> float:
        """A keyed, reproducible number in [0, 1) (which images OCR verifies)."""
        return int(self._mac("sample:" + kind, raw)[:12], 16) / float(16 ** 12)

    def staff(self, raw: str) -> str:
        return "A" + self._mac("staff", raw.strip())[:10]

    def uid(self, raw_uid: str) -> str:
        return "2.25." + str(int(self._mac("uid", raw_uid.strip())[:30], 16))

    def shift_days(self, raw_patient: str) -> int:
        span = 2 * self.max_shift_days + 1
        return int(self._mac("date-shift", raw_patient.strip())[:12], 16) % span - self.max_shift_days

    def shift_date(self, date: dt.date, raw_patient: str) -> dt.date:
        return date + dt.timedelta(days=self.shift_days(raw_patient))


def clean_pixels(arr: np.ndarray, boxes: list[tuple[int, int, int, int]], inplace: bool = False,
                 fill: int | tuple[int, ...] = 0) -> np.ndarray:
    """Set everything outside the ultrasound regions (all frames) to `fill`; `inplace` spares a
    copy. Only the pixels outside are written, band by band of rows (slices, no full pass)."""
    keep = region_mask(arr.shape[1:3], boxes)
    out = arr if inplace else arr.copy()
    value = np.asarray(fill, dtype=out.dtype)
    scalar = value.ndim == 0 or bool((value == value.flat[0]).all())
    rows = out.shape[1]
    edges = sorted({0, rows} | {min(max(y, 0), rows) for x0, y0, x1, y1 in boxes for y in (y0, y1 + 1)})
    for top, bottom in zip(edges[:-1], edges[1:], strict=False):
        if top >= bottom:
            continue
        step = np.diff(np.concatenate(([1], keep[top].view(np.int8), [1])))   # keep is alike in the band
        for start, stop in zip(np.flatnonzero(step == -1), np.flatnonzero(step == 1), strict=True):
            band = out[:, top:bottom, start:stop]
            # a per-sample colour (YBR's neutral chroma) is laid out once and copied into every
            # frame: numpy broadcasting a 3-vector element by element is ten times slower
            band[...] = value.flat[0] if scalar else np.broadcast_to(value, band.shape[1:]).copy()
    return out


def blank_value(photometric: str, ds: Dataset | None, dtype: np.dtype) -> int | tuple[int, ...]:
    """What blanked pixels are set to: black in the output's colour model (for a palette, the
    index of its darkest entry; for YBR_FULL, zero luminance and neutral chroma)."""
    if photometric == "YBR_FULL":
        mid = 1 << (np.dtype(dtype).itemsize * 8 - 1)
        return (0, mid, mid)
    if photometric == "PALETTE COLOR" and ds is not None:
        digest = hashlib.sha256()          # the palette's own bytes (repr of 3 x 128 KiB cost 4 ms a file)
        for k in PALETTE:
            if k in ds:
                value = ds[k].value
                digest.update(k.encode() + (bytes(value) if isinstance(value, bytes | bytearray) else
                                            repr(value).encode()))
        key = digest.hexdigest()
        if key not in _DARKEST:
            from pydicom.pixels import apply_color_lut

            entries, first = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor[:2])
            index = np.arange(first, first + (entries or 65536)).clip(0, np.iinfo(dtype).max).astype(dtype)
            if len(_DARKEST) > 64:
                _DARKEST.clear()
            _DARKEST[key] = int(index[np.argmin(apply_color_lut(index, ds).astype(np.int64).sum(axis=-1))])
        return _DARKEST[key]
    return 0


_DARKEST: dict[str, int] = {}     # a palette's darkest index, by the palette (one expansion per device)


NATIVE_SYNTAXES = frozenset({pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian,
                             pydicom.uid.DeflatedExplicitVRLittleEndian})
# colour models written back as they are (no palette expansion, no YBR conversion)
KEPT_MODELS = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3}


def _native_frames(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian pixels as a writable array (one copy of their bytes, none of
    the decoder's passes), or None where the codec path is needed (big endian, signed data with
    unused high bits, an unexpected length). Planar colour (PlanarConfiguration 1) comes as a
    (frames, rows, cols, 3) view of the planes as stored: cleaned in place and written back
    planar, with no interleaving pass over a cine's tens of MB."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) not in NATIVE_SYNTAXES or "PixelData" not in ds:
        return None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 0) or 0)
    stored, signed = int(ds.get("BitsStored", bits) or bits), int(ds.get("PixelRepresentation", 0) or 0) == 1
    if KEPT_MODELS.get(photometric) != spp or bits not in (8, 16) or not 0 < stored <= bits:
        return None
    planar = int(ds.get("PlanarConfiguration", 0) or 0) if spp == 3 else 0
    if planar not in (0, 1) or (signed and stored < bits):
        return None
    frames, rows, cols = int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns)
    size = frames * rows * cols * spp * bits // 8
    dtype, count = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}"), size // (bits // 8)
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    deferred = getattr(elem, "value", b"") is None and getattr(elem, "value_tell", None) and ds.filename
    if deferred and meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        if not size <= int(elem.length) <= size + 1:       # read once, from the file straight into the array
            return None
        arr = np.fromfile(ds.filename, dtype=dtype, count=count, offset=int(elem.value_tell))
        if arr.size != count:
            return None
    else:
        data = ds.PixelData
        if not isinstance(data, bytes | bytearray) or not size <= len(data) <= size + 1:
            return None
        arr = np.frombuffer(data, dtype=dtype, count=count).copy()
    if planar:
        arr = np.moveaxis(arr.reshape(frames, 3, rows, cols), 1, -1)
    else:
        arr = arr.reshape((frames, rows, cols, 3) if spp == 3 else (frames, rows, cols))
    if stored < bits:                       # bits above BitsStored may hold an embedded overlay
        np.bitwise_and(arr, (1 << stored) - 1, out=arr)
    return arr


def frames_for_cleaning(ds: Dataset) -> tuple[np.ndarray, str]:
    """(frames, rows, cols[, 3]) in the colour model the output keeps, and its photometric
    interpretation. Palette indices stay indices; YBR_FULL(_422) stays YBR_FULL; JPEG 2000's
    YBR_RCT/ICT come out as RGB (the codec's own transform). The array is the caller's own, so
    it may be cleaned in place."""
    native = _native_frames(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if native is not None:
        return native, photometric
    ycc = photometric in ("YBR_FULL", "YBR_FULL_422")
    arr = decode(ds, as_rgb=not ycc)
    if ycc:
        photometric = "YBR_FULL"
    elif photometric.startswith("YBR"):
        photometric = "RGB"
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        arr = arr[None]
    if arr.ndim != (4 if int(ds.get("SamplesPerPixel", 1)) == 3 else 3):
        raise DeidError("bad_pixel_layout", f"unexpected pixel array shape {arr.shape}")
    return np.ascontiguousarray(arr), photometric


def display(frame: np.ndarray, photometric: str, ds: Dataset | None) -> np.ndarray:
    """What a screen shows of one frame (grey or RGB): what OCR reads."""
    if photometric == "PALETTE COLOR" and ds is not None:
        from pydicom.pixels import apply_color_lut

        return apply_color_lut(frame, ds)
    if photometric == "YBR_FULL":
        return frame[..., 0]                 # the luminance: text is drawn in it
    return frame


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


@dataclass(frozen=True)
class Template:
    """Where ultrasound data lies on one device's screen when the file has no regions."""

    manufacturer: str          # "" with raster=True: PNG/JPEG exports of that frame size
    model: str
    rows: int
    columns: int
    keep: tuple[tuple[int, int, int, int], ...]
    raster: bool = False

    def matches(self, manufacturer: str, model: str, rows: int, columns: int, raster: bool) -> bool:
        return (self.raster == raster and (rows, columns) == (self.rows, self.columns)
                and (raster or (self.manufacturer.strip().lower(), self.model.strip().lower())
                     == (manufacturer.strip().lower(), model.strip().lower())))


def parse_templates(raw: tuple[dict, ...] | list[dict]) -> tuple[Template, ...]:
    out = []
    for i, t in enumerate(raw):
        try:
            keep = tuple(tuple(int(v) for v in box) for box in t["keep"])
            if not keep or any(len(b) != 4 or b[0] > b[2] or b[1] > b[3] for b in keep):
                raise ValueError("keep must list boxes [x0, y0, x1, y1] with x0 <= x1, y0 <= y1")
            out.append(Template(str(t.get("manufacturer", "")), str(t.get("model", "")), int(t["rows"]),
                                int(t["columns"]), keep, bool(t.get("raster", False))))
        except (KeyError, TypeError, ValueError) as exc:
            raise P.OptionError(f"params.yaml deid.templates[{i}]: {exc}") from exc
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    """What de-identification applies (params.yaml `deid`)."""

    options: tuple[str, ...] = DEFAULT_OPTIONS
    templates: tuple[Template, ...] = ()
    ocr_sample: float = 0.1
    ocr: OcrSettings = OcrSettings()
    # the limits of this process when built; they travel to worker processes, which never read params.yaml
    limits: S.Limits = field(default_factory=lambda: S.LIMITS)
    # no regions, no template, BurnedInAnnotation not NO: quarantine | blank-text (BLANK_TEXT)
    no_template: str = "quarantine"

    @classmethod
    def from_params(cls, deid: Any) -> Settings:
        return cls(tuple(deid.options), parse_templates(deid.templates), float(deid.ocr_sample),
                   OcrSettings(int(deid.ocr_min_chars), float(deid.ocr_min_confidence),
                               DEFAULT_ALLOWED + tuple(deid.ocr_allowed),
                               DEFAULT_VOCABULARY + tuple(deid.ocr_vocabulary), deid.ocr_engine),
                   S.LIMITS, deid.no_template)


@dataclass
class Cleaned:
    """Pixels after cleaning, and how they were cleaned and verified."""

    frames: np.ndarray            # (frames, rows, cols[, 3])
    photometric: str
    method: str                   # regions | template | flagged-clean (BurnedInAnnotation NO) | raster | blank-text
    verified: bool                # OCR read the cleaned pixels
    lossy: bool = False


LOSSY_SYNTAXES = {pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEGExtended12Bit, pydicom.uid.JPEGLSNearLossless}


class Deidentifier:
    """Headers by Table E.1-1, pixels by regions or device template, verified by OCR.

    One per process: it remembers the devices whose images it has verified, so the first image
    of every device (and template) is read, and after that a keyed random share (`ocr_sample`).
    """

    def __init__(self, pseudo: Pseudonymizer, settings: Settings | None = None) -> None:
        self.pseudo, self.settings = pseudo, settings or Settings()
        self.profile = P.build_profile(self.settings.options)
        self.clean_pixels_on = "clean_pixel_data" in self.profile.options
        self.seen: set[str] = set()

    def record(self) -> dict[str, Any]:
        return {**self.profile.record(), "ocr_sample": self.settings.ocr_sample,
                "ocr_min_chars": self.settings.ocr.min_chars, "templates": len(self.settings.templates),
                "no_template": self.settings.no_template}

    # -- pixels -------------------------------------------------------------------------
    def _template(self, manufacturer: str, model: str, rows: int, cols: int, raster: bool) -> Template | None:
        return next((t for t in self.settings.templates if t.matches(manufacturer, model, rows, cols, raster)), None)

    def _verify(self, frames: np.ndarray, device: str, sample_key: str, first: bool | None,
                shown: Any = None) -> bool:
        """OCR the first and last frame of the first image of a device, and of a keyed sample.
        `first` says whether this image is its device's first (decided by the caller over the whole
        corpus, so the choice does not depend on which process gets which file); None: this
        object's own memory of the devices it has seen decides."""
        first = device not in self.seen if first is None else first
        if not first and self.pseudo.sample("ocr", sample_key) >= self.settings.ocr_sample:
            return False
        # a static banner is on every frame of a cine: the first and last are read, in one call
        shown = shown or (lambda frame: frame)
        words = residual_text([shown(frames[i]) for i in sorted({0, frames.shape[0] - 1})], self.settings.ocr)
        if words:   # the words themselves may be identifiers: count them, never echo them
            raise DeidError("residual_text", f"OCR read {len(words)} word(s) of text in the cleaned pixels")
        self.seen.add(device)
        return True

    def pixel_plan(self, ds: Dataset) -> tuple[str, list[tuple[int, int, int, int]]]:
        """How this file's pixels will be cleaned, from its header alone: (method, boxes to keep)."""
        if str(ds.get("Modality", "")).upper() != "US":
            raise DeidError("not_ultrasound", f"modality {ds.get('Modality', '?')!r} is not US")
        if not self.clean_pixels_on:
            return "not-cleaned", []
        manufacturer, model = str(ds.get("Manufacturer", "")), str(ds.get("ManufacturerModelName", ""))
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if boxes := regions(ds):
            return "regions", boxes
        if (tpl := self._template(manufacturer, model, rows, cols, raster=False)) is not None:
            return "template", list(tpl.keep)
        if str(ds.get("BurnedInAnnotation", "")).upper() == "NO":
            return "flagged-clean", []
        if self.settings.no_template == BLANK_TEXT:
            return BLANK_TEXT, []
        raise DeidError("no_pixel_template",
                        "no SequenceOfUltrasoundRegions, no device template for this manufacturer, "
                        f"model and {cols}x{rows} frame, and BurnedInAnnotation is not NO: "
                        "burned-in text cannot be located")

    def device(self, ds: Dataset, method: str | None = None) -> str:
        """What OCR verification counts as one device: scanner model, frame size, cleaning method
        (from the pixel plan unless the caller has it)."""
        method = method if method is not None else self.pixel_plan(ds)[0]
        return (f"{ds.get('Manufacturer', '')}|{ds.get('ManufacturerModelName', '')}|"
                f"{ds.get('Rows', '')}x{ds.get('Columns', '')}|{method}")

    def raster_device(self, rows: int, cols: int) -> str:
        tpl = self._template("", "", rows, cols, raster=True)
        return f"raster|{rows}x{cols}|{'template' if tpl is not None else 'raster'}"

    def clean_dicom(self, ds: Dataset, first: bool | None = None) -> Cleaned:
        method, boxes = self.pixel_plan(ds)
        arr, photometric = frames_for_cleaning(ds)
        fill = blank_value(photometric, ds, arr.dtype)
        if boxes:                                                # arr is this call's own copy
            clean_pixels(arr, boxes, inplace=True, fill=fill)
        if method == BLANK_TEXT:
            self.blank_text(arr, lambda frame: display(frame, photometric, ds), fill)
            first = True                                         # every such file is read again
        verified = self._verify(arr, self.device(ds, method), str(ds.get("SOPInstanceUID", "")), first,
                                lambda frame: display(frame, photometric, ds)) if self.clean_pixels_on else False
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        lossy = ts in LOSSY_SYNTAXES or str(ds.get("LossyImageCompression", "")) == "01"
        return Cleaned(arr, photometric, method, verified, lossy)

    def clean_raster(self, img: np.ndarray, key: str, first: bool | None = None) -> Cleaned:
        """PNG/JPEG: pixels only (re-encoding keeps no metadata), banner blanked by template.
        Without a template every such image is read by OCR, not a sample."""
        frames = img[None]
        rows, cols = img.shape[:2]
        tpl = self._template("", "", rows, cols, raster=True)
        method = "template" if tpl is not None else BLANK_TEXT if self.settings.no_template == BLANK_TEXT else "raster"
        if tpl is not None:
            frames = clean_pixels(frames, list(tpl.keep))
        elif method == BLANK_TEXT:
            frames = frames.copy()
            self.blank_text(frames, lambda frame: frame, 0)
        verified = self._verify(frames, self.raster_device(rows, cols), key, True if tpl is None else first)
        return Cleaned(frames, "RGB" if img.ndim == 3 else "MONOCHROME2", method, verified)

    def blank_text(self, frames: np.ndarray, shown: Any, fill: int | tuple[int, ...]) -> int:
        """Blank, in every frame, the boxes where OCR reads text in the first, middle or last
        frame, grown by a margin; in place. Looser than the check that follows (BLANK_MIN_*): a
        date read as "12 03 85" or a name read at 70 is blanked, though the check would not flag
        it. The caller reads the file again: only what still reads as text is quarantined.
        Returns how many boxes."""
        n = frames.shape[0]
        loose = dataclasses.replace(self.settings.ocr, min_chars=BLANK_MIN_CHARS,
                                    min_confidence=min(self.settings.ocr.min_confidence, BLANK_MIN_CONFIDENCE))
        boxes = sorted({b for i in sorted({0, n // 2, n - 1})
                        for b in text_boxes(shown_grey(shown(frames[i])), loose)})
        value = np.asarray(fill, dtype=frames.dtype)
        for x0, y0, x1, y1 in boxes:
            frames[:, y0:y1 + 1, x0:x1 + 1] = value
        return len(boxes)

    @staticmethod
    def raster_png(cleaned: Cleaned) -> tuple[bytes, list[dict]]:
        """The cleaned PNG/JPEG as PNG bytes (pixels only) and its audit actions."""
        frame = cleaned.frames[0]
        ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) if frame.ndim == 3 else frame)
        if not ok:
            raise DeidError("unwritable_image", "the cleaned image cannot be encoded as PNG")
        return png.tobytes(), [
            {"path": "(raster metadata: text chunks, EXIF, ICC)", "tag": "-", "action": "X:not-copied"},
            {"path": "pixels", "tag": "-", "action": f"C:pixels-{cleaned.method}"}]

    # -- header + pixels ----------------------------------------------------------------
    def dicom(self, ds: Dataset, raw_patient: str, cleaned: Cleaned | None = None) -> tuple[Dataset, list[dict]]:
        """The de-identified dataset and its audit (tag, path, action; no values)."""
        cleaned = cleaned if cleaned is not None else self.clean_dicom(ds)
        header = P.HeaderPass(self.profile, self.pseudo, raw_patient)
        out = header.run(ds)
        _write_pixels(out, cleaned, ds)
        out.PatientIdentityRemoved = "YES"
        out.LongitudinalTemporalInformationModified = self.profile.temporal
        # blank-text removed only what OCR read: it does not claim the pixels hold no text
        out.BurnedInAnnotation = "NO" if cleaned.method not in ("not-cleaned", BLANK_TEXT) \
            else str(ds.get("BurnedInAnnotation", ""))
        out.DeidentificationMethod = P.METHOD_BLANK_TEXT if cleaned.method == BLANK_TEXT else P.METHOD
        out.DeidentificationMethodCodeSequence = Sequence([_code(v, m) for v, m in self.profile.codes])
        if cleaned.lossy:
            out.LossyImageCompression = "01"
        if "SOPInstanceUID" not in out or "SOPClassUID" not in out:
            raise DeidError("unreadable_dicom", "no SOP Class or SOP Instance UID: not an image instance")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.SOPClassUID
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian   # lossless, uncompressed
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "CBH_DEID_2"
        out.file_meta = meta
        audit = header.audit + [
            {"path": "PixelData", "tag": "(7FE0,0010)", "action": f"C:pixels-{cleaned.method}"},
            {"path": "FileMetaInformation", "tag": "(0002,xxxx)", "action": "rewritten"}]
        return out, audit


def _write_pixels(out: Dataset, cleaned: Cleaned, src: Dataset) -> None:
    arr = cleaned.frames
    out.SamplesPerPixel = 3 if arr.ndim == 4 else 1
    out.PhotometricInterpretation = cleaned.photometric
    planar = arr.ndim == 4 and is_planar(arr)
    if arr.ndim == 4:
        out.PlanarConfiguration = 1 if planar else 0
    if arr.shape[0] > 1:
        out.NumberOfFrames = arr.shape[0]
    elif "NumberOfFrames" in out:
        del out.NumberOfFrames
    bits = arr.dtype.itemsize * 8
    stored = min(int(src.get("BitsStored", bits) or bits), bits) if arr.ndim == 3 else bits
    out.BitsAllocated, out.BitsStored, out.HighBit = bits, stored, stored - 1
    out.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    out.Rows, out.Columns = arr.shape[1], arr.shape[2]
    if cleaned.photometric == "PALETTE COLOR":               # the palette travels with its indices
        for keyword in PALETTE:
            if keyword in src:
                out[keyword] = src[keyword]
    # the cleaned array's own memory (no copy of a cine's tens of MB); write_dicom writes it as it is
    data = np.ascontiguousarray(np.moveaxis(arr, -1, 1) if planar else arr)
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    # (pydicom's value check knows only bytes for OB/OW: it would log a warning for every file)
    out[PIXEL_DATA] = DataElement(PIXEL_DATA, "OW" if bits > 8 else "OB", memoryview(little).cast("B"),
                                  validation_mode=pydicom.config.IGNORE)


def is_planar(arr: np.ndarray) -> bool:
    """(frames, rows, cols, 3) whose memory holds the colour planes one after the other."""
    return not arr.flags.c_contiguous and np.moveaxis(arr, -1, 1).flags.c_contiguous


PALETTE = tuple(f"{kind}{c}PaletteColorLookupTable{part}" for c in ("Red", "Green", "Blue")
                for kind, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data")))
PIXEL_DATA = P.PIXEL_DATA


def write_dicom(fh: Any, ds: Dataset) -> None:
    """`ds` as a DICOM file (its file meta says how). In Explicit VR Little Endian with Pixel
    Data last, the header goes through pydicom and the pixel bytes are written straight after it:
    pydicom copies every value through a buffer first, two more passes over a cine's tens of MB."""
    meta = getattr(ds, "file_meta", None)
    fast = (meta is not None and meta.get("TransferSyntaxUID") == pydicom.uid.ExplicitVRLittleEndian
            and "PixelData" in ds and max(ds.keys()) == PIXEL_DATA)
    if not fast:
        if isinstance(ds.get("PixelData"), memoryview):
            ds.PixelData = ds.PixelData.tobytes()
        ds.save_as(fh, enforce_file_format=True)
        return
    header = Dataset({tag: ds[tag] for tag in ds.keys() if tag != PIXEL_DATA})
    header.file_meta = meta
    header.save_as(fh, enforce_file_format=True)
    value = ds.PixelData
    vr = b"OW" if int(ds.get("BitsAllocated", 8) or 8) > 8 else b"OB"
    fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, len(value) + len(value) % 2))
    fh.write(value)
    if len(value) % 2:
        fh.write(b"\0")
