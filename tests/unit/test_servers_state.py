"""`cbh servers down` stops only its own servers: a PID recorded before a reboot may belong to
another program by now, and that program must survive."""

from __future__ import annotations

import json
import subprocess

from ops.servers import Servers


def test_down_never_stops_a_process_that_reused_a_recorded_pid(tmp_path):
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        state = tmp_path / "servers"
        state.mkdir()
        (state / "servers.json").write_text(json.dumps({
            "postgres": {"pid": other.pid, "port": 5433}, "prefect": {"pid": other.pid, "port": 4200},
            "mlflow": {"pid": other.pid, "port": 5000}}))
        servers = Servers(state)
        assert all("stopped" in line for line in servers.status())
        assert servers.down() == []
        assert other.poll() is None                                   # still running
    finally:
        other.kill()
        other.wait()
