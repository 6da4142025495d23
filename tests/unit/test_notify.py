"""Notifications and the one-DVC-writer lock of the operations layer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from flows.notify import notify
from flows.stages import dvc_writer

ROOT = Path(__file__).resolve().parents[2]


def test_notify_logs_and_posts_to_the_webhook(tmp_path, monkeypatch):
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.handle_request, daemon=True).start()
    monkeypatch.setenv("CBH_NOTIFY_URL", f"http://127.0.0.1:{server.server_port}/hook")
    notify(tmp_path, "promotion-rejected", "version 2 was not promoted: AUC below the floor", version=2)
    server.server_close()
    logged = [json.loads(line) for line in (tmp_path / ".cbh" / "notifications.jsonl").read_text().splitlines()]
    assert logged == received and logged[0]["event"] == "promotion-rejected" and logged[0]["version"] == "2"
    monkeypatch.setenv("CBH_NOTIFY_URL", "http://127.0.0.1:9/unreachable")          # a dead webhook
    notify(tmp_path, "flow-failed", "cbh-retrain failed")                            # does not raise
    assert len((tmp_path / ".cbh" / "notifications.jsonl").read_text().splitlines()) == 2


HOLDER = """
import sys, time
from pathlib import Path
from flows.stages import dvc_writer
root = Path(sys.argv[1])
with dvc_writer(root):
    (root / "held").write_text("1")
    while not (root / "release").exists():
        time.sleep(0.02)
"""


def test_a_second_dvc_writer_waits_for_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "held").exists():
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.02)
    got = threading.Event()

    def second() -> None:
        with dvc_writer(tmp_path):
            got.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    assert not got.wait(1.0)                       # blocked while the other process writes
    (tmp_path / "release").write_text("1")
    assert got.wait(60) and holder.wait(60) == 0   # then it goes on, nothing failed
