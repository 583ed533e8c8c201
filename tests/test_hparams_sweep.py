"""``python -m so8t_exp.train -m hparams_search=...`` end to end: real subprocesses, a real
sqlite MLflow store and Optuna storage, tiny trials of the smoke experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from so8t_exp.paths import sqlite_uri
from tests.conftest import run_at_once, session_info, subprocess_env, wait_for

pytestmark = pytest.mark.slow

STUDY = "t"


def sweep_cmd(home: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "so8t_exp.train",
        "-m",
        "hparams_search=eval_loss",
        f"tracking.uri={sqlite_uri(home / 'mlruns' / 'mlflow.db')}",
        "+experiment=smoke",
        "trainer.progress_bar=false",
        "trainer.max_steps=6",
        "trainer.eval_every_n_steps=3",
        "checkpoint.every_n_steps=2",
        "tracking.log_models=[]",
        f"hydra.sweeper.study_name={STUDY}",
        "hydra.sweeper.n_trials=3",
        *extra,
    ]


def run(home: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """The sweep command (with ``extra`` arguments) to its end."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        sweep_cmd(home, *extra),
        cwd=home,
        env=subprocess_env(home, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def trials(home: Path) -> list[optuna.trial.FrozenTrial]:
    storage = sqlite_uri(home / "mlruns" / "optuna.db")
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials()


def mlflow_runs(home: Path) -> tuple[list, list]:
    client = MlflowClient(sqlite_uri(home / "mlruns" / "mlflow.db"))
    found = client.search_runs([client.get_experiment_by_name("so8t").experiment_id])
    parents = [r for r in found if r.data.tags.get("so8t.sweep.parent") == "true"]
    return parents, [r for r in found if r not in parents]


def check_complete_sweep(home: Path) -> list[optuna.trial.FrozenTrial]:
    """3 finished trials in folders 0-2, one parent run, one child per trial, linked."""
    done = trials(home)
    assert [t.number for t in done] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in done), [t.state for t in done]
    sweep = home / "multirun" / "sweeps" / STUDY
    assert all((sweep / str(t.number) / "session_info.json").is_file() for t in done)
    parents, children = mlflow_runs(home)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_trial = {c.data.tags["optuna.trial.number"]: c for c in children}
    assert sorted(by_trial) == ["0", "1", "2"]
    assert all(c.data.tags["optuna.trial.state"] == "COMPLETE" for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["so8t.sweep.best_trial"] in by_trial
    history = MlflowClient(sqlite_uri(home / "mlruns" / "mlflow.db")).get_metric_history(
        parent.info.run_id, "sweep/objective"
    )
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert (sweep / "optimization_results.yaml").is_file()
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The home of an uninterrupted sweep (same seed as every test's)."""
    home = tmp_path_factory.mktemp("reference")
    out = run(home)
    assert out.returncode == 0, out.stderr[-3000:]
    return home


def test_sweep_runs_n_trials_as_children_of_one_parent(reference: Path):
    check_complete_sweep(reference)
    parent = mlflow_runs(reference)[0][0]
    assert (
        parent.info.status == "FINISHED" and parent.data.tags["so8t.sweep.trials_finished"] == "3"
    )
    command = json.loads(
        (reference / "multirun" / "sweeps" / STUDY / "sweep_command.json").read_text()
    )
    assert "hydra.sweeper.n_trials=3" in command["overrides"]
    # the same command again: nothing more to do, nothing new
    out = run(reference)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(trials(reference)) == 3 and len(mlflow_runs(reference)[1]) == 3


def kill_during_trial_1(home: Path, log_file: Path) -> Path:
    """Start the sweep, SIGKILL it (the sweeper and its in-process trainer) once trial 1
    has a checkpoint; trial 1's job folder."""
    home.mkdir(parents=True, exist_ok=True)
    job = home / "multirun" / "sweeps" / STUDY / "1"
    slow = {"SO8T_FAULT_STEP_SECONDS": "0.3"}  # time to be killed mid-trial
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            sweep_cmd(home),
            cwd=home,
            env=subprocess_env(home, **slow),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: session_info(job).get("current_step", 0) >= 2, 300, "a checkpoint")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [t.state for t in trials(home)] == [TrialState.COMPLETE, TrialState.RUNNING]
    return job


def check_same_as(done: list, reference_home: Path) -> None:
    reference = trials(reference_home)
    assert [t.params for t in done] == [t.params for t in reference]
    # (bit-exact resume: even the values match)
    assert [t.value for t in done] == [t.value for t in reference]
    assert json.loads(json.dumps(done[1].intermediate_values)) == json.loads(
        json.dumps(reference[1].intermediate_values)
    )


def test_killed_sweep_continues_exactly(tmp_path: Path, reference):
    killed = tmp_path / "killed"
    job = kill_during_trial_1(killed, tmp_path / "sweep.log")
    run_id = session_info(job)["session_id"]

    out = run(killed, SO8T_FAULT_STEP_SECONDS="0.3")  # the same command: continues
    assert out.returncode == 0, out.stderr[-3000:]
    done = check_complete_sweep(killed)
    info = session_info(job)
    assert info["session_id"] == run_id and info["resumes"] == 1 and info["status"] == "completed"
    assert not (killed / "multirun" / "sweeps" / STUDY / "3").exists()
    check_same_as(done, reference)


def resume_cmd(home: Path, *extra: str) -> list[str]:
    store = sqlite_uri(home / "mlruns" / "mlflow.db")
    return [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={store}", *extra]


def test_killed_sweep_is_continued_once_by_two_launchers(tmp_path: Path, reference):
    """At boot: the launcher continues the sweep (not its trial alone); two at once, once."""
    home = tmp_path / "home"
    job = kill_during_trial_1(home, tmp_path / "sweep.log")
    env = subprocess_env(home)
    dry = subprocess.run(
        resume_cmd(home, "resume.dry_run=true"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    lines = dry.stdout.splitlines()
    assert any("resume" in ln and "sweep, running, dead, 1/3 trials" in ln for ln in lines), lines
    assert any("continues when its sweep does" in ln for ln in lines), lines

    codes, outputs = run_at_once(resume_cmd(home), 2, tmp_path, env)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    done = check_complete_sweep(home)
    info = session_info(job)
    assert info["resumes"] == 1 and info["status"] == "completed"  # continued once
    assert not (home / "multirun" / "sweeps" / STUDY / "3").exists()
    check_same_as(done, reference)
    parents, _ = mlflow_runs(home)
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["so8t.sweep.trials_finished"] == "3"
    again = subprocess.run(resume_cmd(home), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to resume" in again.stdout, again.stdout


def test_pruned_trial_stops_early_and_stays_pruned(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    # One completed trial is enough for the median; with seed 42, trial 1's first
    # evaluation (step 3 of 6) is worse than trial 0's: it is pruned there.
    extra = ("hydra.sweeper.n_trials=2", "hydra.sweeper.pruner.n_startup_trials=1")

    def go() -> subprocess.CompletedProcess:
        return run(home, *extra)

    out = go()
    assert out.returncode == 0, out.stderr[-3000:]
    done = trials(home)
    assert [t.state for t in done] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert list(done[1].intermediate_values) == [3]
    job = home / "multirun" / "sweeps" / STUDY / "1"
    assert session_info(job)["current_step"] == 3
    assert session_info(job)["status"] == "pruned"  # final, though short of max_steps
    assert json.loads((job / "trial_result.json").read_text())["state"] == "PRUNED"
    _, children = mlflow_runs(home)
    by_trial = {c.data.tags["optuna.trial.number"]: c for c in children}
    assert by_trial["1"].data.tags["optuna.trial.state"] == "PRUNED"
    # again: nothing to do, the pruned trial is not trained on
    out = go()
    assert out.returncode == 0, out.stderr[-3000:]
    assert [t.state for t in trials(home)] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert session_info(job)["current_step"] == 3


def test_second_sweeper_sigterm_and_changed_space(tmp_path: Path):
    """A second sweeper of a live sweep stops (exit 3) and leaves its run alone; SIGTERM
    stops the sweep with its trial RUNNING and checkpointed; a changed search space is
    refused without touching the study; then the same command finishes it."""
    home = tmp_path / "home"
    home.mkdir()
    # Slow enough that trial 0 is still training after a whole second sweeper's start.
    slow = {"SO8T_FAULT_STEP_SECONDS": "3"}
    env = subprocess_env(home, **slow)
    job = home / "multirun" / "sweeps" / STUDY / "0"
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(
            sweep_cmd(home), cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: session_info(job).get("current_step", 0) >= 2, 300, "a checkpoint")
            second = run(home, **slow)
            assert second.returncode == 3, second.stderr[-3000:]
            assert "another sweeper is running this sweep" in second.stderr
            parents, _ = mlflow_runs(home)
            assert [p.info.status for p in parents] == ["RUNNING"]  # (not closed by the second)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == 143
    assert [t.state for t in trials(home)] == [TrialState.RUNNING]
    assert session_info(job)["status"] == "interrupted"
    assert mlflow_runs(home)[0][0].info.status == "KILLED"

    command = (home / "multirun" / "sweeps" / STUDY / "sweep_command.json").read_text()
    out = run(home, "trainer.optimizer.lr=interval(0.001,0.002)")
    assert out.returncode == 2 and "use a new hydra.sweeper.study_name" in out.stderr, out.stderr[
        -2000:
    ]
    assert "Traceback" not in out.stderr
    # the refused command is not what the launcher would run at boot
    assert (home / "multirun" / "sweeps" / STUDY / "sweep_command.json").read_text() == command
    assert [t.state for t in trials(home)] == [TrialState.RUNNING]

    out = run(home)
    assert out.returncode == 0, out.stderr[-3000:]
    check_complete_sweep(home)
    assert session_info(job)["resumes"] == 1


def test_failed_trials_within_max_failures(tmp_path: Path):
    """A trial whose training raises is FAIL; within ``max_failures`` the sweep goes on and
    ends FINISHED; one more stops it with an error naming the setting."""
    home = tmp_path / "home"
    fail = {"SO8T_FAULT_FAIL_AT_STEP": "2"}
    out = run(home, "hydra.sweeper.n_trials=1", "hydra.sweeper.max_failures=1", **fail)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [t.state for t in trials(home)] == [TrialState.FAIL]
    parents, children = mlflow_runs(home)
    assert parents[0].info.status == "FINISHED"
    assert children[0].data.tags["optuna.trial.state"] == "FAIL"

    out = run(home, "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failures=1", **fail)
    assert out.returncode == 1 and "hydra.sweeper.max_failures=1" in out.stderr, out.stderr[-3000:]
    assert [t.state for t in trials(home)] == [TrialState.FAIL, TrialState.FAIL]
    # final for the launcher (each boot would fail one more trial)
    assert "max_failures" in mlflow_runs(home)[0][0].data.tags["so8t.given_up"]
