"""`cbh`: the platform's command line (CONTRACT.md section 2).

Every command prints a short summary, returns 0 on success, and on failure prints one
sentence to stderr and returns the exit code of its `CbhError` (pipelines/errors.py; listed
in `cbh --help`). Heavy libraries are imported inside commands, after the workspace
environment is prepared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Callable

from flows.workspace import find_root, prepare_environment
from pipelines.config import MODELS, Params, load_params
from pipelines.errors import EXIT_FAILURE, EXIT_REJECTED, CbhError, UsageError


class CommandError(CbhError):
    """A command cannot do its job: the message is shown as is."""


def _progress(label: str) -> Callable[[int, int], None]:
    from flows.progress import progress

    return progress(label)


def _params(root: Path, overrides: list[str] | None = None, profile: str | None = None) -> Params:
    return load_params(root / "params.yaml", overrides, profile)


# -- commands -------------------------------------------------------------------------------

def cmd_synth(a: argparse.Namespace, root: Path) -> int:
    from pipelines.data.synth import synth_cohort
    from pipelines.data.synth_render import STYLES

    p = _params(root).synth
    styles = (a.style,) if a.style else p.styles
    if a.style and a.style not in STYLES:
        raise UsageError(f"unknown style {a.style!r}; choose one of {', '.join(sorted(STYLES))}")
    out = Path(a.out)
    if (out / "annotations.csv").exists():
        raise CommandError(f"{out}: a cohort already exists there; choose an empty folder")
    counts = synth_cohort(out, a.patients or p.patients, p.seed if a.seed is None else a.seed, styles,
                          p.hypoplasia_fraction, (p.ga_min, p.ga_max), p.max_exams, p.png_fraction,
                          progress=_progress("rendering"), workers=a.workers or os.cpu_count() or 1)
    print(f"synthetic cohort written to {out}: {counts['images']} images of {counts['patients']} patients "
          f"({counts['hypoplasia_patients']} with hypoplasia, {counts['png']} PNG)")
    return 0


def cmd_deid(a: argparse.Namespace, root: Path) -> int:
    from flows.executors import runner_for
    from flows.stages import pseudonymizer
    from pipelines.deid.core import Settings
    from pipelines.deid.folder import default_quarantine, deid_folder

    params = _params(root)
    dst = Path(a.dst)
    held = Path(a.quarantine) if a.quarantine else default_quarantine(dst)
    rep = deid_folder(Path(a.src), dst, pseudonymizer(params, root), Path(a.link) if a.link else None,
                      progress=_progress("de-identifying"), settings=Settings.from_params(params.deid),
                      quarantine=held,
                      runner=runner_for(a.executor or params.deid.executor,
                                        params.deid.workers if a.workers is None else a.workers,
                                        params.deid.dask_address if a.dask_address is None else a.dask_address))
    print(f"{rep['deidentified']} of {rep['inputs']} files de-identified into {dst} "
          f"({rep['ocr_verified']} verified by OCR, {rep['resumed']} already done), "
          f"{rep['quarantined']} quarantined {rep['reasons'] or ''}; report: {dst / 'deid-report.json'}")
    if rep["quarantined"]:
        print(f"quarantined inputs (identified side, not pushed anywhere): {held}/quarantine.csv")
    return 0


def cmd_import(a: argparse.Namespace, root: Path) -> int:
    import datetime as dt

    if a.format != "hc18":
        from pipelines.data.annotation_formats import import_annotations

        rep = import_annotations(a.format, Path(a.src), Path(a.cohort), Path(a.table) if a.table else None,
                                 Path(a.labels) if a.labels else None)
        print(f"{rep['imported']} of {rep['images']} annotated images imported into {a.cohort} (annotations.csv, "
              f"scans/, masks/), {len(rep['skipped'])} skipped; report: {Path(a.cohort) / 'import-report.json'}")
        for s in rep["skipped"][:5]:
            print(f"  skipped: {s['reason']}")
        return 0
    from pipelines.data.importers import import_hc18

    try:
        exam_date = dt.date.fromisoformat(a.exam_date)
    except ValueError:
        raise UsageError(f"--exam-date {a.exam_date!r} is not a date (YYYY-MM-DD)") from None
    rep = import_hc18(Path(a.src), Path(a.cohort), exam_date)
    print(f"{rep['imported']} of {rep['rows']} images imported into {a.cohort} (annotations.csv, scans/, masks/), "
          f"{len(rep['skipped'])} skipped; report: {Path(a.cohort) / 'import-report.json'}")
    print("GA estimated from each image's HC (column ga_source); the exam date is the one given for all")
    return 0


def cmd_ingest(a: argparse.Namespace, root: Path) -> int:
    from flows import stages
    from flows.workspace import ensure_workspace
    from pipelines.data.ingest import read_annotations

    params = _params(root)
    read_annotations(Path(a.cohort))          # a cohort that cannot be read changes nothing
    ensure_workspace(root, params)
    with stages.workspace_writer(root, "ingest"):
        dest = stages.add_cohort(params, root, Path(a.cohort))
        rep = stages.ingest(params, root, progress=_progress("ingesting"))
    print(f"cohort stored as {params.paths.incoming}/{dest.name}; {rep['deidentified']} rows de-identified, "
          f"{rep['quarantined']} quarantined {rep['reasons'] or ''}")
    print(f"scans: {rep['scans']['deidentified']} de-identified now, {rep['scans']['reused']} unchanged and reused")
    print(f"manifest: {params.paths.manifest}  quarantine: {params.paths.quarantine}")
    return 0


def cmd_validate(a: argparse.Namespace, root: Path) -> int:
    from flows import stages

    params = _params(root)
    rep = stages.validate(params, root, progress=_progress("validating"))
    doc = rep.to_json()
    split = stages.validate_current_split(params, root) if a.with_split else None
    print(rep.verdict())
    print(rep.failures_table())
    if split is not None:                       # the dataset as it was last split, judged again
        doc = {"success": rep.success and split.success, "results": doc["results"] + split.to_json()["results"]}
        print(f"split: {split.verdict()}")
        if not split.success:
            print(split.failures_table())
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"Steward summary: {root / params.paths.contract / 'summary.html'}")
    print(f"Data Docs: {rep.data_docs_index}")
    if not doc["success"]:
        print("cbh validate: the data contract has a critical failure (see the steward summary)", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_stage(a: argparse.Namespace, root: Path) -> int:
    """The entry point `dvc repro` uses; the same code as the Prefect tasks."""
    from flows import stages

    params = _params(root)
    with stages.workspace_writer(root, f"stage {a.name}"):
        if a.name == "ingest":
            print(stages.ingest(params, root))
        elif a.name == "validate":
            return cmd_validate(argparse.Namespace(json=None, with_split=False), root)   # the split is its own stage
        elif a.name == "split":
            print(stages.split(params, root))
        elif a.name == "head":
            print(stages.head(params, root))
        elif a.name == "train":
            info = stages.train(params, root)
            if info["rank"] == 0:
                print(f"trained {info['model']}: operating threshold {info['threshold']:.3f}, images {info['images']}")
        elif a.name == "evaluate":
            out = stages.evaluate(params, root)
            print(f"registered version {out.version}: test AUC {out.metrics['test_auc']:.3f}")
    return 0


def cmd_train(a: argparse.Namespace, root: Path) -> int:
    from flows import stages

    overrides = list(a.set or []) + ([f"train.model={a.model}"] if a.model else [])
    params = _params(root, overrides, a.profile)
    with stages.workspace_writer(root, "train"):
        info = stages.train(params, root, progress=_progress("preparing"))
        if info["rank"] == 0:
            out = stages.evaluate(params, root)
    if info["rank"] != 0:                       # a DDP worker process: rank 0 evaluates and registers
        return 0
    if info.get("classifier_resumed_at_epoch") is not None or info.get("segmenter_resumed_at_epoch") is not None:
        print(f"resumed an interrupted training: segmenter at epoch {info.get('segmenter_resumed_at_epoch')}, "
              f"classifier at epoch {info.get('classifier_resumed_at_epoch')}")
    m = out.metrics
    print(f"run {out.run_id}: {params.train.model}, test AUC {m['test_auc']:.3f} "
          f"[{m['test_auc_ci_low']:.3f}, {m['test_auc_ci_high']:.3f}], sensitivity {m['test_sensitivity']:.3f}, "
          f"specificity {m['test_specificity']:.3f}, Dice cerebellum {m['test_dice_cerebellum']:.3f}")
    print(f"registered {params.promote.model_name} version {out.version} as 'challenger'; `cbh promote` to gate it")
    return 0


def cmd_ablate(a: argparse.Namespace, root: Path) -> int:
    from flows.ablate import ablate, summary_lines

    params = _params(root, list(a.set or []), a.profile)
    models = [m.strip() for m in a.models.split(",") if m.strip()] if a.models else None
    ab = ablate(params, root, models, Path(a.out), progress=_progress("preparing"))
    print(f"ablation run {ab.parent_run}: {len(ab.runs)} models on one data version and frozen test set "
          f"(intervals over patients; the report pairs each model with the first)")
    print("\n".join(summary_lines(ab)))
    print(f"comparison written to {ab.report[0]} and {ab.report[1]}; nothing was registered")
    return 0


def cmd_promote(a: argparse.Namespace, root: Path) -> int:
    from flows import stages
    from pipelines.registry import promote, tracking

    params = _params(root)
    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    if a.history:
        return _history(params, stages.audit_trail(params, root, create=False))
    trail = stages.audit_trail(params, root)
    d = promote.rollback(params.promote.model_name, trail) if a.rollback else stages.promote(params, root)
    print(f"{d.decision}: {d.reason}; champion is version {d.champion}")
    return 0 if d.decision != "rejected" else EXIT_REJECTED


def _history(params, trail) -> int:
    """`cbh promote --history`: every decision, then the checks: the keyed chain line by line,
    and each registered model's last recorded decision still in the trail."""
    from mlflow import MlflowClient

    from pipelines.registry import promote

    records = promote.history(trail)
    for rec in records:
        status = "" if rec["status"] in ("final", "confirmed") else f" [{rec['status']}]"
        print(f"{rec.get('time', '?')}  {rec.get('model') or '-'}  {str(rec.get('action')):10s} "
              f"{str(rec.get('decision')):11s}{status} challenger={rec.get('challenger')} "
              f"champion={rec.get('champion')}  {rec.get('reason', '')}  ({rec.get('user', '?')})")
    broken = promote.verify_trail(trail)
    models = {r.get("model") for r in records if r.get("model")} | {params.promote.model_name, params.head.model_name}
    missing = trail.check_registry(MlflowClient(), models)
    if broken:
        print(f"cbh promote: {trail.path}: the keyed hash chain breaks at line(s) {broken}: the trail was edited, "
              f"or its key ({params.paths.audit_key} or CBH_AUDIT_KEY) is not the one it was written with",
              file=sys.stderr)
    for problem in missing:
        print(f"cbh promote: {trail.path}: {problem}", file=sys.stderr)
    if broken or missing:
        return EXIT_FAILURE
    pending = sum(r["status"] == "pending" for r in records)
    print(f"{len(records)} decisions; keyed hash chain intact, registry heads present ({trail.path})"
          + (f"; {pending} pending: the next promotion settles it against the registry" if pending else ""))
    return 0


