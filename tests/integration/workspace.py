"""Throwaway workspaces for integration tests: the project's code and config, no data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT, TEST_KEY

# a tiny head localiser from the synthetic heads, and a gate it passes: the crops are then cut
# around the learned frame, as with a real head model
TINY_HEAD = {"head.size": 64, "head.max_epochs": 6, "head.tta": False, "head.min_dice": 0.0,
             "head.max_hc_mae_mm": 1000.0, "head.max_refused": 1.0}
# a tiny training run: what the integration tests train with (also as `cbh train --set`)
TINY_PARAMS = {"segment.max_epochs": 3, "train.max_epochs": 3, "preprocess.size": 64, "evaluate.bootstrap": 50,
               **TINY_HEAD}


def make_workspace(tmp: Path, tiny: bool = True) -> Path:
    """A fresh workspace: the project's code and config, no data, its own git and DVC."""
    ws = tmp / "ws"
    ws.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, ws / name)
    for name in ("pipelines", "models", "flows", "ops"):
        shutil.copytree(ROOT / name, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "expectations", ws / "expectations", ignore=shutil.ignore_patterns("uncommitted"))
    if not tiny:
        return ws
    # a tiny cohort: smaller class minimum, and gate floors a 3-epoch model can meet
    set_params(ws, {"validate.min_per_class": 2, "promote.min_auc": 0.0, "promote.min_sensitivity": 0.0,
                    "promote.max_ece": 1.0})
    return ws


def commit_workspace(ws: Path) -> str:
    """git + DVC initialised and the code committed, as in a real checkout; returns the commit."""
    from flows.workspace import ensure_workspace
    from pipelines.config import load_params

    ensure_workspace(ws, load_params(ws / "params.yaml"))
    shutil.copy(ROOT / ".gitignore", ws / ".gitignore")
    git = ["git", "-c", "user.name=cbh-test", "-c", "user.email=cbh-test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=ws, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace"], cwd=ws, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, check=True, capture_output=True,
                          text=True).stdout.strip()


def set_params(ws: Path, values: dict[str, object]) -> None:
    """Edit the workspace's params.yaml (what a user would do), key by key."""
    path = ws / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for key, value in values.items():
        section, name = key.split(".")
        assert name in raw[section], key
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _cbh_env(ws: Path, env_extra: dict | None) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)           # mlflow.set_tracking_uri in a test sets it: the workspace's own
    env.update(CBH_DEID_KEY=TEST_KEY, CBH_WORKSPACE=str(ws), **(env_extra or {}))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])   # cbh for dvc repro
    env.pop("CBH_DEMO", None)
    return env


def cbh(ws: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ws, env=_cbh_env(ws, env_extra),
                          capture_output=True, text=True, timeout=600)


def cbh_side_by_side(ws: Path, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Independent read-only `cbh` commands (predictions) run at the same time: each spends
    most of its time starting up (torch, MLflow) on one core."""
    env = _cbh_env(ws, None)
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ws, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in commands]
    outputs = [proc.communicate(timeout=600) for proc in procs]        # waits: returncode is set after
    return [subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            for proc, (out, err) in zip(procs, outputs, strict=True)]


def registry(ws: Path):
    """An MLflow client on the workspace's own tracking store and registry."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    return MlflowClient()
