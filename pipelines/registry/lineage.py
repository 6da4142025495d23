"""Lineage of a training run: which code, data, parameters and environment made a model.

Recorded on every MLflow run and registered model version (tags), with the DVC lock file and
the effective parameters as run artifacts, so that `cbh lineage --restore` can bring a
workspace back to the exact data of any model and `dvc repro` can rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path

import yaml

from pipelines.config import Params

PACKAGES = ("torch", "lightning", "monai", "numpy", "pandas", "pyarrow", "pydicom", "mlflow", "dvc",
            "prefect", "great-expectations", "scikit-learn", "opencv-python-headless")


def git_lineage(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the workspace (`none` outside git)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--verify", "-q", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "none", "git.dirty": str(bool(dirty)).lower()}


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lock_outputs(root: Path) -> dict[str, str]:
    """Output path -> md5 as recorded in the workspace's dvc.lock (empty without one)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    raw = yaml.safe_load(lock.read_text()) or {}
    return {o["path"]: o.get("md5", "") for st in (raw.get("stages") or {}).values() for o in st.get("outs", [])}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = pkg_version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def deid_profile(options: tuple[str, ...]) -> str:
    """The de-identification profile and options, as every de-identification report states them."""
    from pipelines.deid.core import profile_record

    rec = profile_record(options)
    return f"{rec['profile']}; options: {', '.join(rec['options'])}; CID 7050 codes {', '.join(rec['codes'])}"


def collect(root: Path, params: Params) -> dict[str, str]:
    """The lineage tags of a run trained and evaluated on the workspace's current data."""
    p = params.paths
    tags = git_lineage(root)
    recorded = lock_outputs(root)
    for key, rel in (("data.dataset_md5", p.dataset), ("data.frozen_test_md5", p.frozen_test)):
        path = root / rel
        tags[key] = md5_file(path) if path.is_file() else "none"
        # does dvc.lock (hence the DVC remote) hold exactly this version?
        tags[key.replace("_md5", "_in_dvc")] = str(recorded.get(rel) == tags[key]).lower()
    tags["data.deid_md5"] = recorded.get(p.deid, "none")          # DVC's directory hash (.dir)
    lock = root / "dvc.lock"
    tags["data.dvc_lock_md5"] = md5_file(lock) if lock.is_file() else "none"
    validation = root / p.validation
    if validation.is_file():
        tags["data.validation"] = "passed" if json.loads(validation.read_text()).get("success") else "failed"
    else:
        tags["data.validation"] = "missing"
    tags["deid.profile"] = deid_profile(params.deid.options)
    tags["params.md5"] = hashlib.md5(json.dumps(params.flat(), sort_keys=True, default=str).encode()).hexdigest()
    tags.update({f"pkg.{k}": v for k, v in package_versions().items()})
    return tags


def artifacts(root: Path, params: Params, out: Path) -> Path:
    """Files a reproduction needs, written to `out`: dvc.lock and the effective params."""
    out.mkdir(parents=True, exist_ok=True)
    lock = root / "dvc.lock"
    if lock.is_file():
        (out / "dvc.lock").write_bytes(lock.read_bytes())
    (out / "params.effective.yaml").write_text(yaml.safe_dump(params.raw, sort_keys=False))
    return out


def describe(model_name: str, ref: str):
    """(model version, its tags) for a version number or an alias."""
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = client.get_model_version(model_name, ref) if ref.isdigit() else \
        client.get_model_version_by_alias(model_name, ref)
    return mv, dict(mv.tags)


def restore(run_id: str, root: Path) -> list[str]:
    """Put a run's dvc.lock and effective params back into the workspace."""
    import tempfile

    import mlflow

    written = []
    with tempfile.TemporaryDirectory(prefix="cbh-restore-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="lineage", dst_path=tmp))
        if (local / "dvc.lock").is_file():
            (root / "dvc.lock").write_bytes((local / "dvc.lock").read_bytes())
            written.append("dvc.lock")
        if (local / "params.effective.yaml").is_file():
            (root / "params.yaml").write_bytes((local / "params.effective.yaml").read_bytes())
            written.append("params.yaml")
    if not written:
        raise FileNotFoundError(f"run {run_id} has no lineage artifacts to restore")
    return written