def cmd_lineage(a: argparse.Namespace, root: Path) -> int:
    from pipelines.registry import lineage, tracking

    params = _params(root)
    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    version, tags = lineage.describe(params.promote.model_name, a.version or a.alias)
    print(f"{params.promote.model_name} version {version.version} (run {version.run_id})")
    for key in sorted(tags):
        if key.startswith(("git.", "data.", "deid.", "params.", "pkg.", "model.")):
            print(f"  {key:26s} {tags[key]}")
    if a.restore:
        written = lineage.restore(version.run_id, root)
        print(f"restored {', '.join(written)} from the run; `dvc pull --with-deps train` now brings back the data "
              f"and weights it evaluated, and `dvc repro` rebuilds what differs; its code is git commit "
              f"{tags.get('git.commit', '?')[:12]}")
    return 0


def cmd_compare(a: argparse.Namespace, root: Path) -> int:
    from pipelines.registry import tracking
    from pipelines.reports import compare as report

    params = _params(root)
    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    html, md = report.compare_runs(a.run_ids, Path(a.out), audit=root / params.paths.audit,
                                   frozen=root / params.paths.frozen_test, bootstrap=params.evaluate.bootstrap,
                                   seed=params.train.seed)
    print(f"comparison written to {html} and {md}")
    return 0


