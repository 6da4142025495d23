"""The synthetic cohort is the ground truth of every other test: check it against itself."""

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from pipelines import biometry as B
from pipelines.data.synth import synth_cohort
from pipelines.imaging.scan import pixel_spacing_mm


def _rows(cohort):
    with (cohort / "annotations.csv").open() as fh:
        return list(csv.DictReader(fh))


def _pixels_and_spacing(cohort, row):
    path = cohort / row["image"]
    if path.suffix == ".png":
        spacing = json.loads(path.with_suffix(".json").read_text())["pixel_spacing_mm"]
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED), spacing
    ds = pydicom.dcmread(path)
    return ds.pixel_array, pixel_spacing_mm(ds)


def test_masks_agree_with_measurements(small_cohort, tmp_path):
    """The mask's transverse width (and CM depth) in mm equal the CSV values within a pixel."""
    sheet = []
    for row in _rows(small_cohort):
        pixels, spacing = _pixels_and_spacing(small_cohort, row)
        mask = cv2.imread(str(small_cohort / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == pixels.shape[:2] and set(np.unique(mask)) == {0, 1, 2}
        tcd, cm = B.measure_mask(mask, spacing[0])
        # within half a millimetre of the generator's truth (and within 1.5 / 2.5 pixels)
        assert abs(tcd - float(row["tcd_mm"])) <= min(0.5, 1.5 * spacing[0]), row["image"]
        assert abs(cm - float(row["cm_mm"])) <= min(0.5, 2.5 * spacing[0]), row["image"]
        # the truth sits where the anatomy is drawn: the cerebellum is echogenic-rimmed tissue,
        # the cisterna magna is fluid (darker than the cerebellum)
        grey = pixels if pixels.ndim == 2 else pixels[..., 0]
        assert grey[mask == 2].mean() < grey[mask == 1].mean()
        if len(sheet) < 4:
            vis = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
            vis[mask == 1, 2], vis[mask == 2, 0] = 255, 255
            sheet.append(cv2.resize(vis, (320, 240)))
    cv2.imwrite(str(tmp_path / "synth-sheet.png"), np.concatenate(sheet, 1))


def test_labels_follow_the_5th_centile_rule(small_cohort):
    for row in _rows(small_cohort):
        z = B.tcd_zscore(float(row["tcd_mm"]), float(row["ga_weeks"]))
        assert (z < B.Z_5TH) == (row["label"] == "hypoplasia"), row


def test_identifiers_where_hospitals_leave_them(small_cohort):
    dicoms = [r for r in _rows(small_cohort) if r["image"].endswith(".dcm")]
    syntaxes = set()
    for row in dicoms:
        ds = pydicom.dcmread(small_cohort / row["image"])
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert ds.PatientName and ds.PatientID and ds.PatientBirthDate and ds.InstitutionName
        assert ds.BurnedInAnnotation == "YES"
        assert any(el.tag.is_private for el in ds) and ds.OtherPatientIDsSequence[0].PatientID
        assert row["patient_id"] in ("", ds.PatientID)
        region = ds.SequenceOfUltrasoundRegions[0]
        assert region.PhysicalUnitsXDirection == 3 and 0.01 <= region.PhysicalDeltaX <= 0.03
        assert ds.pixel_array[: int(region.RegionLocationMinY0)].max() > 0       # burned-in banner
    assert pydicom.uid.RLELossless in syntaxes                                    # a compressed one
    assert any(r["image"].endswith(".png") and r["patient_id"] for r in _rows(small_cohort))


def test_deterministic_by_seed(tmp_path):
    """Byte for byte, rendered in one process or in two, RLE-compressed DICOM included."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    styles = ("aurora", "boreal", "cirrus")
    synth_cohort(a, 6, 11, styles)
    synth_cohort(b, 6, 11, styles, workers=2)
    synth_cohort(c, 6, 12, styles)
    assert any(pydicom.dcmread(p).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
               for p in (a / "scans").glob("*.dcm"))

    def digest(folder):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()

    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_cohort_statistics():
    rows = _rows_of(60)
    patients = {}
    for r in rows:
        patients.setdefault(r["mask"][6:10], set()).add(r["label"])
    share = sum("hypoplasia" in v for v in patients.values()) / len(patients)
    assert 0.2 < share < 0.5                                # about 35 % as in the paper
    ga = np.array([float(r["ga_weeks"]) for r in rows])
    assert ga.min() >= 16 and ga.max() <= 36
    years = {r["exam_date"][:4] for r in rows}
    assert len(years) >= 4                                  # exam dates span years


def _rows_of(n):
    from pipelines.data.synth import plan_exams
    exams = plan_exams(n, 3, ("aurora", "boreal"), 0.35, (16, 36), 3, 0.1)
    return [{"mask": f"masks/{e.patient:04d}", "label": e.label, "ga_weeks": e.ga_weeks,
             "exam_date": e.exam_time.date().isoformat()} for e in exams]


def test_unknown_style_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown style"):
        synth_cohort(tmp_path, 1, 1, ("nope",))


def test_the_external_validation_style_is_its_own_site(tmp_path):
    """`delta` renders outside the default mix's grain, gain and dynamic range: a site
    (site-west) no default cohort contains, for testing on a scanner never trained on."""
    from pipelines.config import load_params
    from pipelines.data.synth_render import STYLES

    mix = load_params(Path(__file__).resolve().parents[2] / "params.yaml").synth.styles
    assert "delta" not in mix
    others = [STYLES[name] for name in mix]                                      # the default mix
    delta = STYLES["delta"]
    assert delta.grain_lateral > max(s.grain_lateral for s in others)
    assert delta.gain_db < min(s.gain_db for s in others)
    assert delta.dynamic_range_db > max(s.dynamic_range_db for s in others)
    synth_cohort(tmp_path, 2, 5, ("delta",), png_fraction=0.0)
    rows = list(csv.DictReader((tmp_path / "annotations.csv").open()))
    assert rows and {r["site"] for r in rows} == {"site-west"}
    ds = pydicom.dcmread(tmp_path / rows[0]["image"])
    assert ds.Manufacturer == "Delta Echo" and (ds.Rows, ds.Columns) == (600, 800)


def test_the_second_external_validation_style_lies_outside_all_four(tmp_path):
    """`ember` (site-central) is outside every other style in axial and lateral grain, gain and
    dynamic range, and no default cohort contains it."""
    from pipelines.config import load_params
    from pipelines.data.synth_render import STYLES

    assert "ember" not in load_params(Path(__file__).resolve().parents[2] / "params.yaml").synth.styles
    others = [s for name, s in STYLES.items() if name != "ember"]
    ember = STYLES["ember"]
    assert ember.grain_axial < min(s.grain_axial for s in others)
    assert ember.grain_lateral > max(s.grain_lateral for s in others)
    assert ember.gain_db > max(s.gain_db for s in others)
    assert ember.dynamic_range_db > max(s.dynamic_range_db for s in others)
    synth_cohort(tmp_path, 2, 5, ("ember",), png_fraction=0.0)
    rows = list(csv.DictReader((tmp_path / "annotations.csv").open()))
    assert rows and {r["site"] for r in rows} == {"site-central"}
    ds = pydicom.dcmread(tmp_path / rows[0]["image"])
    assert ds.Manufacturer == "Ember Diagnostics" and ds.PhotometricInterpretation == "RGB"


def test_the_sixth_style_is_its_own_site_outside_the_default_mix(tmp_path):
    """`fjord` (site-coast), fixed before any model saw it: a wider dynamic range than the
    default mix, for a first look after the noise-floor augmentation was developed on `ember`."""
    from pipelines.config import load_params
    from pipelines.data.synth_render import STYLES

    mix = load_params(Path(__file__).resolve().parents[2] / "params.yaml").synth.styles
    assert "fjord" not in mix
    assert STYLES["fjord"].dynamic_range_db > max(STYLES[name].dynamic_range_db for name in mix)
    synth_cohort(tmp_path, 2, 5, ("fjord",), png_fraction=0.0)
    rows = list(csv.DictReader((tmp_path / "annotations.csv").open()))
    assert rows and {r["site"] for r in rows} == {"site-coast"}
    assert pydicom.dcmread(tmp_path / rows[0]["image"]).Manufacturer == "Fjord Medical"
