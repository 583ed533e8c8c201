"""Shared fixtures: configs composed with Hydra's compose API into a temp folder, and
``python -m so8t_exp.*`` subprocesses against a private sqlite MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from so8t_exp import config as _config  # noqa: F401  (registers the schemas)
from so8t_exp.paths import config_dir, sqlite_uri

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A fresh sqlite tracking URI in the test's temp folder."""
    return sqlite_uri(tmp_path / "mlruns" / "mlflow.db")


@pytest.fixture
def compose_cfg(tmp_path: Path, store: str):
    """Compose ``train.yaml`` with overrides, tracking and outputs pointed at ``tmp_path``."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(
                "train",
                overrides=[f"tracking.uri={store}", "trainer.progress_bar=false", *overrides],
            )

    return _compose


def train_cmd(store: str, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "so8t_exp.train",
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "trainer.progress_bar=false",
        *overrides,
    ]


def sweep_cmd(store: str, sweep: Path, *overrides: str) -> list[str]:
    """``python -m so8t_exp.train -m`` of the smoke experiment into ``sweep``."""
    return [
        sys.executable,
        "-m",
        "so8t_exp.train",
        "-m",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={sweep}",
        "trainer.progress_bar=false",
        "+experiment=smoke",
        *overrides,
    ]


def run_at_once(
    cmd: list[str], n: int, cwd: Path, env: dict[str, str], timeout: float = 600
) -> tuple[list[int], list[str]]:
    """Start ``n`` copies of ``cmd`` together; their exit codes and outputs."""
    procs = [
        subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(n)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SO8T_EXP_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_train(
    tmp_path: Path, store: str, run_dir: Path, *overrides: str, env=None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m so8t_exp.train`` to completion in a neutral working directory."""
    return subprocess.run(
        train_cmd(store, run_dir, *overrides),
        cwd=tmp_path,
        env=env or subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_train(
    tmp_path: Path, store: str, run_dir: Path, *overrides: str, env=None
) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        train_cmd(store, run_dir, *overrides),
        cwd=tmp_path,
        env=env or subprocess_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def session_info(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "session_info.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(
    predicate, timeout: float = 120, what: str = "condition", proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def only_run(store: str, experiment: str = "so8t"):
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def stop_at_step(
    tmp_path: Path,
    store: str,
    run_dir: Path,
    overrides,
    step: int,
    sig: int = signal.SIGKILL,
    env=None,
) -> subprocess.Popen:
    """Start a trainer, wait until it has checkpointed step ``step``, send ``sig``, wait."""
    proc = start_train(tmp_path, store, run_dir, *overrides, env=env)
    wait_for(
        lambda: session_info(run_dir).get("current_step", 0) >= step, proc=proc, what=f"step {step}"
    )
    proc.send_signal(sig)
    proc.wait(60)
    return proc


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts): its URI."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path / "server"
    home.mkdir()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", sqlite_uri(home / "srv.db")]
    cmd += ["--artifacts-destination", str(home / "artifacts")]
    with open(home / "server.log", "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, proc=proc, timeout=180, what="mlflow server")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