def cmd_predict(a: argparse.Namespace, root: Path) -> int:
    from pipelines.registry import tracking
    from pipelines.serving.predict import predict_path

    params = _params(root)
    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    uri = a.model_uri or f"models:/{params.promote.model_name}@champion"
    threshold, note = None, ""
    if a.site:
        from pipelines.registry.commission import operating_point

        point = operating_point(uri, a.site)
        uri, threshold = point.uri, point.threshold
        note = f"; operating threshold {threshold:.4f}, commissioned for site {a.site} on version {point.version}"
        if point.biometry_warning:
            print(f"cbh predict: warning: {point.biometry_warning}", file=sys.stderr)
    dicom_out = Path(a.dicom_out) if a.dicom_out else None
    if dicom_out is not None and dicom_out.exists() and not dicom_out.is_dir():
        raise CommandError(f"--dicom-out {dicom_out}: is a file, not a folder")
    done = predict_path(
        Path(a.input), Path(a.out), uri, a.use_masks, a.ga_weeks, tta=a.tta, threshold=threshold,
        head_model=a.head_model, progress=_progress("predicting"), frame_stride=params.predict.frame_stride,
        dicom_out=dicom_out)
    n, errors, refused, scored, outside = done[:5]
    exams = Path(a.out).parent / (Path(a.out).stem + "-exams.csv")
    print(f"{n} predictions written to {a.out} (one row per exam: {exams}) with {uri}"
          + (f"; {errors} could not be used" if errors else "")
          + (f"; {refused} not assessable (no head, or not a usable transcerebellar plane: see `reason`)"
             if refused else "") + note)
    if dicom_out is not None:
        print(f"DICOM SEG and SR for {done.dicom_exams} exam(s) written to {dicom_out}/exam-N/"
              + "".join(f"\n  {line}" for line in done.dicom_notes))
    if scored:
        _segmenter_check(uri, outside, scored)
    if n and errors == n:
        raise CommandError(f"none of the {n} inputs could be predicted: their rows in {a.out} say why")
    return 0


def _segmenter_check(uri: str, outside: int, scored: int) -> None:
    """The label-free drift signal: how often the segmenter put cerebellum outside the skull,
    against the model's own test set; a significant excess is a warning (stderr)."""
    from pipelines.registry.commission import excess, registered_version, version_metric

    try:
        ref = version_metric(*registered_version(uri), "test_cerebellum_outside_head")
    except Exception:  # boundary: a runs:/ or file URI has no registered test set to compare with
        ref = float("nan")
    print(f"segmenter check: cerebellum outside the skull in {outside} of {scored} files (each file's first "
          f"assessable frame; {outside / scored:.1%})"
          + (f"; the model's test set: {ref:.1%}" if ref == ref else ""))
    if excess(outside, scored, ref):
        print(f"cbh predict: warning: the segmenter left the skull significantly more often than on its test set "
              f"({outside / scored:.1%} against {ref:.1%}): this scanner may be outside what it learnt; check its "
              f"masks, and commission the site (`cbh commission`)", file=sys.stderr)


def cmd_commission(a: argparse.Namespace, root: Path) -> int:
    from flows import stages
    from pipelines.registry import commission, tracking

    params = _params(root, a.set)
    p = params.commission
    tracking.setup(params.paths.mlflow_uri, root / params.paths.mlflow_artifacts)
    site = commission.check_site(a.site)
    uri = a.model_uri or f"models:/{params.promote.model_name}@champion"
    name, version = commission.registered_version(uri)
    r, counts = commission.commission_site(Path(a.cohort), site, name, version, p)
    left = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if k != "rows" and v)
    print(f"site {site}, {name} version {version}: {r.images} images of {r.patients} patients scored "
          f"({r.hypoplasia_patients} with hypoplasia, {r.normal_patients} without)"
          + (f"; left out: {left}" if left else ""))
    print(f"  segmenter: cerebellum outside the skull in {r.outside_share:.1%} of images (the model's test set: "
          f"{r.test_outside_share:.1%})" + ("; significantly more: this scanner may defeat it" if r.outside_excess
                                              else "")
          + (f"; TCD error {r.tcd_mae_mm:.2f} mm (bias {r.tcd_bias_mm:+.2f}) on {r.tcd_images} images against "
             f"the sonographers' tcd_mm" if r.tcd_images else "; no sonographer TCD to check the biometry against"))
    if r.biometry_ok is False:
        print(f"  warning: TCD error above {p.max_tcd_error_mm:.2f} mm on this site: its TCD, CM and centiles are "
              f"not reliable (kept with the site's threshold; `cbh predict --site {site}` repeats it)", file=sys.stderr)
    print(f"  trained threshold {r.trained_threshold:.4f}: {r.trained_patient_sensitivity:.1%} of hypoplasia "
          f"patients detected on every image (one-sided {r.confidence:.0%} lower bound "
          f"{r.trained_patient_sensitivity_low:.1%}); image sensitivity {r.trained_image_sensitivity:.3f}, "
          f"specificity {r.trained_image_specificity:.3f}")
    if a.json:
        figures = {k: (None if isinstance(v, float) and v != v else v) for k, v in r.__dict__.items()}
        Path(a.json).write_text(json.dumps(figures | {"counts": counts}, indent=2) + "\n")
    if r.threshold is None:
        raise CommandError(f"site {site}: {r.reason}; nothing recorded (the trained threshold stays in use)")
    print(f"  commissioned threshold {r.threshold:.4f} ({r.reason}): P(sensitivity < {r.min_sensitivity:.2f}) "
          f"= {r.violation_probability:.3f}; on these scans sensitivity {r.image_sensitivity:.3f}, "
          f"specificity {r.image_specificity:.3f}")
    if a.dry_run:
        print("dry run: nothing recorded")
        return 0
    commission.record(name, version, r, stages.audit_trail(params, root))
    print(f"recorded on {name} version {version} (tags {commission.TAG_PREFIX}{site}.*) and in the audit trail; "
          f"`cbh predict INPUT --site {site}` uses it")
    return 0


