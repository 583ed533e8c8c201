"""``python -m so8t_exp.sessions`` and Optuna sweeps: a row per sweep with its trials under
it (never again as loose sessions), ``show`` of a sweep, ``abandon`` of a sweep and the
refusal to abandon a trial alone. Fast tests build the runs with the sweeper's tags in a
real sqlite store; one slow test lists a real tiny sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from so8t_exp import sessions
from so8t_exp.config import ResumeConfig
from so8t_exp.lock import SessionLock
from so8t_exp.sessions_sweeps import split
from so8t_exp.sweep_resume import settled
from so8t_exp.tracking.runs import GIVEN_UP, RunRecord, RunRegistry
from so8t_exp.tracking.sweep import (
    COMMAND_FILE,
    ENDED,
    JOB_NUM,
    JOB_OVERRIDES,
    N_TRIALS,
    PARENT,
    PARENT_RUN,
    STUDY,
    SWEEP_DIR,
    TRIALS_DONE,
)
from so8t_exp.verdict import judge
from tests.conftest import subprocess_env
from tests.test_hparams_sweep import run as run_sweep

HOST = "so8t-test-host"


@pytest.fixture(autouse=True)
def _host(monkeypatch):
    monkeypatch.setenv("SO8T_HOST_ID", HOST)


@pytest.fixture
def client(store: str) -> MlflowClient:
    client = MlflowClient(store)
    client.create_experiment("so8t")
    return client


def exp_id(client: MlflowClient) -> str:
    return client.get_experiment_by_name("so8t").experiment_id


def make_sweep(
    client: MlflowClient,
    folder: Path,
    trials: list[tuple[str, str | None, float | None]],
    study: str = "lr_search",
    n_trials: int = 3,
    best: int | None = 0,
    host: str = HOST,
) -> tuple[str, list[str]]:
    """A sweep's parent run and one child run per ``(status, Optuna state or None, value)``,
    tagged as the sweeper tags them; ``(parent id, trial ids)``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMMAND_FILE).write_text(json.dumps({"overrides": [], "study": study}))
    done = sum(state is not None for _, state, _ in trials)
    parent = client.create_run(
        exp_id(client),
        run_name=f"multirun {study}",
        tags={
            PARENT: "true",
            SWEEP_DIR: str(folder),
            STUDY: study,
            N_TRIALS: str(n_trials),
            TRIALS_DONE: str(done),
            "so8t.host": host,
        },
    ).info.run_id
    ids = []
    for number, (status, state, value) in enumerate(trials):
        job = folder / str(number)
        job.mkdir(exist_ok=True)
        tags = {
            PARENT_RUN: parent,
            JOB_NUM: str(number),
            STUDY: study,
            SWEEP_DIR: str(folder),
            "so8t.session_dir": str(job),
            "so8t.host": host,
            "so8t.step": "4",
            "so8t.heartbeat": f"{time.time():.3f}",
            JOB_OVERRIDES: f"trainer.optimizer.lr={10.0 ** -(number + 2)!r} +experiment=smoke",
        }
        if state is not None:
            tags |= {
                "optuna.trial.number": str(number),
                "optuna.trial.state": state,
                "optuna.param.trainer.optimizer.lr": repr(10.0 ** -(number + 2)),
            }
        run_id = client.create_run(exp_id(client), run_name=f"trial run {number}", tags=tags)
        run_id = run_id.info.run_id
        client.log_param(run_id, "trainer.max_steps", "6")
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        if value is not None:
            client.log_metric(parent, "sweep/objective", value, step=number)
        ids.append(run_id)
    if best is not None:
        client.set_tag(parent, "so8t.sweep.best_trial", str(best))
        client.set_tag(parent, "so8t.sweep.best_params", json.dumps({"lr": 0.01}))
        client.log_metric(parent, "sweep/best_value", trials[best][2], step=best)
    return parent, ids


def plain_session(client: MlflowClient, folder: Path) -> str:
    tags = {"so8t.session_dir": str(folder), "so8t.host": HOST, "so8t.step": "3"}
    run = client.create_run(exp_id(client), run_name="plain", tags=tags).info.run_id
    client.log_param(run, "trainer.max_steps", "10")
    return run


def sessions_out(capsys, store: str, *args: str) -> str:
    assert sessions.main([*args, f"tracking.uri={store}"]) == 0
    return capsys.readouterr().out


def tables(out: str) -> list[list[dict[str, str]]]:
    """Each table of ``sessions list`` (tables are separated by a blank line) as rows of
    {column: cell}, cut at the header's column starts (cells may hold spaces)."""
    out_tables = []
    for block in out.strip("\n").split("\n\n"):
        header, *lines = block.splitlines()
        names = header.split()
        starts = [header.index(f"{n} " if i < len(names) - 1 else n) for i, n in enumerate(names)]
        ends = [*starts[1:], None]
        out_tables.append(
            [
                {n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}
                for line in lines
            ]
        )
    return out_tables


