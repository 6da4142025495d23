"""Head biometry in every answer and no confident answer from the wrong picture (issue #19):
`cbh predict` and the registered pyfunc report the head (hc_mm, hc_centile, head_found), and a
frame without a head, or not a usable transcerebellar plane, is `not_assessable` with its
reason and no probability."""

from __future__ import annotations

import base64
import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.imaging.head import HeadFit, HeadLocaliser, hc_mm
from pipelines.imaging.preprocess import Skull
from pipelines.registry import tracking
from pipelines.serving.predict import COLUMNS, predict_path
from pipelines.serving.pyfunc import OUTPUT_COLUMNS, CBHModel

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hc18"
TINY_HEAD = (4, 4, 8, 8, 16, 4)


def _weights(folder: Path) -> Path:
    from models.networks import make_classifier, make_segmenter
    from pipelines.serving.inference import ModelConfig, Predictor

    torch.manual_seed(0)
    cfg = ModelConfig("asc-ga", 16, (8, 16, 32), 48, 1.15, 0.5)
    Predictor(make_segmenter(cfg.seg_channels), make_classifier(cfg.model, cfg.features), cfg).save(folder)
    return folder


def _head(folder: Path) -> Path:
    from models.head import make_head_net

    torch.manual_seed(0)
    HeadLocaliser(make_head_net(TINY_HEAD), size=32, features=TINY_HEAD, tta=False).save(folder)
    return folder


def _register(tmp_path: Path, name: str, head_dir: Path | None) -> str:
    _, version = tracking.log_training_run(params_flat={"train.model": "asc-ga"}, metrics={}, tags={},
                                           weights_dir=_weights(tmp_path / f"w-{name}"), model_name=name,
                                           run_name=name, head_dir=head_dir)
    return f"models:/{name}/{version}"


