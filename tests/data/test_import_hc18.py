"""`cbh import hc18`: real HC18 images and expert outlines (tests/fixtures/hc18, CC BY 4.0) into the
cohort format; the head masks agree with the expert's HC, and nothing is dropped silently."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines import biometry
from pipelines.data.importers import ImportFormatError, fit_outline, import_hc18

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hc18"
DATE = dt.date(2018, 1, 1)


def _rows(cohort: Path) -> list[dict[str, str]]:
    with (cohort / "annotations.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_import_writes_the_cohort_format(tmp_path):
    rep = import_hc18(FIXTURE, tmp_path / "c", DATE)
    assert rep["rows"] == rep["imported"] == 3 and rep["skipped"] == []
    table = {r["filename"]: r for r in csv.DictReader((FIXTURE / "pixel_size_and_hc.csv").open())}
    for row in _rows(tmp_path / "c"):
        name = Path(row["image"]).name
        spacing = json.loads((tmp_path / "c" / row["image"]).with_suffix(".json").read_text())["pixel_spacing_mm"]
        assert spacing == [float(table[name]["pixel_size_mm"])] * 2
        assert float(row["hc_mm"]) == float(table[name]["head_circumference_mm"])
        mask = cv2.imread(str(tmp_path / "c" / row["head_mask"]), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(tmp_path / "c" / row["image"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 1}
        # the filled mask's own ellipse gives the expert's HC back (within half a percent)
        ellipse = fit_outline(mask)
        hc = biometry.ellipse_perimeter(ellipse.a, ellipse.b) * spacing[0]
        assert abs(hc - float(row["hc_mm"])) < 0.005 * float(row["hc_mm"]), (name, hc)
        assert row["exam_date"] == "2018-01-01" and row["patient_id"].startswith("hc18-")
        ga = float(row["ga_weeks"])
        assert math.isclose(float(biometry.hc_mean_mm(ga)), float(row["hc_mm"]), rel_tol=0.01)
        assert row["ga_source"] == ("hc_median" if 14 <= ga <= 40 else "hc_median_extrapolated")


def test_a_missing_outline_is_reported_not_dropped(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    (src / "images" / "010_HC_Annotation.png").unlink()
    rep = import_hc18(src, tmp_path / "c", DATE)
    assert rep["imported"] == 2 and [s["image"] for s in rep["skipped"]] == ["010_HC.png"]
    assert "outline not found" in rep["skipped"][0]["reason"]
    assert json.loads((tmp_path / "c" / "import-report.json").read_text())["skipped"] == rep["skipped"]


def test_an_existing_cohort_is_not_overwritten(tmp_path):
    import_hc18(FIXTURE, tmp_path / "c", DATE)
    with pytest.raises(ImportFormatError, match="already holds a cohort"):
        import_hc18(FIXTURE, tmp_path / "c", DATE)


def test_outline_drawn_thin_or_filled_gives_the_same_ellipse():
    shape = (300, 400)
    filled = np.zeros(shape, np.uint8)
    cv2.ellipse(filled, ((200.0, 150.0), (220.0, 160.0), 30.0), 255, -1)
    thin = np.zeros(shape, np.uint8)
    cv2.ellipse(thin, ((200.0, 150.0), (220.0, 160.0), 30.0), 255, 1)
    a, b = fit_outline(filled), fit_outline(thin)
    assert abs(a.a - b.a) < 1.0 and abs(a.b - b.b) < 1.0 and abs(a.angle - b.angle) < 0.02
    assert fit_outline(np.zeros(shape, np.uint8)) is None