def test_list_shows_each_sweep_with_its_trials_under_it(tmp_path: Path, client, store, capsys):
    plain = plain_session(client, tmp_path / "plain")
    trials = [("FINISHED", "COMPLETE", 0.5), ("FINISHED", "PRUNED", None), ("KILLED", None, None)]
    parent, ids = make_sweep(client, tmp_path / "sweep", trials)
    out = sessions_out(capsys, store)

    loose, sweep = tables(out)
    assert [r["run_id"] for r in loose] == [plain]  # the trials are not sessions here
    assert loose[0]["status"] == "RUNNING/dead" and loose[0]["step"] == "3/10"
    assert "resumes" in loose[0] and "checkpoint" in loose[0]  # the sessions' columns
    head, *rows = sweep
    assert head["sweep"] == "sweep lr_search" and head["run_id"] == parent
    assert head["trials"] == "2/3" and head["value"] == "0.5 (trial 0)"
    assert head["status"] == "RUNNING/dead" and head["launcher"] == "resume"
    assert head["folder"] == str(tmp_path / "sweep")
    assert [r["sweep"] for r in rows] == ["trial 0", "trial 1", "trial 2"]
    assert [r["run_id"] for r in rows] == ids
    assert [r["status"] for r in rows] == [
        "FINISHED/COMPLETE",
        "FINISHED/PRUNED",
        "KILLED/dead",
    ]
    assert [r["value"] for r in rows] == ["0.5 (best)", "-", "-"]
    assert [r["step"] for r in rows] == ["4/6"] * 3
    # (trial 2 not tagged by Optuna yet: its parameters from its job's overrides)
    assert [r["name"] for r in rows] == ["lr=0.01", "lr=0.001", "lr=0.0001"]
    assert all(out.count(run_id) == 1 for run_id in [plain, parent, *ids])


def test_live_sweep_and_its_running_trial_are_alive(tmp_path: Path, client, store, capsys):
    folder = tmp_path / "sweep"
    parent, ids = make_sweep(
        client, folder, [("FINISHED", "COMPLETE", 1.25), ("RUNNING", None, None)]
    )
    eta = (datetime.now().astimezone() + timedelta(minutes=30)).isoformat()
    logs = folder / "1" / "progress_logs"
    logs.mkdir(parents=True)
    (logs / "progress.jsonl").write_text(json.dumps({"step": 5, "train/loss": 2.5, "eta": eta}))
    # the sweeper holds its folder's lock, the trial's trainer its job folder's
    with SessionLock(folder), SessionLock(folder / "1"):
        (only,) = tables(sessions_out(capsys, store))
        assert sessions.main(["abandon", parent, f"tracking.uri={store}"]) == 0
        abandoned = capsys.readouterr().out
    head, done, running = only
    assert head["status"] == "RUNNING/alive" and head["launcher"] == "skip"
    assert head["trials"] == "1/3" and head["value"] == "1.25 (trial 0)"
    assert done["status"] == "FINISHED/COMPLETE" and done["eta"] == "-"
    assert running["status"] == "RUNNING/alive" and running["step"] == "5/6"
    assert running["loss"] == "2.5" and running["eta"].endswith("(30m)")
    assert "marked given-up" in abandoned and "It is running now" in abandoned


def test_finished_and_other_hosts_sweeps(tmp_path: Path, client, store, capsys):
    ended, _ = make_sweep(
        client, tmp_path / "a", [("FINISHED", "COMPLETE", 3.0), ("FINISHED", "FAIL", None)]
    )
    client.set_tag(ended, ENDED, "2026-01-01T00:00:00+00:00")
    client.set_terminated(ended, "FINISHED")
    elsewhere, _ = make_sweep(
        client, tmp_path / "b", [("RUNNING", None, None)], study="far", best=None, host="other"
    )
    (sweeps,) = tables(sessions_out(capsys, store))
    by_id = {r["run_id"]: r for r in sweeps}
    assert by_id[ended]["status"] == "FINISHED/finished"
    assert by_id[ended]["launcher"] == "skip" and by_id[ended]["trials"] == "2/3"
    assert [r["status"] for r in sweeps if r["sweep"].strip() == "trial 1"] == ["FINISHED/FAIL"]
    # another host's sweep: its lock is there; its trial's fresh heartbeat says alive
    assert by_id[elsewhere]["status"] == "RUNNING/alive"
    assert by_id[elsewhere]["launcher"] == "skip" and by_id[elsewhere]["value"] == "-"


def test_show_sweep_gives_study_best_and_each_trial(tmp_path: Path, client, store, capsys):
    trials = [("FINISHED", "COMPLETE", 0.75), ("FINISHED", "COMPLETE", 0.5), ("KILLED", None, None)]
    parent, ids = make_sweep(client, tmp_path / "sweep", trials, best=1)
    page = json.loads(sessions_out(capsys, store, "show", parent))
    assert page["kind"] == "optuna sweep" and page["study"] == "lr_search"
    assert page["trials_finished"] == "2/3" and page["status"] == "RUNNING/dead"
    assert page["best_trial"] == 1 and page["best_value"] == 0.5
    assert page["best_params"] == {"lr": 0.01}
    assert page["folder"] == str(tmp_path / "sweep")
    assert page["launcher_would"] == "resume"
    assert page["because"] == "sweep, running, dead, 2/3 trials finished"
    assert [t["run_id"] for t in page["trials"]] == ids
    assert [(t["trial"], t["state"], t["value"]) for t in page["trials"]] == [
        (0, "COMPLETE", 0.75),
        (1, "COMPLETE", 0.5),
        (2, "dead", None),
    ]
    assert [t["params"] for t in page["trials"]] == [
        {"trainer.optimizer.lr": lr} for lr in (0.01, 0.001, 0.0001)
    ]

    trial = json.loads(sessions_out(capsys, store, "show", ids[2]))
    assert trial["sweep_run_id"] == parent and trial["trial"] == 2 and trial["state"] == "dead"
    assert trial["launcher_would"] == "skip" and "continues when its sweep does" in trial["because"]


