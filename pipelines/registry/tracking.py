"""MLflow: runs reviewers compare, and the registry that holds `challenger` and `champion`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from pipelines.imaging import scan

EXPERIMENT = "cerebellar-hypoplasia"


def setup(tracking_uri: str, artifacts: Path) -> None:
    """Point MLflow at the workspace store (or MLFLOW_TRACKING_URI) and the experiment.

    With the embedded store, artifacts go to the workspace's folder. A tracking server keeps
    its own artifact root and serves it (`mlflow-artifacts:`), so clients need no access to it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        served = uri.startswith(("http://", "https://"))
        mlflow.create_experiment(EXPERIMENT, artifact_location=None if served else artifacts.resolve().as_uri())
    mlflow.set_experiment(EXPERIMENT)


# what the served pyfunc's model_config may carry; only keys logged here can be set when it is
# loaded (`cbh serve --site` sets the site's threshold; None: the trained operating point)
MODEL_CONFIG: dict[str, Any] = {"model_uri": "", "site": None, "threshold": None, "limits": None}


def signature() -> ModelSignature:
    inputs = Schema([ColSpec("string", "image"), ColSpec("double", "ga_weeks"),
                     ColSpec("double", "pixel_spacing_mm", required=False)])
    outputs = Schema([ColSpec("string", "image"), ColSpec("long", "frame"),
                      ColSpec("double", "hypoplasia_probability"), ColSpec("string", "prediction"),
                      ColSpec("string", "reason"), ColSpec("double", "tcd_mm"), ColSpec("double", "tcd_z"),
                      ColSpec("double", "tcd_centile"), ColSpec("double", "cm_mm"),
                      ColSpec("double", "cm_centile"), ColSpec("double", "hc_mm"), ColSpec("double", "hc_centile"),
                      ColSpec("boolean", "head_found"), ColSpec("double", "ga_weeks"),
                      ColSpec("string", "model_uri")])
    return ModelSignature(inputs=inputs, outputs=outputs)


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset the run used, for `mlflow.log_input` (schema, profile, digest; never the rows)."""

    frame: pd.DataFrame
    name: str
    digest: str
    source: str
    context: str              # training | test


def log_training_run(*, params_flat: dict[str, Any], metrics: dict[str, float], tags: dict[str, str],
                     weights_dir: Path, model_name: str, run_name: str,
                     figures: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                     tables: dict[str, pd.DataFrame] | None = None, inputs: list[DatasetRecord] | None = None,
                     lineage_dir: Path | None = None, input_example: pd.DataFrame | None = None,
                     head_dir: Path | None = None) -> tuple[str, str]:
    """Log one run and register its pyfunc; returns (run_id, model version). `head_dir`: a
    fetal-head localiser (HeadLocaliser.save's folder) the pyfunc carries as artifact `head`."""
    from pipelines.serving.pyfunc import CBHModel

    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params_flat.items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})   # NaN-free
        mlflow.set_tags(tags)
        datasets = {}
        for rec in inputs or []:
            ds = mlflow.data.from_pandas(rec.frame, source=rec.source, name=rec.name, digest=rec.digest)
            mlflow.log_input(ds, context=rec.context)
            datasets[rec.context] = ds
        import matplotlib.pyplot as plt
        for name, fig in (figures or {}).items():
            mlflow.log_figure(fig, f"plots/{name}.png")
            plt.close(fig)
        for name, table in (tables or {}).items():
            mlflow.log_text(table.to_csv(index=False), f"evaluation/{name}.csv")
        if lineage_dir is not None:
            mlflow.log_artifacts(str(lineage_dir), "lineage")
        if extra:
            mlflow.log_dict(extra, "summary.json")
        card = None
        if extra and "split" in extra:
            from pipelines.registry import modelcard
            meta = modelcard.metadata(tags.get("model.kind", ""), metrics, extra["split"],
                                      extra.get("subgroups", []), tags)
            card = modelcard.markdown(meta)
            mlflow.log_dict(meta, "model_card/metadata.json")
            mlflow.log_text(card, "model_card/model_card.md")
        log_training_history(weights_dir)
        uri = f"runs:/{run.info.run_id}/model"
        artifacts = {"weights": str(weights_dir)} | ({"head": str(head_dir)} if head_dir is not None else {})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=CBHModel(), artifacts=artifacts,
            signature=signature(), model_config=MODEL_CONFIG | {"model_uri": uri, "limits": asdict(scan.LIMITS)},
            input_example=input_example,
            registered_model_name=model_name, code_paths=code_paths(), pip_requirements=requirements())
        version = str(info.registered_model_version)
        # the registered version's logged model carries the same lineage, and its test metrics
        # are linked to the frozen test set's dataset record
        MlflowClient().set_logged_model_tags(info.model_id, tags)
        test = {k: v for k, v in metrics.items() if k.startswith("test_") and v == v}
        if "test" in datasets and test:
            mlflow.log_metrics(test, model_id=info.model_id, dataset=datasets["test"])
    client = MlflowClient()
    if card:
        client.update_model_version(model_name, version, description=card)
    client.set_registered_model_alias(model_name, "challenger", version)
    for k, v in {**tags, **{f"metric.{k}": f"{v:.4f}" for k, v in metrics.items()}}.items():
        client.set_model_version_tag(model_name, version, k, v)
    return run.info.run_id, version


