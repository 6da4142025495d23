"""Scheduled retraining on one machine: a Prefect server (its own SQLite database under the
state folder) and one process worker per work pool, as background services with logs and PID
files, so that a schedule registered with `cbh schedule` fires without anything started by hand.

`cbh scheduler up` starts what is not running and writes `.cbh/scheduler/env`; while it runs,
every `cbh` command of the workspace talks to this server (flows/workspace.py sets
PREFECT_API_URL from `running_url`), so `cbh schedule` registers its deployments there and a
manual `cbh retrain` shows beside the scheduled ones. `cbh scheduler down` stops the services
by process group (a worker's flow runs included) and checks none is left. On a real host,
systemd units run the same two commands (docs/operator.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ops.servers import ServersError, _alive, _ours, _port_free, _wait_http, read_state, spawn, write_state

STATE_DIR = Path(".cbh") / "scheduler"


def gpu_present() -> bool:
    """An NVIDIA GPU this machine's workers could use (its driver's tool or device node)."""
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def _ensure_pool(url: str, pool: str) -> None:
    """The process work pool `pool` exists on the server (created now if not: before its worker
    starts, so a deployment registered right after `up` finds it)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}/work_pools/", data=json.dumps({"name": pool, "type": "process"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 409:                               # 409: it exists already
            raise ServersError(f"the Prefect server refused to create work pool {pool!r} (HTTP {exc.code})") from exc


def _group_alive(pgid: int | None) -> bool:
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _wait_gone(pgids: list[int | None], timeout: float) -> None:
    """Wait until none of these process groups is alive, or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(map(_group_alive, pgids)) and time.monotonic() < deadline:
        time.sleep(0.1)


class Scheduler:
    """The Prefect server and workers of one workspace (state in `<root>/.cbh/scheduler`)."""

    def __init__(self, root: Path, state_dir: Path | None = None) -> None:
        self.root = root.resolve()
        self.dir = (state_dir or self.root / STATE_DIR).resolve()
        self.state_file = self.dir / "scheduler.json"
        self.env_file = self.dir / "env"

    def state(self) -> dict:
        return read_state(self.state_file)

    def _save(self, state: dict) -> None:
        write_state(self.state_file, state)
        for name, entry in state.get("services", {}).items():       # PID files, for systemd and people
            pid_file = self.dir / f"{name}.pid"
            if entry.get("pid"):
                pid_file.write_text(f"{entry['pid']}\n")
            else:
                pid_file.unlink(missing_ok=True)

    def _env(self, url: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(PREFECT_HOME=str(self.dir / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", CBH_WORKSPACE=str(self.root))
        if url:
            env["PREFECT_API_URL"] = url
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> tuple[int, Path]:
        return spawn(self.dir, name, argv, env, self.root)

    def up(self, port: int = 4200, pools: tuple[str, ...] | None = None) -> dict:
        """Start the server and a worker per pool (`cpu`, and `gpu` where a GPU is present) unless
        they run; returns the state."""
        pools = pools or (("cpu", "gpu") if gpu_present() else ("cpu",))
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.state()
        services = state.setdefault("services", {})
        server = services.get("prefect", {})
        if not _ours(server.get("pid"), "prefect"):
            if not _port_free(port):
                raise ServersError(f"port {port} on 127.0.0.1 is taken: choose another with --port")
            pid, log = self._spawn("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                               "127.0.0.1", "--port", str(port)], self._env())
            services["prefect"] = server = {"pid": pid, "port": port, "log": str(log)}
            self._save(state)
            _wait_http(f"http://127.0.0.1:{port}/api/health", "the Prefect server", log, pid)
        url = f"http://127.0.0.1:{server['port']}/api"
        state["url"] = url
        for pool in pools:
            name = f"worker-{pool}"
            _ensure_pool(url, pool)
            if _ours(services.get(name, {}).get("pid"), "prefect"):
                continue
            env = self._env(url)
            if pool == "gpu":
                env.setdefault("CUDA_VISIBLE_DEVICES", "0")
            # one flow run at a time per worker: a retrain owns the workspace while it runs
            pid, log = self._spawn(name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                          "--type", "process", "--limit", "1", "--name", f"cbh-{pool}"], env)
            services[name] = {"pid": pid, "pool": pool, "log": str(log)}
            self._save(state)
        time.sleep(1.0)
        dead = [n for n, s in services.items() if n.startswith("worker-") and not _alive(s.get("pid"))]
        if dead:
            raise ServersError(f"{', '.join(dead)} exited while starting; see {self.dir}/<name>.log")
        self._save(state)
        self.env_file.write_text(f"export PREFECT_API_URL={url}\n")
        return state

    def down(self, timeout: float = 30.0) -> list[str]:
        """Stop every service by process group (workers first, with their flow runs), wait, kill
        what is left; returns the names stopped. Raises if a process group outlives SIGKILL."""
        state = self.state()
        services = state.get("services", {})
        order = sorted(services, key=lambda n: n == "prefect")          # workers before the server
        stopped = []
        for name in order:
            pid = services[name].get("pid")
            if _group_alive(pid):
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                stopped.append(name)
        pids = [services[n].get("pid") for n in stopped]
        _wait_gone(pids, timeout)
        for pid in pids:
            if _group_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        # a killed group is gone once init has reaped every member, which under load takes
        # longer than one short sleep (a worker killed mid flow run has several processes)
        _wait_gone(pids, 10.0)
        left = [n for n in stopped if _group_alive(services[n].get("pid"))]
        if left:
            raise ServersError(f"{', '.join(left)} did not stop; their process groups are still alive")
        for entry in services.values():
            entry.pop("pid", None)
        state.pop("url", None)
        if state:
            self._save(state)
        self.env_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[str]:
        services = self.state().get("services", {})
        if not services:
            return ["prefect   stopped  (cbh scheduler up starts it)"]
        lines = []
        for name, s in sorted(services.items(), key=lambda kv: kv[0] != "prefect"):
            running = _ours(s.get("pid"), "prefect")
            where = f"http://127.0.0.1:{s['port']}/api" if s.get("port") else f"pool {s.get('pool')}"
            lines.append(f"{name:11s} {'running' if running else 'stopped':8s} {where}  log {s.get('log', '-')}")
        return lines


def running_url(root: Path) -> str | None:
    """The API URL of the workspace's scheduler if its server runs, else None."""
    state_file = root / STATE_DIR / "scheduler.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    server = state.get("services", {}).get("prefect", {})
    return state.get("url") if _ours(server.get("pid"), "prefect") else None
