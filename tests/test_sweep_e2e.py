"""A Hydra multirun as one parent MLflow run, end to end: real ``python -m so8t_exp.train -m``
and ``python -m so8t_exp.resume`` subprocesses against a real sqlite store."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import session_info, subprocess_env, sweep_cmd, wait_for

pytestmark = pytest.mark.slow


def runs(store: str) -> tuple[list, list]:
    """(parents, children) of the so8t experiment."""
    client = MlflowClient(store)
    found = client.search_runs([client.get_experiment_by_name("so8t").experiment_id])
    parents = [r for r in found if r.data.tags.get("so8t.sweep.parent") == "true"]
    return parents, [r for r in found if r not in parents]


def test_multirun_is_one_parent_that_survives_resume(tmp_path: Path, store: str):
    sweep = tmp_path / "sweep"
    cmd = sweep_cmd(store, sweep, "trainer.max_bad_steps=3", "trainer.max_steps=2,6")

    def run(args: list[str], **extra: str) -> subprocess.CompletedProcess:
        env = subprocess_env(tmp_path, **extra)
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)

    # job 1 diverges at step 5 (NaN loss at steps 3-5): FAILED, the sweep goes on and ends
    out = run(cmd, SO8T_FAULT_NAN_AT_STEPS="3,4,5")
    assert out.returncode == 0, out.stderr[-3000:]
    parents, children = runs(store)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FAILED" and "so8t.sweep.ended" in parent.data.tags
    assert parent.info.run_name == "multirun smoke max_bad_steps=3 max_steps=2,6"
    by_num = {c.data.tags["so8t.job.num"]: c for c in children}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert by_num["0"].info.run_name == "smoke max_bad_steps=3 max_steps=2"
    assert by_num["0"].info.status == "FINISHED" and by_num["1"].info.status == "FAILED"
    assert by_num["1"].data.tags["so8t.job.overrides"].endswith("trainer.max_steps=6")
    assert by_num["1"].data.tags["so8t.step"] == "5"

    # the resume launcher finishes the failed job: same parent, which now has finished too
    resume = [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={store}"]
    out = run(resume)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert parent.info.run_id not in out.stdout  # never even considered
    parents, children = runs(store)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert parents[0].info.status == "FINISHED"
    job = next(c for c in children if c.data.tags["so8t.job.num"] == "1")
    assert job.info.status == "FINISHED" and job.data.tags["so8t.step"] == "6"
    assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert " resumed from step 5 on " in job.data.tags["mlflow.note.content"]

    # the same sweep command again: the same parent, reopened and closed; no new runs
    out = run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    parents, children = runs(store)
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    assert " continued on " in parents[0].data.tags["mlflow.note.content"]
    listing = run([sys.executable, "-m", "so8t_exp.sessions", "--tracking-uri", store])
    assert parent.info.run_id not in listing.stdout and job.info.run_id in listing.stdout


def test_stopped_multirun_leaves_its_parent_killed(tmp_path: Path, store: str):
    sweep = tmp_path / "sweep"
    cmd = sweep_cmd(store, sweep, "checkpoint.every_n_steps=2", "trainer.max_steps=400,2")
    env = subprocess_env(tmp_path)
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: session_info(sweep / "0").get("current_step", 0) >= 2, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
    parents, children = runs(store)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert "so8t.sweep.ended" not in parents[0].data.tags
    assert [c.info.status for c in children] == ["KILLED"]  # job 1 never started
