"""Learning curves: a tiny real training records one entry per epoch for each network, keeps
them across a resume, and they reach MLflow as metrics with `step=epoch`, both live (training
inside a run) and from `training.json` (the evaluate stage, after the train stage)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipelines.config import replace
from pipelines.imaging.crops import Prepared
from pipelines.registry import tracking
from pipelines.training.train import train_models

# tests/integration/test_training.py's shrunk real configuration
SHRUNK = ["preprocess.size=48", "segment.max_epochs=2", "segment.channels=[8, 16, 32]", "train.max_epochs=3",
          "train.features=16", "train.early_stopping_patience=10", "train.accelerator=cpu"]
SEG = {"seg_train_loss", "seg_val_loss", "seg_val_dice_cerebellum", "seg_lr"}
CLS = {"cls_train_loss", "cls_val_loss", "cls_val_auc", "cls_lr"}


@pytest.fixture(scope="module")
def prepared(small_cohort, tmp_path_factory, params) -> Prepared:
    from pipelines.data.ingest import ingest_cohort
    from pipelines.data.split import assign_splits
    from pipelines.deid.core import Pseudonymizer
    from pipelines.imaging.crops import prepare
    from tests.conftest import TEST_KEY

    ws = tmp_path_factory.mktemp("curves-ws")
    res = ingest_cohort(small_cohort, ws, "data/deid", Pseudonymizer(TEST_KEY.encode()),
                        params.deid.keep_columns, dt.date(2026, 1, 1))
    dataset, _ = assign_splits(pd.DataFrame(res.manifest), None, 0.3, 0.3, params.split.seed)
    return prepare(dataset, ws, 48, params.preprocess.crop_margin)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup(uri, tmp_path / "mlartifacts")
    yield MlflowClient()
    mlflow.set_tracking_uri("")


def _steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_curves_are_recorded_per_epoch_and_reach_mlflow(prepared, params, store, tmp_path, caplog):
    p = replace(params, SHRUNK)
    info: dict = {}
    caplog.set_level(logging.INFO, logger="pipelines.training.train.progress")
    with mlflow.start_run() as live:
        predictor = train_models(prepared, p, info=info)

    seg, cls = info["history"]["segmenter"], info["history"]["classifier"]
    assert [h["epoch"] for h in seg] == [0, 1] and all(SEG <= set(h) for h in seg)
    assert [h["epoch"] for h in cls] == [0, 1, 2] and all(CLS <= set(h) for h in cls)
    assert info["train_wall_s"] > 0 and info["train_peak_rss_mb"] > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.training.train.progress"]
    assert len(lines) == 5 and lines[0].startswith("segmenter epoch 1/2: ") and "cls_val_loss" in lines[-1]

    # live: the training ran inside a run
    for key in SEG | CLS:
        history = seg if key.startswith("seg") else cls
        assert _steps(store, live.info.run_id, key) == [(h["epoch"], pytest.approx(h[key])) for h in history]

    # the stages: train writes training.json beside the weights, evaluate logs it to its run
    model = tmp_path / "model"
    predictor.save(model)
    (model / "training.json").write_text(json.dumps(info))
    with mlflow.start_run() as run:
        assert tracking.log_training_history(model) == 2 * len(SEG) + 3 * len(CLS) + 2
    assert [s for s, _ in _steps(store, run.info.run_id, "cls_train_loss")] == [0, 1, 2]
    assert [s for s, _ in _steps(store, run.info.run_id, "seg_val_loss")] == [0, 1]
    assert _steps(store, run.info.run_id, "cls_val_auc") == _steps(store, live.info.run_id, "cls_val_auc")
    metrics = store.get_run(run.info.run_id).data.metrics
    assert metrics["train_wall_s"] == info["train_wall_s"] and metrics["train_peak_rss_mb"] > 0


def test_a_resumed_training_keeps_the_curves_before_the_cut(prepared, params, tmp_path):
    """The history is in the checkpoint: the classifier, stopped after 2 epochs and resumed
    for a third, reports all three; the finished segmenter reports its two."""
    checkpoints = tmp_path / "ckpt"
    first: dict = {}
    train_models(prepared, replace(params, SHRUNK + ["train.max_epochs=2"]), checkpoints, first)
    resumed: dict = {}
    train_models(prepared, replace(params, SHRUNK), checkpoints, resumed)
    assert resumed["classifier_resumed_at_epoch"] == 2
    cls = resumed["history"]["classifier"]
    assert [h["epoch"] for h in cls] == [0, 1, 2]
    assert cls[:2] == first["history"]["classifier"]
    assert [h["epoch"] for h in resumed["history"]["segmenter"]] == [0, 1]


def test_a_model_dir_without_training_json_logs_nothing(tmp_path):
    assert tracking.training_history(Path(tmp_path)) == ({}, {})
