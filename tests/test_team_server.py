"""The team tracking server end to end: ``scripts/team_server.sh`` — ``mlflow server`` with a
real PostgreSQL backend store and proxied artifacts — and real trainers and launchers that
reach it over HTTP only: training, checkpoints mirrored and pruned on the server, a run that
moves to another machine through the server alone, and the launcher's liveness judgement.

One server (and one PostgreSQL cluster) per module; each test uses its own experiment.
Skips, saying why, only where PostgreSQL is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from so8t_exp.checkpoint import verify
from tests.conftest import (
    history,
    only_run,
    run_train,
    session_info,
    start_train,
    subprocess_env,
    wait_for,
)
from tests.team_server_support import TeamServer, team_server

pytestmark = pytest.mark.slow

STEPS = 16
KEEP = 2
OVERRIDES = (
    "+experiment=smoke",
    f"trainer.max_steps={STEPS}",
    "checkpoint.every_n_steps=3",
    f"checkpoint.keep={KEEP}",
)


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> TeamServer:
    with team_server(tmp_path_factory.mktemp("team")) as server:
        yield server


@pytest.fixture(scope="module")
def baseline(team: TeamServer, tmp_path_factory) -> dict:
    """An uninterrupted run against the team server: the reference for the others."""
    tmp = tmp_path_factory.mktemp("baseline")
    out = run_train(tmp, team.uri, tmp / "run", *OVERRIDES, "tracking.experiment=baseline")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    client, run = only_run(team.uri, "baseline")
    return {
        "dir": tmp / "run",
        "client": client,
        "run": run,
        "loss": history(client, run.info.run_id, "train/loss"),
    }


def resume(home: Path, team: TeamServer, experiment: str, *overrides: str, env=None, uri=None):
    return subprocess.run(
        [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={uri or team.uri}"]
        + [f"tracking.experiment={experiment}", *overrides],
        cwd=home,
        env=env or subprocess_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = run_dir / "checkpoints" / f"final-step{STEPS:08d}"
    assert verify(folder) is None
    return {name: load_file(folder / f"{name}.safetensors") for name in ("weights", "optimizer")}


def assert_same_as_baseline(run_dir: Path, team: TeamServer, experiment: str, baseline) -> str:
    """One FINISHED run, every train/loss step logged once with the baseline's values, final
    weights and optimizer state equal to the baseline's bit for bit. Its run id."""
    client, run = only_run(team.uri, experiment)
    assert run.info.status == "FINISHED"
    loss = history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, STEPS + 1)), "a step missing or logged twice"
    assert loss == baseline["loss"]
    ours, ref = final_state(run_dir), final_state(baseline["dir"])
    for group in ref:
        assert ours[group].keys() == ref[group].keys()
        for key, tensor in ref[group].items():
            assert torch.equal(ours[group][key], tensor), f"{group}/{key} differs"
    return run.info.run_id


def remote_checkpoints(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "checkpoints"))


def test_training_lands_in_postgres_and_its_checkpoints_on_the_server(team, baseline):
    import psycopg2

    client, run = baseline["client"], baseline["run"]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert [s for s, _ in baseline["loss"]] == list(range(1, STEPS + 1))
    # The backend store really is PostgreSQL: the run and each loss point are rows there.
    with psycopg2.connect(team.db_url) as db, db.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute(
            "SELECT step, count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss' "
            "GROUP BY step ORDER BY step",
            (run_id,),
        )
        assert cur.fetchall() == [(s, 1) for s in range(1, STEPS + 1)]
    # Artifacts are proxied: the client only knows mlflow-artifacts:, the files are on the
    # server's disk under --artifacts-destination.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    local = sorted(p.name for p in (baseline["dir"] / "checkpoints").iterdir())
    local_rolling = [n for n in local if n.startswith("rolling-")]
    assert len(local_rolling) == KEEP, local
    remote = remote_checkpoints(client, run_id)
    # Retention applies on the server: only the newest `keep` rolling ones remain there
    # (of the 3 written: 6 and 12 are best ones), beside the final and the best checkpoint.
    assert [n for n in remote if n.startswith("rolling-")] == local_rolling, remote
    assert (
        f"final-step{STEPS:08d}" in remote
        and session_info(baseline["dir"])["best_checkpoint"] in remote
    )
    on_disk = team.artifacts / run.info.experiment_id / run_id / "artifacts" / "checkpoints"
    assert sorted(p.name for p in on_disk.iterdir()) == remote  # pruned ones deleted there
    for name in remote:
        assert verify(on_disk / name) is None, name
    assert run.data.tags["so8t.checkpoint.latest"] == f"final-step{STEPS:08d}"


