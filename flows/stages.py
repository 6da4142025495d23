"""The stages, one implementation for two entry points: `dvc repro` (through
`cbh stage NAME`) and the Prefect retrain flow. Each reads params, calls pipelines, and
does the I/O of its declared dependencies and outputs in dvc.yaml."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from flows.executors import runner_for
from pipelines.config import Params
from pipelines.contract.validate import ValidateParams, ValidationReport, validate_manifest
from pipelines.data.ingest import (
    MANIFEST_SCHEMA,
    QUARANTINE_SCHEMA,
    CohortError,
    IngestResult,
    ScanCache,
    cohort_name,
    collect_garbage,
    file_digest,
    ingest_cohort,
    rank_first_exams,
    read_annotations,
    report,
    write_table,
)
from pipelines.data.split import assign_splits, split_summary
from pipelines.deid.core import Pseudonymizer, Settings, load_key
from pipelines.deid.folder import tree_files, write_atomic
from pipelines.errors import CbhError

log = logging.getLogger("cbh")
# inside the head stage's output: the head localiser the crops are cut around
FRAME_DIR = "frame"

Progress = Callable[[int, int], None] | None


class StageError(CbhError, RuntimeError):
    """A stage cannot do its job; the message is the one sentence the user sees."""


def pseudonymizer(params: Params, root: Path) -> Pseudonymizer:
    """The keyed pseudonymiser; only the demo (CBH_DEMO=1) may create a workspace key."""
    demo = os.environ.get("CBH_DEMO") == "1"
    key_file = root / params.paths.key_file
    if not demo and not os.environ.get(params.deid.key_env, "").strip() and key_file.is_file():
        # the workspace keeps its pseudonyms consistent, but real data deserves its own key
        log.warning("%s is not set: using the demo's key file %s; set %s to your own key for real data",
                    params.deid.key_env, params.paths.key_file, params.deid.key_env)
    key = load_key(params.deid.key_env, key_file, create=demo)
    return Pseudonymizer(key, params.deid.max_date_shift_days)


def audit_trail(params: Params, root: Path, create: bool = True):
    """The workspace's promotion audit trail with its chain key (created for a new trail by a
    writer, `create`)."""
    from pipelines.registry.audit import Trail

    return Trail.open(root / params.paths.audit, root / params.paths.audit_key, create)


# an incoming copy being written (`.partial`) or being replaced (`.replaced`): never ingested
PARTIAL_SUFFIXES = (".partial", ".replaced")


def _restore_replaced(incoming: Path) -> None:
    """A copy whose replacement was cut short between its two renames goes back in place: the
    next ingest would otherwise drop that cohort's rows and remove their files."""
    for old in incoming.glob("*.replaced") if incoming.is_dir() else ():
        current = old.with_name(old.name.removesuffix(".replaced"))
        if not current.exists():
            old.rename(current)
        else:                                   # the replacement landed: the old raw copy goes
            shutil.rmtree(old, ignore_errors=True)


def _tree(folder: Path, files: list[Path] | None = None) -> list[tuple[str, str]]:
    """(relative path, sha256) of every file of an export, through linked folders."""
    return [(str(f.relative_to(folder)), file_digest(f)) for f in files or tree_files(folder, each_folder_once=False)]


