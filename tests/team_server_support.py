"""The team tracking server for tests: ``scripts/team_server.sh --local-postgres`` — a real
PostgreSQL cluster of its own (Debian's ``postgresql`` package) on a free port and a real
``mlflow server`` with proxied artifacts on 127.0.0.1 — started and stopped around a module."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_for

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "team_server.sh"


def pg_bin() -> Path | None:
    """PostgreSQL's bin folder, found the way the script finds it; None if not installed."""
    if found := os.environ.get("PG_BIN"):
        return Path(found)
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")],
    )
    if debian:
        return Path(debian[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TeamServer:
    uri: str  # the tracking URI clients use
    artifacts: Path  # --artifacts-destination, on the server's disk
    db_url: str  # the backend store, for reading it directly (psycopg2)
    log: Path


@contextlib.contextmanager
def team_server(root: Path) -> Iterator[TeamServer]:
    """Start the script, wait for ``/health``, yield the server, stop it (and PostgreSQL)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL is not installed (Debian/Ubuntu: apt-get install postgresql; "
            "or set PG_BIN): the team tracking server tests need its initdb and pg_ctl"
        )
    # The cluster's folder must be reachable by the user PostgreSQL runs as (as root: the
    # `postgres` user), which pytest's private /tmp/pytest-of-<user>/ is not.
    pg_dir = Path(tempfile.mkdtemp(prefix="so8t-team-pg-"))
    os.chmod(pg_dir, 0o755)
    pg_port, port = free_port(), free_port()
    artifacts = root / "artifacts"
    log = root / "team_server.log"
    cmd = ["bash", str(SCRIPT), "--local-postgres", str(pg_dir), "--pg-port", str(pg_port)]
    cmd += ["--artifacts", str(artifacts), "--port", str(port), "--workers", "1"]
    env = {**os.environ, "PG_BIN": str(bin_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                return r.status == 200 and "tracking URI: " in log.read_text()
        except OSError:
            return False

    try:
        try:
            wait_for(healthy, proc=proc, timeout=240, what="the team server")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{log.read_text()[-4000:]}") from None
        password = (pg_dir / "password").read_text().strip()
        db_url = f"postgresql://mlflow:{password}@127.0.0.1:{pg_port}/mlflow"
        yield TeamServer(uri=uri, artifacts=artifacts, db_url=db_url, log=log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # its trap stops mlflow, then PostgreSQL
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Whatever happened to the script, PostgreSQL must not outlive the tests.
        subprocess.run(
            ["bash", str(SCRIPT), "--local-postgres", str(pg_dir), "--stop"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(pg_dir, ignore_errors=True)