def test_abandon_gives_the_sweep_up(tmp_path: Path, client, store, capsys):
    parent, _ = make_sweep(client, tmp_path / "sweep", [("KILLED", None, None)], best=None)
    out = sessions_out(capsys, store, "abandon", parent)
    assert out.startswith(f"sweep {parent} (lr_search, 0/3 trials finished) marked given-up")
    assert "running now" not in out
    registry = RunRegistry(store)
    record = registry.get(parent)
    assert record.tags[GIVEN_UP] == "abandoned by the user"
    assert settled(record).startswith("given up")
    assert judge(record, ResumeConfig(), trials=[]).action == "skip"
    (sweeps,) = tables(sessions_out(capsys, store))
    assert sweeps[0]["status"] == "RUNNING/given-up" and sweeps[0]["launcher"] == "skip"


def test_abandon_of_a_trial_is_refused_with_its_sweep_named(tmp_path: Path, client, store, capsys):
    parent, ids = make_sweep(client, tmp_path / "sweep", [("KILLED", None, None)], best=None)
    assert sessions.main(["abandon", ids[0], f"tracking.uri={store}"]) == 2
    err = capsys.readouterr().err
    assert "trial 0 of sweep lr_search" in err
    assert f"python -m so8t_exp.sessions abandon {parent}" in err
    assert GIVEN_UP not in RunRegistry(store).get(ids[0]).tags


def test_grid_sweeps_stay_as_they_were(tmp_path: Path, client, store, capsys):
    """A grid sweep's parent is no session and no Optuna sweep: hidden; its jobs are
    sessions (the launcher resumes them one by one)."""
    tags = {PARENT: "true", SWEEP_DIR: str(tmp_path / "grid")}
    parent = client.create_run(exp_id(client), run_name="multirun", tags=tags).info.run_id
    job = plain_session(client, tmp_path / "grid" / "0")
    client.set_tag(job, PARENT_RUN, parent)
    out = sessions_out(capsys, store)
    (loose,) = tables(out)
    assert [r["run_id"] for r in loose] == [job] and parent not in out


def test_a_trial_without_its_sweep_stays_a_session():
    def record(run_id: str, **tags: str) -> RunRecord:
        return RunRecord(run_id, run_id, "so8t", "RUNNING", 0.0, tags=tags)

    parent = record("p", **{PARENT: "true", STUDY: "s"})
    mine = record("t1", **{PARENT_RUN: "p", STUDY: "s"})
    orphan = record("t2", **{PARENT_RUN: "gone", STUDY: "s"})
    loose, found = split([parent, mine, orphan, record("plain")])
    assert [r.run_id for r in loose] == ["t2", "plain"]
    assert [(p.run_id, [t.run_id for t in ts]) for p, ts in found] == [("p", ["t1"])]


# -- a real sweep -----------------------------------------------------------------------
@pytest.mark.slow
def test_sessions_lists_a_real_sweep(tmp_path: Path, store: str):
    def run(args: list[str]) -> subprocess.CompletedProcess:
        env = subprocess_env(tmp_path)
        return subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )

    out = run_sweep(tmp_path, "hydra.sweeper.n_trials=2")  # (its store is `store`)
    assert out.returncode == 0, out.stderr[-3000:]
    listing = run([sys.executable, "-m", "so8t_exp.sessions", f"tracking.uri={store}"])
    assert listing.returncode == 0, listing.stderr[-3000:]
    (sweep,) = tables(listing.stdout)  # no loose sessions: both runs are the sweep's
    head, *trials = sweep
    client = MlflowClient(store)
    best = client.get_run(head["run_id"]).data.tags["so8t.sweep.best_trial"]
    assert head["sweep"] == "sweep t" and head["trials"] == "2/2"
    assert head["status"] == "FINISHED/finished" and head["launcher"] == "skip"
    assert head["value"].endswith(f"(trial {best})")
    assert head["folder"] == str(tmp_path / "multirun" / "sweeps" / "t")
    assert [t["sweep"] for t in trials] == ["trial 0", "trial 1"]
    assert [t["status"] for t in trials] == ["FINISHED/COMPLETE"] * 2
    assert [t["step"] for t in trials] == ["6/6"] * 2
    assert trials[int(best)]["value"].endswith("(best)")
    assert head["value"].split()[0] == trials[int(best)]["value"].split()[0]
    assert all(t["name"].startswith("lr=") for t in trials)