def code_paths() -> list[str]:
    """The packages the pyfunc is pickled against, copied into the model's `code/` (MLflow puts
    that folder first on sys.path when it loads the model): the model loads and predicts where
    this checkout is not installed. Whole packages, not `infer_code_paths`: that one replays the
    loading in a subprocess and resolves modules against the cwd."""
    import models
    import pipelines

    return [str(Path(pkg.__file__).parent) for pkg in (pipelines, models)]


# what `pipelines.serving` imports at load and predict time, transitively: models.lightning
# (one_hot_masks) brings lightning and torchmetrics; pydicom decodes compressed DICOM with the
# pylibjpeg codecs and pyjpegls; cloudpickle unpickles the python_model
SERVING_PACKAGES = ("mlflow", "cloudpickle", "torch", "lightning", "torchmetrics", "monai", "numpy", "pandas",
                    "scipy", "opencv-python-headless", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg",
                    "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls")


def requirements() -> list[str]:
    """SERVING_PACKAGES pinned at the installed versions, without a local label (`2.13.0+cpu`
    is no index's version; `torch==2.13.0` accepts the CPU and the CUDA builds)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in SERVING_PACKAGES]


def training_history(weights_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, float]]:
    """The learning curves (key -> [(epoch, value)]) and the training's resource use that the
    `train` stage wrote into `training.json` beside the weights; empty without one."""
    path = weights_dir / "training.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for entries in (info.get("history") or {}).values():
        for entry in entries:
            for key, value in entry.items():
                if key != "epoch" and isinstance(value, (int, float)) and value == value:
                    curves.setdefault(key, []).append((int(entry["epoch"]), float(value)))
    usage = {k: float(info[k]) for k in ("train_wall_s", "train_peak_rss_mb", "train_peak_gpu_mem_mb")
             if isinstance(info.get(k), (int, float))}
    return curves, usage


def log_training_history(weights_dir: Path, run_id: str | None = None) -> int:
    """Log the learning curves as metrics with `step=epoch` (seg_train_loss, seg_val_loss,
    seg_val_dice_cerebellum, seg_lr, cls_train_loss, cls_val_loss, cls_val_auc, cls_lr) and the
    training's wall time and peak memory, to `run_id` or the active run; returns how many values."""
    from mlflow.entities import Metric

    curves, usage = training_history(weights_dir)
    run_id = run_id or mlflow.active_run().info.run_id
    now = int(1000 * time.time())
    values = [Metric(k, v, now, step) for k, points in curves.items() for step, v in points]
    values += [Metric(k, v, now, 0) for k, v in usage.items()]
    if values:                                  # MlflowClient splits batches over its per-call limit
        MlflowClient().log_batch(run_id, metrics=values, synchronous=True)
    return len(values)
