"""The resume launcher's verdict on Optuna sweeps (``so8t_exp.verdict`` with
``so8t_exp.sweep_resume``): a sweep is continued as a whole, its trials never alone.
Real folders and real OS locks; the runs are records as the registry reads them."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from so8t_exp.config import ResumeConfig
from so8t_exp.host import host_id
from so8t_exp.lock import SessionLock
from so8t_exp.signals import StopRequest, note_pending
from so8t_exp.sweep_resume import command, progress
from so8t_exp.tracking.runs import ATTEMPTS, GIVEN_UP, LAST_STEP, RunRecord
from so8t_exp.verdict import judge

NOW = time.time()


def parent(folder: Path, **tags: str) -> RunRecord:
    base = {
        "so8t.sweep.parent": "true",
        "so8t.sweep.dir": str(folder),
        "so8t.sweep.study": "s",
        "so8t.sweep.n_trials": "3",
        "so8t.sweep.trials_finished": "1",
        "so8t.host": host_id(),
    }
    return RunRecord("p1", "sweep", "so8t", "RUNNING", NOW - 60, {**base, **tags})


def trial(number: int, step: int, **tags: str) -> RunRecord:
    base = {
        "mlflow.parentRunId": "p1",
        "so8t.sweep.study": "s",
        "so8t.job.num": str(number),
        "so8t.checkpoint.latest_step": str(step),
        "so8t.heartbeat": str(NOW - 30),
    }
    return RunRecord(f"t{number}", f"t{number}", "so8t", "RUNNING", NOW - 50, {**base, **tags})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweeps" / "s"
    sweep.mkdir(parents=True)
    overrides = [
        "hydra.sweeper.n_trials=3",
        "hparams_search=eval_loss",
        "tracking.uri=old",
        "hydra.sweep.dir=old",
    ]
    (sweep / "sweep_command.json").write_text(json.dumps({"overrides": overrides}))
    return sweep


def test_a_dead_sweep_is_resumed_and_its_trial_is_not(folder: Path):
    cfg, t1 = ResumeConfig(), trial(1, 4)
    d = judge(parent(folder), cfg, trials=[t1])
    assert (d.action, d.reason) == ("resume", "sweep, running, dead, 1/3 trials finished")
    assert d.progress == progress(parent(folder), [t1]) and d.attempt == 1
    t = judge(t1, cfg)
    assert t.action == "skip" and t.reason == "trial 1 of sweep s: continues when its sweep does"


def test_a_live_sweeper_holds_its_folder(folder: Path):
    lock = SessionLock(folder).acquire(purpose="sweep")
    try:
        d = judge(parent(folder), ResumeConfig(), trials=[])
    finally:
        lock.release()
    assert d.action == "skip" and d.reason.startswith("alive: ") and d.state == "alive"


@pytest.mark.parametrize(
    ("tags", "why"),
    [
        ({"so8t.sweep.ended": "2026-01-01"}, "finished"),
        ({GIVEN_UP: "by hand"}, "given up (by hand)"),
        ({"so8t.expired": "old"}, "expired"),
        ({"so8t.host": "elsewhere"}, "a sweep of elsewhere: its folder and lock are there"),
    ],
)
def test_settled_sweeps_are_left_alone(folder: Path, tags: dict, why: str):
    d = judge(parent(folder, **tags), ResumeConfig(), trials=[])
    assert d.action == "skip" and d.reason.startswith(why), d.reason


def test_a_sweep_without_its_command_file_is_not_guessed(folder: Path):
    (folder / "sweep_command.json").write_text("{torn")
    d = judge(parent(folder), ResumeConfig(), trials=[])
    assert d.action == "skip" and "no readable sweep_command.json" in d.reason
    (folder / "sweep_command.json").unlink()
    d = judge(parent(folder), ResumeConfig(), trials=[])
    assert d.action == "skip" and "run the sweep's command again" in d.reason


def test_expiry_counts_the_trials_activity(folder: Path):
    cfg, now = ResumeConfig(max_age_hours=1.0), time.time()
    old = parent(folder)
    old.start_time = now - 2 * 3600  # started 2 h ago, no heartbeat of its own
    assert judge(old, cfg, trials=[]).action == "expire"
    recent = trial(1, 2, **{"so8t.heartbeat": str(now - 60)})  # a trial beat a minute ago
    assert judge(old, cfg, trials=[recent]).action == "resume"
    between = parent(folder, **{"so8t.heartbeat": str(now - 60)})  # the sweeper, between trials
    between.start_time = now - 2 * 3600
    assert judge(between, cfg, trials=[]).action == "resume"


def test_a_signal_before_the_trainer_starts_is_not_lost():
    """SIGTERM to a sweeper while its next trial starts: the trainer's stop request, made
    later, starts out requested (it stops at its first step boundary)."""
    note_pending(signal.SIGTERM)
    with StopRequest() as stop:
        assert stop.requested and stop.exit_code == 143
    with StopRequest() as stop:  # (once)
        assert not stop.requested


def test_given_up_after_attempts_without_progress(folder: Path):
    t1, cfg = trial(1, 4), ResumeConfig(max_attempts=2)
    stuck = {LAST_STEP: str(progress(parent(folder), [t1])), ATTEMPTS: "2"}
    d = judge(parent(folder, **stuck), cfg, trials=[t1])
    assert d.action == "give_up" and "2 resumes without progress past 1/3 trials" in d.reason
    # a step more in the trial is progress: attempt 1 again
    assert judge(parent(folder, **stuck), cfg, trials=[trial(1, 5)]).attempt == 1


def test_command_runs_the_sweep_again_in_its_folder(folder: Path):
    recorded = json.loads((folder / "sweep_command.json").read_text())
    recorded.update(study="s", storage="sqlite:////abs/optuna.db")
    (folder / "sweep_command.json").write_text(json.dumps(recorded))
    cmd = command(parent(folder), "sqlite:///new.db")
    # the study as resolved at its start, whatever the YAML says now
    assert "hydra.sweeper.study_name='s'" in cmd
    assert "hydra.sweeper.storage='sqlite:////abs/optuna.db'" in cmd
    assert (
        cmd[0] == "-m" and "hydra.sweeper.n_trials=3" in cmd and "hparams_search=eval_loss" in cmd
    )
    assert "tracking.uri=old" not in cmd and "hydra.sweep.dir=old" not in cmd
    assert cmd[-2:] == [f"hydra.sweep.dir='{folder.as_posix()}'", "tracking.uri='sqlite:///new.db'"]
