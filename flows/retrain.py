"""The retraining flow: ingest -> validate -> split -> head -> train -> evaluate (each versioned
with DVC) -> push -> promote -> reviewer report.

Thin Prefect tasks around flows/stages.py; the flow stops before training when the data
contract has a critical failure. Import this module only after
flows.workspace.prepare_environment() has set PREFECT_HOME and friends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import stages
from flows.notify import on_flow_failure
from pipelines.config import Params, load_params


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10])
def ingest_task(params: Params, root: Path, cohort: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    if cohort:
        dest = stages.add_cohort(params, root, Path(cohort))
        logger.info("cohort added to the data store as %s", dest.name)

    def progress(i: int, n: int) -> None:
        if i == n or i % 50 == 0:
            logger.info("de-identified %d/%d rows", i, n)

    rep = stages.ingest(params, root, progress=progress)
    logger.info("ingest: %d de-identified, %d quarantined %s; scans: %d de-identified now, %d reused",
                rep["deidentified"], rep["quarantined"], rep["reasons"], rep["scans"]["deidentified"],
                rep["scans"]["reused"])
    return rep


@task(name="validate")
def validate_task(params: Params, root: Path) -> dict[str, Any]:
    rep = stages.validate(params, root)
    logger = get_run_logger()
    logger.info("data contract: %s\n%s", rep.verdict(), rep.failures_table())
    summary = root / params.paths.contract / "summary.md"
    create_markdown_artifact(key="data-contract", description="the steward summary of the data contract",
                             markdown=summary.read_text(encoding="utf-8"))
    return {"success": rep.success, "docs": str(rep.data_docs_index or ""), "verdict": rep.verdict(),
            "quarantined": len(rep.quarantined), "failures": rep.failures_table()}


@task(name="split")
def split_task(params: Params, root: Path) -> dict[str, Any]:
    try:
        out = stages.split(params, root)
    finally:
        summary = root / params.paths.split_contract / "summary.md"
        if summary.is_file():
            create_markdown_artifact(key="split-contract", description="the split suite's steward summary",
                                     markdown=summary.read_text(encoding="utf-8"))
    get_run_logger().info("split (images per label): %s; %s", out["images"], out["contract"])
    return out


@task(name="head", timeout_seconds=3 * 3600)
def head_task(params: Params, root: Path) -> dict[str, Any]:
    """The fetal-head localiser on the workspace's head masks (skipped without any)."""
    out = stages.head(params, root)
    logger = get_run_logger()
    if "skipped" in out:
        logger.info("head localiser: skipped (%s)", out["skipped"])
    else:
        logger.info("head localiser: version %s, test Dice %.3f, HC error %.2f mm; %s (%s)", out["version"],
                    out["metrics"]["test_dice_mean"], out["metrics"]["test_hc_mae_mean"],
                    out["promotion"]["decision"], out["promotion"]["reason"])
    return out


@task(name="version-data", retries=2, retry_delay_seconds=5)
def version_task(root: Path, names: tuple[str, ...]) -> None:
    stages.dvc_commit(root, names)


@task(name="train", timeout_seconds=3 * 3600)
def train_task(params: Params, root: Path) -> dict[str, Any]:
    if params.train.strategy.startswith("ddp") and (params.train.devices > 1 or params.train.num_nodes > 1):
        # DDP starts one process per device by re-running the command that called it: give it
        # its own command (the DVC stage), never this flow
        import subprocess
        import sys

        # the stage runs under the writer lock of the retrain flow that asked for this training
        # (here, or in a train deployment it waits for), never as a second writer
        env = dict(os.environ, CBH_WORKSPACE=str(root), **{stages.WRITER_ENV: str(root.resolve())})
        subprocess.run([sys.executable, "-m", "flows.cli", "stage", "train"], cwd=root, env=env, check=True)
        return json.loads((root / params.paths.model_dir / "training.json").read_text())
    info = stages.train(params, root)
    get_run_logger().info("trained %s on %s images; operating threshold %.3f",
                          info["model"], info["images"], info["threshold"])
    return info


@task(name="evaluate", timeout_seconds=3600)
def evaluate_task(params: Params, root: Path) -> stages.TrainOutcome:
    out = stages.evaluate(params, root)
    get_run_logger().info("registered version %s (run %s): test AUC %.3f, Dice %.3f",
                          out.version, out.run_id, out.metrics["test_auc"], out.metrics["test_dice_cerebellum"])
    return out


@task(name="promote")
def promote_task(params: Params, root: Path) -> dict[str, Any]:
    d = stages.promote(params, root)
    get_run_logger().info("promotion: %s (%s)", d.decision, d.reason)
    return {"decision": d.decision, "reason": d.reason, "champion": d.champion}


