"""The workspace: the checkout itself (git + DVC), with embedded defaults for every service.

Entry points call `prepare_environment()` before importing Prefect, MLflow or DVC, so
that telemetry is off and state lands in the workspace; nothing here runs at import time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pipelines.config import Params


def find_root(start: Path | None = None) -> Path:
    """CBH_WORKSPACE, else the nearest folder upwards holding params.yaml."""
    env = os.environ.get("CBH_WORKSPACE")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return here


def prepare_environment(root: Path, prefect_home: str = ".prefect") -> None:
    """Embedded defaults (CONTRACT.md section 3); explicit environment settings win."""
    defaults = {
        "PREFECT_HOME": str(root / prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GIT_PYTHON_REFRESH": "quiet",
        "TQDM_DISABLE": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ:
        from ops.scheduler import running_url

        url = running_url(root)            # `cbh scheduler up` runs: flows and schedules go to it
        if url:
            os.environ["PREFECT_API_URL"] = url


def ensure_workspace(root: Path, params: Params) -> None:
    """git and DVC initialised, the local folder remote configured (idempotent)."""
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    import logging

    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)   # DVC raises itself to INFO on import
    if not (root / ".dvc").is_dir():
        Repo.init(str(root))
    with Repo(str(root)) as repo:
        with repo.config.edit() as conf:
            conf["core"]["analytics"] = False
            conf["core"].setdefault("remote", "local")
            # DVC resolves a relative url against the current directory when editing
            conf["remote"].setdefault("local", {"url": str((root / params.paths.dvc_remote).resolve())})
    (root / params.paths.data).mkdir(parents=True, exist_ok=True)
