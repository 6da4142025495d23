"""`cbh import FORMAT SRC COHORT` for the annotation tools hospitals use: DICOM SEG, NIfTI, COCO
JSON, CVAT for images 1.1 XML and Label Studio JSON, into the cohort format (README, "Your own
cohort").

Each format's reader yields one `Annotated` per image (or frame of a cine): its structures as
boolean masks on the scan's own pixel grid. Class names (and NIfTI values, DICOM SEG codes) are
mapped to the platform's structures by a `LabelMap` (defaults below, or a YAML file given with
`--labels`); a name the map does not know refuses that image, naming the file and the label,
since a silently dropped class would become background. The writer then joins each image with
its clinical row (`--table`: a CSV keyed by `image`, with any `annotations.csv` column) and with
what the DICOM header holds (patient, StudyDate, GA from LastMenstrualDate), copies the scan,
writes the label mask (0 background, 1 cerebellum, 2 cisterna magna) and the head mask (0/1),
and lists every image it could not take, with its reason, in `COHORT/import-report.json`.

Polygons and RLE are rasterised by COCO's own API (pycocotools) in its convention: vertices are
pixel corners, so a polygon traced along pixel edges gives its mask back exactly. CVAT and
Label Studio polygons use the same rasteriser; their ellipses are drawn by OpenCV.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from numpy.typing import NDArray

from pipelines.data.importers import ImportFormatError
from pipelines.imaging.scan import (
    RASTER_SUFFIXES,
    ScanError,
    header_ga_weeks,
    read_dicom,
    sidecar_spacing_mm,
    study_date,
)

FORMATS = ("dicom-seg", "nifti", "coco", "cvat", "labelstudio")
STRUCTURES = ("cerebellum", "cisterna_magna", "head")
MASK_VALUE = {"cerebellum": 1, "cisterna_magna": 2}
IGNORE = "ignore"
DEFAULT_NAMES = {
    "cerebellum": ["cerebellum", "cb", "cbl", "tcd", "cerebellar hemispheres"],
    "cisterna_magna": ["cisterna magna", "cm", "cisterna", "cistern"],
    "head": ["head", "fetal head", "skull", "hc", "head circumference"],
}
DEFAULT_VALUES = {1: "cerebellum", 2: "cisterna_magna", 3: "head"}
# DICOM SEG segmented property types (SNOMED CT) that need no name
SNOMED = {"113305005": "cerebellum", "54165005": "cisterna_magna", "69536005": "head"}
COLUMNS = ["image", "frame", "patient_id", "exam_date", "ga_weeks", "label", "tcd_mm", "cm_mm", "mask", "head_mask",
           "annotator", "site"]


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


@dataclass(frozen=True)
class LabelMap:
    """Class name (normalised) or raster value -> structure (`STRUCTURES`) or `ignore`."""

    names: dict[str, str]
    values: dict[int, str]

    @classmethod
    def load(cls, path: Path | None = None) -> LabelMap:
        """The defaults, with what a YAML file gives replacing them per structure:
        `names: {cerebellum: [...], cisterna_magna: [...], head: [...], ignore: [...]}` and
        `values: {1: cerebellum, 2: cisterna_magna, 3: head, 4: ignore}`."""
        names = {k: list(v) for k, v in DEFAULT_NAMES.items()}
        values: dict[int, str] = dict(DEFAULT_VALUES)
        if path is not None:
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ImportFormatError(f"{path}: label mapping cannot be read: {exc}") from None
            if not isinstance(raw, dict) or set(raw) - {"names", "values"}:
                raise ImportFormatError(f"{path}: a label mapping has `names:` and/or `values:` only")
            for target, given in (raw.get("names") or {}).items():
                if target not in (*STRUCTURES, IGNORE) or not isinstance(given, list):
                    raise ImportFormatError(f"{path}: names.{target}: not one of {STRUCTURES + (IGNORE,)} with a list")
                names[target] = [str(g) for g in given]
            if raw.get("values") is not None:
                values = {}
                for value, target in (raw.get("values") or {}).items():
                    if target not in (*STRUCTURES, IGNORE) or not str(value).isdigit():
                        raise ImportFormatError(f"{path}: values.{value}: {target!r} is not one of "
                                                f"{STRUCTURES + (IGNORE,)}")
                    values[int(value)] = target
        flat: dict[str, str] = {}
        for target, given in names.items():
            for g in given:
                if flat.setdefault(_norm(g), target) != target:
                    raise ImportFormatError(f"label {g!r} is mapped to both {flat[_norm(g)]} and {target}")
        return cls(flat, values)

    def structure(self, name: str) -> str | None:
        return self.names.get(_norm(name))

    def describe(self) -> dict:
        return {"names": self.names, "values": {str(k): v for k, v in self.values.items()}}


@dataclass
class Annotated:
    """One annotated image (or frame): where it is, which structures, or why it is refused."""

    ref: str                              # the image as the annotation names it
    where: str                            # the annotation file (and entry) the report names
    frame: int = 0
    shape: tuple[int, int] | None = None  # (rows, cols) the annotation declares
    layers: dict[str, NDArray[np.bool_]] = field(default_factory=dict)
    problem: str = ""
    annotator: str = ""
    image: Path | None = None             # resolved scan file

    def add(self, structure: str, mask: NDArray, what: str = "") -> None:
        mask = np.asarray(mask, bool)
        if not mask.any():                 # a box-only COCO entry, a polygon of two points: nothing drawn
            self.problem = self.problem or f"{self.where}: {what or structure} covers no pixel"
            return
        if self.shape is None:
            self.shape = mask.shape
        self.layers[structure] = self.layers.get(structure, np.zeros(mask.shape, bool)) | mask

    def target(self, labels: LabelMap, name: str) -> str | None:
        """The structure `name` is drawn into, or None: ignored by the map, or unknown to it (the
        image is then refused, naming the label)."""
        target = labels.structure(name)
        if target is None:
            self.unknown(name)
        return None if target in (None, IGNORE) else target

    def unknown(self, label: str) -> None:
        if not self.problem:
            self.problem = (f"{self.where}: label {label!r} is not in the label mapping (map it to a structure or "
                            f"list it under names.ignore in --labels)")


# ---- rasterisers ------------------------------------------------------------------------------

def polygon_mask(polygons: list[list[float]], rows: int, cols: int) -> NDArray[np.bool_]:
    """Polygons [x0, y0, x1, y1, ...] in pixel-corner coordinates, by COCO's rasteriser."""
    from pycocotools import mask as coco_mask

    polys = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not polys:
        return np.zeros((rows, cols), bool)
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polys, rows, cols))).astype(bool)


