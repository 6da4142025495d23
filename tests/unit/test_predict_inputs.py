"""`cbh predict` and `cbh commission` read a cohort's annotations.csv: a row they cannot use is
one sentence naming the file and the row, not a traceback."""

from __future__ import annotations

import csv

import pytest

from pipelines.serving.predict import PredictInputError, prediction_inputs


def _cohort(tmp_path, ga: str):
    with (tmp_path / "annotations.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "patient_id", "exam_date", "ga_weeks", "label"])
        w.writeheader()
        w.writerow({"image": "scans/a.png", "patient_id": "P1", "exam_date": "2024-01-02", "ga_weeks": "22.5",
                    "label": "normal"})
        w.writerow({"image": "scans/b.png", "patient_id": "P2", "exam_date": "2024-01-03", "ga_weeks": ga,
                    "label": "normal"})
    return tmp_path


def test_cohort_rows_become_items(tmp_path):
    items = prediction_inputs(_cohort(tmp_path, "30"), None, False)
    assert [(name, frame, ga) for _, name, frame, ga, _ in items] == [("scans/a.png", 0, 22.5),
                                                                        ("scans/b.png", 0, 30.0)]


@pytest.mark.parametrize("ga", ["", "about 30"])
def test_a_row_without_a_numeric_ga_is_one_sentence(tmp_path, ga):
    with pytest.raises(PredictInputError, match=r"annotations.csv: data row 2: .*ga_weeks"):
        prediction_inputs(_cohort(tmp_path, ga), None, False)


def test_ga_comes_from_the_dicom_header_when_not_given(small_cohort, tmp_path):
    """Without --ga-weeks a plain folder's DICOM takes StudyDate - LastMenstrualDate (shifted
    together by de-identification, so the interval survives); a PNG or a header without the
    dates gets no GA, which `predict_items` refuses in the file's row."""
    import math
    import shutil

    import pydicom

    from pipelines.serving.predict import header_ga_weeks, prediction_inputs

    folder = tmp_path / "today"
    folder.mkdir()
    src = sorted((small_cohort / "scans").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.StudyDate, ds.LastMenstrualDate = "20260301", "20250920"        # 162 days: 23.14 weeks
    ds.save_as(folder / "with_lmp.dcm")
    shutil.copy(src, folder / "without.dcm")
    shutil.copy(sorted((small_cohort / "scans").glob("*.png"))[0], folder / "a.png")
    assert header_ga_weeks(folder / "with_lmp.dcm") == pytest.approx(162 / 7)
    got = {name: ga for _, name, _, ga, _ in prediction_inputs(folder, None, False)}
    assert got["with_lmp.dcm"] == pytest.approx(162 / 7)
    assert math.isnan(got["without.dcm"]) and math.isnan(got["a.png"])
    assert all(ga == 21.0 for _, _, _, ga, _ in prediction_inputs(folder, 21.0, False))   # given: it wins
