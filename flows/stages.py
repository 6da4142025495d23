"""The stages, one implementation for two entry points: `dvc repro` (through
`cbh stage NAME`) and the Prefect retrain flow. Each reads params, calls pipelines, and
does the I/O of its declared dependencies and outputs in dvc.yaml."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import biometry
from pipelines.config import Params
from pipelines.deid import Pseudonymizer, load_key
from pipelines.ingest import (
    MANIFEST_SCHEMA,
    QUARANTINE_SCHEMA,
    CohortError,
    IngestResult,
    cohort_name,
    ingest_cohort,
    read_annotations,
    report,
    upsert,
)
from pipelines.split import assign_splits, split_summary
from pipelines.validate import ValidateParams, ValidationReport, validate_manifest

log = logging.getLogger("cbh")
Progress = Callable[[int, int], None] | None


class StageError(RuntimeError):
    """A stage cannot do its job; the message is the one sentence the user sees."""


def pseudonymizer(params: Params, root: Path) -> Pseudonymizer:
    """The keyed pseudonymiser; only the demo (CBH_DEMO=1) may create a workspace key."""
    demo = os.environ.get("CBH_DEMO") == "1"
    key = load_key(params.deid.key_env, root / params.paths.key_file, create=demo)
    return Pseudonymizer(key, params.deid.max_date_shift_days)


def add_cohort(params: Params, root: Path, cohort: Path) -> Path:
    """Copy a hospital export into the incoming area (immutable raw data; a DVC dependency).

    The copy is named by the content of annotations.csv, so adding the same cohort again
    changes nothing.
    """
    read_annotations(cohort)                   # fail early, with the file named
    dest = root / params.paths.incoming / cohort_name(cohort)
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(cohort, tmp)
        tmp.rename(dest)
    return dest


def ingest(params: Params, root: Path, today: dt.date | None = None, progress: Progress = None) -> dict[str, Any]:
    """De-identify every cohort in the incoming area into the data store (idempotent)."""
    incoming = root / params.paths.incoming
    cohorts = sorted(p for p in incoming.iterdir() if p.is_dir() and not p.name.endswith(".partial")) \
        if incoming.is_dir() else []
    if not cohorts:
        raise StageError(f"{incoming}: no cohort to ingest; pass one with `cbh ingest COHORT` "
                         "or `cbh retrain --cohort COHORT`")
    pseudo = pseudonymizer(params, root)
    deid_dir = root / params.paths.deid
    shutil.rmtree(deid_dir, ignore_errors=True)           # a DVC output: rebuilt whole
    total = IngestResult()
    for cohort in cohorts:
        res = ingest_cohort(cohort, root, params.paths.deid, pseudo, params.deid.keep_columns, today, progress)
        total.manifest.extend(res.manifest)
        total.quarantine.extend(res.quarantine)
    for path in (root / params.paths.manifest, root / params.paths.quarantine):
        path.unlink(missing_ok=True)
    upsert(root / params.paths.manifest, total.manifest, MANIFEST_SCHEMA, ("image_id",))
    upsert(root / params.paths.quarantine, total.quarantine, QUARANTINE_SCHEMA, ("cohort", "source_row"))
    rep = report(total, params.deid.max_date_shift_days)
    (root / params.paths.deid_report).write_text(json.dumps(rep, indent=2, sort_keys=True))
    return rep


def validate(params: Params, root: Path) -> ValidationReport:
    """Run the Great Expectations suites; writes the JSON report and Data Docs."""
    v = params.validate
    vp = ValidateParams(v.min_per_class, v.ga_min, v.ga_max, v.spacing_min_mm, v.spacing_max_mm,
                        v.cm_max_mm, v.tcd_max_abs_z)
    rep = validate_manifest(root / params.paths.manifest, root / params.paths.gx_root, vp, biometry.tcd_zscore)
    out = root / params.paths.validation
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep.to_json(), indent=2))
    return rep


def split(params: Params, root: Path) -> dict[str, dict[str, int]]:
    """Patient-level split with the frozen temporal test set."""
    manifest = pq.read_table(root / params.paths.manifest).to_pandas()
    frozen_path = root / params.paths.frozen_test
    frozen = pq.read_table(frozen_path).to_pandas() if frozen_path.is_file() else None
    df, frozen = assign_splits(manifest, frozen, params.split.test_fraction, params.split.val_fraction,
                               params.split.seed)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), root / params.paths.dataset)
    if not frozen_path.is_file():
        pq.write_table(pa.Table.from_pandas(frozen, preserve_index=False), frozen_path)
    return split_summary(df)


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    version: str
    metrics: dict[str, float]


def train(params: Params, root: Path, progress: Progress = None) -> TrainOutcome:
    """Train, evaluate on the frozen test set, log to MLflow, register a `challenger`."""
    from pipelines import tracking
    from pipelines.train import evaluate_models, prepare, train_models

    for name in ("lightning.pytorch", "lightning.fabric"):   # lightning sets INFO on import
        logging.getLogger(name).setLevel(logging.WARNING)

    dataset = pq.read_table(root / params.paths.dataset).to_pandas()
    data = prepare(dataset, root, params.preprocess.size, params.preprocess.crop_margin, progress)
    for split_name in ("train", "test"):
        labels = set(data.frame.loc[data.frame["split"] == split_name, "label"])
        if labels != {"normal", "hypoplasia"}:
            raise StageError(f"{params.paths.dataset}: the {split_name} split lacks a class "
                             f"(has {sorted(labels)}); add cases before training")
    predictor = train_models(data, params)
    predictor, evaluation = evaluate_models(predictor, data, params)
    metrics = evaluation.metrics
    model_dir = root / params.paths.model_dir
    shutil.rmtree(model_dir, ignore_errors=True)
    predictor.save(model_dir)
    (root / params.paths.metrics).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    tags = {**tracking.git_lineage(root), **data_versions(root, params),
            "model.kind": params.train.model, "deid.profile": "PS3.15 basic + clean pixels, "
            "modified dates, device identity"}
    run_id, version = tracking.log_training_run(
        params_flat=params.flat(), metrics=metrics, tags=tags, weights_dir=model_dir,
        model_name=params.promote.model_name, run_name=f"{params.train.model}", figures=evaluation.figures,
        extra={"split": split_summary(dataset), "excluded_unfittable": len(data.failed),
               "subgroups": evaluation.subgroups})
    return TrainOutcome(run_id, version, metrics)


def data_versions(root: Path, params: Params) -> dict[str, str]:
    """md5 of the dataset and frozen test set, as DVC records them (lineage tags)."""
    import hashlib
    out = {}
    for key, rel in (("data.dataset_md5", params.paths.dataset), ("data.frozen_test_md5", params.paths.frozen_test)):
        path = root / rel
        out[key] = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "none"
    return out


def dvc_commit(root: Path, stages: tuple[str, ...]) -> None:
    """Record what the flow produced in dvc.lock, as `dvc repro` would have."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for name in stages:
            repo.commit(f"dvc.yaml:{name}", force=True)


def dvc_push(root: Path) -> int:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return int(repo.push() or 0)


__all__ = ["add_cohort", "ingest", "validate", "split", "train", "dvc_commit", "dvc_push",
           "StageError", "CohortError"]