def ellipse_mask(cx: float, cy: float, rx: float, ry: float, angle_deg: float, rows: int, cols: int
                 ) -> NDArray[np.bool_]:
    """A filled ellipse, centre in pixel-corner coordinates (as the tools give it)."""
    out = np.zeros((rows, cols), np.uint8)
    k = 16     # OpenCV's fixed-point shift: sub-pixel centre and axes
    cv2.ellipse(out, (round((cx - 0.5) * k), round((cy - 0.5) * k)), (round(rx * k), round(ry * k)), angle_deg,
                0, 360, 1, -1, lineType=cv2.LINE_8, shift=4)
    return out.astype(bool)


UNREADABLE = object()
LS_REGIONS = ("polygonlabels", "brushlabels", "ellipselabels", "rectanglelabels")


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return UNREADABLE


# ---- COCO -------------------------------------------------------------------------------------

def read_coco(src: Path, labels: LabelMap) -> Iterator[Annotated]:
    from pycocotools import mask as coco_mask

    found = False
    for path in sorted(src.rglob("*.json")):
        doc = _json(path)
        if not (isinstance(doc, dict) and {"images", "annotations", "categories"} <= set(doc)):
            if doc is UNREADABLE:
                yield Annotated(ref=path.name, where=path.name, problem=f"{path.name}: not readable JSON")
            continue
        found = True
        cats = {c["id"]: c.get("name", str(c["id"])) for c in doc["categories"]}
        by_image: dict[int, Annotated] = {}
        for img in doc["images"]:
            by_image[img["id"]] = Annotated(ref=str(img.get("file_name", "")), where=f"{path.name}: image {img['id']}",
                                            shape=(int(img["height"]), int(img["width"])))
        for ann in doc["annotations"]:
            item = by_image.get(ann.get("image_id"))
            if item is None or item.shape is None:
                yield Annotated(ref=str(ann.get("image_id")), where=f"{path.name}: annotation {ann.get('id')}",
                                problem=f"{path.name}: annotation {ann.get('id')} names image {ann.get('image_id')!r}, "
                                        f"which the file does not list")
                continue
            name = cats.get(ann.get("category_id"), str(ann.get("category_id")))
            if (target := item.target(labels, name)) is None:
                continue
            rows, cols = item.shape
            seg = ann.get("segmentation")
            try:
                if isinstance(seg, list):
                    mask = polygon_mask(seg, rows, cols)
                elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                    mask = coco_mask.decode(coco_mask.frPyObjects(seg, rows, cols)).astype(bool)
                elif isinstance(seg, dict):
                    mask = coco_mask.decode({"size": seg["size"], "counts": seg["counts"]}).astype(bool)
                else:
                    raise ValueError("no polygon or RLE")
            except (ValueError, KeyError, TypeError) as exc:
                item.problem = item.problem or f"{item.where}: annotation {ann.get('id')} ({name}): {exc}"
                continue
            if mask.shape != (rows, cols):
                item.problem = f"{item.where}: annotation {ann.get('id')} is {mask.shape}, the image {(rows, cols)}"
                continue
            item.add(target, mask, f"annotation {ann.get('id')} ({name})")
        yield from by_image.values()
    if not found:
        raise ImportFormatError(f"{src}: no COCO JSON (with images, annotations and categories) found")