def _png(grey: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", grey)
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def test_pyfunc_carries_its_head_and_refuses_a_blank_frame(mlflow_registry, tmp_path):
    """The head localiser logged with the model is loaded with it; a blank frame has no head:
    not_assessable, its reason, and no probability or measurement."""
    from pipelines.data.synth import example_png

    uri = _register(tmp_path, "with-head", _head(tmp_path / "head"))
    model = mlflow.pyfunc.load_model(uri)
    assert isinstance(model.unwrap_python_model().head, HeadLocaliser)
    png, spacing = example_png()
    request = pd.DataFrame({"image": [base64.b64encode(png).decode(), _png(np.zeros((200, 260), np.uint8))],
                            "ga_weeks": [24.0, 24.0], "pixel_spacing_mm": [spacing, 0.2]})
    out = model.predict(request)
    assert list(out.columns) == OUTPUT_COLUMNS
    assert {"hc_mm", "hc_centile", "head_found", "reason"} <= set(out.columns)
    blank = out.iloc[1]
    assert not blank["head_found"] and blank["prediction"] == "not_assessable" and blank["reason"]
    assert all(math.isnan(blank[c]) for c in ("hypoplasia_probability", "tcd_mm", "cm_mm", "hc_mm", "hc_centile"))
    for _, row in out.iterrows():       # never a probability without a head, nor a head without an HC
        if row["head_found"]:
            assert math.isfinite(row["hc_mm"])
        else:
            assert math.isnan(row["hypoplasia_probability"]) and row["prediction"] == "not_assessable"


def test_without_a_localiser_the_skull_fit_gives_the_head(mlflow_registry, tmp_path):
    from pipelines.data.synth import example_png

    model = mlflow.pyfunc.load_model(_register(tmp_path, "no-head", None))
    assert model.unwrap_python_model().head is None
    png, spacing = example_png()
    request = pd.DataFrame({"image": [base64.b64encode(png).decode(), _png(np.zeros((200, 260), np.uint8))],
                            "ga_weeks": [24.0, 24.0], "pixel_spacing_mm": [spacing, 0.2]})
    out = model.predict(request)
    synthetic, blank = out.iloc[0], out.iloc[1]
    assert synthetic["head_found"] and 100 < synthetic["hc_mm"] < 320 and math.isfinite(synthetic["hc_centile"])
    assert not blank["head_found"] and blank["prediction"] == "not_assessable"
    assert blank["reason"].startswith("no fetal head found")


def test_a_missing_or_impossible_ga_is_never_read_as_normal(mlflow_registry, tmp_path):
    from pipelines.data.synth import example_png

    model = mlflow.pyfunc.load_model(_register(tmp_path, "ga", None))
    png, spacing = example_png()
    cases = [(None, "no gestational age"), (math.nan, "no gestational age"), (math.inf, "no gestational age"),
             (-5.0, "outside 14-42 weeks")]
    image = base64.b64encode(png).decode()
    out = model.predict(pd.DataFrame({"image": [image] * len(cases), "ga_weeks": [g for g, _ in cases],
                                      "pixel_spacing_mm": [spacing] * len(cases)}, dtype=object))
    for (_, words), (_, row) in zip(cases, out.iterrows(), strict=True):
        assert row["prediction"] == "not_assessable" and words in row["reason"], row["reason"]
        assert all(math.isnan(row[c]) for c in ("hypoplasia_probability", "tcd_mm", "cm_mm", "tcd_centile"))


def test_a_real_hc18_frame_through_cbh_predict(mlflow_registry, tmp_path):
    """A real HC18 PNG (transthalamic plane) with its sidecar, through `cbh predict`'s path with a
    tiny saved localiser: a finite HC where the head is found, else head_found=false with a
    reason; never a probability without a head; the CSV has the contract's columns."""
    sizes = {r["filename"]: float(r["pixel_size_mm"]) for r in csv.DictReader(
        (FIXTURES / "pixel_size_and_hc.csv").open())}
    src = tmp_path / "in"
    src.mkdir()
    for name in sorted(sizes)[:2]:
        shutil.copy(FIXTURES / "images" / name, src / name)
        (src / name).with_suffix(".json").write_text(json.dumps({"pixel_spacing_mm": [sizes[name]] * 2}))
    cv2.imwrite(str(src / "blank.png"), np.zeros((240, 320), np.uint8))
    (src / "blank.json").write_text(json.dumps({"pixel_spacing_mm": [0.15, 0.15]}))
    uri = _register(tmp_path, "plain", None)
    out = tmp_path / "pred.csv"
    n, errors, refused, _, _ = predict_path(src, out, uri, ga_weeks=20.0, head_model=str(_head(tmp_path / "head")))[:5]
    rows = list(csv.DictReader(out.open()))
    assert n == len(rows) == 3 and errors == 0 and list(rows[0]) == COLUMNS
    for r in rows:
        assert r["head_found"] in ("true", "false")
        if r["head_found"] == "true":
            assert math.isfinite(float(r["hc_mm"]))
        else:
            assert r["reason"] and r["prediction"] == "not_assessable" and r["hypoplasia_probability"] == ""
        if r["prediction"] == "not_assessable":
            assert r["reason"] and r["hypoplasia_probability"] == r["tcd_mm"] == r["cm_mm"] == ""
    blank = next(r for r in rows if r["image"] == "blank.png")
    assert blank["head_found"] == "false" and blank["hc_mm"] == ""
    assert refused == sum(r["prediction"] == "not_assessable" for r in rows)


class _StubHead:
    """A localiser that finds the given skull on every frame."""

    def __init__(self, skull: Skull) -> None:
        self.skull = skull

    def locate_batch(self, greys, spacings) -> list[HeadFit]:
        return [HeadFit(self.skull, hc_mm(self.skull.a, self.skull.b), 0.9, True, "") for _ in greys]


def _model(tmp_path: Path, head) -> CBHModel:
    from pipelines.serving.inference import Predictor

    model = CBHModel()
    model.predictor, model.model_uri, model.head = Predictor.load(_weights(tmp_path / "w")), "stub", head
    return model


def _synthetic_frame() -> tuple[np.ndarray, np.ndarray, tuple[float, float], float]:
    from pipelines.data.synth import example_png

    png, spacing = example_png()
    grey = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    return grey, np.ones(grey.shape, bool), (spacing, spacing), 24.0


def test_the_learned_head_cuts_the_crop_where_the_skull_fit_fails(tmp_path):
    """A frame the classical fit finds nothing in, with a learned head: the crop comes from the
    learned skull and the HC is the learned one."""
    skull = Skull(25.0, 20.0, 15.0, 12.0, 0.0)
    blank = np.zeros((200, 260), np.float32)
    (row,) = _model(tmp_path, _StubHead(skull)).predict_rows([(blank, np.ones(blank.shape, bool), (0.2, 0.2), 24.0)],
                                                            ["x"], [0])
    assert row["head_found"] and row["hc_mm"] == pytest.approx(hc_mm(15.0, 12.0))
    assert row["_crop"].skull == skull and row["_labels"] is not None


def test_a_crop_the_learned_head_disagrees_with_is_not_assessable(tmp_path):
    frame = _synthetic_frame()
    far = Skull(5.0, 5.0, 10.0, 8.0, 0.0)        # a small head in the corner: not the crop's skull
    (row,) = _model(tmp_path, _StubHead(far)).predict_rows([frame], ["x"], [0])
    assert row["head_found"] and row["prediction"] == "not_assessable" and "disagree" in row["reason"]
    assert math.isnan(row["hypoplasia_probability"]) and math.isnan(row["tcd_mm"])
    # commissioning measures the model itself: the same frame keeps its numbers ungated
    (raw,) = _model(tmp_path, _StubHead(far)).predict_rows([frame], ["x"], [0], assess=False)
    assert raw["prediction"] in ("normal", "hypoplasia") and not raw["_assessable"]


def test_bad_files_in_a_folder_cost_only_their_own_rows(mlflow_registry, tmp_path, monkeypatch):
    """A zero-byte and a non-DICOM `.dcm`, a 2x5000 PNG, and a frame the model itself fails on
    (the batch is retried frame by frame): every file gets its row, the good one its answer."""
    from pipelines.data.synth import example_png

    src = tmp_path / "in"
    src.mkdir()
    png, spacing = example_png()
    for name, data in (("good.png", png), ("zero.dcm", b""), ("text.dcm", b"not a DICOM file")):
        (src / name).write_bytes(data)
    cv2.imwrite(str(src / "strip.png"), np.full((2, 5000), 128, np.uint8))
    cv2.imwrite(str(src / "odd.png"), np.full((300, 301), 90, np.uint8))
    for name in ("good", "strip", "odd"):
        (src / f"{name}.json").write_text(json.dumps({"pixel_spacing_mm": [spacing, spacing]}))
    real = CBHModel.predict_rows

    def fails_on_odd(self, frames, *args, **kwargs):           # the model cannot take the 300x301 frame
        if any(f[0].shape == (300, 301) for f in frames):
            raise RuntimeError("cannot take this frame")
        return real(self, frames, *args, **kwargs)

    monkeypatch.setattr(CBHModel, "predict_rows", fails_on_odd)
    out = tmp_path / "pred.csv"
    n, errors, _, _, _ = predict_path(src, out, _register(tmp_path, "bad", None), ga_weeks=24.0)[:5]
    rows = {r["image"]: r for r in csv.DictReader(out.open())}
    assert n == len(rows) == 5 and errors == 3
    assert rows["zero.dcm"]["prediction"].startswith("error: ") and rows["text.dcm"]["prediction"].startswith("error: ")
    assert rows["odd.png"]["prediction"] == "error: RuntimeError: cannot take this frame"
    assert rows["strip.png"]["prediction"] == "not_assessable" and rows["strip.png"]["head_found"] == "false"
    assert rows["good.png"]["head_found"] == "true"


def test_a_strip_is_no_frame_for_the_skull_fit():
    from pipelines.imaging.preprocess import PreprocessError, fit_skull

    with pytest.raises(PreprocessError, match="2x5000 frame is too small"):
        fit_skull(np.full((5000, 2), 0.5, np.float32), np.ones((5000, 2), bool), (0.2, 0.2))