def cmd_retrain(a: argparse.Namespace, root: Path) -> int:
    from flows.retrain import retrain_flow

    t0 = time.monotonic()
    summary = retrain_flow(workspace=str(root), cohort=a.cohort)
    _print_summary(summary, _params(root), time.monotonic() - t0)
    return 0


def _print_summary(s: dict, params: Params, seconds: float) -> None:
    m = s["metrics"]
    rows = [
        ("ingest", f"{s['ingest']['deidentified']} de-identified, {s['ingest']['quarantined']} quarantined",
         params.paths.manifest),
        ("validate", s["contract"]["verdict"], f"{params.paths.contract}/summary.html"),
        ("split", ", ".join(f"{k} {sum(v.values())}" for k, v in s["split"].items()), params.paths.dataset),
        ("version", f"dvc commit + push ({s['dvc_pushed']} files)", "dvc status / dvc.lock"),
        ("train", f"test AUC {m['test_auc']:.3f} [{m['test_auc_ci_low']:.2f}-{m['test_auc_ci_high']:.2f}], "
                  f"Dice cerebellum {m['test_dice_cerebellum']:.3f}, TCD error {m['test_tcd_mae_mm']:.2f} mm",
         f"MLflow run {s['run_id'][:12]}"),
        ("promote", f"{s['promotion']['decision']}: {s['promotion']['reason']}",
         f"models:/{params.promote.model_name}@champion (v{s['promotion']['champion']})"),
    ]
    for site, what in (s.get("commission") or {}).items():
        rows.append(("commission", f"{site}: {what}", f"tags commission.{site}.*"))
    width = max(len(r[1]) for r in rows)
    print(f"\ncbh retrain finished in {seconds:.0f} s")
    for stage, what, where in rows:
        print(f"  {stage:9s} {what:{width}s}  {where}")
    print("Look at it: `make ui` (MLflow and Prefect UIs), Data Docs in the browser, `dvc status`.")


def cmd_schedule(a: argparse.Namespace, root: Path) -> int:
    from flows.schedule import list_deployments, register

    if a.list:
        for line in list_deployments():
            print(line)
        return 0
    if not a.cron:
        raise UsageError("give --cron EXPR to register a schedule, or --list to show them")
    import os

    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError("no Prefect server to keep the schedule: start this machine's with `cbh scheduler up` "
                         "(or point PREFECT_API_URL at a team server), then register it")
    name = register(root, a.cron, a.pool, a.train_pool)
    print(f"deployment {name} registered on pool {a.pool!r} with schedule {a.cron!r} at "
          f"{os.environ['PREFECT_API_URL']}; a worker on the pool runs it (`cbh scheduler up` starts one here)")
    if a.train_pool:
        print(f"training runs as deployment cbh-train/train-{a.train_pool} on pool {a.train_pool!r} "
              f"(a GPU worker: `prefect worker start --pool {a.train_pool}`)")
    return 0


def cmd_serve(a: argparse.Namespace, root: Path) -> int:
    import json
    import os
    import subprocess
    from dataclasses import asdict

    from mlflow.models import get_model_info
    from mlflow.models.model import MODEL_CONFIG
    from mlflow.pyfunc.scoring_server import SERVING_MODEL_CONFIG

    from pipelines.registry import commission, tracking

    params = _params(root)
    env = dict(os.environ, MLFLOW_TRACKING_URI=os.environ.get("MLFLOW_TRACKING_URI", params.paths.mlflow_uri))
    # the scoring server pseudonymises nothing and promotes nothing: it never gets either key
    env.pop(params.deid.key_env, None)
    env.pop("CBH_AUDIT_KEY", None)
    # mlflow starts uvicorn by name: the environment's own scripts must come first on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(params.limits.max_request_seconds)
    tracking.setup(env["MLFLOW_TRACKING_URI"], root / params.paths.mlflow_artifacts)
    uri, note, config = f"models:/{params.promote.model_name}@champion", "", {}
    if a.site:
        point = commission.operating_point(uri, a.site)
        config = commission.serving_config(point)
        uri, note = point.uri, f" at the threshold {point.threshold:.4f} commissioned for site {a.site}"
        if point.biometry_warning:
            print(f"cbh serve: warning: {point.biometry_warning}", file=sys.stderr)
    if "limits" in (get_model_info(uri).flavors.get("python_function", {}).get(MODEL_CONFIG) or {}):
        config["limits"] = asdict(params.limits)      # this workspace's limits, not the training run's
    if config:
        # read by MLflow's scoring server as it loads the model: the pyfunc's model_config
        env[SERVING_MODEL_CONFIG] = json.dumps(config)
    print(f"serving {uri} on http://127.0.0.1:{a.port}/invocations{note}", flush=True)
    return subprocess.call([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                            "local", "--host", "127.0.0.1", "--port", str(a.port)], cwd=root, env=env)


