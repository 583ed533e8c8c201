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
from tests.conftest import session_info, subprocess_env, wait_for

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


def run(home: Path, **env: str) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        sweep_cmd(home),
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


def test_sweep_runs_n_trials_as_children_of_one_parent(tmp_path: Path):
    home = tmp_path / "home"
    out = run(home)
    assert out.returncode == 0, out.stderr[-3000:]
    check_complete_sweep(home)
    # the same command again: nothing more to do, nothing new
    out = run(home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(trials(home)) == 3 and len(mlflow_runs(home)[1]) == 3


def test_killed_sweep_continues_exactly(tmp_path: Path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir()
    job = killed / "multirun" / "sweeps" / STUDY / "1"
    slow = {"SO8T_FAULT_STEP_SECONDS": "0.3"}  # time to be killed mid-trial
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(
            sweep_cmd(killed),
            cwd=killed,
            env=subprocess_env(killed, **slow),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: session_info(job).get("current_step", 0) >= 2, 300, "a checkpoint")
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # the sweeper and its in-process trainer
            proc.wait()
    before = trials(killed)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    run_id = session_info(job)["session_id"]

    out = run(killed, **slow)  # the same command: continues
    assert out.returncode == 0, out.stderr[-3000:]
    done = check_complete_sweep(killed)
    info = session_info(job)
    assert info["session_id"] == run_id and info["resumes"] == 1 and info["status"] == "completed"
    assert not (killed / "multirun" / "sweeps" / STUDY / "3").exists()

    out = run(reference)  # uninterrupted, same seed: the same trials
    assert out.returncode == 0, out.stderr[-3000:]
    assert [t.params for t in done] == [t.params for t in trials(reference)]
    # (bit-exact resume: even the values match)
    assert [t.value for t in done] == [t.value for t in trials(reference)]
    assert json.loads(json.dumps(done[1].intermediate_values)) == json.loads(
        json.dumps(trials(reference)[1].intermediate_values)
    )


def test_pruned_trial_stops_early_and_stays_pruned(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    # One completed trial is enough for the median; with seed 42, trial 1's first
    # evaluation (step 3 of 6) is worse than trial 0's: it is pruned there.
    cmd = sweep_cmd(home, "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner.n_startup_trials=1")

    def go() -> subprocess.CompletedProcess:
        env = subprocess_env(home)
        return subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=600)

    out = go()
    assert out.returncode == 0, out.stderr[-3000:]
    done = trials(home)
    assert [t.state for t in done] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert list(done[1].intermediate_values) == [3]
    job = home / "multirun" / "sweeps" / STUDY / "1"
    assert session_info(job)["current_step"] == 3
    assert json.loads((job / "trial_result.json").read_text())["state"] == "PRUNED"
    _, children = mlflow_runs(home)
    by_trial = {c.data.tags["optuna.trial.number"]: c for c in children}
    assert by_trial["1"].data.tags["optuna.trial.state"] == "PRUNED"
    # again: nothing to do, the pruned trial is not trained on
    out = go()
    assert out.returncode == 0, out.stderr[-3000:]
    assert [t.state for t in trials(home)] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert session_info(job)["current_step"] == 3
