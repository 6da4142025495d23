"""Real-config-shrunk training runs on CPU (seconds): every comparison model, determinism,
and the evaluation it reports."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipelines.config import replace
from pipelines.data.ingest import ingest_cohort
from pipelines.data.split import assign_splits
from pipelines.evaluation.evaluate import evaluate_models
from pipelines.imaging.crops import prepare
from pipelines.training.train import train_models

SHRUNK = ["preprocess.size=48", "segment.max_epochs=2", "segment.channels=[8, 16, 32]",
          "train.max_epochs=2", "train.features=16", "evaluate.bootstrap=20"]


@pytest.fixture(scope="module")
def prepared(small_cohort, tmp_path_factory, params):
    from pipelines.deid.core import Pseudonymizer
    from tests.conftest import TEST_KEY

    ws = tmp_path_factory.mktemp("train-ws")
    res = ingest_cohort(small_cohort, ws, "data/deid", Pseudonymizer(TEST_KEY.encode()),
                        params.deid.keep_columns, dt.date(2026, 1, 1))
    manifest = pd.DataFrame(res.manifest)
    dataset, _ = assign_splits(manifest, None, 0.3, 0.3, params.split.seed)
    return prepare(dataset, ws, 48, params.preprocess.crop_margin)


@pytest.mark.parametrize("model", ["asc", "asc-ga", "asc-scale", "asc-z", "image-only", "biometry-rule"])
def test_each_model_trains_and_evaluates(prepared, params, model):
    p = replace(params, SHRUNK + [f"train.model={model}"])
    predictor = train_models(prepared, p)
    ev = evaluate_models(predictor, prepared, p)
    m = ev.metrics
    assert 0.0 <= m["test_auc"] <= 1.0 or np.isnan(m["test_auc"])
    assert 0.0 <= m["val_threshold"] <= 1.0
    assert {"test_dice_cerebellum", "test_tcd_mae_mm", "test_ece", "test_auc_ci_low"} <= set(m)
    assert 0.0 <= m["test_cerebellum_outside_head"] <= 1.0
    assert {r["group"] for r in ev.subgroups} == {"ga_band", "site"}
    sites = [r for r in ev.subgroups if r["group"] == "site"]      # segmentation per site, too
    assert all({"dice_cerebellum", "dice_cisterna", "tcd_mae_mm", "tcd_bias_mm"} <= set(r) for r in sites)
    if len(sites) == 1 and np.isfinite(m["test_dice_cerebellum"]):
        assert sites[0]["dice_cerebellum"] == pytest.approx(m["test_dice_cerebellum"])
        assert sites[0]["tcd_mae_mm"] == pytest.approx(m["test_tcd_mae_mm"], nan_ok=True)
    assert set(ev.figures) == {"roc", "reliability", "confusion", "overlays"}
    assert set(ev.tables) == {"roc", "reliability", "test_predictions"}
    preds = ev.tables["test_predictions"]
    assert len(preds) == len(prepared.subset("test")) and set(preds["actual"]) <= {"normal", "hypoplasia"}
    assert ev.tables["roc"]["tpr"].is_monotonic_increasing
    assert predictor.cfg.model == model


def test_same_seed_same_metrics(prepared, params):
    p = replace(params, SHRUNK)
    first = evaluate_models(train_models(prepared, p), prepared, p)
    second = evaluate_models(train_models(prepared, p), prepared, p)
    assert first.metrics == pytest.approx(second.metrics, nan_ok=True)


def test_zero_epochs_gives_an_untrained_model(prepared, params):
    p = replace(params, SHRUNK + ["train.max_epochs=0", "segment.max_epochs=0"])
    predictor = train_models(prepared, p)
    ev = evaluate_models(predictor, prepared, p)
    assert ev.metrics["test_dice_cerebellum"] < 0.5         # an untrained segmenter finds nothing useful
    assert predictor.cfg.threshold == ev.metrics["val_threshold"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def test_an_equalised_classifier_trains_and_its_predictor_equalises(prepared, params, tmp_path):
    """`train.image_norm=equalise` reaches the trained network and the saved model, which then
    gives the same probability for a crop and for its gain-and-gamma-changed copy."""
    from pipelines.serving.inference import Predictor, context_features

    p = replace(params, SHRUNK + ["train.image_norm=equalise"])
    predictor = train_models(prepared, p)
    assert predictor.cfg.image_norm == "equalise" and predictor.cls.equalise
    predictor.save(tmp_path)
    loaded = Predictor.load(tmp_path)
    images = prepared.images[:4]
    labels = loaded.segment(images, prepared.axis_ratio[:4])
    ctx = context_features(prepared.frame["ga_weeks"].to_numpy()[:4], prepared.mm_per_px[:4])
    brighter = (1.3 * np.clip(images, 0, None) ** 0.7).astype(np.float32)
    assert np.allclose(loaded.probability(images, labels, ctx), loaded.probability(brighter, labels, ctx), atol=1e-6)


@pytest.fixture(scope="module")
def prepared80(prepared, small_cohort, tmp_path_factory, params):
    """The same split at 80 px: Inception-v3 needs at least 75."""
    from pipelines.deid.core import Pseudonymizer
    from tests.conftest import TEST_KEY

    ws = tmp_path_factory.mktemp("train-ws80")
    res = ingest_cohort(small_cohort, ws, "data/deid", Pseudonymizer(TEST_KEY.encode()),
                        params.deid.keep_columns, dt.date(2026, 1, 1))
    dataset, _ = assign_splits(pd.DataFrame(res.manifest), None, 0.3, 0.3, params.split.seed)
    return prepare(dataset, ws, 80, params.preprocess.crop_margin)


@pytest.mark.parametrize("gate", ["sample", "batch"])
def test_asc_paper_shrunk_trains_saves_and_loads_with_its_gate(prepared80, params, gate, tmp_path):
    """The published network, every width scaled to 1/8, trains and evaluates on CPU with either
    gate reading; the saved model rebuilds the same network and answers the same."""
    from pipelines.serving.inference import Predictor

    p = replace(params, SHRUNK + ["preprocess.size=80", "train.model=asc-paper", "train.paper_width=0.125",
                                  f"train.paper_gate={gate}", "train.max_epochs=1"])
    predictor = train_models(prepared80, p)
    ev = evaluate_models(predictor, prepared80, p)
    preds = ev.tables["test_predictions"]
    assert len(preds) == len(prepared80.subset("test")) and preds["probability"].between(0, 1).all()
    assert predictor.cls.gate_reading == gate and predictor.cls.image.fc.out_features == 125
    predictor.save(tmp_path / "m")
    again = Predictor.load(tmp_path / "m")
    assert (again.cfg.model, again.cfg.gate_reading, again.cfg.paper_width) == ("asc-paper", gate, 0.125)
    from pipelines.serving.inference import context_features

    te = prepared80.subset("test")
    images = prepared80.images[te]
    labels = predictor.segment(images, prepared80.axis_ratio[te])
    ctx = context_features(prepared80.frame["ga_weeks"].to_numpy()[te], prepared80.mm_per_px[te])
    assert np.allclose(predictor.probability(images, labels, ctx), again.probability(images, labels, ctx), atol=1e-6)