def cmd_scheduler(a: argparse.Namespace, root: Path) -> int:
    from ops.scheduler import Scheduler

    scheduler = Scheduler(root)
    if a.action == "up":
        state = scheduler.up(a.port, tuple(a.pools) if a.pools else None)
        for name, s in state["services"].items():
            print(f"{name:11s} pid {s['pid']:<8d} log {s['log']}")
        print(f"Prefect API {state['url']}; cbh commands of this workspace now use it "
              f"(other shells: source {scheduler.env_file})")
        print("register a schedule:  cbh schedule --cron '17 3 * * 1' --pool cpu;  stop: cbh scheduler down")
    elif a.action == "down":
        stopped = scheduler.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        print("\n".join(scheduler.status()))
    return 0


def cmd_servers(a: argparse.Namespace, root: Path) -> int:
    from ops.servers import Ports, Servers

    servers = Servers(Path(a.dir) if a.dir else root / ".cbh" / "servers")
    if a.action == "up":
        state = servers.up(Ports(a.postgres_port, a.prefect_port, a.mlflow_port), a.artifacts_destination, a.host)
        print(f"PostgreSQL  127.0.0.1:{state['postgres']['port']} (pid {state['postgres']['pid']})")
        print(f"Prefect     {state['prefect']['url']} (pid {state['prefect']['pid']}), on PostgreSQL, "
              f"listening on {a.host}, API auth string required")
        print(f"MLflow      {state['mlflow']['url']} (pid {state['mlflow']['pid']}), on PostgreSQL, "
              f"listening on {a.host}, basic-auth login required, artifacts {state['mlflow']['artifacts']}")
        print(f"point the platform at them:  source {servers.env_file}  (URLs and credentials; mode 600)")
        print("stop them:                   make servers-down  (or cbh servers down)")
    elif a.action == "down":
        stopped = servers.down(purge=a.purge)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}"
              + ("; database cluster deleted" if a.purge else ""))
    else:
        print("\n".join(servers.status()))
    return 0


def cmd_params(a: argparse.Namespace, root: Path) -> int:
    from pipelines.config import describe

    rows = describe(_params(root, a.set, a.profile))
    if a.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    cells = [("KEY", "VALUE", "TYPE", "MEANING")] + [(r.key, _show(r.value), r.kind, r.description) for r in rows]
    print("\n".join(_table(cells, caps=(None, 24, 26))))
    return 0


def _show(value: object) -> str:
    """A value as it would be written in params.yaml."""
    if isinstance(value, str):
        return value or "''"
    if isinstance(value, (list, dict)):
        import yaml

        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return json.dumps(value)


def _table(rows: list[tuple[str, ...]], caps: tuple[int | None, ...]) -> list[str]:
    """Left-aligned columns at most `caps` wide; a longer cell pushes the rest of its row
    onto a continuation line, so nothing is cut."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(caps))]
    widths = [w if cap is None else min(w, cap) for w, cap in zip(widths, caps, strict=True)]
    starts = [sum(widths[:i]) + 2 * i for i in range(len(caps) + 1)]
    lines = []
    for row in rows:
        line = ""
        for cell, start in zip(row, starts, strict=True):
            if len(line) > max(start - 2, 0):
                lines.append(line.rstrip())
                line = ""
            line = line.ljust(start) + cell
        lines.append(line.rstrip())
    return lines


# -- parser -----------------------------------------------------------------------------------

EPILOG = """\
exit codes:
  0  done
  1  the command could not do its job (bad input, a refused stage)
  2  the command line or params.yaml is wrong
  3  something the command needs is missing (a key, OCR, a server)
  4  cbh promote: the gate rejected the challenger (the decision is recorded)

examples:
  cbh synth cohort --patients 40        a synthetic hospital export to try things on
  cbh ingest cohort                     de-identify it into the data store
  cbh retrain                           the whole flow, as scheduled
  cbh train --set train.lr=0.001        one training run with one value changed
  cbh params                            every key --set accepts, its value and meaning
  cbh COMMAND --help                    what a command does and its options
