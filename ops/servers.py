"""Team servers on this machine: a PostgreSQL server (Debian's package, on 127.0.0.1 only), a
Prefect server on it and an MLflow tracking server with a PostgreSQL backend store and a local
(or remote) artifact root, proxied by the server so clients need no access to it.

Both servers ask for a login. MLflow runs its basic-auth app (users and per-experiment and
per-model permissions in its own database, `mlflow_auth`; the admin `cbh-admin` is made on
first start, and new users get READ); Prefect checks one API auth string (`cbh:<token>`) on
every request. They listen on `--host` (127.0.0.1 by default; a team's address behind a
TLS-terminating reverse proxy, docs/operator.md).

`cbh servers up` starts them and writes `.cbh/servers/env` (mode 600: the two URLs and the
credentials clients need); `cbh servers down` stops them by PID; `cbh servers status` says what
runs. Every secret is made on first start and kept in a file of mode 600 in the state folder
(`pgpass`, `mlflow-admin`, `prefect-auth`, `flask-secret`; never in git, never on a command
line, never printed): the servers read them from their environment or from MLflow's auth
config file (`mlflow-auth.ini`, mode 600).

PostgreSQL refuses to run as root; as root its cluster runs as Debian's `postgres` user, in a
folder of that user's (`/var/lib/postgresql/cbh/<key of the state folder>`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import EXIT_UNAVAILABLE, CbhError

DB_USER = "cbh"
DATABASES = ("prefect", "mlflow", "mlflow_auth")
MLFLOW_ADMIN = "cbh-admin"
PREFECT_USER = "cbh"


class ServersError(CbhError, RuntimeError):
    """A server could not be started or stopped; the message says which and why."""

    exit_code = EXIT_UNAVAILABLE


@dataclass(frozen=True)
class Ports:
    postgres: int = 5433
    prefect: int = 4200
    mlflow: int = 5000


def pg_bindir() -> Path:
    """Debian's PostgreSQL server programs (the newest installed version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise ServersError("PostgreSQL's server is not installed: run `make postgres` (Debian's postgresql package)")


def _as_root() -> bool:
    return os.geteuid() == 0


def _pg_run(args: list[str]) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program, as `postgres` when we are root (the server refuses root)."""
    argv = ["runuser", "-u", "postgres", "--", *args] if _as_root() else args
    try:
        return subprocess.run(argv, capture_output=True, text=True)
    except OSError as exc:
        raise ServersError(f"cannot run {argv[0]} ({exc.strerror or exc}); as root, PostgreSQL needs "
                           "Debian's postgres user and runuser") from exc


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                           # a zombie (our own exited child) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _ours(pid: int | None, word: str) -> bool:
    """`pid` is alive and is that server (its command line names it): a PID recorded before a
    reboot may belong to another program now, which must never be stopped."""
    if not _alive(pid):
        return False
    try:
        return word.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True                                   # no /proc: trust the PID


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def basic_auth(user_and_password: str) -> str:
    """The Authorization header value of HTTP basic authentication."""
    import base64

    return "Basic " + base64.b64encode(user_and_password.encode()).decode()


def _wait_http(url: str, what: str, log: Path, pid: int, timeout: float = 180.0, auth: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Authorization": basic_auth(auth)} if auth else {})
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise ServersError(f"{what} exited while starting; see {log}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise ServersError(f"{what} did not answer {url} within {timeout:.0f} s; see {log}")


def read_state(state_file: Path) -> dict:
    """A service folder's state (PIDs, ports, URLs), {} before the first start."""
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def write_state(state_file: Path, state: dict) -> None:
    """Replace the state atomically (a reader never sees half of it)."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file)


def spawn(log_dir: Path, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, Path]:
    """Start a background service in its own session (so its whole process group can be
    stopped), output appended to `<log_dir>/<name>.log`; returns its PID and log."""
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    return proc.pid, log


class Servers:
    """The three servers of one state folder (default `.cbh/servers` in the workspace)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir.resolve()
        self.state_file = self.dir / "servers.json"
        self.env_file = self.dir / "env"
        self.pgpass = self.dir / "pgpass"
        if _as_root():
            key = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
            self.pg_home = Path("/var/lib/postgresql/cbh") / key
        else:
            self.pg_home = self.dir / "postgres"
        self.pg_data = self.pg_home / "data"
        self.pg_log = self.pg_home / "postgres.log"

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return read_state(self.state_file)

    def _save(self, state: dict) -> None:
        write_state(self.state_file, state)

    def _secret(self, name: str) -> str:
        """A secret of the state folder, made on first use in a file of mode 600."""
        path = self.dir / name
        if not path.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def _password(self) -> str:
        return self._secret(self.pgpass.name)

    def credentials(self) -> dict[str, str]:
        """What a client needs to log in to both servers, as environment variables."""
        return {"MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN, "MLFLOW_TRACKING_PASSWORD": self._secret("mlflow-admin"),
                "PREFECT_API_AUTH_STRING": f"{PREFECT_USER}:{self._secret('prefect-auth')}"}

    def _write_private(self, path: Path, text: str) -> None:
        """Write a file only its owner can read (created 600, then replaced atomically)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)

    def _db_url(self, driver: str, database: str, port: int) -> str:
        return f"postgresql+{driver}://{DB_USER}:{self._password()}@127.0.0.1:{port}/{database}"

    # -- PostgreSQL -------------------------------------------------------------------------
    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.pg_data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _init_postgres(self, bindir: Path) -> None:
        if (self.pg_data / "PG_VERSION").is_file():
            return
        self.pg_home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.pg_home, delete=False) as pw:
            pw.write(self._password() + "\n")
        try:
            if _as_root():
                try:
                    shutil.chown(self.pg_home, "postgres", "postgres")
                    shutil.chown(pw.name, "postgres", "postgres")
                except LookupError as exc:
                    raise ServersError("PostgreSQL refuses to run as root, and there is no postgres user to "
                                       "run it as: run `make postgres` (Debian's package makes it)") from exc
            res = _pg_run([str(bindir / "initdb"), "-D", str(self.pg_data), "-U", DB_USER, f"--pwfile={pw.name}",
                           "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                           "--locale=C.UTF-8"])
        finally:
            os.unlink(pw.name)
        if res.returncode != 0:
            raise ServersError(f"initdb failed in {self.pg_data}: {res.stderr.strip()[-500:]}")

    def _start_postgres(self, port: int) -> int:
        bindir = pg_bindir()
        self._init_postgres(bindir)
        pid = self._postmaster_pid()
        if _ours(pid, "postgres"):
            return pid
        if not _port_free(port):
            raise ServersError(f"port {port} on 127.0.0.1 is taken: choose another with --postgres-port")
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
        res = _pg_run([str(bindir / "pg_ctl"), "-D", str(self.pg_data), "-l", str(self.pg_log), "-w", "-t", "120",
                       "-o", opts, "start"])
        pid = self._postmaster_pid()
        if res.returncode != 0 or not _alive(pid):
            raise ServersError(f"PostgreSQL did not start on port {port}: {res.stderr.strip()[-300:]}; "
                               f"see {self.pg_log}")
        self._create_databases(port)
        return pid

    def _create_databases(self, port: int) -> None:
        import psycopg2

        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=self._password(),
                                        dbname="postgres", connect_timeout=5)
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for db in DATABASES:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            conn.close()

    # -- Prefect and MLflow -----------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> tuple[int, Path]:
        return spawn(self.dir, name, argv, env, self.dir)

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_", "MLFLOW_BACKEND_"))}
        # the servers start helpers (uvicorn, gunicorn) by name: this environment's scripts first
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        return env

    def _start_prefect(self, port: int, pg_port: int, host: str) -> int:
        env = self._base_env()
        auth = self.credentials()["PREFECT_API_AUTH_STRING"]
        env.update(PREFECT_HOME=str(self.dir / "prefect-home"),
                   PREFECT_API_DATABASE_CONNECTION_URL=self._db_url("asyncpg", "prefect", pg_port),
                   PREFECT_SERVER_API_AUTH_STRING=auth)
        pid, log = self._spawn("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                           "--port", str(port)], env)
        _wait_http(f"http://127.0.0.1:{port}/api/health", "the Prefect server", log, pid, auth=auth)
        return pid

    def _start_mlflow(self, port: int, pg_port: int, artifacts: str, host: str) -> int:
        env = self._base_env()
        env["MLFLOW_BACKEND_STORE_URI"] = self._db_url("psycopg2", "mlflow", pg_port)
        # MLflow's basic-auth app: its users and permissions in their own database; the admin is
        # made on first start from this file (mode 600), which also holds that database's URL
        ini = self.dir / "mlflow-auth.ini"
        self._write_private(ini, "[mlflow]\ndefault_permission = READ\n"
                                 f"database_uri = {self._db_url('psycopg2', 'mlflow_auth', pg_port)}\n"
                                 f"admin_username = {MLFLOW_ADMIN}\n"
                                 f"admin_password = {self._secret('mlflow-admin')}\n"
                                 "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=self._secret("flask-secret"))
        pid, log = self._spawn("mlflow", [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                                          "--host", host, "--port", str(port), "--serve-artifacts",
                                          "--artifacts-destination", artifacts, "--workers", "2"], env)
        _wait_http(f"http://127.0.0.1:{port}/health", "the MLflow tracking server", log, pid)
        return pid

    # -- commands ---------------------------------------------------------------------------
    def up(self, ports: Ports = Ports(), artifacts: str | None = None, host: str = "127.0.0.1") -> dict:
        """Start what is not running, Prefect and MLflow listening on `host`; returns the state
        (PIDs, ports, URLs; no secret)."""
        state = self.state()
        self.dir.mkdir(parents=True, exist_ok=True)
        artifacts = artifacts or str(self.dir / "mlartifacts")
        if "://" not in artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
        pg = state.get("postgres", {})
        pg_port = pg.get("port", ports.postgres) if _ours(pg.get("pid"), "postgres") else ports.postgres
        state["postgres"] = {"pid": self._start_postgres(pg_port), "port": pg_port, "data": str(self.pg_data),
                             "log": str(self.pg_log)}
        self._save(state)
        for name, port, start in (("prefect", ports.prefect, lambda p: self._start_prefect(p, pg_port, host)),
                                  ("mlflow", ports.mlflow, lambda p: self._start_mlflow(p, pg_port, artifacts, host))):
            old = state.get(name, {})
            if _ours(old.get("pid"), name):
                continue
            if not _port_free(port):
                raise ServersError(f"port {port} on 127.0.0.1 is taken: choose another with --{name}-port")
            state[name] = {"pid": start(port), "port": port, "log": str(self.dir / f"{name}.log"), "host": host}
            self._save(state)
        # this machine reaches them on the loopback whatever they listen on; others on the host given
        state["prefect"]["url"] = f"http://127.0.0.1:{state['prefect']['port']}/api"
        state["mlflow"]["url"] = f"http://127.0.0.1:{state['mlflow']['port']}"
        state["mlflow"]["artifacts"] = artifacts
        self._save(state)
        lines = [f"export PREFECT_API_URL={state['prefect']['url']}",
                 f"export MLFLOW_TRACKING_URI={state['mlflow']['url']}",
                 *(f"export {k}={v}" for k, v in self.credentials().items())]
        self._write_private(self.env_file, "\n".join(lines) + "\n")
        return state

    def down(self, purge: bool = False, timeout: float = 60.0) -> list[str]:
        """Stop the servers by PID (MLflow and Prefect with their worker processes, then
        PostgreSQL by a fast shutdown); with `purge`, delete the database cluster too."""
        state = self.state()
        stopped = []
        for name in ("mlflow", "prefect"):
            pid = state.get(name, {}).get("pid")
            if _ours(pid, name):
                try:
                    os.killpg(pid, signal.SIGTERM)       # the server and the workers it started
                except ProcessLookupError:
                    pass
                stopped.append(name)
        pg_pid = state.get("postgres", {}).get("pid") or self._postmaster_pid()
        if _ours(pg_pid, "postgres"):
            os.kill(pg_pid, signal.SIGINT)                # PostgreSQL's fast shutdown
            stopped.append("postgres")
        else:
            pg_pid = None
        deadline = time.monotonic() + timeout
        pids = [state.get(n, {}).get("pid") if n in stopped else None for n in ("mlflow", "prefect")] + [pg_pid]
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids[:2]:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        if _alive(pg_pid):
            raise ServersError(f"PostgreSQL (pid {pg_pid}) did not stop within {timeout:.0f} s; see {self.pg_log}")
        for name in ("mlflow", "prefect", "postgres"):
            state.get(name, {}).pop("pid", None)
        if state:
            self._save(state)
        if purge:
            shutil.rmtree(self.pg_home, ignore_errors=True)
            shutil.rmtree(self.dir, ignore_errors=True)
        return stopped

    def status(self) -> list[str]:
        state = self.state()
        lines = []
        for name in ("postgres", "prefect", "mlflow"):
            s = state.get(name, {})
            where = s.get("url") or (f"127.0.0.1:{s['port']}" if s.get("port") else "")
            lines.append(f"{name:9s} {'running' if _ours(s.get('pid'), name) else 'stopped':8s} {where}")
        return lines
