"""`cbh import dicom-seg|nifti|coco|cvat|labelstudio`: our masks written by each format's own
library (highdicom, nibabel, pycocotools, Label Studio's converter; CVAT XML as its documented
layout), imported, and compared with the originals: pixel-exact for raster formats, IoU >= 0.99
for polygons. An imported cohort ingests and passes the data contract's row checks."""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from pipelines.data.annotation_formats import import_annotations
from pipelines.data.importers import ImportFormatError

STRUCT = {"cerebellum": 1, "cisterna_magna": 2}


@pytest.fixture(scope="module")
def source(tmp_path_factory, small_cohort) -> tuple[Path, list[dict]]:
    """Eight annotated scans (DICOM and PNG, with sidecars) and the clinical table without masks."""
    src = tmp_path_factory.mktemp("annotated") / "export"
    with (small_cohort / "annotations.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["mask"] and r["head_mask"]]
    dicoms = [r for r in rows if r["image"].endswith(".dcm")]
    dicoms = [r for r in dicoms if r["label"] == "hypoplasia"][:2] + [r for r in dicoms if r["label"] == "normal"][:4]
    rows = [r for r in rows if r["image"].endswith(".png")][:2] + dicoms
    (src / "scans").mkdir(parents=True)
    for r in rows:
        shutil.copy(small_cohort / r["image"], src / r["image"])
        side = (small_cohort / r["image"]).with_suffix(".json")
        if side.exists():
            shutil.copy(side, (src / r["image"]).with_suffix(".json"))
    return src, rows


def _table(tmp: Path, rows: list[dict]) -> Path:
    path = tmp / "clinical.csv"
    cols = [c for c in rows[0] if c not in ("mask", "head_mask")]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _load(small_cohort: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    mask = cv2.imread(str(small_cohort / row["mask"]), cv2.IMREAD_UNCHANGED)
    head = cv2.imread(str(small_cohort / row["head_mask"]), cv2.IMREAD_UNCHANGED) > 0
    return mask, head


def edge_polygons(mask: np.ndarray) -> list[list[float]]:
    """Polygons along the pixel edges of `mask` (vertices at pixel corners), as a careful exporter
    writes them: contours of the mask doubled, corner index ceil(u / 2)."""
    up = np.kron(mask.astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [((c.reshape(-1, 2) + 1) // 2).reshape(-1).astype(float).tolist() for c in contours]


def _imported(cohort: Path) -> dict[str, dict]:
    with (cohort / "annotations.csv").open(newline="") as fh:
        return {r["image"]: r for r in csv.DictReader(fh)}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _check(cohort: Path, small_cohort: Path, rows: list[dict], exact: dict[str, bool], head: bool = True) -> None:
    got = _imported(cohort)
    assert set(got) == {r["image"] for r in rows}, json.loads((cohort / "import-report.json").read_text())["skipped"]
    for r in rows:
        want_mask, want_head = _load(small_cohort, r)
        g = got[r["image"]]
        mask = cv2.imread(str(cohort / g["mask"]), cv2.IMREAD_UNCHANGED)
        for name, value in STRUCT.items():
            if exact[name]:
                assert np.array_equal(mask == value, want_mask == value), (r["image"], name)
            else:
                assert _iou(mask == value, want_mask == value) >= 0.99, (r["image"], name)
        if head:
            got_head = cv2.imread(str(cohort / g["head_mask"]), cv2.IMREAD_UNCHANGED) > 0
            assert _iou(got_head, want_head) >= (1.0 if exact["head"] else 0.99), r["image"]
        for col in ("exam_date", "ga_weeks", "label", "patient_id"):
            assert g[col] == r[col], (r["image"], col)
        if r["image"].endswith(".png"):
            assert json.loads((cohort / r["image"]).with_suffix(".json").read_text())["pixel_spacing_mm"]


def _fresh(source, tmp_path: Path) -> tuple[Path, list[dict]]:
    """A source folder of the scans alone, for one format's annotations."""
    src, rows = source
    dest = tmp_path / "src"
    shutil.copytree(src, dest)
    return dest, rows


def write_coco(src: Path, small_cohort: Path, rows: list[dict]) -> None:
    """COCO JSON by pycocotools: RLE on odd images, pixel-edge polygons on the others."""
    from pycocotools import mask as coco_mask

    images, anns = [], []
    cats = [{"id": 1, "name": "Cerebellum"}, {"id": 2, "name": "cisterna_magna"}, {"id": 3, "name": "Fetal head"}]
    for i, r in enumerate(rows, 1):
        mask, head = _load(small_cohort, r)
        images.append({"id": i, "file_name": Path(r["image"]).name, "height": mask.shape[0], "width": mask.shape[1]})
        for cat, layer in ((1, mask == 1), (2, mask == 2), (3, head)):
            if i % 2 and cat < 3:            # odd images: COCO RLE, the others: polygons
                rle = coco_mask.encode(np.asfortranarray(layer.astype(np.uint8)))
                seg = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                seg = edge_polygons(layer)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "segmentation": seg, "iscrowd": 0})
    (src / "coco.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_rle_and_polygons_round_trip(source, small_cohort, tmp_path):
    src, rows = _fresh(source, tmp_path)
    write_coco(src, small_cohort, rows)
    rep = import_annotations("coco", src, tmp_path / "c", _table(tmp_path, rows))
    assert rep["imported"] == len(rows) and not rep["skipped"]
    _check(tmp_path / "c", small_cohort, rows, {"cerebellum": False, "cisterna_magna": False, "head": False})


def _cvat_rle(layer: np.ndarray) -> tuple[str, int, int, int, int]:
    ys, xs = np.nonzero(layer)
    top, left, bottom, right = ys.min(), xs.min(), ys.max(), xs.max()
    box = layer[top:bottom + 1, left:right + 1].reshape(-1)
    change = np.flatnonzero(np.diff(box.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [box.size]])
    runs = np.diff(bounds).tolist()
    if box[0]:
        runs = [0, *runs]
    return ",".join(map(str, runs)), int(left), int(top), int(right - left + 1), int(bottom - top + 1)


def write_cvat(src: Path, small_cohort: Path, rows: list[dict]) -> None:
    """CVAT for images 1.1 XML: cerebellum as polygons, cisterna magna and head as CVAT masks,
    and a probe box whose label no default maps."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    for i, r in enumerate(rows):
        mask, head = _load(small_cohort, r)
        img = ET.SubElement(root, "image", id=str(i), name=r["image"], width=str(mask.shape[1]),
                            height=str(mask.shape[0]))
        for poly in edge_polygons(mask == 1):
            ET.SubElement(img, "polygon", label="cerebellum", occluded="0", source="manual", z_order="0",
                          points=";".join(f"{x:.2f},{y:.2f}" for x, y in zip(poly[::2], poly[1::2], strict=True)))
        rle, left, top, w, h = _cvat_rle(mask == 2)
        ET.SubElement(img, "mask", label="Cisterna Magna", source="manual", occluded="0", rle=rle, left=str(left),
                      top=str(top), width=str(w), height=str(h), z_order="0")
        rle, left, top, w, h = _cvat_rle(head)
        ET.SubElement(img, "mask", label="head", source="manual", occluded="0", rle=rle, left=str(left),
                      top=str(top), width=str(w), height=str(h), z_order="0")
        ET.SubElement(img, "box", label="probe", xtl="1", ytl="1", xbr="5", ybr="5")
    (src / "annotations.xml").write_bytes(ET.tostring(root))
    (src / "labels.yaml").write_text("names:\n  ignore: [probe]\n")


def test_cvat_polygons_and_masks_round_trip(source, small_cohort, tmp_path):
    src, rows = _fresh(source, tmp_path)
    write_cvat(src, small_cohort, rows)
    # the probe box's label is unknown by default: every image is refused, naming it
    rep = import_annotations("cvat", src, tmp_path / "refused", _table(tmp_path, rows))
    rep_ok = import_annotations("cvat", src, tmp_path / "c", _table(tmp_path, rows), src / "labels.yaml")
    assert rep["imported"] == 0 and all("label 'probe' is not in the label mapping" in s["reason"]
                                        for s in rep["skipped"])
    assert rep_ok["imported"] == len(rows)
    _check(tmp_path / "c", small_cohort, rows, {"cerebellum": False, "cisterna_magna": True, "head": True})


def write_labelstudio(src: Path, small_cohort: Path, rows: list[dict]) -> None:
    """A Label Studio JSON export: cerebellum as a brush (Label Studio's own RLE encoder), the
    others as polygons in percent of the image."""
    from label_studio_converter import brush

    tasks = []
    for i, r in enumerate(rows):
        mask, head = _load(small_cohort, r)
        h, w = mask.shape
        result = [{"type": "brushlabels", "original_width": w, "original_height": h, "from_name": "tag",
                   "value": {"format": "rle", "rle": brush.mask2rle((mask == 1).astype(np.uint8) * 255),
                             "brushlabels": ["Cerebellum"]}}]
        for name, layer in (("Cisterna magna", mask == 2), ("Head", head)):
            for poly in edge_polygons(layer):
                pts = [[x * 100.0 / w, y * 100.0 / h] for x, y in zip(poly[::2], poly[1::2], strict=True)]
                result.append({"type": "polygonlabels", "original_width": w, "original_height": h,
                               "value": {"points": pts, "polygonlabels": [name]}})
        result.append({"type": "choices", "value": {"choices": ["good plane"]}})    # about the task: no region
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/3/0a1b2c3d-{Path(r['image']).name}"},
                      "annotations": [{"id": 1, "completed_by": 7, "was_cancelled": False, "result": result}]})
    (src / "export.json").write_text(json.dumps(tasks))


def test_label_studio_brush_and_polygons_round_trip(source, small_cohort, tmp_path):
    src, rows = _fresh(source, tmp_path)
    write_labelstudio(src, small_cohort, rows)
    rep = import_annotations("labelstudio", src, tmp_path / "c", _table(tmp_path, rows))
    assert rep["imported"] == len(rows), rep["skipped"]
    _check(tmp_path / "c", small_cohort, rows, {"cerebellum": True, "cisterna_magna": False, "head": False})
    assert {r["annotator"] for r in _imported(tmp_path / "c").values()} <= {"labelstudio-user-7", *(
        r["annotator"] for r in rows)}


def write_nifti(src: Path, small_cohort: Path, rows: list[dict]) -> None:
    """One label map per image by nibabel (cerebellum 1, cisterna magna 2)."""
    import nibabel as nib

    for r in rows:
        mask, _ = _load(small_cohort, r)
        # voxel (i, j) = column i, row j: the layout ITK-SNAP and 3D Slicer give a 2D image
        path = src / "scans" / f"{Path(r['image']).stem}_seg.nii.gz"
        nib.save(nib.Nifti1Image(mask.T[:, :, None].astype(np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0])), path)


def test_nifti_label_maps_round_trip(source, small_cohort, tmp_path):
    src, rows = _fresh(source, tmp_path)
    write_nifti(src, small_cohort, rows)
    rep = import_annotations("nifti", src, tmp_path / "c", _table(tmp_path, rows))
    assert rep["imported"] == len(rows), rep["skipped"]
    _check(tmp_path / "c", small_cohort, rows, {"cerebellum": True, "cisterna_magna": True, "head": True},
           head=False)


def write_dicom_seg(src: Path, small_cohort: Path, rows: list[dict]) -> None:
    """A binary DICOM SEG per DICOM scan by highdicom: cerebellum, cisterna magna and head."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    for n, r in enumerate(r for r in rows if r["image"].endswith(".dcm")):
        ds = pydicom.dcmread(src / r["image"])
        mask, head = _load(small_cohort, r)
        layers = np.stack([mask == 1, mask == 2, head], -1)[None].astype(np.uint8)
        descs = [hd.seg.SegmentDescription(
            segment_number=k, segment_label=label, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
            for k, (label, prop) in enumerate((("CB", codes.SCT.Cerebellum), ("CM", codes.SCT.CisternaMagna),
                                               ("Head", codes.SCT.Head)), 1)]
        seg = hd.seg.Segmentation(
            source_images=[ds], pixel_array=layers, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=50,
            sop_instance_uid=hd.UID(), instance_number=n + 1, manufacturer="test", manufacturer_model_name="t",
            software_versions="1", device_serial_number="1")
        seg.save_as(src / f"seg{n}.dcm")


def test_dicom_seg_round_trip(source, small_cohort, tmp_path):
    src, rows = _fresh(source, tmp_path)
    write_dicom_seg(src, small_cohort, rows)
    rep = import_annotations("dicom-seg", src, tmp_path / "c", _table(tmp_path, rows))
    dicom_rows = [r for r in rows if r["image"].endswith(".dcm")]
    assert rep["imported"] == len(dicom_rows), rep["skipped"]
    _check(tmp_path / "c", small_cohort, dicom_rows, {"cerebellum": True, "cisterna_magna": True, "head": True})


WRITERS = {"coco": write_coco, "cvat": write_cvat, "labelstudio": write_labelstudio, "nifti": write_nifti,
           "dicom-seg": write_dicom_seg}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_an_imported_cohort_ingests_and_passes_the_contract(fmt, source, small_cohort, tmp_path):
    """Through de-identification and the contract like any export: every row in, none
    quarantined, no row-level expectation failed."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.contract.validate import ValidateParams, validate_manifest
    from pipelines.data.ingest import MANIFEST_SCHEMA, ingest_cohort
    from pipelines.deid.core import Pseudonymizer
    from tests.conftest import ROOT, TEST_KEY

    src, rows = _fresh(source, tmp_path)
    WRITERS[fmt](src, small_cohort, rows)
    labels = src / "labels.yaml"
    rep = import_annotations(fmt, src, tmp_path / "c", _table(tmp_path, rows), labels if labels.exists() else None)
    assert rep["imported"] and not rep["skipped"], rep["skipped"]
    keep = ("image", "frame", "ga_weeks", "label", "tcd_mm", "cm_mm", "mask", "hc_mm", "head_mask", "annotator",
            "site")
    res = ingest_cohort(tmp_path / "c", tmp_path / "ws", "data/deid", Pseudonymizer(TEST_KEY.encode()), keep,
                        dt.date(2026, 1, 1))
    assert len(res.manifest) == rep["imported"] and not res.quarantine
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(res.manifest), preserve_index=False)
                   .select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA), manifest)
    gx = tmp_path / "expectations"
    shutil.copytree(ROOT / "expectations", gx, ignore=shutil.ignore_patterns("uncommitted"))
    report = validate_manifest(manifest, gx, ValidateParams(min_per_class=1), workspace=tmp_path / "ws",
                               cache_path=tmp_path / "stats.parquet")
    assert not report.quarantined, report.quarantined
    failed = [(r.suite, r.expectation, r.column) for r in report.results
              if not r.success and r.suite in ("scan_manifest", "annotations", "masks", "heads")]
    assert not failed


def test_refusals_name_the_file_and_the_label(source, tmp_path):
    src, rows = _fresh(source, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImportFormatError, match="no COCO JSON"):
        import_annotations("coco", empty, tmp_path / "c0")
    bad = tmp_path / "bad.yaml"
    bad.write_text("names:\n  liver: [x]\n")
    with pytest.raises(ImportFormatError, match="names.liver"):
        import_annotations("coco", src, tmp_path / "c1", None, bad)
    r = rows[0]
    (src / "one.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": Path(r["image"]).name, "height": 10, "width": 10},
                   {"id": 2, "file_name": "not-there.png", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "segmentation": [[0, 0, 5, 0, 5, 5]]},
                        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}],
        "categories": [{"id": 1, "name": "cerebellum"}, {"id": 9, "name": "thalamus"}]}))
    rep = import_annotations("coco", src, tmp_path / "c2")        # no table: PNG without patient_id
    reasons = [s["reason"] for s in rep["skipped"]]
    assert rep["imported"] == 0 and len(reasons) == 2
    assert "one.json: image 1: label 'thalamus' is not in the label mapping" in reasons[0]
    assert "one.json: image 2: image 'not-there.png' not found" in reasons[1]
    assert json.loads((tmp_path / "c2" / "import-report.json").read_text())["skipped"] == rep["skipped"]


def test_the_dicom_header_fills_what_the_table_leaves_empty(source, small_cohort, tmp_path):
    """No table row: a DICOM scan takes its exam date from StudyDate and its patient from the
    header at ingest; without LastMenstrualDate its GA is missing, and the image is refused in one
    sentence. With GA in the table it is imported. COCO entries naming no listed image, or
    covering no pixel, are reported, not dropped."""
    src, rows = _fresh(source, tmp_path)
    r = next(r for r in rows if r["image"].endswith(".dcm"))
    ds = pydicom.dcmread(src / r["image"], stop_before_pixels=True)
    mask, _ = _load(small_cohort, r)
    h, w = mask.shape
    (src / "c.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": Path(r["image"]).name, "height": h, "width": w}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": edge_polygons(mask == 1)},
                        {"id": 2, "image_id": 7, "category_id": 1, "segmentation": edge_polygons(mask == 1)}],
        "categories": [{"id": 1, "name": "cerebellum"}]}))
    rep = import_annotations("coco", src, tmp_path / "no-ga")
    reasons = sorted(s["reason"] for s in rep["skipped"])
    assert rep["imported"] == 0 and len(reasons) == 2
    assert "annotation 2 names image 7, which the file does not list" in reasons[0]
    assert "no gestational age: none in the table, and the header has no LastMenstrualDate" in reasons[1]
    table = tmp_path / "ga.csv"
    table.write_text(f"image,ga_weeks,label\n{Path(r['image']).name},{r['ga_weeks']},{r['label']}\n")
    rep = import_annotations("coco", src, tmp_path / "with-ga", table)
    (row,) = _imported(tmp_path / "with-ga").values()
    study = str(ds.StudyDate)
    assert row["exam_date"] == f"{study[:4]}-{study[4:6]}-{study[6:]}" and row["patient_id"] == ""
    assert row["ga_weeks"] == r["ga_weeks"] and row["label"] == r["label"]
    box = json.loads((src / "c.json").read_text())
    box["annotations"] = [{"id": 3, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": [1, 1, 5, 5]}]
    (src / "c.json").write_text(json.dumps(box))
    rep = import_annotations("coco", src, tmp_path / "box", table)
    assert rep["imported"] == 0 and "annotation 3 (cerebellum) covers no pixel" in rep["skipped"][0]["reason"]
    with pytest.raises(ImportFormatError, match="not an empty folder"):
        import_annotations("coco", src, tmp_path / "box", table)
