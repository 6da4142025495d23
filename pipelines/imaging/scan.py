"""The one reader of scans: a DICOM file (path or bytes) or a PNG/JPEG with its SCAN.json sidecar
in, frames, the valid-pixel mask (the ultrasound regions) and the pixel spacing out.

De-identification, preprocessing, `cbh predict` and the registered pyfunc all read through it,
so a file decodes the same way everywhere.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pipelines.errors import InputFileError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFER = "1 MB"   # values this large are read when used: uncompressed pixels go from the file into the array
FAST_PLUGINS = {pydicom.uid.JPEGBaseline8Bit: "pillow", pydicom.uid.RLELossless: "pylibjpeg"}


class ScanError(InputFileError):
    """A scan cannot be read; `code` is the quarantine reason code."""


@dataclass(frozen=True)
class Limits:
    """What any one input may cost before it is refused (a quarantine reason, a predict error row,
    HTTP 400). A PNG or JPEG declares its size in a few header bytes and may inflate far beyond
    its own size (a 214 KB PNG of 14000x14000 decodes to 196 million pixels), a DICOM declares
    rows, columns and frames, a deflated DICOM inflates: each is checked before the work. The
    defaults are params.yaml's `limits`; `configure` sets them for the process."""

    max_frame_pixels: int = 64_000_000       # eight times the largest ultrasound frame in clinical use
    max_file_pixels: int = 1_000_000_000     # every frame of one file together
    max_frames: int = 5_000                  # frames of one multi-frame file
    min_spacing_mm: float = 0.01             # mm per pixel: finer than any ultrasound probe resolves
    max_spacing_mm: float = 5.0
    max_inflated_bytes: int = 1_000_000_000  # a deflated DICOM's dataset once inflated (pydicom holds it)
    max_request_bytes: int = 100_000_000     # one serving request's images (base64 characters)
    max_request_seconds: int = 60            # MLflow's scoring server answers 504 past it


LIMITS = Limits()
_CONFIGURED = False


def configure(limits: Limits | dict | None) -> Limits:
    """Set the limits every reader in this process applies (None: the defaults)."""
    global LIMITS, _CONFIGURED
    if isinstance(limits, dict):
        limits = Limits(**{k: v for k, v in limits.items() if k in Limits.__dataclass_fields__})
    LIMITS, _CONFIGURED = limits or Limits(), True
    return LIMITS


def configured() -> bool:
    """Whether this process set its limits (from params.yaml, or a worker from its parent's)."""
    return _CONFIGURED


def check_dimensions(ds: Dataset) -> None:
    """Refuse a DICOM whose header declares more pixels or frames than the limits, before decoding."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ScanError("bad_pixel_layout", "Rows, Columns or NumberOfFrames is not a number") from exc
    lim = LIMITS
    if rows * cols > lim.max_frame_pixels:
        raise ScanError("too_many_pixels", f"the file declares {cols}x{rows} pixels per frame, more than the "
                        f"{lim.max_frame_pixels:,} of limits.max_frame_pixels")
    if frames > lim.max_frames:
        raise ScanError("too_many_frames", f"the file declares {frames:,} frames, more than the "
                        f"{lim.max_frames:,} of limits.max_frames")
    if rows * cols * frames > lim.max_file_pixels:
        raise ScanError("too_many_pixels", f"the file declares {rows * cols * frames:,} pixels in {frames} frames, "
                        f"more than the {lim.max_file_pixels:,} of limits.max_file_pixels")


def check_spacing(spacing: tuple[float, float] | None) -> tuple[float, float] | None:
    """The spacing if it lies in the limits' range (None stays None: the caller decides)."""
    if spacing is None:
        return None
    lim = LIMITS
    if not all(lim.min_spacing_mm <= v <= lim.max_spacing_mm for v in spacing):
        raise ScanError("implausible_spacing", f"pixel spacing {spacing[0]:.4g} x {spacing[1]:.4g} mm lies outside "
                        f"{lim.min_spacing_mm}-{lim.max_spacing_mm} mm (limits.min_spacing_mm, max_spacing_mm)")
    return spacing