def add_cohort(params: Params, root: Path, cohort: Path) -> Path:
    """Copy a hospital export into the incoming area (immutable raw data; a DVC dependency).

    The copy is named by the content of annotations.csv, so adding the same cohort again
    changes nothing; a re-export with the same annotations but changed or added scans replaces
    the copy (ingest then de-identifies only the files that changed). Linked sub-folders are
    copied as folders under every name they have (the annotations may use any), a link loop is
    not followed round; a copy cut short stays `.partial`, which ingest skips and the next add
    replaces.
    """
    read_annotations(cohort)                   # fail early, with the file named
    _restore_replaced(root / params.paths.incoming)
    dest = root / params.paths.incoming / cohort_name(cohort)
    files = tree_files(cohort, each_folder_once=False)
    if dest.is_dir() and _tree(dest) == _tree(cohort, files):
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for src in files:
        target = tmp / src.relative_to(cohort)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    old = dest.with_name(dest.name + ".replaced")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def ingest(params: Params, root: Path, today: dt.date | None = None, progress: Progress = None) -> dict[str, Any]:
    """De-identify every cohort in the incoming area into the data store, incrementally: a scan
    de-identified before with the same bytes, patient, settings and key is reused (the
    ScanCache), never done again, and the store is never deleted to be rebuilt. New files are
    written under new names beside the old ones; the manifest, written last and atomically, is
    the commit: a run killed before it leaves the previous manifest and every file it names in
    place. Only then are files no manifest row names removed."""
    incoming = root / params.paths.incoming
    _restore_replaced(incoming)
    cohorts = sorted(p for p in incoming.iterdir() if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIXES)) \
        if incoming.is_dir() else []
    if not cohorts:
        raise StageError(f"{incoming}: no cohort to ingest; pass one with `cbh ingest COHORT` "
                         "or `cbh retrain --cohort COHORT`")
    pseudo = pseudonymizer(params, root)
    deid_dir = root / params.paths.deid
    settings = Settings.from_params(params.deid)
    cache = ScanCache(root / params.paths.ingest_cache)
    total = IngestResult()
    for cohort in cohorts:
        total.extend(ingest_cohort(cohort, root, params.paths.deid, pseudo, params.deid.keep_columns, today,
                                   progress, settings,
                                   runner_for(params.deid.executor, params.deid.workers, params.deid.dask_address),
                                   rank=False, cache=cache))
    rank_first_exams(total.manifest)            # the temporal order across every cohort, no date kept
    audit = "".join(json.dumps(a, sort_keys=True) + "\n" for a in sorted(total.audit, key=lambda a: a["output"]))
    audit_file = deid_dir / "deid-audit.jsonl"
    write_atomic(audit_file, audit.encode(), durable=True)
    write_table(root / params.paths.quarantine, total.quarantine, QUARANTINE_SCHEMA, ("cohort", "source_row"))
    rep = report(total, params.deid.max_date_shift_days, settings)
    write_atomic(root / params.paths.deid_report, json.dumps(rep, indent=2, sort_keys=True).encode(), durable=True)
    os.sync()           # every scan and mask on disk before the manifest that names them
    write_table(root / params.paths.manifest, total.manifest, MANIFEST_SCHEMA, ("image_id",))   # the commit
    keep = {str(audit_file.relative_to(root))} | {
        rec[col] for rec in total.manifest for col in ("deid_path", "mask_path", "head_mask_path") if rec[col]}
    for output, key in total.unused:
        if output not in keep:
            cache.forget_output(key)
    removed = collect_garbage(deid_dir, root, keep)
    cache.prune()
    # how this run got there (not in the report file: a DVC output must not depend on history)
    return {**rep, "scans": {"deidentified": total.scans_processed, "reused": total.scans_reused,
                             "files_removed": removed}}


def validate_params(params: Params) -> ValidateParams:
    return ValidateParams(**{f: getattr(params.validate, f) for f in ValidateParams.__dataclass_fields__})


def validate(params: Params, root: Path, progress: Progress = None) -> ValidationReport:
    """Run the data contract on the manifest: the JSON report, Data Docs, the steward summary
    and the contract's quarantine table (same columns as ingest's; pseudonymous image ids)."""
    from pipelines.reports.steward import quarantine_frame, write_summary

    rep = validate_manifest(root / params.paths.manifest, root / params.paths.gx_root, validate_params(params),
                            workspace=root, cache_path=root / params.paths.cache / "mask-stats.parquet",
                            progress=progress)
    out = root / params.paths.validation
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep.to_json(), indent=2) + "\n")
    folder = root / params.paths.contract
    shutil.rmtree(folder, ignore_errors=True)
    write_summary(rep, folder, "Data contract: de-identified scans, annotations and masks")
    table = pa.Table.from_pandas(quarantine_frame(rep), schema=QUARANTINE_SCHEMA, preserve_index=False)
    out = root / params.paths.contract_quarantine
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return rep


def validate_current_split(params: Params, root: Path) -> ValidationReport | None:
    """The `split` suite on the workspace's current dataset (None before the first split)."""
    from pipelines.contract.validate import validate_split

    dataset, frozen = root / params.paths.dataset, root / params.paths.frozen_test
    if not dataset.is_file():
        return None
    return validate_split(pq.read_table(dataset).to_pandas(),
                          pq.read_table(frozen).to_pandas() if frozen.is_file() else None,
                          root / params.paths.gx_root, validate_params(params))


