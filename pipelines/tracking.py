"""MLflow: runs reviewers compare, and the registry that holds `challenger` and `champion`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

EXPERIMENT = "cerebellar-hypoplasia"


def setup(tracking_uri: str, artifacts: Path) -> None:
    """Point MLflow at the workspace store (or MLFLOW_TRACKING_URI) and the experiment."""
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts.resolve().as_uri())
    mlflow.set_experiment(EXPERIMENT)


def signature() -> ModelSignature:
    inputs = Schema([ColSpec("string", "image"), ColSpec("double", "ga_weeks"),
                     ColSpec("double", "pixel_spacing_mm", required=False)])
    outputs = Schema([ColSpec("string", "image"), ColSpec("long", "frame"),
                      ColSpec("double", "hypoplasia_probability"), ColSpec("string", "prediction"),
                      ColSpec("double", "tcd_mm"), ColSpec("double", "tcd_z"),
                      ColSpec("double", "tcd_centile"), ColSpec("double", "cm_mm"),
                      ColSpec("double", "cm_centile"), ColSpec("double", "ga_weeks"),
                      ColSpec("string", "model_uri")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def git_lineage(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the workspace (empty strings outside git)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "none", "git.dirty": str(bool(dirty)).lower()}


def log_training_run(*, params_flat: dict[str, Any], metrics: dict[str, float], tags: dict[str, str],
                     weights_dir: Path, model_name: str, run_name: str,
                     figures: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> tuple[str, str]:
    """Log one run and register its pyfunc; returns (run_id, model version)."""
    from models.pyfunc import CBHModel

    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params_flat.items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})   # NaN-free
        mlflow.set_tags(tags)
        import matplotlib.pyplot as plt
        for name, fig in (figures or {}).items():
            mlflow.log_figure(fig, f"plots/{name}.png")
            plt.close(fig)
        if extra:
            mlflow.log_dict(extra, "summary.json")
        card = None
        if extra and "split" in extra:
            from pipelines import modelcard
            meta = modelcard.metadata(tags.get("model.kind", ""), metrics, extra["split"],
                                      extra.get("subgroups", []), tags)
            card = modelcard.markdown(meta)
            mlflow.log_dict(meta, "model_card/metadata.json")
            mlflow.log_text(card, "model_card/model_card.md")
        uri = f"runs:/{run.info.run_id}/model"
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CBHModel(), artifacts={"weights": str(weights_dir)},
            signature=signature(), model_config={"model_uri": uri},
            registered_model_name=model_name, pip_requirements=_requirements())
        version = str(info.registered_model_version)
    client = MlflowClient()
    if card:
        client.update_model_version(model_name, version, description=card)
    client.set_registered_model_alias(model_name, "challenger", version)
    for k, v in {**tags, **{f"metric.{k}": f"{v:.4f}" for k, v in metrics.items()}}.items():
        client.set_model_version_tag(model_name, version, k, v)
    return run.info.run_id, version


def _requirements() -> list[str]:
    from importlib.metadata import version as v
    return [f"{p}=={v(p)}" for p in ("torch", "monai", "numpy", "pandas", "pydicom",
                                      "opencv-python-headless", "scipy", "mlflow", "scikit-learn")]