def _deflated_start(fp: Any) -> int | None:
    """Where the dataset of a Part-10 file with the deflated transfer syntax starts, read with
    pydicom's own file-meta reader (the one dcmread uses, so both agree on the syntax; it does not
    inflate); None for any other file."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # boundary: not Part 10, or a meta dcmread will refuse on its own
        return None
    syntax = str(meta.get("TransferSyntaxUID", "")).strip()
    return fp.tell() if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian else None


def check_inflation(source: Path | bytes) -> None:
    """Refuse a deflated DICOM whose dataset inflates past limits.max_inflated_bytes, counted in
    1 MiB steps and never held (a few KB of zeros deflate from gigabytes)."""
    import zlib

    if isinstance(source, Path):
        with source.open("rb") as fh:
            start = _deflated_start(fh)
        if start is None:
            return
        raw = source.read_bytes()
    else:
        raw, start = source, _deflated_start(io.BytesIO(source))
        if start is None:
            return
    limit, total = LIMITS.max_inflated_bytes, 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data = raw[start:]
    try:
        while data:
            total += len(inflater.decompress(data, 1 << 20))
            if total > limit:
                raise ScanError("inflated_too_large", f"the deflated dataset inflates past the {limit:,} bytes "
                                f"of limits.max_inflated_bytes")
            data = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ScanError("unreadable_dicom", f"the deflated dataset does not inflate ({exc})") from exc


def raster_size(source: bytes | Path) -> tuple[int, int] | None:
    """(width, height) a PNG/JPEG (bytes or file) declares in its header, without decoding it; None
    if the header cannot be read. Raises ScanError('too_many_pixels') past limits.max_frame_pixels."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise ScanError("too_many_pixels", f"the image declares over {Image.MAX_IMAGE_PIXELS * 2:,} pixels, more "
                        f"than the {LIMITS.max_frame_pixels:,} of limits.max_frame_pixels") from None
    except OSError:
        if isinstance(source, Path):
            raise                     # the file itself cannot be read: the caller reports that
        return None
    except Exception:  # boundary: not an image PIL knows; cv2 still gets its try
        return None
    if width * height > LIMITS.max_frame_pixels:
        raise ScanError("too_many_pixels", f"the image declares {width}x{height} pixels, more than the "
                        f"{LIMITS.max_frame_pixels:,} of limits.max_frame_pixels")
    return width, height