# ---- CVAT for images 1.1 ----------------------------------------------------------------------

def cvat_mask(rle: str, left: int, top: int, width: int, height: int, rows: int, cols: int) -> NDArray[np.bool_]:
    """CVAT's mask shape: run lengths over its box (row-major), alternating, background first."""
    counts = [int(c) for c in rle.replace(" ", "").split(",") if c]
    flat = np.zeros(width * height, bool)
    pos, value = 0, False
    for c in counts:
        flat[pos:pos + c] = value
        pos, value = pos + c, not value
    if pos != width * height:
        raise ValueError(f"mask runs cover {pos} pixels, its box {width}x{height}")
    out = np.zeros((rows, cols), bool)
    out[top:top + height, left:left + width] = flat.reshape(height, width)[: rows - top, : cols - left]
    return out


def read_cvat(src: Path, labels: LabelMap) -> Iterator[Annotated]:
    found = False
    for path in sorted(src.rglob("*.xml")):
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            yield Annotated(ref=path.name, where=path.name, problem=f"{path.name}: not readable XML")
            continue
        if root.tag != "annotations":
            continue
        found = True
        for img in root.iter("image"):
            rows, cols = int(img.get("height", 0)), int(img.get("width", 0))
            item = Annotated(ref=img.get("name", ""), where=f"{path.name}: image {img.get('id')}", shape=(rows, cols))
            for shape in img:
                name = shape.get("label", "")
                if (target := item.target(labels, name)) is None:
                    continue
                try:
                    if shape.tag == "polygon":
                        pts = [float(v) for p in shape.get("points", "").split(";") if p for v in p.split(",")]
                        item.add(target, polygon_mask([pts], rows, cols), f"polygon {name!r}")
                    elif shape.tag == "mask":
                        item.add(target, cvat_mask(shape.get("rle", ""), int(shape.get("left")), int(shape.get("top")),
                                                   int(shape.get("width")), int(shape.get("height")), rows, cols))
                    elif shape.tag == "ellipse":
                        item.add(target, ellipse_mask(float(shape.get("cx")), float(shape.get("cy")),
                                                      float(shape.get("rx")), float(shape.get("ry")),
                                                      float(shape.get("rotation", 0)), rows, cols))
                    else:
                        item.problem = item.problem or (f"{item.where}: {name!r} is a {shape.tag}, not a polygon, "
                                                        f"mask or ellipse")
                except (TypeError, ValueError) as exc:
                    item.problem = item.problem or f"{item.where}: {shape.tag} {name!r}: {exc}"
            yield item
    if not found:
        raise ImportFormatError(f"{src}: no CVAT for images XML (<annotations>) found")


# ---- Label Studio -----------------------------------------------------------------------------