def test_a_run_moves_to_another_machine_through_the_server_alone(tmp_path, team, baseline):
    """Machine A trains and is SIGKILLed; all of A's files are gone. Machine B (another host
    name, another project folder) has only the tracking URI: its launcher waits until A's
    heartbeat is stale, restores the newest valid checkpoint from the server's artifacts and
    finishes the same run, equal to an uninterrupted one."""
    home_a, home_b = tmp_path / "machine-a", tmp_path / "machine-b"
    home_a.mkdir()
    home_b.mkdir()
    env_a = subprocess_env(home_a, SO8T_HOST_ID="machine-a")
    run_dir = home_a / "run"
    overrides = (*OVERRIDES, "tracking.experiment=moved")
    client = MlflowClient(team.uri)

    def mirrored() -> int:
        exp = client.get_experiment_by_name("moved")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return int(runs[0].data.tags.get("so8t.checkpoint.latest_step", 0)) if runs else 0

    proc = start_train(home_a, team.uri, run_dir, *overrides, env=env_a)
    try:
        wait_for(lambda: mirrored() >= 6, proc=proc, timeout=180, what="a mirrored checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    run_id = session_info(run_dir)["session_id"]
    shutil.rmtree(home_a)

    env_b = subprocess_env(home_b, SO8T_HOST_ID="machine-b")
    # B reaches the server by another name than A did (the launcher hands its trainer its own).
    b_uri = team.uri.replace("127.0.0.1", "localhost")
    out = resume(home_b, team, "moved", "resume.stale_after_seconds=3", env=env_b, uri=b_uri)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "last trained on another host" in out.stdout
    assert "from MLflow artifacts" in out.stdout + out.stderr
    moved_to = home_b / "outputs" / run_id  # A's path means nothing on B
    assert assert_same_as_baseline(moved_to, team, "moved", baseline) == run_id
    assert session_info(moved_to)["status"] == "completed"
    run = client.get_run(run_id)
    assert run.data.tags["so8t.host"] == "machine-b"
    assert f"final-step{STEPS:08d}" in remote_checkpoints(client, run_id)


def test_a_live_run_is_left_alone_and_a_killed_one_resumed(tmp_path, team):
    """The launcher's liveness against the team server: a trainer that is alive (lock held,
    heartbeat beating) is not resumed — not from this host, not from another one that watches
    its heartbeat — and once it is SIGKILLed it is, into the same run."""
    # At 3 s a step it lives almost a minute, time enough to look at it; resumed without
    # the delay, the rest is quick.
    overrides = (*OVERRIDES, "tracking.experiment=live")
    run_dir = tmp_path / "run"
    slow = subprocess_env(tmp_path, SO8T_FAULT_STEP_SECONDS="3")
    beat = "session.heartbeat_seconds=0.5"
    proc = start_train(tmp_path, team.uri, run_dir, *overrides, beat, env=slow)
    try:
        # (a checkpoint first: a resume from step 0 would not show that nothing is repeated)
        wait_for(lambda: session_info(run_dir).get("current_step", 0) >= 3, proc=proc)
        run_id = session_info(run_dir)["session_id"]
        client = MlflowClient(team.uri)
        wait_for(lambda: "so8t.heartbeat" in client.get_run(run_id).data.tags, proc=proc)

        dry = resume(tmp_path, team, "live", "resume.dry_run=true")
        assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
        assert "alive" in dry.stdout and f"PID {proc.pid}" in dry.stdout, dry.stdout
        assert "dry run: nothing to resume" in dry.stdout, dry.stdout
        # Another machine sees only the server: the heartbeat changes while it watches.
        home_b = tmp_path / "machine-b"
        home_b.mkdir()
        env_b = subprocess_env(home_b, SO8T_HOST_ID="machine-b")
        other = resume(home_b, team, "live", "resume.stale_after_seconds=3", env=env_b)
        assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
        assert "watching 1 run(s) last trained on another host" in other.stdout, other.stdout
        assert "nothing to resume" in other.stdout, other.stdout
        assert proc.poll() is None, "the live trainer was left alone"
        claims = [k for k in client.get_run(run_id).data.params if ".resume.claim." in k]
        assert claims == ["so8t.resume.claim.1"], claims  # only the trainer's own
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)

    out = resume(tmp_path, team, "live")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "launching: " in out.stdout and run_id in out.stdout
    client, run = only_run(team.uri, "live")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    logged = [s for s, _ in history(client, run_id, "train/loss")]
    assert logged == list(range(1, STEPS + 1)), "a step missing or logged twice"
    assert session_info(run_dir)["status"] == "completed"
