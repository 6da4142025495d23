"""The registered pyfunc carries its code: it loads and predicts in an interpreter where this
checkout is not importable, and its requirements.txt pins every distribution it imports."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sysconfig
import venv
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipelines.registry import tracking

# runs in the fresh interpreter: argv = model URI, request rows (JSON), answer (JSON)
LOADER = r"""
import importlib.util, json, sys
from pathlib import Path

before = {name: importlib.util.find_spec(name) is not None for name in ("pipelines", "models", "flows")}

import mlflow
import pandas as pd

uri, request, answer = sys.argv[1:4]
rows = pd.DataFrame(json.loads(Path(request).read_text())).astype({"ga_weeks": float, "pixel_spacing_mm": float})
prediction = mlflow.pyfunc.load_model(uri).predict(rows)

import models
import pipelines

Path(answer).write_text(json.dumps({"before": before, "pipelines": pipelines.__file__, "models": models.__file__,
                                    "prediction": prediction.to_json(orient="split")}))
"""


def _closure(pins: list[str]) -> set[str]:
    """The installed distributions that `pip install` of `pins` brings: the pins and,
    transitively, their dependencies (with the extras asked for, for this platform)."""
    names, todo = set(), [(Requirement(p).name, set(Requirement(p).extras)) for p in pins]
    while todo:
        name, extras = todo.pop()
        if canonicalize_name(name) in names:
            continue
        names.add(canonicalize_name(name))
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, set(req.extras)))
    return names


def _pinned_stack(pins: list[str], dest: Path) -> Path:
    """A fresh venv holding exactly what `pip install -r requirements.txt` would: no checkout.

    There is no index to install from here, so its site-packages links to the files this
    environment installed for those distributions (each one's RECORD names them). Anything the
    model imports beyond its requirements, or from the checkout, is then missing."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(dest)
    site = Path(sysconfig.get_paths("venv", vars={"base": str(dest), "platbase": str(dest)})["purelib"])
    for name in _closure(pins):
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return dest / "bin" / "python"


@pytest.mark.heavy         # a fresh venv and a cold torch import (about 40 s): make test-heavy, in .ci/run
def test_registered_model_predicts_where_the_checkout_is_not_installed(mlflow_registry, tmp_path):
    """Registered as the evaluate stage does (tracking.log_training_run), with tiny untrained
    networks, then loaded by URI from the registry by a fresh venv that holds only what the
    model's requirements.txt installs, from a cwd outside the repository: there `import
    pipelines` fails before loading; after it, the code comes from the model's own `code/`
    folder and the rows it answers are those this process answers."""
    import torch

    from models.networks import make_classifier, make_segmenter
    from pipelines.data.synth import example_png
    from pipelines.serving.inference import ModelConfig, Predictor
    from pipelines.serving.pyfunc import OUTPUT_COLUMNS

    torch.manual_seed(0)
    cfg = ModelConfig("asc-ga", 16, (8, 16, 32), 48, 1.15, 0.5)
    Predictor(make_segmenter(cfg.seg_channels), make_classifier(cfg.model, cfg.features), cfg).save(tmp_path / "w")
    png, spacing = example_png()
    request = pd.DataFrame({"image": [base64.b64encode(png).decode()], "ga_weeks": [24.0],
                            "pixel_spacing_mm": [spacing]})
    _, version = tracking.log_training_run(params_flat={"train.model": "asc-ga"}, metrics={}, tags={},
                                           weights_dir=tmp_path / "w", model_name="portable", run_name="portable",
                                           input_example=request)
    uri = f"models:/portable/{version}"
    expected = mlflow.pyfunc.load_model(uri).predict(request)

    pins = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert {"torch", "lightning", "monai", "pydicom", "opencv-python-headless", "numpy", "pandas",
            "mlflow"} <= {p.split("==")[0] for p in pins}
    assert all("==" in p and "+" not in p for p in pins)          # installable from an index
    python = _pinned_stack(pins, tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "load.py").write_text(LOADER)
    (elsewhere / "request.json").write_text(request.to_json(orient="records"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["MLFLOW_TRACKING_URI"] = mlflow_registry
    res = subprocess.run([str(python), "load.py", uri, "request.json", "answer.json"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    answer = json.loads((elsewhere / "answer.json").read_text())

    assert answer["before"] == {"pipelines": False, "models": False, "flows": False}
    for package in ("pipelines", "models"):
        code = Path(answer[package]).parent.parent
        assert code.name == "code" and not code.is_relative_to(Path(tracking.__file__).parents[2]), answer[package]
    got = json.loads(answer["prediction"])
    assert got["columns"] == OUTPUT_COLUMNS and len(got["data"]) == len(expected) == 1
    assert got == json.loads(expected.to_json(orient="split"))