def label_studio_rle(rle: list[int], rows: int, cols: int) -> NDArray[np.bool_]:
    """Label Studio's brush RLE (thi.ng rle-pack of the RGBA image): its alpha channel."""
    bits = np.unpackbits(np.asarray(rle, np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        v = 0
        for b in bits[pos:pos + n]:
            v = (v << 1) | int(b)
        pos += n
        return v

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    if num != rows * cols * 4:
        raise ValueError(f"brush holds {num // 4} pixels, the image {rows}x{cols}")
    return out.reshape(rows, cols, 4)[:, :, 3] > 0


def _upload_name(ref: str) -> str:
    """Label Studio stores an upload as `<8 hex>-<original name>` under /data/upload/N/."""
    base = ref.rsplit("/", 1)[-1].split("?", 1)[0]
    return re.sub(r"^[0-9a-f]{8}-", "", base)


def read_labelstudio(src: Path, labels: LabelMap) -> Iterator[Annotated]:
    found = False
    for path in sorted(src.rglob("*.json")):
        doc = _json(path)
        if not (isinstance(doc, list) and doc and isinstance(doc[0], dict) and "annotations" in doc[0]):
            if doc is UNREADABLE:
                yield Annotated(ref=path.name, where=path.name, problem=f"{path.name}: not readable JSON")
            continue
        found = True
        for task in doc:
            data = task.get("data") or {}
            ref = str(data.get("image") or next((v for v in data.values() if isinstance(v, str)), ""))
            item = Annotated(ref=_upload_name(ref), where=f"{path.name}: task {task.get('id')}")
            done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
            if not done:
                item.problem = f"{item.where}: no annotation that was not cancelled"
                yield item
                continue
            ann = done[0]                       # the first annotator's; the report counts the others
            item.annotator = f"labelstudio-user-{ann.get('completed_by', '')}" if ann.get("completed_by") else ""
            if len(done) > 1:
                item.where += f" ({len(done)} annotations, the first kept)"
            for res in ann.get("result") or []:
                value, kind = res.get("value") or {}, res.get("type", "")
                if kind not in LS_REGIONS:
                    continue                # choices, ratings, text: about the task, not a drawn structure
                names = value.get(kind) or []
                rows, cols = int(res.get("original_height") or 0), int(res.get("original_width") or 0)
                if not rows or not cols:
                    item.problem = item.problem or f"{item.where}: a {kind} result without the image's size"
                    continue
                item.shape = item.shape or (rows, cols)
                for name in names:
                    if (target := item.target(labels, name)) is None:
                        continue
                    try:
                        if kind == "polygonlabels":
                            pts = [c for x, y in value["points"] for c in (x * cols / 100.0, y * rows / 100.0)]
                            item.add(target, polygon_mask([pts], rows, cols), f"polygon {name!r}")
                        elif kind == "brushlabels":
                            item.add(target, label_studio_rle(value["rle"], rows, cols), f"brush {name!r}")
                        elif kind == "ellipselabels":
                            item.add(target, ellipse_mask(value["x"] * cols / 100.0, value["y"] * rows / 100.0,
                                                          value["radiusX"] * cols / 100.0,
                                                          value["radiusY"] * rows / 100.0,
                                                          float(value.get("rotation", 0)), rows, cols),
                                     f"ellipse {name!r}")
                        else:
                            item.problem = item.problem or f"{item.where}: {name!r} is a rectangle, not a " \
                                                           f"polygon, brush or ellipse"
                    except (KeyError, TypeError, ValueError) as exc:
                        item.problem = item.problem or f"{item.where}: {kind} {name!r}: {exc}"
            yield item
    if not found:
        raise ImportFormatError(f"{src}: no Label Studio JSON export (a list of tasks with annotations) found")


# ---- NIfTI ------------------------------------------------------------------------------------

NIFTI_SUFFIX = re.compile(r"([_\-.](seg|label|labels|mask|segmentation))?\.nii(\.gz)?$", re.IGNORECASE)


def read_nifti(src: Path, labels: LabelMap) -> Iterator[Annotated]:
    """A label map per image, `<image stem>[_seg|_label|_mask].nii[.gz]`: voxel (i, j, k) is column
    i, row j of frame k, as ITK-SNAP and 3D Slicer save a 2D image or a cine; its values go
    through the map's `values`."""
    import nibabel as nib

    files = sorted(p for p in src.rglob("*") if p.is_file() and NIFTI_SUFFIX.search(p.name))
    if not files:
        raise ImportFormatError(f"{src}: no NIfTI label file (.nii or .nii.gz) found")
    for path in files:
        stem = NIFTI_SUFFIX.sub("", path.name)
        try:
            data = np.asarray(nib.load(path).dataobj)
        except Exception as exc:  # boundary: nibabel raises many kinds for a bad file; it is named
            yield Annotated(ref=stem, where=path.name, problem=f"{path.name}: not a readable NIfTI file: {exc}")
            continue
        data = data.reshape(*data.shape[:2], -1) if data.ndim >= 2 else data
        if data.ndim != 3 or not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            yield Annotated(ref=stem, where=path.name, problem=f"{path.name}: not a 2D label map of whole numbers")
            continue
        for k in range(data.shape[2]):
            plane = data[:, :, k].T.astype(np.int64)
            if k > 0 and not plane.any():
                continue                             # an unlabelled frame of a cine
            item = Annotated(ref=stem, where=path.name + (f": frame {k}" if data.shape[2] > 1 else ""), frame=k,
                             shape=plane.shape)
            for value in (int(v) for v in np.unique(plane) if v != 0):
                target = labels.values.get(value)
                if target is None:
                    item.problem = item.problem or (f"{item.where}: label value {value} is not in the label mapping "
                                                    f"(values: in --labels)")
                elif target != IGNORE:
                    item.add(target, plane == value)
            yield item


# ---- DICOM SEG --------------------------------------------------------------------------------

def read_dicom_seg(src: Path, labels: LabelMap) -> Iterator[Annotated]:
    """Segmentations (Modality SEG) beside their source images, found by SOP Instance UID; a
    segment is mapped by its SNOMED property type, else by its label; fractional segments are
    taken at 0.5."""
    import highdicom as hd
    import pydicom

    segs, sources = [], {}
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # boundary: not DICOM at all; ingest names such files itself
            continue
        if ds.get("Modality") == "SEG":
            segs.append(path)
        elif ds.get("SOPInstanceUID"):
            sources[str(ds.SOPInstanceUID)] = path
    if not segs:
        raise ImportFormatError(f"{src}: no DICOM Segmentation (Modality SEG) found")
    for path in segs:
        try:
            seg = hd.seg.segread(path)
            refs = seg.get_source_image_uids()
        except Exception as exc:  # boundary: highdicom refuses a malformed SEG; named, the rest go on
            yield Annotated(ref=path.name, where=path.name, problem=f"{path.name}: not a readable DICOM SEG: {exc}")
            continue
        targets: dict[int, str] = {}
        problem = ""
        for desc in seg.SegmentSequence:
            code = str(desc.SegmentedPropertyTypeCodeSequence[0].CodeValue)
            target = SNOMED.get(code) or labels.structure(str(desc.get("SegmentLabel", "")))
            if target is None:
                problem = problem or (f"{path.name}: segment {desc.SegmentNumber} label "
                                      f"{str(desc.get('SegmentLabel', ''))!r} is not in the label mapping")
            elif target != IGNORE:
                targets[int(desc.SegmentNumber)] = target
        if not refs:
            yield Annotated(ref=path.name, where=path.name, problem=f"{path.name}: references no source image")
        for _study, _series, uid in refs:
            source = sources.get(str(uid))
            item = Annotated(ref=source.name if source else str(uid), where=path.name, problem=problem)
            if source is None:
                item.problem = item.problem or f"{path.name}: its source image is not in the folder"
                yield item
                continue
            item.image = source
            frames = _seg_frames(seg, str(uid))
            for frame in frames:
                one = Annotated(ref=item.ref, where=item.where + (f": frame {frame}" if frames != [None] else ""),
                                frame=frame or 0, problem=item.problem, image=source)
                if not one.problem:
                    try:
                        for number, target in targets.items():
                            if frame is None:
                                px = seg.get_pixels_by_source_instance([str(uid)], segment_numbers=[number])
                            else:
                                px = seg.get_pixels_by_source_frame(str(uid), [frame + 1], segment_numbers=[number])
                            one.add(target, np.asarray(px)[0, ..., 0] >= 0.5, f"segment {number}")
                    except Exception as exc:  # boundary: highdicom refuses the SEG's pixels; named, the rest go on
                        one.problem = f"{path.name}: its pixels cannot be read: {str(exc)[:200]}"
                yield one


def _seg_frames(seg, uid: str) -> list[int | None]:
    """The 0-based source frames a SEG segments of a multi-frame source; [None] for one frame."""
    frames = set()
    for group in getattr(seg, "PerFrameFunctionalGroupsSequence", []):
        for der in group.get("DerivationImageSequence", []):
            for s in der.get("SourceImageSequence", []):
                if str(s.ReferencedSOPInstanceUID) == uid and "ReferencedFrameNumber" in s:
                    frames.add(int(s.ReferencedFrameNumber) - 1)
    return sorted(frames) or [None]


READERS = {"coco": read_coco, "cvat": read_cvat, "labelstudio": read_labelstudio, "nifti": read_nifti,
           "dicom-seg": read_dicom_seg}


# ---- the cohort writer ------------------------------------------------------------------------

def _scan_index(src: Path) -> tuple[dict[str, Path], dict[str, list[Path]], dict[str, list[Path]]]:
    """Scans under SRC by relative path, by file name and by stem (annotations name them any of
    these ways)."""
    by_rel, by_name, by_stem = {}, {}, {}
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in (".dcm", *RASTER_SUFFIXES):
            continue
        by_rel[p.relative_to(src).as_posix()] = p
        by_name.setdefault(p.name, []).append(p)
        by_stem.setdefault(p.stem, []).append(p)
    return by_rel, by_name, by_stem


def _resolve(ref: str, src: Path, index) -> tuple[Path | None, str]:
    by_rel, by_name, by_stem = index
    ref = ref.replace("\\", "/").lstrip("./")
    hits = ([by_rel[ref]] if ref in by_rel else by_name.get(Path(ref).name) or by_stem.get(ref)
            or by_stem.get(Path(ref).stem) or [])
    if len(hits) > 1:
        return None, f"image {ref!r} matches {len(hits)} files under the source folder"
    return (hits[0], "") if hits else (None, f"image {ref!r} not found under the source folder")


def _read_table(path: Path | None) -> dict[str, dict[str, str]]:
    if path is None:
        return {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ImportFormatError(f"{path}: cannot be read: {exc.strerror}") from None
    if rows and "image" not in rows[0]:
        raise ImportFormatError(f"{path}: the table needs an `image` column (the scan's file name or path)")
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        key = f"{row['image'].replace(chr(92), '/').lstrip('./')}#{(row.get('frame') or '0').strip() or '0'}"
        out[key] = row
    return out


def _table_row(table: dict[str, dict[str, str]], rel: str, frame: int) -> dict[str, str]:
    for key in (f"{rel}#{frame}", f"{Path(rel).name}#{frame}"):
        if key in table:
            return table[key]
    return {}


def _image_shape(path: Path) -> tuple[int, int] | None:
    if path.suffix.lower() in RASTER_SUFFIXES:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        return None if img is None else img.shape[:2]
    ds = read_dicom(path, header_only=True)
    return int(ds.Rows), int(ds.Columns)


def import_annotations(fmt: str, src: Path, cohort: Path, table: Path | None = None,
                       label_file: Path | None = None) -> dict:
    """Write `cohort` from annotations in `fmt` under `src`; returns the import report (also
    `COHORT/import-report.json`)."""
    if fmt not in READERS:
        raise ImportFormatError(f"unknown format {fmt!r}: one of {', '.join(('hc18',) + FORMATS)}")
    if not src.is_dir():
        raise ImportFormatError(f"{src}: source folder not found")
    if cohort.exists() and (not cohort.is_dir() or any(cohort.iterdir())):
        raise ImportFormatError(f"{cohort}: not an empty folder (an earlier import's files would mix with this "
                                "one's); choose a new folder")
    labels = LabelMap.load(label_file)
    clinical = _read_table(table)
    index = _scan_index(src)
    items = list(READERS[fmt](src, labels))
    (cohort / "scans").mkdir(parents=True, exist_ok=True)
    (cohort / "masks").mkdir(parents=True, exist_ok=True)
    extra = [c for c in next(iter(clinical.values()), {}) if c not in COLUMNS and c != "pixel_spacing_mm"]
    out, skipped, seen, placed = [], [], set(), {}
    for item in items:
        reason, row = _one(item, src, cohort, index, clinical, seen, placed)
        if reason:
            skipped.append({"image": item.ref, "frame": item.frame, "reason": reason})
        else:
            out.append(row)
    with (cohort / "annotations.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS + extra, extrasaction="ignore")
        w.writeheader()
        w.writerows(out)
    report = {"format": fmt, "images": len(items), "imported": len(out), "skipped": skipped,
              "labels": labels.describe(), "table": table.name if table else None}
    (cohort / "import-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _one(item: Annotated, src: Path, cohort: Path, index, clinical: dict, seen: set,
         placed: dict[str, str]) -> tuple[str, dict]:
    """One annotated image: (why it was skipped, {}) or ('', its annotations.csv row)."""
    if item.problem:
        return item.problem, {}
    path = item.image
    if path is None:
        path, why = _resolve(item.ref, src, index)
        if path is None:
            return f"{item.where}: {why}", {}
    rel = path.relative_to(src).as_posix()
    if (rel, item.frame) in seen:
        return f"{item.where}: {rel} frame {item.frame} is annotated twice; the first annotation was kept", {}
    if not item.layers:
        return f"{item.where}: no cerebellum, cisterna magna or head drawn", {}
    try:
        shape = _image_shape(path)
        ds = read_dicom(path, header_only=True) if path.suffix.lower() not in RASTER_SUFFIXES else None
    except (ScanError, OSError, AttributeError) as exc:
        return f"{item.where}: {rel}: {exc}", {}
    if shape is None:
        return f"{item.where}: {rel} cannot be decoded", {}
    if item.shape != shape:
        return f"{item.where}: the annotation is {item.shape[0]}x{item.shape[1]}, the image {shape[0]}x{shape[1]}", {}
    overlap = int((item.layers.get("cerebellum", False) & item.layers.get("cisterna_magna", False)).sum()) \
        if {"cerebellum", "cisterna_magna"} <= set(item.layers) else 0
    if overlap:
        return f"{item.where}: cerebellum and cisterna magna overlap in {overlap} pixels", {}
    given = _table_row(clinical, rel, item.frame)
    # (a row with more fields than the header gives them under None: dropped, as csv has no name for them)
    row = {c: str(given.get(c) or "").strip() for c in given if c is not None}
    dicom = ds is not None
    if dicom:
        if not row.get("exam_date") and study_date(ds):
            row["exam_date"] = study_date(ds).isoformat()
        if not row.get("ga_weeks") and math.isfinite(ga := header_ga_weeks(ds)):
            row["ga_weeks"] = f"{ga:.2f}"
    else:
        spacing = sidecar_spacing_mm(path)
        if spacing is None and row.get("pixel_spacing_mm"):
            try:
                s = float(row["pixel_spacing_mm"])
                spacing = (s, s)
            except ValueError:
                return f"{item.where}: pixel_spacing_mm {row['pixel_spacing_mm']!r} is not a number", {}
        if spacing is None:
            return f"{item.where}: {rel} has no SCAN.json sidecar and the table no pixel_spacing_mm", {}
        if not row.get("patient_id"):
            return f"{item.where}: {rel} is not DICOM and the table gives no patient_id", {}
    if not row.get("exam_date"):
        return f"{item.where}: no exam_date in the table" + (" and no StudyDate in the header" if dicom else ""), {}
    try:
        float(row.get("ga_weeks", ""))
    except ValueError:
        return (f"{item.where}: no gestational age: none in the table"
                + (", and the header has no LastMenstrualDate with a StudyDate" if dicom else "")), {}
    seen.add((rel, item.frame))
    inner = rel.removeprefix("scans/")          # an export's own scans/ folder is not nested again
    if placed.setdefault(inner, rel) != rel:    # ... unless another file already has that place
        inner = f"{hashlib.sha256(rel.encode()).hexdigest()[:8]}/{rel}"
        placed[inner] = rel
    dest = cohort / "scans" / inner
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(path, dest)
        if not dicom:
            dest.with_suffix(".json").write_text(json.dumps({"pixel_spacing_mm": list(spacing)}) + "\n")
    # the whole name, suffix and folders included, so x.dcm and x.png never share a mask file
    stem = inner.replace("/", "__").replace(".", "_") + (f"_f{item.frame}" if item.frame else "")
    row.update(image=f"scans/{inner}", frame=item.frame, annotator=row.get("annotator") or item.annotator)
    if set(item.layers) & set(MASK_VALUE):
        mask = np.zeros(shape, np.uint8)
        for name, value in MASK_VALUE.items():
            if name in item.layers:
                mask[item.layers[name]] = value
        cv2.imwrite(str(cohort / "masks" / f"{stem}_mask.png"), mask)
        row["mask"] = f"masks/{stem}_mask.png"
    if "head" in item.layers:
        cv2.imwrite(str(cohort / "masks" / f"{stem}_head.png"), item.layers["head"].astype(np.uint8))
        row["head_mask"] = f"masks/{stem}_head.png"
    row.pop("pixel_spacing_mm", None)
    return "", row
