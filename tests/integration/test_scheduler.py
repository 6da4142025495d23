"""`cbh scheduler up` makes schedules fire on one machine: a Prefect server and a process worker
start in the background; a deployment firing every minute completes a flow run within three
minutes; `cbh scheduler down` leaves no process behind (every process group it started is gone).

Marked `servers` (make test-servers, run by .ci/run): real services and a wait for the clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_servers import _free_ports

pytestmark = pytest.mark.servers

ROOT = Path(__file__).resolve().parents[2]

HEARTBEAT = '''
from pathlib import Path

from prefect import flow


@flow(name="cbh-heartbeat")
def heartbeat(out: str) -> None:
    Path(out).write_text("ran\\n")
'''

DEPLOY = '''
import sys
from prefect import flow

remote = flow.from_source(source=sys.argv[1], entrypoint="heartbeat.py:heartbeat")
remote.deploy(name="minutely", work_pool_name="cpu", cron="* * * * *", concurrency_limit=1,
              parameters={"out": sys.argv[2]}, build=False, push=False, print_next_steps=False)
'''


def _cbh(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(CBH_WORKSPACE=str(ws), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=300)


def _completed(url: str) -> list[dict]:
    body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    req = urllib.request.Request(f"{url}/flow_runs/filter", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_a_minutely_schedule_fires_and_down_leaves_no_process(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (ws / "heartbeat.py").write_text(HEARTBEAT)
    out = tmp_path / "heartbeat.txt"
    (port,) = _free_ports(1)
    up = _cbh(ws, "scheduler", "up", "--port", str(port), "--pool", "cpu")
    state_file = ws / ".cbh" / "scheduler" / "scheduler.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads(state_file.read_text())
        url = state["url"]
        assert url == f"http://127.0.0.1:{port}/api" and set(state["services"]) == {"prefect", "worker-cpu"}
        for name, entry in state["services"].items():
            assert (ws / ".cbh" / "scheduler" / f"{name}.pid").read_text().strip() == str(entry["pid"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "client-home"))
        deployed = subprocess.run([sys.executable, "-c", DEPLOY, str(ws), str(out)], env=env, cwd=ws,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        listed = _cbh(ws, "schedule", "--list")                    # the CLI finds the running server itself
        assert listed.returncode == 0 and "minutely" in listed.stdout and "* * * * *" in listed.stdout, listed
        status = _cbh(ws, "scheduler", "status").stdout
        assert "prefect     running" in status and "worker-cpu  running" in status, status

        deadline, runs = time.monotonic() + 180, []
        while time.monotonic() < deadline and not runs:
            time.sleep(5)
            runs = _completed(url)
        assert runs, f"no flow run completed within three minutes; worker log:\n" \
                     f"{(ws / '.cbh' / 'scheduler' / 'worker-cpu.log').read_text()[-3000:]}"
        assert out.read_text() == "ran\n"
    finally:
        down = _cbh(ws, "scheduler", "down")
    assert down.returncode == 0, down.stderr[-3000:]
    assert "worker-cpu" in down.stdout and "prefect" in down.stdout
    for entry in json.loads(state_file.read_text())["services"].values():
        assert "pid" not in entry
    for pid in state["services"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid["pid"], 0)                               # no process left in its group
    assert "stopped" in _cbh(ws, "scheduler", "status").stdout