def decode_raster(data: bytes) -> np.ndarray | None:
    """PNG/JPEG bytes as pixels (grey, or RGB in that order), None if they do not decode.
    Raises ScanError('too_many_pixels') before decoding an image larger than limits.max_frame_pixels."""
    raster_size(data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is not None and img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    return img


def sidecar_spacing_mm(path: Path) -> tuple[float, float] | None:
    """(row, col) spacing in mm from the SCAN.json beside a PNG/JPEG; None if missing or invalid."""
    try:
        row, col = (float(v) for v in json.loads(path.with_suffix(".json").read_text())["pixel_spacing_mm"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def parse_da(value: Any) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD) as a date, None when empty or unreadable."""
    try:
        return dt.datetime.strptime(str(value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def study_date(ds: Dataset) -> dt.date | None:
    """The exam's date: StudyDate, else AcquisitionDate, else ContentDate."""
    return parse_da(ds.get("StudyDate")) or parse_da(ds.get("AcquisitionDate")) or parse_da(ds.get("ContentDate"))


def header_ga_weeks(ds: Dataset) -> float:
    """Gestational age in weeks from a header: the exam's date (`study_date`) minus
    LastMenstrualDate. De-identification shifts a patient's dates together, so the interval
    survives it. NaN when either date is absent or unreadable (the frame is then refused,
    never given a default)."""
    lmp, exam = parse_da(ds.get("LastMenstrualDate")), study_date(ds)
    return (exam - lmp).days / 7.0 if lmp and exam else math.nan


def regions(ds: Dataset) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1, inclusive) of the ultrasound regions."""
    out = []
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        try:
            out.append((int(r.RegionLocationMinX0), int(r.RegionLocationMinY0),
                        int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)))
        except (AttributeError, TypeError, ValueError):
            # a region with a missing or empty bound is not used: its pixels are then blanked as
            # outside every region, or, with no region left, the frame needs a device template
            continue
    return out


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, col) spacing in mm from the ultrasound regions (cm, units code 3) or PixelSpacing."""
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        if r.get("PhysicalUnitsXDirection") == 3 and r.get("PhysicalUnitsYDirection") == 3:
            try:
                dx, dy = float(r.get("PhysicalDeltaX") or 0), float(r.get("PhysicalDeltaY") or 0)
            except (TypeError, ValueError):
                continue   # an empty or malformed delta: this region gives no spacing
            if dx > 0 and dy > 0 and np.isfinite(dx) and np.isfinite(dy):
                return abs(dy) * 10.0, abs(dx) * 10.0
    try:
        row, col = (float(v) for v in ds.get("PixelSpacing") or ())
    except (TypeError, ValueError):
        return None   # missing, empty or not two numbers
    if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
        return row, col
    return None


def _plugin(syntax: str) -> str:
    """The decoding plugin for this transfer syntax ('': pydicom's first available)."""
    from pydicom.pixels.decoders.base import get_decoder

    plugin = FAST_PLUGINS.get(syntax, "")
    return plugin if plugin and plugin in get_decoder(syntax).available_plugins else ""


def decode(ds: Dataset, as_rgb: bool = True, index: int | None = None) -> np.ndarray:
    """pydicom's decoding, with the fastest plugin where pydicom's first choice is slow:
    libjpeg-turbo (Pillow's) for 8-bit baseline JPEG, about three times faster than the default
    and as conformant (the two differ by one level on about 1% of samples, within the IDCT
    tolerance JPEG allows); pylibjpeg-rle for RLE, seven times faster than pydicom's own and
    lossless like it. One decoder for everything that reads input pixels, so cleaning and
    checking agree. `index` decodes that frame alone (a cine read frame by frame costs one
    decode per frame, not one of the whole cine per frame)."""
    from pydicom.pixels import pixel_array

    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    try:
        return pixel_array(ds, as_rgb=as_rgb, decoding_plugin=_plugin(syntax), index=index)
    except Exception as exc:  # boundary: any codec failure becomes a quarantine reason
        raise ScanError("undecodable_pixels", f"pixel data cannot be decoded ({exc})") from exc


def frames_rgb_or_grey(ds: Dataset, index: int | None = None) -> tuple[np.ndarray, str]:
    """Decoded pixels as (frames, rows, cols[, 3]) and the photometric interpretation they are in
    (with `index`, that frame alone, still with its frame axis). The array is the caller's own
    (not the dataset's cached `pixel_array`), so it may be cleaned in place."""
    arr = decode(ds, index=index)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        arr, photometric, spp = apply_color_lut(arr, ds), "RGB", 3
    elif photometric.startswith("YBR"):
        photometric = "RGB"  # pydicom 3's pixel_array converts YBR to RGB (as_rgb=True)
    if frames == 1 or index is not None:
        arr = arr[None]
    if spp == 3 and arr.ndim != 4:
        raise ScanError("bad_pixel_layout", f"unexpected pixel array shape {arr.shape}")
    return np.ascontiguousarray(arr), photometric


def region_mask(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Where ultrasound data lies: the union of the regions, or the whole frame if none."""
    if not boxes:
        return np.ones(shape, bool)
    keep = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        keep[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    return keep


def read_dicom(path: Path, header_only: bool = False) -> Dataset:
    """Read a DICOM file (the header alone if asked) or raise ScanError: 'unreadable_dicom', or a
    limit's reason (the pixels are not decoded here, but a file past the limits is refused now)."""
    check_inflation(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, defer_size=None if header_only else DEFER)
        ds.SOPInstanceUID  # noqa: B018 - a file without it is not an image instance
    except OSError:
        raise                 # a missing or unreadable file is the caller's to report (its path may be PHI)
    except Exception as exc:  # boundary: record and quarantine
        raise ScanError("unreadable_dicom", f"not a readable DICOM image ({type(exc).__name__}: {exc})") from exc
    check_dimensions(ds)
    return ds


def to_grey(pixels: NDArray) -> NDArray[np.float32]:
    """Luminance in [0, 1] from a grey or RGB frame of any integer depth."""
    arr = pixels.astype(np.float32)
    if arr.ndim == 3:
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    hi = float(np.iinfo(pixels.dtype).max) if np.issubdtype(pixels.dtype, np.integer) else max(float(arr.max()), 1.0)
    return arr / hi


def given_spacing(value: Any) -> tuple[float, float] | None:
    """A caller's pixel spacing (one number, or [row, col] mm) as (row, col); None if absent or not positive."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        vals = [float(v) for v in value]
        return (vals[0], vals[-1]) if vals and min(vals) > 0 else None
    v = float(value)
    return (v, v) if v > 0 else None


@dataclass(frozen=True)
class Scan:
    """Grey frames in [0, 1] (frames, rows, cols), where ultrasound data lies, and the spacing."""

    frames: NDArray[np.float32]
    valid: NDArray[np.bool_]
    spacing: tuple[float, float] | None
    dataset: Dataset | None = None     # the DICOM header, for callers that need more of it


def is_dicom_bytes(raw: bytes) -> bool:
    return len(raw) > 132 and raw[128:132] == b"DICM"


def _parse_dicom(raw: bytes) -> Dataset:
    check_inflation(raw)
    try:
        ds = pydicom.dcmread(io.BytesIO(raw))
    except Exception as exc:  # boundary: any parse failure is the caller's bad input
        raise ScanError("unreadable_dicom", f"not a readable DICOM file ({type(exc).__name__})") from exc
    check_dimensions(ds)
    return ds


# The last DICOM file read frame by frame, parsed: a cine's frames are read one after another,
# and parsing the file again for each would make reading it cost frames x file size.
_LAST: tuple[tuple[str, int, int], Dataset] | None = None


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def _cached_dataset(source: Path | bytes) -> Dataset | None:
    if not isinstance(source, Path) or _LAST is None:
        return None
    try:
        return _LAST[1] if _LAST[0] == _file_key(source) else None
    except OSError:
        return None


def _remember(path: Path, ds: Dataset) -> None:
    global _LAST
    _LAST = (_file_key(path), ds)


def read_scan(source: Path | bytes, spacing: Any = None, frame: int | None = None) -> Scan:
    """Read a scan from a file or from its bytes. Spacing: the DICOM's own, else the sidecar (files),
    else `spacing` as given; None when none is known (the caller decides whether that is fatal).
    `frame` keeps one frame of a multi-frame DICOM. Messages never repeat the path (it may name the
    patient): the caller says which input it was, as it names it."""
    ds = _cached_dataset(source) if frame is not None else None
    raw = b"" if ds is not None else source.read_bytes() if isinstance(source, Path) else source
    if ds is not None or is_dicom_bytes(raw) or (isinstance(source, Path)
                                                and source.suffix.lower() not in RASTER_SUFFIXES):
        if ds is None:
            ds = _parse_dicom(raw)
            if frame is not None and isinstance(source, Path):
                _remember(source, ds)
        index = None                              # None: every frame
        if frame is not None:
            count = int(ds.get("NumberOfFrames", 1) or 1)
            if not 0 <= frame < count:
                raise ScanError("bad_frame", f"frame {frame} does not exist ({count} frames)")
            index = frame if count > 1 else None
        arr, _ = frames_rgb_or_grey(ds, index=index)
        grey = np.stack([to_grey(f) for f in arr])
        spacing = check_spacing(pixel_spacing_mm(ds) or given_spacing(spacing))
        return Scan(grey, region_mask(grey.shape[1:], regions(ds)), spacing, ds)
    img = decode_raster(raw)
    if img is None:
        raise ScanError("undecodable_image", "the image is neither a DICOM file nor a decodable PNG/JPEG")
    own = sidecar_spacing_mm(source) if isinstance(source, Path) else None
    grey = to_grey(img)[None]
    return Scan(grey, np.ones(grey.shape[1:], bool), check_spacing(own or given_spacing(spacing)))