def contract_quarantined(params: Params, root: Path) -> set[str]:
    """image_ids the data contract quarantined (never reach the dataset)."""
    path = root / params.paths.contract_quarantine
    return set(pq.read_table(path).column("image").to_pylist()) if path.is_file() else set()


def split(params: Params, root: Path) -> dict[str, Any]:
    """Patient-level split with the frozen temporal test set, over the rows the contract kept;
    then the `split` suite. A critical failure raises: nothing trains on a leaking split."""
    from pipelines.contract.validate import validate_split
    from pipelines.reports.steward import write_summary

    manifest = pq.read_table(root / params.paths.manifest).to_pandas()
    manifest = manifest[~manifest["image_id"].isin(contract_quarantined(params, root))]
    frozen_path = root / params.paths.frozen_test
    frozen = pq.read_table(frozen_path).to_pandas() if frozen_path.is_file() else None
    try:
        df, frozen = assign_splits(manifest, frozen, params.split.test_fraction, params.split.val_fraction,
                                   params.split.seed, params.split.test_site)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    rep = validate_split(df, frozen, root / params.paths.gx_root, validate_params(params))
    folder = root / params.paths.split_contract
    shutil.rmtree(folder, ignore_errors=True)
    write_summary(rep, folder, "Data contract: the split")
    (folder / "validation.json").write_text(json.dumps(rep.to_json(), indent=2) + "\n")
    if not rep.success:                       # nothing is written: no later step can train on it
        raise StageError(f"the split breaks the data contract: training stopped (see {params.paths.split_contract}"
                         f"/summary.html)\n{rep.failures_table()}")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), root / params.paths.dataset)
    if not frozen_path.is_file():
        pq.write_table(pa.Table.from_pandas(frozen, preserve_index=False), frozen_path)
    return {"images": split_summary(df), "contract": rep.verdict()}


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    version: str
    metrics: dict[str, float]


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):   # lightning sets INFO on import
        logging.getLogger(name).setLevel(logging.WARNING)


def frame_head(params: Params, root: Path) -> Path | None:
    """The head localiser the crops are cut around (the head stage's `frame/`), or None: fit_skull."""
    folder = root / params.paths.head / FRAME_DIR
    return folder if params.preprocess.frame == "learned" and (folder / "head.pt").is_file() else None


def _prepared(params: Params, root: Path, progress: Progress = None):
    from pipelines.imaging.crops import prepare_cached

    return prepare_cached(root / params.paths.dataset, root, params.preprocess.size,
                          params.preprocess.crop_margin, root / params.paths.cache, progress,
                          head_dir=frame_head(params, root))


def require_both_classes(data, params: Params) -> None:
    """Training and testing need both labels; a split without one is refused in one sentence."""
    for split_name in ("train", "test"):
        labels = set(data.frame.loc[data.frame["split"] == split_name, "label"])
        if labels != {"normal", "hypoplasia"}:
            raise StageError(f"{params.paths.dataset}: the {split_name} split lacks a class "
                             f"(has {sorted(labels)}); add cases before training")