"""

def _command(sub: argparse._SubParsersAction, name: str, summary: str | None, description: str,
             epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help opens with what it does; `summary` is its line in the list."""
    extra = {"help": summary} if summary else {}
    return sub.add_parser(name, description=textwrap.fill(description, 88), epilog=epilog, **extra,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_overrides(parser: argparse.ArgumentParser, profile: bool = False) -> None:
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a params.yaml value for this run (repeatable; `cbh params` lists the keys)")
    if profile:
        parser.add_argument("--profile", help="a named set of overrides from params.yaml `profiles:` (e.g. paper); "
                            "--set applies on top")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cbh")
    except PackageNotFoundError:              # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cbh", description="Cerebellar hypoplasia from fetal ultrasound: "
                                 "de-identify, validate, train, register, promote, predict.\n"
                                 "params.yaml in the workspace root configures every command.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"cbh {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for add in (_data_commands, _model_commands, _site_commands, _ops_commands):
        add(sub)
    return ap


def _data_commands(sub: argparse._SubParsersAction) -> None:
    s = _command(sub, "synth", "write a synthetic cohort (DICOM with identifiers, masks, annotations.csv)",
                 "Write a synthetic hospital export: DICOM and PNG scans carrying identifiers, cerebellum and "
                 "cisterna magna masks, and annotations.csv, drawn as params.yaml synth: says.",
                 "example:\n  cbh synth data/demo-cohort-src --patients 40 --style aurora")
    s.add_argument("out", help="folder to write the cohort into (must not hold a cohort already)")
    s.add_argument("--patients", type=int, help="number of patients (default: params.yaml synth.patients)")
    s.add_argument("--seed", type=int, help="random seed (default: params.yaml synth.seed)")
    s.add_argument("--style", help="one vendor style for all scans (default: the mix in params.yaml)")
    s.add_argument("--workers", type=int, default=0,
                   help="rendering processes (default 0: one per core); the files do not depend on it")
    s.set_defaults(fn=cmd_synth)
    s = _command(sub, "deid", "de-identify every DICOM/PNG/JPEG under SRC into DST",
                 "De-identify every DICOM, PNG and JPEG file under SRC into DST: headers by the DICOM PS3.15 "
                 "profile, burned-in text removed from the pixels and checked by OCR. Files that cannot be "
                 "made safe are quarantined with their reason.",
                 "example:\n  cbh deid /exports/site-west /data/site-west-deid --link /secure/link.csv")
    s.add_argument("src", help="folder of identified files (read only)")
    s.add_argument("dst", help="folder for the de-identified files (not inside SRC)")
    s.add_argument("--link", help="CSV file for the source-to-output link (kept apart from DST)")
    s.add_argument("--quarantine", help="folder for held inputs and their reasons (default: DST-quarantine)")
    s.add_argument("--workers", type=int, help="processes (default: params.yaml deid.workers; 0: one per core)")
    s.add_argument("--executor", choices=("processes", "dask"), help="default: params.yaml deid.executor")
    s.add_argument("--dask-address", help="Dask scheduler (default: params.yaml deid.dask_address; '': local)")
    s.set_defaults(fn=cmd_deid)
    s = _command(sub, "import", "convert another tool's annotations (DICOM SEG, NIfTI, COCO, CVAT, Label Studio, "
                 "HC18) into a cohort",
                 "Convert annotations made elsewhere into the cohort format (CONTRACT.md section 1), so they go "
                 "through de-identification, the data contract and DVC like any export. dicom-seg, nifti, coco, "
                 "cvat (CVAT for images 1.1 XML), labelstudio (JSON export): SRC holds the annotation files and "
                 "the scans they name; masks are rasterised on each scan's pixel grid; class names map to "
                 "cerebellum, cisterna magna and head by --labels (defaults: cerebellum/cb, cisterna magna/cm, "
                 "head/skull; NIfTI values 1, 2, 3), and an unmapped label refuses its image. --table gives "
                 "each image's clinical columns (patient_id, exam_date, ga_weeks, label, ...); a DICOM header "
                 "fills the patient, the exam date and the GA (LastMenstrualDate). hc18: the HC18 "
                 "challenge layout: NNN_HC.png images, NNN_HC_Annotation.png head outlines and the table of "
                 "pixel sizes and head circumferences; each outline becomes a filled head mask (head_mask "
                 "column), each pixel size a SCAN.json, each HC the hc_mm column. HC18 has no GA and no "
                 "date: GA is estimated from the HC (ga_source column) and --exam-date is used for every row.",
                 "example:\n  cbh import hc18 ../shared/data/hc18-subset data/hc18-cohort\n"
                 "  cbh import coco exports/coco data/site-east --table exports/clinical.csv\n"
                 "  cbh ingest data/hc18-cohort")
    s.add_argument("format", choices=["hc18", "dicom-seg", "nifti", "coco", "cvat", "labelstudio"],
                   help="the annotation layout of SRC")
    s.add_argument("src", help="the folder to import (read only)")
    s.add_argument("cohort", help="the cohort folder to write (must not hold a cohort yet)")
    s.add_argument("--exam-date", default="2018-01-01",
                   help="hc18: exam date written for every image, YYYY-MM-DD (HC18 publishes none; default "
                        "2018-01-01)")
    s.add_argument("--table", metavar="CSV", help="clinical columns per image, keyed by `image` (file name or path "
                   "under SRC) and optional `frame`; `pixel_spacing_mm` for PNG/JPEG without a SCAN.json")
    s.add_argument("--labels", metavar="YAML", help="label mapping: names: {cerebellum: [...], cisterna_magna: "
                   "[...], head: [...], ignore: [...]}, values: {1: cerebellum, ...}")
    s.set_defaults(fn=cmd_import)
    s = _command(sub, "ingest", "de-identify a cohort into the workspace data store and build the manifest",
                 "Add a hospital export (annotations.csv and its scans) to the workspace data store: "
                 "de-identify it and rebuild the manifest. A cohort that cannot be read changes nothing.")
    s.add_argument("cohort", help="a cohort folder holding annotations.csv and the scans it names")
    s.set_defaults(fn=cmd_ingest)
    s = _command(sub, "validate", "run the data contract (and the split suite on the current split), "
                 "build Data Docs and the steward summary; exits 1 on a critical failure",
                 "Run the data contract on the manifest (and the split suite on the current split), "
                 "quarantine failing rows, and write Data Docs and the steward summary. Exits 1 when a "
                 "critical check fails: the data is not fit for training.")
    s.add_argument("--json", metavar="FILE", help="write the results as JSON to this file")
    s.set_defaults(fn=cmd_validate, with_split=True)


def _model_commands(sub: argparse._SubParsersAction) -> None:
    s = _command(sub, "train", "train, evaluate, log to MLflow and register a 'challenger'",
                 "Train the segmenter and the classifier on the current split, evaluate them on the frozen "
                 "test set, log the run to MLflow and register the model as 'challenger'. An interrupted "
                 "training resumes from its last checkpoint (train.resume).",
                 "examples:\n  cbh train --model asc\n  cbh train --profile paper --set train.seed=14")
    s.add_argument("--model", choices=MODELS, help="default: params.yaml train.model")
    _add_overrides(s, profile=True)
    s.set_defaults(fn=cmd_train)
    s = _command(sub, "ablate", "train and evaluate every model on the same data and test set, and compare them",
                 "Train every comparison model (or --models) on the current split with one shared segmenter, "
                 "evaluate each on the frozen test set, log one MLflow parent run with a child run per model, "
                 "and write the reviewer report comparing them: intervals over patients and each model's AUC "
                 "difference to the first, paired over the same patients. Nothing is registered.",
                 "examples:\n  cbh ablate\n  cbh ablate --models asc-ga,asc,image-only,biometry-rule "
                 "--out reports/ablation")
    s.add_argument("--models", help="comma-separated, the reference first (default: params.yaml train.model, "
                   "then every other model but asc-paper, which needs a GPU)")
    s.add_argument("--out", default="reports/ablation", help="folder for compare.html and compare.md")
    _add_overrides(s, profile=True)
    s.set_defaults(fn=cmd_ablate)
    s = _command(sub, "promote", "gate the challenger against the champion",
                 "Gate the challenger against the champion (params.yaml promote:) and record the decision "
                 "in the hash-chained audit trail. Exits 4 when the gate rejects the challenger.")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--history", action="store_true", help="print the promotion audit trail and check its hash chain")
    g.add_argument("--rollback", action="store_true", help="restore the previous champion")
    s.set_defaults(fn=cmd_promote)
    s = _command(sub, "lineage", "the code, data, parameters and environment behind a model version",
                 "Show the git commit, DVC data, parameters and packages a registered model version was "
                 "trained with; --restore writes its dvc.lock and params.yaml back to rebuild it.",
                 "example:\n  cbh lineage --version 3 --restore && dvc pull --with-deps train && dvc repro")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    g.add_argument("--version", help="a model version number")
    s.add_argument("--restore", action="store_true",
                   help="write the version's dvc.lock and params.yaml into the workspace (then dvc pull / repro)")
    s.set_defaults(fn=cmd_lineage)
    s = _command(sub, "compare", "write a reviewer report comparing MLflow runs",
                 "Write a reviewer report (HTML and Markdown) comparing MLflow runs: metrics, subgroups, "
                 "parameters and the promotion decisions.")
    s.add_argument("run_ids", nargs="*", help="runs to compare (default: the latest run of each model)")
    s.add_argument("--out", default="reports", help="output folder (default: reports)")
    s.set_defaults(fn=cmd_compare)


def _site_commands(sub: argparse._SubParsersAction) -> None:
    s = _command(sub, "predict", "predict hypoplasia for a file, a folder or a cohort",
                 "Predict cerebellar hypoplasia for a scan, a folder of scans or a cohort with the champion "
                 "(or another model), with biometry, into a CSV file; warns when the segmenter looks lost on "
                 "these scans.",
                 "example:\n  cbh predict /exports/site-west --out predictions.csv --site site-west")
    s.add_argument("input", help="a DICOM/PNG/JPEG file, a folder of them, or a cohort folder (annotations.csv)")
    s.add_argument("--out", required=True, help="CSV file to write")
    s.add_argument("--model-uri", help="default: models:/cerebellar-hypoplasia@champion")
    s.add_argument("--use-masks", action="store_true", help="use the cohort's annotated masks (as in the paper)")
    s.add_argument("--ga-weeks", type=float, help="GA for every input that is not a cohort (default: each DICOM "
                   "header's StudyDate minus LastMenstrualDate; a file with neither is refused)")
    s.add_argument("--tta", action="store_true", help="test-time augmentation: average with the mirrored crop")
    s.add_argument("--site", help="use the operating threshold commissioned for this site on the model version")
    s.add_argument("--head-model", metavar="PATH_OR_URI",
                   help="fetal-head localiser to use instead of the model's own: a folder with head.json and "
                        "head.pt, or a model URI such as models:/fetal-head@champion (default: the one the model "
                        "carries, else the classical skull fit)")
    s.add_argument("--dicom-out", metavar="DIR",
                   help="also write, per exam from DICOM, a DICOM Segmentation of the best frame's predicted "
                        "structures and a DICOM SR measurement report (TID 1500) into DIR/exam-N/, for PACS")
    s.set_defaults(fn=cmd_predict)
    s = _command(sub, "commission", "set a site's operating threshold on its own labelled scans "
                 "(sensitivity guaranteed with stated confidence) and record it on the model version",
                 "Set a site's own operating threshold on its labelled scans, so that sensitivity stays at "
                 "or above commission.min_sensitivity with commission.confidence, check the segmenter's "
                 "biometry there, and record both on the model version.",
                 "example:\n  cbh commission /exports/site-west-labelled --site site-west --dry-run")
    s.add_argument("cohort", help="a labelled cohort of the site (annotations.csv, scans): its labels are used")
    s.add_argument("--site", required=True, help="the scanner group's label (annotations.csv's site column)")
    s.add_argument("--model-uri", help="a registered version (default: models:/cerebellar-hypoplasia@champion)")
    s.add_argument("--dry-run", action="store_true", help="report only: record nothing")
    s.add_argument("--json", help="also write the figures (counts, thresholds, no identifiers) to this file")
    _add_overrides(s)
    s.set_defaults(fn=cmd_commission)
    s = _command(sub, "serve", "serve the champion over REST on 127.0.0.1",
                 "Serve the champion over REST (MLflow's scoring server) on 127.0.0.1 until interrupted.",
                 "example:\n  cbh serve --port 5001 --site site-west")
    s.add_argument("--port", type=int, default=5001, help="port to listen on (default: 5001)")
    s.add_argument("--site", help="serve the champion's version at the threshold commissioned for this site")
    s.set_defaults(fn=cmd_serve)


def _ops_commands(sub: argparse._SubParsersAction) -> None:
    s = _command(sub, "retrain", "the whole Prefect flow: ingest, validate, split, train, evaluate, "
                 "version (DVC), promote, review report; reads params.yaml as it is",
                 "Run the whole retraining flow in Prefect: ingest, validate, split, train, evaluate, version "
                 "with DVC, promote, commission the listed sites and write the review report. It reads "
                 "params.yaml as it is (no overrides) and stops before training on a critical data failure.")
    s.add_argument("--cohort", help="a hospital export to add to the data store first")
    s.set_defaults(fn=cmd_retrain)
    s = _command(sub, "schedule", "register the retraining flow on a schedule / list deployments",
                 "Register the retraining flow as a Prefect deployment on a cron schedule, or list the "
                 "deployments; a worker on the pool runs it.",
                 "example:\n  cbh schedule --cron '0 2 * * 1' --pool cpu --train-pool gpu")
    s.add_argument("--cron", help="cron expression of the schedule, e.g. '0 2 * * 1'")
    s.add_argument("--pool", default="cpu", help="work pool that runs the flow (default: cpu)")
    s.add_argument("--train-pool", help="run training as its own deployment on this (GPU) pool, e.g. gpu")
    s.add_argument("--list", action="store_true", help="list the deployments instead")
    s.set_defaults(fn=cmd_schedule)
    s = _command(sub, "scheduler", "scheduled retraining on this machine: a Prefect server and workers "
                 "(up | down | status)",
                 "Start, stop or show the workspace's scheduler: a Prefect server (SQLite, 127.0.0.1) and a "
                 "process worker for the cpu pool (and the gpu pool where a GPU is present), in the "
                 "background with logs and PID files in .cbh/scheduler. While it runs, cbh commands use it, "
                 "so a schedule registered with `cbh schedule` fires.",
                 "example:\n  cbh scheduler up && cbh schedule --cron '17 3 * * 1' --pool cpu")
    s.add_argument("action", choices=("up", "down", "status"), help="start it, stop it, or show its state")
    s.add_argument("--port", type=int, default=4200, help="the Prefect server's port (default: 4200)")
    s.add_argument("--pool", action="append", dest="pools", metavar="POOL",
                   help="a work pool to start a worker for (repeatable; default: cpu, and gpu with a GPU)")
    s.set_defaults(fn=cmd_scheduler)
    s = _command(sub, "servers", "team servers: PostgreSQL, a Prefect server and an MLflow tracking server on it, "
                 "both with a login (up | down | status)",
                 "Start, stop or show the team servers: PostgreSQL (127.0.0.1 only), and a Prefect server "
                 "(API auth string) and an MLflow tracking server (basic-auth app: users and permissions) "
                 "both storing into it, listening on --host. Secrets live in files of mode 600 in the state "
                 "folder; .cbh/servers/env holds what a client needs.",
                 "example:\n  cbh servers up && source .cbh/servers/env")
    s.add_argument("action", choices=("up", "down", "status"), help="start them, stop them, or show their state")
    s.add_argument("--dir", help="state folder (default .cbh/servers in the workspace)")
    s.add_argument("--host", default="127.0.0.1", help="address Prefect and MLflow listen on (default 127.0.0.1; "
                   "for a team, put a TLS reverse proxy in front: docs/operator.md)")
    s.add_argument("--postgres-port", type=int, default=5433, help="PostgreSQL port (default: 5433)")
    s.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default: 4200)")
    s.add_argument("--mlflow-port", type=int, default=5000, help="MLflow tracking server port (default: 5000)")
    s.add_argument("--artifacts-destination", help="MLflow's artifact root, served through the tracking server "
                   "(a folder, or s3://bucket/path etc.; default: the state folder's mlartifacts)")
    s.add_argument("--purge", action="store_true", help="with down: delete the database cluster and the state")
    s.set_defaults(fn=cmd_servers)
    s = _command(sub, "params", "list every params.yaml key --set accepts, with its value and meaning",
                 "List every key of params.yaml that --set accepts: its current value (with the profile and "
                 "overrides given here applied), what it may be, and what it means.",
                 "examples:\n  cbh params\n  cbh params --profile paper --set train.lr=0.001\n  cbh params --json")
    _add_overrides(s, profile=True)
    s.add_argument("--json", action="store_true", help="print the list as JSON instead of a table")
    s.set_defaults(fn=cmd_params)
    # what dvc.yaml calls: no summary keeps it out of the list (argparse would show SUPPRESS)
    s = _command(sub, "stage", None, "Run one dvc.yaml stage: what `dvc repro` calls (not for direct use).")
    s.add_argument("name", choices=["ingest", "validate", "split", "head", "train", "evaluate"], help="the stage")
    s.set_defaults(fn=cmd_stage)


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "dvc", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|eval mode|does not have many workers).*")


def _library_errors() -> tuple[type[BaseException], ...]:
    """Failures of libraries that name what the user asked for and is not there (a run or a
    model version MLflow does not have); looked up only once the library is loaded."""
    mlflow = sys.modules.get("mlflow.exceptions")
    return (mlflow.MlflowException,) if mlflow else ()


def main(argv: list[str] | None = None) -> int:
    """Run one command; a CbhError becomes one sentence on stderr and its exit code."""
    args = build_parser().parse_args(argv)
    root = find_root()
    prepare_environment(root)
    _quiet_libraries()
    try:
        return int(args.fn(args, root) or 0)
    except CbhError as exc:
        print(f"cbh {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, *_library_errors()) as exc:   # boundary: a file or run the user named is absent
        print(f"cbh {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