@task(name="commission")
def commission_task(params: Params, root: Path, version: str) -> dict[str, str]:
    """The sites of `commission.cohorts` get their thresholds on the champion (a new one has none)."""
    from pipelines.registry.commission import recommission

    out = recommission(params.promote.model_name, version, params.commission,
                         stages.audit_trail(params, root))
    for site, what in out.items():
        get_run_logger().info("site %s: %s", site, what)
    return out


@task(name="review-report", retries=1, retry_delay_seconds=5)
def report_task(params: Params, root: Path, run_id: str) -> str:
    """The reviewer report (latest run of each model, promotion history), attached to the
    Prefect flow run as an artifact and to the MLflow run."""
    from pipelines.reports import compare as report

    html, md = report.compare_runs([], root / "reports" / run_id[:12], audit=root / params.paths.audit,
                                   frozen=root / params.paths.frozen_test, bootstrap=params.evaluate.bootstrap,
                                   seed=params.train.seed)
    report.attach_to_run(run_id, html, md)
    create_markdown_artifact(key="review-report", description="cbh compare: the latest run of each model",
                             markdown=md.read_text(encoding="utf-8") + f"\n\nHTML report: `{html}`")
    return str(html)


@task(name="push-data", retries=2, retry_delay_seconds=5)
def push_task(root: Path) -> int:
    return stages.dvc_push(root)


@flow(name="cbh-train", log_prints=True, on_failure=[on_flow_failure])
def train_flow(workspace: str = ".") -> dict[str, Any]:
    """Training alone, as its own deployment on a GPU work pool (`cbh schedule --train-pool gpu`):
    the retrain flow, on a CPU pool, runs it with run_deployment and waits for it. Both workers
    must see the workspace at the same path (shared storage)."""
    root = Path(workspace).resolve()
    params = load_params(root / "params.yaml")
    info = train_task(params, root)
    version_task(root, ("train",))
    return info


@flow(name="cbh-retrain", log_prints=True, on_failure=[on_flow_failure])
def retrain_flow(workspace: str = ".", cohort: str | None = None,
                 train_deployment: str | None = None) -> dict[str, Any]:
    """The whole retraining run; returns a summary for the command line.

    It reads params.yaml as it is (no overrides): dvc.lock records the parameters of every
    stage from that file, so a run with values the file does not hold would break lineage.
    With `train_deployment` ("cbh-train/train-gpu"), training runs as that deployment, on its
    work pool; otherwise in this flow run.
    """
    root = Path(workspace).resolve()
    params = load_params(root / "params.yaml")
    from flows.workspace import ensure_workspace

    ensure_workspace(root, params)
    with stages.workspace_writer(root, "retrain"):
        return _retrain(params, root, cohort, train_deployment)


def _retrain(params, root: Path, cohort: str | None, train_deployment: str | None) -> dict[str, Any]:
    ingest_rep = ingest_task(params, root, cohort)
    contract = validate_task(params, root)
    if not contract["success"]:
        version_task(root, ("ingest",))
        raise stages.StageError("the data contract has a critical failure: training stopped "
                                f"(see {params.paths.contract}/summary.html and the Data Docs)\n"
                                f"{contract['failures']}")
    split_summary = split_task(params, root)["images"]
    version_task(root, ("ingest", "validate", "split"))
    head = head_task(params, root)
    version_task(root, ("head",))
    if train_deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(name=train_deployment, parameters={"workspace": str(root)}, as_subflow=True)
        if run.state is None or not run.state.is_completed():
            raise stages.StageError(f"training deployment {train_deployment} ended "
                                    f"{run.state.name if run.state else 'without a state'}")
    else:
        train_task(params, root)
        version_task(root, ("train",))
    outcome = evaluate_task(params, root)
    version_task(root, ("evaluate",))
    pushed = push_task(root)
    decision = promote_task(params, root)
    sites = commission_task(params, root, str(decision["champion"])) \
        if params.commission.cohorts and decision["champion"] else {}
    report = report_task(params, root, outcome.run_id)
    summary = {"ingest": ingest_rep, "contract": contract, "split": split_summary, "head": head,
               "run_id": outcome.run_id, "version": outcome.version, "metrics": outcome.metrics,
               "promotion": decision, "commission": sites, "dvc_pushed": pushed, "report": report}
    create_markdown_artifact(key="retrain-summary", description="cbh retrain",
                             markdown="```json\n" + json.dumps(summary, indent=2, default=str) + "\n```")
    return summary
