"""Parallel trials (``hydra.sweeper.n_jobs=2``): each trial in its own child process,
reporting to the study itself; a killed sweeper's trials stop and are continued. Real
subprocesses, a real sqlite MLflow store and Optuna storage."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState

from tests.conftest import session_info, subprocess_env, wait_for
from tests.test_hparams_sweep import STUDY, check_complete_sweep, run, sweep_cmd, trials

pytestmark = pytest.mark.slow

PARALLEL = "hydra.sweeper.n_jobs=2"


def test_killed_sweeper_stops_its_trials_and_continues(tmp_path: Path):
    """Two trials at once, each a child trainer; the sweeper SIGKILLed: they stop by
    themselves, and the same command finishes both and the third."""
    home = tmp_path / "home"
    home.mkdir()
    # (slow: both trials are still training when the second has a checkpoint)
    env = subprocess_env(home, SO8T_FAULT_STEP_SECONDS="1")
    sweep = home / "multirun" / "sweeps" / STUDY
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(
            sweep_cmd(home, PARALLEL), cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: all(
                    session_info(sweep / str(n)).get("current_step", 0) >= 2 for n in (0, 1)
                ),
                300,
                "two trials with a checkpoint",
            )
            children = psutil.Process(proc.pid).children()
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # the sweeper only: its trials live on ...
            proc.wait()
    assert len(children) == 2
    # ... until they notice and stop as if sent SIGTERM (emergency checkpoint)
    gone, alive = psutil.wait_procs(children, timeout=120)
    assert not alive and len(gone) == 2
    for n in (0, 1):
        said = (sweep / str(n) / "trial_output.log").read_text(encoding="utf-8")
        assert "is gone: stopping this trial" in said and "received SIGTERM" in said, said[-2000:]
    assert [t.state for t in trials(home)] == [TrialState.RUNNING, TrialState.RUNNING]
    runs = {n: session_info(sweep / str(n))["session_id"] for n in (0, 1)}
    assert all(session_info(sweep / str(n))["status"] == "interrupted" for n in (0, 1))

    out = run(home, PARALLEL)
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "trial 0 (resumed)" in said and "2 running" in said, said[-3000:]
    done = check_complete_sweep(home)
    # each child reported its evaluations to the study itself (steps 3 and 6)
    assert all(sorted(t.intermediate_values) == [3, 6] for t in done), [
        t.intermediate_values for t in done
    ]
    assert all((sweep / str(n) / "trial_output.log").is_file() for n in range(3))
    for n in (0, 1):  # each in its own folder and run, continued once
        info = session_info(sweep / str(n))
        assert (
            info["session_id"] == runs[n] and info["resumes"] == 1 and info["status"] == "completed"
        )
    assert not (sweep / "3").exists()
