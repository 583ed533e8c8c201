"""Every user error: one line ``error: ...`` (no traceback unless ``HYDRA_FULL_ERROR=1``)
and the exit code the README documents — config 2, unknown run 4, tracking store
unreachable or unusable 6, the session's run missing from the store 7."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from so8t_exp import sessions
from so8t_exp.cli_errors import config_error_line
from so8t_exp.paths import config_dir
from so8t_exp.session import Session, SessionInfo
from so8t_exp.tracking import Tracker
from so8t_exp.tracking.errors import (
    HTTP_LIMITS,
    RunNotFound,
    TrackingUnavailable,
    bound_http_retries,
    check_store,
    http_call_bound_seconds,
)
from so8t_exp.tracking.metrics import retry
from tests.conftest import run_train, session_info, subprocess_env

UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"


def closed_port_uri() -> str:
    """An http URI nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def one_error_line(stderr: str) -> str:
    """The stderr of a refused command: no traceback, and an ``error:`` line last."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


# -- messages, without a process -------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_step=3", "trainer.max_step: not a key of the schema (TrainerConfig); "
         "did you mean trainer.max_steps?"),
        ("trainer.max_steps=many", "trainer.max_steps: Value 'many' of type 'str' could not"),
        ("model=nonexist", "model=nonexist: no such config; choose one of: borea_phi35_so8t"),
        ("+experiment=nope", "experiment=nope: no such config; choose one of: borea, smoke"),
        ("trainer.max_steps=[1", "cannot parse override 'trainer.max_steps=[1'"),
    ],
)  # fmt: skip
def test_hydra_config_errors_read_as_one_line(override: str, expected: str):
    with (
        initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"),
        pytest.raises(Exception) as err,
    ):
        compose("train", overrides=[override])
    line = config_error_line(err.value)
    assert line.startswith(expected) and "\n" not in line


# -- MLflow's own HTTP retries ----------------------------------------------------------
def test_one_mlflow_call_is_bounded_to_about_30_seconds(monkeypatch):
    for name in HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert http_call_bound_seconds() > 300  # MLflow's defaults: minutes
    bound_http_retries()
    assert http_call_bound_seconds() <= 30


def test_what_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"


def test_unreachable_store_is_retried_one_line_per_try_then_gives_up(caplog):
    client = MlflowClient(closed_port_uri())
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(TrackingUnavailable) as err:
        retry("read the experiment", 5.0, client.get_experiment_by_name, "so8t")
    assert time.monotonic() - started < 5.0 + 30
    tries = [r for r in caplog.records if "could not read the experiment" in r.getMessage()]
    assert tries and all("\n" not in r.getMessage() for r in tries)
    assert "Connection refused" in str(err.value) and "startup_timeout_seconds" in str(err.value)


def test_a_refusal_is_not_retried(store: str):
    tracker = Tracker(store, startup_seconds=60)
    started = time.monotonic()
    with pytest.raises(RunNotFound, match=UNKNOWN_RUN):
        tracker.start("so8t", None, UNKNOWN_RUN)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("kind", ["folder", "not a database", "parent is a file"])
def test_an_unusable_sqlite_store_fails_at_once(tmp_path: Path, kind: str):
    path = {
        "folder": tmp_path,
        "not a database": tmp_path / "junk.db",
        "parent is a file": tmp_path / "junk.db" / "mlflow.db",
    }[kind]
    (tmp_path / "junk.db").write_text("not sqlite\n")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="tracking store sqlite:///"):
        Tracker(f"sqlite:///{path}")
    assert time.monotonic() - started < 5  # MLflow alone retries ~100 s


def test_a_fresh_sqlite_store_passes(tmp_path: Path):
    check_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")


# -- sessions: Hydra-style overrides, unknown ids ---------------------------------------
def test_sessions_takes_key_value_overrides(store: str, capsys):
    assert sessions.main([f"tracking.uri={store}", "tracking.experiment=other"]) == 0
    assert capsys.readouterr().out.strip() == "no sessions"
    assert sessions.main(["list", f"tracking.uri={store}"]) == 0


@pytest.mark.parametrize("command", ["show", "abandon"])
def test_sessions_unknown_run_exits_4(store: str, capsys, command: str):
    assert sessions.main([command, UNKNOWN_RUN, f"tracking.uri={store}"]) == 4
    assert one_error_line(capsys.readouterr().err) == (
        f"error: run {UNKNOWN_RUN} is not in the tracking store {store}"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tracking.ur=x"], "tracking.ur: not a key of the schema"),
        (["+resume.foo=1"], "resume.foo: not a key of the schema"),
        (["resume.stale_after_seconds=-1"], "resume.stale_after_seconds=-1.0: must be > 0"),
        (["lst"], "unexpected 'lst'"),
        (["show"], "show needs a RUN_ID"),
    ],
)
def test_sessions_bad_arguments_exit_2(store: str, capsys, argv, message):
    assert sessions.main([*argv, f"tracking.uri={store}"]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_sessions_unreachable_store_exits_6(capsys):
    uri = closed_port_uri()
    assert sessions.main([f"tracking.uri={uri}", "tracking.startup_timeout_seconds=0"]) == 6
    line = one_error_line(capsys.readouterr().err)
    assert "unreachable" in line and uri in line


# -- the commands, as a user meets them --------------------------------------------------
def cli(tmp_path: Path, module: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env=env or subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_step=10", "error: trainer.max_step: not a key of the schema"),
        ("+trainer.max_step=10", "error: trainer.max_step: not a key of the schema"),
        ("model=nonexist", "error: model=nonexist: no such config"),
        ("checkpoint.every_n_steps=-1", "error: checkpoint.every_n_steps=-1: must be >= 0"),
    ],
)
def test_train_config_errors_exit_2_in_one_line(tmp_path, store, override, message):
    out = run_train(tmp_path, store, tmp_path / "run", override)
    assert out.returncode == 2
    assert one_error_line(out.stderr).startswith(message)
    assert not (tmp_path / "run" / "session_info.json").exists()


@pytest.mark.slow
def test_hydra_full_error_adds_the_traceback(tmp_path, store):
    env = subprocess_env(tmp_path, HYDRA_FULL_ERROR="1")
    out = run_train(tmp_path, store, tmp_path / "run", "trainer.max_step=10", env=env)
    assert out.returncode == 2 and "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: trainer.max_step")


@pytest.mark.slow
def test_train_unreachable_store_exits_6_after_the_startup_timeout(tmp_path):
    uri = closed_port_uri()
    started = time.monotonic()
    out = run_train(tmp_path, uri, tmp_path / "run", "tracking.startup_timeout_seconds=3")
    assert out.returncode == 6
    line = one_error_line(out.stderr)
    assert "unreachable for 3 s" in line and uri in line
    assert "try 1 failed" in out.stdout  # one line per try
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_a_run_missing_from_the_store_exits_7_and_marks_the_session_lost(tmp_path, store):
    # A session folder whose run the store does not have (its mlflow.db was replaced).
    run_dir = tmp_path / "run"
    session = Session(run_dir)
    session.info = SessionInfo(session_id=UNKNOWN_RUN, status="interrupted", tracking_uri=store)
    session.save()
    started = time.monotonic()
    out = run_train(tmp_path, store, run_dir)
    assert out.returncode == 7
    line = one_error_line(out.stderr)
    assert UNKNOWN_RUN in line and "hydra.run.dir" in line and "tracking.uri" in line
    assert session_info(run_dir)["status"] == "lost"
    assert time.monotonic() - started < 90  # not retried


@pytest.mark.slow
def test_resume_unknown_run_exits_4_and_empty_dry_run_says_so(tmp_path, store):
    out = cli(tmp_path, "so8t_exp.resume", f"tracking.uri={store}", f"resume.run_id={UNKNOWN_RUN}")
    assert out.returncode == 4
    assert one_error_line(out.stderr).startswith(f"error: run {UNKNOWN_RUN} is not in the")
    dry = cli(tmp_path, "so8t_exp.resume", f"tracking.uri={store}", "resume.dry_run=true")
    assert dry.returncode == 0
    assert "no unfinished runs in experiment(s) so8t" in dry.stdout
    assert dry.stdout.strip().splitlines()[-1] == "dry run: nothing to resume"


@pytest.mark.slow
def test_resume_config_error_exits_2(tmp_path, store):
    out = cli(tmp_path, "so8t_exp.resume", f"tracking.uri={store}", "resume.max_attempt=3")
    assert out.returncode == 2
    assert "did you mean resume.max_attempts?" in one_error_line(out.stderr)
