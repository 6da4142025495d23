"""Training engineering: DDP with two CPU processes (gloo), resuming an interrupted training
from its checkpoint, and test-time augmentation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TEST_KEY
from tests.integration.workspace import cbh, make_workspace, registry, set_params

TINY = {"segment.max_epochs": 2, "train.max_epochs": 3, "preprocess.size": 48, "evaluate.bootstrap": 20,
        "train.accelerator": "cpu"}


@pytest.fixture(scope="module")
def split_workspace(tmp_path_factory) -> Path:
    """A workspace whose data is ingested, validated and split (ready for `cbh train`)."""
    from pipelines.data.synth import synth_cohort

    tmp = tmp_path_factory.mktemp("engineering")
    ws = make_workspace(tmp)
    set_params(ws, TINY)
    synth_cohort(tmp / "export", 26, 21, ("aurora", "boreal", "cirrus"))
    for args in (("ingest", str(tmp / "export")), ("stage", "validate"), ("stage", "split")):
        res = cbh(ws, *args)
        assert res.returncode == 0, res.stderr[-2000:]
    return ws


def _copy(ws: Path, tmp: Path) -> Path:
    dest = tmp / "ws"
    shutil.copytree(ws, dest, symlinks=True)
    return dest


def _versions(ws: Path) -> list[str]:
    return sorted(str(v.version) for v in registry(ws).search_model_versions("name='cerebellar-hypoplasia'"))


@pytest.mark.slow          # two training processes on two cores (about 80 s of CPU): make test-full
def test_ddp_with_two_cpu_processes(split_workspace, tmp_path):
    ws = _copy(split_workspace, tmp_path)
    res = cbh(ws, "train", "--set", "train.strategy=ddp", "--set", "train.devices=2")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    info = json.loads((ws / "data/model/training.json").read_text())
    assert info["world_size"] == 2 and info["rank"] == 0
    assert res.stdout.count("registered cerebellar-hypoplasia version") == 1     # rank 0 alone registers
    assert _versions(ws) == ["1"]


@pytest.mark.heavy         # two trainings and a kill (about 2 minutes): make test-heavy, in .ci/run
def test_interrupted_training_resumes_from_its_checkpoint(split_workspace, tmp_path):
    ws = _copy(split_workspace, tmp_path)
    # The tiny classifier runs an epoch in about 0.1 s here (0.3 s with the rest of the suite
    # beside it): 60 epochs leave a window of seconds between its second checkpoint and the end,
    # which the 50 ms polling below cannot miss, and keep the resumed run short.
    args = ["train", "--set", "train.max_epochs=60", "--set", "train.early_stopping_patience=60"]
    env = dict(os.environ, CBH_DEID_KEY=TEST_KEY, CBH_WORKSPACE=str(ws))
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "interrupted.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ws, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    last = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((ws / ".cbh/cache/checkpoints").glob("*/classifier/last.ckpt"))
        if found and torch.load(found[0], map_location="cpu", weights_only=False)["epoch"] >= 2:
            last = found[0]
            os.killpg(proc.pid, signal.SIGKILL)           # the machine goes away mid-training
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    log.close()
    assert last is not None, ("the training finished or failed before it could be interrupted:\n"
                              + (tmp_path / "interrupted.log").read_text()[-3000:])
    assert not (ws / "data/model/training.json").exists()
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]

    res = cbh(ws, *args)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    info = json.loads((ws / "data/model/training.json").read_text())
    assert info["classifier_resumed_at_epoch"] >= epoch >= 2           # it went on, it did not start over
    assert "resumed an interrupted training" in res.stdout
    assert not any((ws / ".cbh/cache/checkpoints").glob("*"))        # finished work leaves no checkpoint
    assert _versions(ws) == ["1"]


def test_tta_prediction_is_mirror_invariant():
    from models.networks import make_classifier, make_segmenter
    from pipelines.serving.inference import ModelConfig, Predictor, context_features

    torch.manual_seed(0)
    cfg = ModelConfig("asc-ga", 16, (8, 16, 32), 48, 1.15, 0.5)
    seg, clf = make_segmenter(cfg.seg_channels), make_classifier(cfg.model, cfg.features)
    rng = np.random.default_rng(0)
    images = rng.random((6, 1, 48, 48), dtype=np.float32)
    mirrored = images[..., ::-1].copy()
    ctx = context_features(np.full(6, 24.0), np.full(6, 0.3))

    def predict(p: Predictor, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = p.segment(x)
        return labels, p.probability(x, labels, ctx)

    plain = Predictor(seg, clf, cfg)
    lab, prob = predict(plain, images)
    lab_m, prob_m = predict(plain, mirrored)
    assert not np.allclose(prob, prob_m, atol=1e-6)                   # the network alone is not symmetric
    tta = Predictor(seg, clf, cfg, tta=True)
    lab, prob = predict(tta, images)
    lab_m, prob_m = predict(tta, mirrored)
    assert np.allclose(prob, prob_m, atol=1e-5)
    assert (lab[..., ::-1] == lab_m).mean() > 0.999