def train(params: Params, root: Path, progress: Progress = None) -> dict[str, Any]:
    """Fit the segmenter and the classifier, choose the operating point on validation, save
    the weights (the `train` stage's output)."""
    from pipelines.training.train import train_models

    _quiet_lightning()
    data = _prepared(params, root, progress)
    require_both_classes(data, params)
    from pipelines.registry.lineage import md5_file

    # checkpoints of this exact work (same data, same parameters): an interrupted run resumes
    key = hashlib.sha256((md5_file(root / params.paths.dataset) + json.dumps(params.flat(), sort_keys=True,
                                                                             default=str)).encode()).hexdigest()
    checkpoints = root / params.paths.cache / "checkpoints" / key[:16]
    fit: dict[str, Any] = {}
    predictor = train_models(data, params, checkpoints, fit)
    if fit["rank"] != 0:                      # a DDP worker: rank 0 writes the results
        return {"rank": fit["rank"]}
    # serving cuts its crops the way these were cut
    predictor.cfg = dataclasses.replace(predictor.cfg, frame="learned" if frame_head(params, root) else "classical")
    model_dir = root / params.paths.model_dir
    shutil.rmtree(model_dir, ignore_errors=True)
    predictor.save(model_dir)
    info = {"model": params.train.model, "threshold": predictor.cfg.threshold,
            "images": {s: int((data.frame["split"] == s).sum()) for s in ("train", "val", "test")},
            "excluded_unfittable": sorted(data.failed), "frame": predictor.cfg.frame,
            "frame_sources": {str(k): int(v) for k, v in data.frame["frame_source"].value_counts().items()}, **fit}
    (model_dir / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    shutil.rmtree(checkpoints, ignore_errors=True)     # done: the next run of the same work starts afresh
    return info


def evaluate(params: Params, root: Path, progress: Progress = None) -> TrainOutcome:
    """Evaluate the trained weights on the frozen test set, write metrics and plots (the
    `evaluate` stage's outputs), log the run with its lineage to MLflow and register the
    model as `challenger`."""
    import pandas as pd

    from pipelines.data.synth import example_png
    from pipelines.evaluation.evaluate import evaluate_models
    from pipelines.registry import lineage, tracking
    from pipelines.serving.inference import Predictor

    _quiet_lightning()
    model_dir = root / params.paths.model_dir
    if not (model_dir / "config.json").is_file():
        raise StageError(f"{params.paths.model_dir}: no trained model; run the train stage first")
    data = _prepared(params, root, progress)
    predictor = Predictor.load(model_dir)
    evaluation = evaluate_models(predictor, data, params)
    metrics = {**evaluation.metrics, **predictor.parameter_metrics()}
    dataset = pq.read_table(root / params.paths.dataset).to_pandas()
    summary = {"split": split_summary(dataset), "excluded_unfittable": len(data.failed),
               "subgroups": evaluation.subgroups}
    (root / params.paths.metrics).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (root / params.paths.evaluation).write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    plots = root / params.paths.plots
    shutil.rmtree(plots, ignore_errors=True)
    plots.mkdir(parents=True)
    for name, table in evaluation.tables.items():
        table.to_csv(plots / f"{name}.csv", index=False)

    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    tags = {**lineage.collect(root, params), "model.kind": params.train.model,
            # the test intervals resample patients (all of a drawn patient's images together)
            "evaluation.bootstrap_unit": "patient"}
    frozen = pq.read_table(root / params.paths.frozen_test).to_pandas()
    remote = str((root / params.paths.dvc_remote).resolve())
    inputs = [
        tracking.DatasetRecord(dataset, "dataset", tags["data.dataset_md5"],
                               f"{remote}#{params.paths.dataset}", "training"),
        tracking.DatasetRecord(frozen, "frozen_test", tags["data.frozen_test_md5"],
                               f"{remote}#{params.paths.frozen_test}", "test"),
    ]
    png, spacing = example_png()
    example = pd.DataFrame({"image": [base64.b64encode(png).decode()], "ga_weeks": [24.0],
                            "pixel_spacing_mm": [spacing]})
    # the head the crops were cut around (the fetal-head champion when the head stage ran) travels
    # inside the diagnosis model: serving cuts the same crops, and every answer carries the head's
    # biometry and the plane check
    head_dir = frame_head(params, root)
    frame_info = json.loads((root / params.paths.head / FRAME_DIR / "frame.json").read_text()) if head_dir else {}
    if frame_info.get("model"):
        tags["head.model"] = frame_info["model"]
    tags["preprocess.frame_source"] = "learned" if head_dir else "classical"
    with tempfile.TemporaryDirectory(prefix="cbh-lineage-") as tmp:
        run_id, version = tracking.log_training_run(
            params_flat=params.flat(), metrics=metrics, tags=tags, weights_dir=model_dir,
            model_name=params.promote.model_name, run_name=f"{params.train.model}", figures=evaluation.figures,
            extra=summary, tables=evaluation.tables, inputs=inputs,
            lineage_dir=lineage.artifacts(root, params, Path(tmp)), input_example=example, head_dir=head_dir)
    return TrainOutcome(run_id, version, metrics)


def champion_head(params: Params, tmp: Path) -> tuple[Path | None, str | None]:
    """The `champion` of the head model, downloaded into `tmp` (its head folder and version), or
    (None, None) when there is none yet."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = params.head.model_name
    try:
        version = MlflowClient().get_model_version_by_alias(name, "champion").version
    except MlflowException:
        return None, None
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp / "head")))
    return folder / "artifacts" / "head", str(version)


def promote(params: Params, root: Path):
    """`cbh promote`: the gate, with the champion re-scored on the current frozen test set
    when it was evaluated on another version of it."""
    from pipelines.registry import lineage
    from pipelines.registry import promote as gatekeeper

    frozen = root / params.paths.frozen_test
    current = lineage.md5_file(frozen) if frozen.is_file() else None

    def reevaluate(version: str) -> dict[str, float]:
        import matplotlib.pyplot as plt
        import mlflow

        from pipelines.evaluation.evaluate import evaluate_models
        from pipelines.imaging.crops import prepare_cached
        from pipelines.serving.inference import Predictor

        local = Path(mlflow.artifacts.download_artifacts(f"models:/{params.promote.model_name}/{version}"))
        predictor = Predictor.load(local / "artifacts" / "weights")
        # the champion's crops as it was trained on them: its own size and margin, around its own
        # head (the one it carries) or fit_skull's skull
        head_dir = local / "artifacts" / "head"
        head_dir = head_dir if predictor.cfg.frame == "learned" and (head_dir / "head.pt").is_file() else None
        data = prepare_cached(root / params.paths.dataset, root, predictor.cfg.size, predictor.cfg.crop_margin,
                              root / params.paths.cache, head_dir=head_dir)
        evaluation = evaluate_models(predictor, data, params)
        rescored["test_predictions"] = evaluation.tables["test_predictions"]
        plt.close("all")
        return evaluation.metrics

    def paired(champ, chal, champion_rescored: bool):
        """The challenger's AUC difference to the champion over the frozen test set's patients."""
        from pipelines.registry.paired import paired as compare
        from pipelines.registry.paired import patients_of, run_table

        ref = rescored.get("test_predictions") if champion_rescored else run_table(champ.run_id, "test_predictions")
        other = run_table(chal.run_id, "test_predictions")
        if ref is None or other is None:
            return None
        patients = patients_of(root / params.paths.frozen_test, chal.tags.get("data.frozen_test_md5"))
        return compare(ref, other, patients, params.evaluate.bootstrap, params.train.seed)

    rescored: dict = {}
    decision = gatekeeper.promote(params.promote.model_name, params.promote, audit_trail(params, root),
                                  current, reevaluate, paired)
    if decision.decision == "rejected":
        from flows.notify import notify

        notify(root, "promotion-rejected", f"{params.promote.model_name} version {decision.challenger} was not "
               f"promoted: {decision.reason}", model=params.promote.model_name, version=decision.challenger)
    return decision


def _head_items(params: Params, root: Path) -> list:
    """The manifest's frames with a readable head mask (and kept by the data contract), as
    training items: grey frame, filled mask, spacing, the sonographer's HC (NaN if none);
    the subject is the patient pseudonym, so no patient is on both sides of the split."""
    import math

    import cv2

    from pipelines.imaging.scan import read_scan
    from pipelines.training.head import HeadItem

    manifest = pq.read_table(root / params.paths.manifest).to_pandas()
    if "head_mask_status" not in manifest:
        return []
    rows = manifest[(manifest["head_mask_status"] == "ok")
                    & ~manifest["image_id"].isin(contract_quarantined(params, root))]
    # a key-free order (the cleaned pixels' digest): the seeded shuffle then gives every workspace
    # of the same data the same batches, whatever its pseudonymisation key
    rows = rows.sort_values(["pixel_sha256", "image_id"], kind="stable")
    items = []
    for r in rows.itertuples(index=False):
        grey = read_scan(root / r.deid_path, frame=int(r.frame)).frames[0]
        mask = cv2.imread(str(root / r.head_mask_path), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.shape != grey.shape:
            raise StageError(f"{r.head_mask_path}: head mask unreadable or not the size of its frame")
        hc = float(r.hc_mm) if r.hc_mm is not None and r.hc_mm == r.hc_mm else math.nan
        items.append(HeadItem(r.image_id, r.patient_pseudo, grey, mask > 0,
                              (float(r.spacing_row_mm), float(r.spacing_col_mm)), hc))
    return items


def diagnosis_test_patients(params: Params, root: Path) -> set[str]:
    """The patient pseudonyms of the dataset's test split (none before the `split` stage, or in
    a workspace of head annotations only)."""
    path = root / params.paths.dataset
    if not path.is_file():
        return set()
    table = pq.read_table(path, columns=["patient_pseudo", "split"]).to_pandas()
    return set(table.loc[table["split"] == "test", "patient_pseudo"])


def head(params: Params, root: Path) -> dict[str, Any]:
    """Train the fetal-head localiser on the manifest's head masks (subject split by patient),
    evaluate it once on the test subjects, save it with its metrics and split (the `head`
    stage's output), log and register it as `fetal-head` `challenger`, then gate it."""
    import pandas as pd

    from pipelines.data.synth import example_png
    from pipelines.registry import head as registry
    from pipelines.registry import lineage
    from pipelines.training.head import arrays_from_pairs, choose_localiser, evaluate_head, split_subjects, train_head

    p = params.head
    out = root / params.paths.head
    items = _head_items(params, root)
    registry.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    if not items:
        skipped = {"skipped": "no head annotations"}
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)                   # the stage's output says why it holds no model
        (out / "skipped.json").write_text(json.dumps(skipped) + "\n")
        return {**skipped, "frame": _write_frame_head(params, out)}
    _quiet_lightning()
    # the diagnosis model's test patients never train the head that frames their crops
    held = diagnosis_test_patients(params, root)
    digests = pq.read_table(root / params.paths.manifest, columns=["patient_pseudo", "pixel_sha256"]).to_pandas()
    order = digests.dropna().groupby("patient_pseudo")["pixel_sha256"].min().to_dict()
    assignment = split_subjects([it.subject for it in items], p.val_fraction, p.test_fraction, p.seed, held, order)
    parts = {k: [it for it in items if assignment[it.subject] == k] for k in ("train", "val", "test")}
    kept = held & set(assignment)
    if not parts["train"] and kept:
        raise StageError(f"{params.paths.manifest}: every patient with a head mask ({len(kept)}) is a test patient "
                         f"of the diagnosis model ({params.paths.dataset}), and those never train the head that "
                         "frames their crops; add head annotations of training patients (or `cbh import hc18`)")
    if not parts["train"] or not parts["test"]:
        raise StageError(f"{params.paths.manifest}: {len(set(assignment))} patient(s) with head masks are too "
                         "few for a train and a test subject; add head annotations")
    train_arrays = arrays_from_pairs(((it.grey, it.mask) for it in parts["train"]), p.size, p.refine, p.seed)
    val_arrays = arrays_from_pairs(((it.grey, it.mask) for it in parts["val"]), p.size) if parts["val"] else None
    net, seconds = train_head(train_arrays, val_arrays, p)
    localiser, _ = choose_localiser(net, p, parts["val"])       # ellipse fit and threshold, on validation
    metrics = {f"test_{k}": v for k, v in evaluate_head(localiser, parts["test"]).items()}
    metrics["train_seconds"] = seconds
    frames = {k: len(v) for k, v in parts.items()}
    shutil.rmtree(out, ignore_errors=True)
    localiser.save(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # the split is recorded by patient pseudonym: on disk (DVC), never in MLflow
    (out / "split.json").write_text(json.dumps({"seed": p.seed, "frames": frames, "subjects": dict(
        sorted(assignment.items())), "held_for_diagnosis_test": len(kept)}, indent=2) + "\n")

    tags = {**lineage.collect(root, params), "model.kind": "head", "head.method": localiser.method,
            "head.tta": str(localiser.tta), "head.level": str(localiser.level), "head.refine": str(localiser.refine),
            "data.manifest_md5": lineage.md5_file(root / params.paths.manifest)}
    png, spacing = example_png()
    example = pd.DataFrame({"image": [base64.b64encode(png).decode()], "pixel_spacing_mm": [spacing]})
    with tempfile.TemporaryDirectory(prefix="cbh-head-") as tmp:
        model_dir = Path(tmp) / "head"
        model_dir.mkdir()
        for name in ("head.pt", "head.json", "metrics.json"):
            shutil.copy(out / name, model_dir / name)
        run_id, version = registry.log_head_run(
            params_flat={f"head.{k}": v for k, v in params.raw["head"].items()}, metrics=metrics, tags=tags,
            head_dir=model_dir, split=frames, model_name=p.model_name,
            lineage_dir=lineage.artifacts(root, params, Path(tmp) / "lineage"), input_example=example)
    decision = registry.promote_head(p, audit_trail(params, root))
    return {"frames": frames, "metrics": metrics, "run_id": run_id, "version": version,
            "promotion": {"decision": decision.decision, "reason": decision.reason, "champion": decision.champion},
            "frame": _write_frame_head(params, out)}


def _write_frame_head(params: Params, out: Path) -> str:
    """Put the head the crops will be cut around in `out/frame/` (the fetal-head champion after
    this stage's gate: the new head if it passed, else the one before), with `frame.json`
    naming it; without a champion, or with `preprocess.frame: classical`, the folder says why
    fit_skull frames the crops. Returns the frame source."""
    frame = out / FRAME_DIR
    shutil.rmtree(frame, ignore_errors=True)
    frame.mkdir(parents=True)
    info: dict[str, Any] = {"source": "classical"}
    if params.preprocess.frame != "learned":
        info["why"] = "preprocess.frame: classical"
    else:
        with tempfile.TemporaryDirectory(prefix="cbh-frame-") as tmp:
            folder, version = champion_head(params, Path(tmp))
            if folder is None:
                info["why"] = f"no {params.head.model_name} champion"
            else:
                for f in folder.iterdir():
                    shutil.copy(f, frame / f.name)
                info = {"source": "learned", "model": f"{params.head.model_name}/{version}"}
    (frame / "frame.json").write_text(json.dumps(info) + "\n")
    return info["source"]


WRITER_ENV = "CBH_WORKSPACE_WRITER"      # set while this process (and its children) hold the writer lock


@contextlib.contextmanager
def workspace_writer(root: Path, what: str):
    """One writer of a workspace's data store at a time: `cbh ingest`, `cbh train`, the retrain
    flow and the DVC stages take this lock, and a second writer is refused at once, naming the
    first (a scheduled retrain and a manual ingest would otherwise rebuild the store under each
    other). A child process of the holder (a stage it runs) finds the lock its parent's."""
    from pipelines.locks import Busy, exclusive_lock

    here = str(root.resolve())
    if os.environ.get(WRITER_ENV) == here:
        yield
        return
    info = root / ".cbh" / "writer.json"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(root / ".cbh" / "writer.lock", wait=False))
        except Busy:
            try:
                holder = json.loads(info.read_text())
            except (OSError, ValueError):
                holder = {}
            raise StageError(f"another `cbh {holder.get('what', '...')}` (pid {holder.get('pid', '?')}) is writing "
                             f"this workspace; run this again when it has finished") from None
        info.write_text(json.dumps({"pid": os.getpid(), "what": what}) + "\n")
        os.environ[WRITER_ENV] = here
        try:
            yield
        finally:
            os.environ.pop(WRITER_ENV, None)


def dvc_writer(root: Path):
    """One DVC writer per workspace at a time: DVC's own repository lock fails at once when
    another process holds it; this one waits its turn (an exclusive flock on `.cbh/dvc-writer.lock`)."""
    from pipelines.locks import exclusive_lock

    return exclusive_lock(root / ".cbh" / "dvc-writer.lock")


def dvc_commit(root: Path, stages: tuple[str, ...]) -> None:
    """Record what the flow produced in dvc.lock, as `dvc repro` would have."""
    from dvc.repo import Repo

    with dvc_writer(root), Repo(str(root)) as repo:
        for name in stages:
            repo.commit(f"dvc.yaml:{name}", force=True)


def dvc_push(root: Path) -> int:
    from dvc.repo import Repo

    with dvc_writer(root), Repo(str(root)) as repo:
        return int(repo.push() or 0)


__all__ = ["add_cohort", "ingest", "validate", "split", "head", "train", "evaluate", "promote", "dvc_commit",
           "dvc_push", "StageError", "CohortError"]
