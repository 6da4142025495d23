"""The team servers: `cbh servers up` starts PostgreSQL, a Prefect server and an MLflow tracking
server on it (127.0.0.1 only); a demo-sized retrain runs against them; their APIs report the
flow run, the MLflow runs and the registry aliases; a schedule registered against the running
Prefect server is reported by its API with next runs; `cbh servers down` stops them by PID.

Marked `servers` (make test-servers, run by .ci/run): it starts real servers (about a minute)."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.workspace import TINY_HEAD, cbh, commit_workspace, make_workspace, set_params

pytestmark = pytest.mark.servers

TINY = {"segment.max_epochs": 3, "train.max_epochs": 3, "preprocess.size": 64, "evaluate.bootstrap": 50, **TINY_HEAD}
CRON = "17 3 * * 1"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _credentials(state: Path) -> dict[str, str]:
    """The client environment `cbh servers up` wrote (URLs and logins)."""
    return dict(line.removeprefix("export ").split("=", 1) for line in (state / "env").read_text().splitlines())


def _api(url: str, body: dict | None = None, auth: str | None = None) -> object:
    from ops.servers import basic_auth

    headers = {"Content-Type": "application/json", **({"Authorization": basic_auth(auth)} if auth else {})}
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _status(url: str, body: dict | None = None, auth: str | None = None) -> int:
    import urllib.error

    try:
        _api(url, body, auth)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servers")
    ws = make_workspace(tmp)
    set_params(ws, TINY)
    commit_workspace(ws)
    state = tmp / "state"
    pg, prefect, mlflow = _free_ports(3)
    # the scheduler service looks for due schedules every 5 s instead of every minute
    up = cbh(ws, "servers", "up", "--dir", str(state), "--postgres-port", str(pg), "--prefect-port", str(prefect),
             "--mlflow-port", str(mlflow), env_extra={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"})
    info = json.loads((state / "servers.json").read_text()) if (state / "servers.json").is_file() else {}
    try:
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        yield ws, state, info, up
    finally:
        down = cbh(ws, "servers", "down", "--dir", str(state), "--purge")
        assert down.returncode == 0, down.stderr[-2000:]
        pids = [info.get(n, {}).get("pid") for n in ("postgres", "prefect", "mlflow")]
        assert not [p for p in pids if p and _alive(p)], "a server outlived `cbh servers down`"
        assert not Path(info.get("postgres", {}).get("data", "/nonexistent")).exists()


def test_servers_listen_on_loopback_and_keep_the_password_to_themselves(servers):
    ws, state, info, up = servers
    assert {"postgres", "prefect", "mlflow"} <= set(info)
    env = (state / "env").read_text()
    assert f"PREFECT_API_URL=http://127.0.0.1:{info['prefect']['port']}/api" in env
    assert info["prefect"]["host"] == info["mlflow"]["host"] == "127.0.0.1"
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{info['mlflow']['port']}" in env
    assert (state / "pgpass").stat().st_mode & 0o077 == 0
    password = (state / "pgpass").read_text().strip()
    assert len(password) >= 24
    said = up.stdout + up.stderr + (state / "servers.json").read_text() + env
    for log in state.glob("*.log"):
        said += log.read_text(errors="replace")
    assert password not in said
    # PostgreSQL listens on 127.0.0.1 only, and the password (scram) is needed
    import psycopg2
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=info["postgres"]["port"], user="cbh", password="wrong",
                         dbname="prefect", connect_timeout=5)
    conn = psycopg2.connect(host="127.0.0.1", port=info["postgres"]["port"], user="cbh", password=password,
                            dbname="postgres", connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone()[0] == "127.0.0.1"
        cur.execute("SELECT datname FROM pg_database")
        assert {"prefect", "mlflow"} <= {r[0] for r in cur.fetchall()}
    conn.close()
    status = cbh(ws, "servers", "status", "--dir", str(state))
    assert status.stdout.count("running") == 3, status.stdout


def test_both_servers_ask_for_a_login_and_keep_their_secrets_in_private_files(servers):
    """Without credentials both APIs answer 401; with those of .cbh/servers/env (mode 600), 200.
    Every secret sits in a file of mode 600 and appears in no output, state or log."""
    ws, state, info, up = servers
    creds = _credentials(state)
    mlflow_api = f"{info['mlflow']['url']}/api/2.0/mlflow/experiments/search?max_results=1"
    prefect_api = f"{info['prefect']['url']}/flows/filter"
    assert _status(mlflow_api) == 401 and _status(prefect_api, {}) == 401
    assert _status(mlflow_api, auth="cbh-admin:wrong") == 401
    mlflow_login = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}"
    assert _status(mlflow_api, auth=mlflow_login) == 200
    assert _status(prefect_api, {}, auth=creds["PREFECT_API_AUTH_STRING"]) == 200
    said = up.stdout + up.stderr + (state / "servers.json").read_text()
    for log in state.glob("*.log"):
        said += log.read_text(errors="replace")
    for name in ("env", "pgpass", "mlflow-admin", "prefect-auth", "flask-secret", "mlflow-auth.ini"):
        assert (state / name).stat().st_mode & 0o077 == 0, name
    for secret in (creds["MLFLOW_TRACKING_PASSWORD"], creds["PREFECT_API_AUTH_STRING"].split(":", 1)[1],
                   (state / "flask-secret").read_text().strip()):
        assert len(secret) >= 24 and secret not in said


def test_retrain_against_the_team_servers(servers, tmp_path, monkeypatch):
    from pipelines.data.synth import synth_cohort

    ws, state, info, _ = servers
    prefect_url, mlflow_url = info["prefect"]["url"], info["mlflow"]["url"]
    env = _credentials(state)
    auth = env["PREFECT_API_AUTH_STRING"]
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):   # this process's MLflow client
        monkeypatch.setenv(key, env[key])
    cohort = tmp_path / "export"
    synth_cohort(cohort, 26, 21, ("aurora", "boreal", "cirrus"))
    res = cbh(ws, "retrain", "--cohort", str(cohort), env_extra=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert not (ws / "mlflow.db").exists()                        # nothing went to the embedded store

    # Prefect's API: the flow run, completed, on this server (whose database is PostgreSQL)
    runs = _api(f"{prefect_url}/flow_runs/filter", {"sort": "START_TIME_DESC"}, auth)
    flows = {f["id"]: f["name"] for f in _api(f"{prefect_url}/flows/filter", {}, auth)}
    retrain = [r for r in runs if flows.get(r["flow_id"]) == "cbh-retrain"]
    assert len(retrain) == 1 and retrain[0]["state_type"] == "COMPLETED", [(r["name"], r["state_type"]) for r in runs]
    import psycopg2
    conn = psycopg2.connect(host="127.0.0.1", port=info["postgres"]["port"], user="cbh",
                            password=(state / "pgpass").read_text().strip(), dbname="prefect")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM flow_run WHERE id = %s", (retrain[0]["id"],))
        assert cur.fetchone()[0] == 1
    conn.close()

    # MLflow's API: the run with its metrics, the registered model and its aliases
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    champ = client.get_model_version_by_alias("cerebellar-hypoplasia", "champion")
    chal = client.get_model_version_by_alias("cerebellar-hypoplasia", "challenger")
    assert str(champ.version) == str(chal.version) == "1"
    run = client.get_run(champ.run_id)
    assert {"test_auc", "test_dice_cerebellum"} <= set(run.data.metrics)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")    # served by the tracking server
    assert "report" in {a.path for a in client.list_artifacts(champ.run_id)}
    import mlflow
    mlflow.set_tracking_uri(mlflow_url)                            # the registry too (it follows the tracking URI)
    model = mlflow.artifacts.download_artifacts(artifact_uri="models:/cerebellar-hypoplasia@champion",
                                                dst_path=str(tmp_path / "champion"))
    assert (Path(model) / "MLmodel").is_file()                   # fetched through the server
    assert list(Path(info["mlflow"]["artifacts"]).rglob("MLmodel")), "the model is not in the server's artifact root"


def test_schedule_against_the_running_prefect_server(servers):
    ws, state, info, _ = servers
    env = _credentials(state)
    auth = env["PREFECT_API_AUTH_STRING"]
    sch = cbh(ws, "schedule", "--cron", CRON, "--pool", "cpu", "--train-pool", "gpu", env_extra=env)
    assert sch.returncode == 0, (sch.stdout + sch.stderr)[-3000:]
    deployments = _api(f"{info['prefect']['url']}/deployments/filter", {}, auth)
    by_name = {d["name"]: d for d in deployments}
    crons = [s["schedule"].get("cron") for s in by_name["scheduled-retrain-cpu"]["schedules"]]
    assert crons == [CRON]
    assert by_name["scheduled-retrain-cpu"]["work_pool_name"] == "cpu"
    assert by_name["train-gpu"]["work_pool_name"] == "gpu"
    # the server's scheduler (a long-running server, unlike the embedded one) creates the next runs
    deadline, scheduled = time.monotonic() + 90, []
    while time.monotonic() < deadline and not scheduled:
        scheduled = _api(f"{info['prefect']['url']}/flow_runs/filter",
                         {"deployments": {"id": {"any_": [by_name["scheduled-retrain-cpu"]["id"]]}},
                          "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}, auth)
        time.sleep(2)
    assert scheduled, "the Prefect server scheduled no run of the deployment"
    starts = sorted(r["next_scheduled_start_time"] for r in scheduled)
    import datetime as dt
    first = dt.datetime.fromisoformat(starts[0].replace("Z", "+00:00"))
    assert (first.weekday(), first.hour, first.minute) == (0, 3, 17)    # Monday 03:17 (UTC, the default)
    listed = cbh(ws, "schedule", "--list", env_extra=env)
    line = next(x for x in listed.stdout.splitlines() if x.startswith("scheduled-retrain-cpu"))
    assert CRON in line and "none yet" not in line
