"""``python -m so8t_exp.resume`` end to end: real trainers killed with real signals."""

from __future__ import annotations

import gc
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from so8t_exp.overrides import override
from so8t_exp.paths import sqlite_uri
from tests.conftest import (
    history,
    only_run,
    run_at_once,
    run_train,
    session_info,
    start_train,
    stop_at_step,
    subprocess_env,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS = 40
OVERRIDES = ("+experiment=smoke", f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=4")


def resume_cmd(store: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={store}", *overrides]


def run_resume(tmp_path: Path, store: str, *overrides: str, env=None, cwd=None):
    return subprocess.run(
        resume_cmd(store, *overrides),
        cwd=cwd or tmp_path,
        env=env or subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def killed_run(tmp_path: Path, store: str, at_step: int = 8) -> Path:
    run_dir = tmp_path / "run"
    stop_at_step(tmp_path, store, run_dir, OVERRIDES, at_step)
    return run_dir


def assert_finished_once(store: str, run_id: str) -> None:
    client, run = only_run(store)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    steps = [s for s, _ in history(client, run_id, "train/loss")]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.parametrize("in_process", ["true", "false"])
def test_sigkilled_run_is_finished_by_the_launcher_from_another_directory(
    tmp_path, store, in_process
):
    run_dir = killed_run(tmp_path, store)
    run_id = session_info(run_dir)["session_id"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dry = run_resume(tmp_path, store, "resume.dry_run=true", cwd=elsewhere)
    assert dry.returncode == 0 and f"{run_id}" in dry.stdout and "resume" in dry.stdout
    out = run_resume(tmp_path, store, f"resume.in_process={in_process}", cwd=elsewhere)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    mode = "in this process" if in_process == "true" else "as a child process"
    assert "launching: " in out.stdout and mode in out.stdout
    assert_finished_once(store, run_id)
    logs = list((run_dir / "resume_logs").glob("train_*.log"))
    assert logs and "finished" in logs[0].read_text()
    # the trainer wrote its own Hydra output and log into the session folder, as a fresh start
    assert "finished" in (run_dir / "train.log").read_text()
    assert "so8t.resume.claim.1" in only_run(store)[1].data.params
    again = run_resume(tmp_path, store)
    assert again.returncode == 0 and "nothing to resume" in again.stdout


def test_sigterm_to_the_launcher_stops_its_trainer_cleanly(tmp_path, store):
    """In-process, the trainer's own signal handling applies: emergency checkpoint, exit
    128+15, and the run stays resumable with every metric step logged once."""
    run_dir = tmp_path / "run"
    stop_at_step(tmp_path, store, run_dir, (*OVERRIDES, "trainer.max_steps=100000"), 4)
    run_id = session_info(run_dir)["session_id"]
    proc = subprocess.Popen(
        resume_cmd(store),
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: session_info(run_dir).get("current_step", 0) >= 10, proc=proc, what="step 10")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM
    info = session_info(run_dir)
    assert info["status"] == "interrupted" and info["current_step"] >= 10
    client, run = only_run(store)
    assert run.info.run_id == run_id and run.info.status == "KILLED"
    steps = [s for s, _ in history(client, run_id, "train/loss")]
    assert steps == list(range(1, info["current_step"] + 1))


def test_resume_all_finishes_every_dead_run_in_one_process(tmp_path, store):
    """``resume.all``: several sessions trained one after another by the same in-process
    launcher (Hydra, logging and the frozen heap are set up and torn down each time)."""
    dirs = [tmp_path / "run-a", tmp_path / "run-b"]
    for run_dir in dirs:
        stop_at_step(tmp_path, store, run_dir, OVERRIDES, 8)
    ids = {session_info(d)["session_id"] for d in dirs}
    out = run_resume(tmp_path, store, "resume.all=true")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("launching: ") == 2
    client = MlflowClient(store)
    for run_id in ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = [s for s, _ in history(client, run_id, "train/loss")]
        assert steps == list(range(1, STEPS + 1))
    for run_dir, other in (dirs, dirs[::-1]):  # each trainer logged to its own folder
        text = (run_dir / "train.log").read_text()
        assert f"resuming from checkpoint {run_dir}/checkpoints" in text
        assert str(other) not in text
        assert session_info(run_dir)["status"] == "completed"


class MemoryProbe:
    """A notifier (real, instantiated by the trainer from its config) that reports, when a
    session finishes, how many sessions and checkpoint payloads are still in memory."""

    def notify(self, event: str, message: str) -> None:
        if event == "finished":
            from so8t_exp.checkpoint.format import Payload
            from so8t_exp.run import TrainingRun

            gc.collect()
            alive = gc.get_objects()
            runs = sum(isinstance(o, TrainingRun) for o in alive)
            payloads = sum(isinstance(o, Payload) for o in alive)
            print(f"memory probe: {runs} sessions, {payloads} payloads", flush=True)


def test_one_launcher_frees_each_session_before_the_next(tmp_path, store):
    """``resume.all`` in one process: when the second session finishes, the first one (its
    model) and the restored checkpoint (a host copy of the trained state) are gone."""
    probe = f"+notify.notifiers.probe._target_={__name__}.MemoryProbe"
    for name in ("run-a", "run-b"):
        stop_at_step(tmp_path, store, tmp_path / name, (*OVERRIDES, probe), 8)
    out = run_resume(tmp_path, store, "resume.all=true")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    probes = [line for line in out.stdout.splitlines() if line.startswith("memory probe")]
    assert probes == ["memory probe: 1 sessions, 0 payloads"] * 2, out.stdout[-3000:]


def test_session_folder_deleted_resumes_from_mlflow(tmp_path, store):
    run_dir = killed_run(tmp_path, store, at_step=12)
    run_id = session_info(run_dir)["session_id"]
    shutil.rmtree(run_dir)
    out = run_resume(tmp_path, store)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "from MLflow artifacts" in out.stdout + out.stderr
    assert_finished_once(store, run_id)


def test_checkpoints_travel_through_a_real_tracking_server(tmp_path, mlflow_server):
    """Against ``mlflow server`` (artifacts proxied over HTTP): the mirror uploads and
    prunes there, and a run whose session folder is gone resumes from the server's copy."""
    run_dir = tmp_path / "run"
    proc = start_train(tmp_path, mlflow_server, run_dir, *OVERRIDES)
    client = MlflowClient(mlflow_server)

    def mirrored_past_step_12() -> bool:
        info = session_info(run_dir)
        if info.get("current_step", 0) < 12:
            return False
        # the tag is sent as soon as the upload ends: the server has a copy to resume from
        return bool(client.get_run(info["session_id"]).data.tags.get("so8t.checkpoint.latest"))

    wait_for(mirrored_past_step_12, proc=proc, what="a mirrored checkpoint")
    proc.kill()
    proc.wait(60)
    run_id = session_info(run_dir)["session_id"]
    remote = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    assert 1 <= len(remote) <= 5, remote  # checkpoint.keep=5 applies to the copy too
    shutil.rmtree(run_dir)
    out = run_resume(tmp_path, mlflow_server)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "from MLflow artifacts" in out.stdout + out.stderr
    assert_finished_once(mlflow_server, run_id)
    final = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    assert any(p.endswith("final-step00000040") for p in final), final


def test_two_launchers_at_once_resume_the_run_once(tmp_path, store):
    run_dir = killed_run(tmp_path, store)
    run_id = session_info(run_dir)["session_id"]
    env = subprocess_env(tmp_path)
    codes, outputs = run_at_once(resume_cmd(store), 2, tmp_path, env, timeout=300)
    assert codes == [0, 0], outputs
    assert sum("launching:" in o for o in outputs) == 1, outputs
    client, run = only_run(store)
    claims = sorted(k for k in run.data.params if k.startswith("so8t.resume.claim."))
    assert claims == ["so8t.resume.claim.1", "so8t.resume.claim.2"]  # the trainer's, one launcher's
    assert_finished_once(store, run_id)


def test_live_run_is_never_resumed_and_a_second_trainer_refuses(tmp_path, store):
    run_dir = tmp_path / "run"
    proc = start_train(tmp_path, store, run_dir, "+experiment=smoke", "trainer.max_steps=100000")
    try:
        wait_for(
            lambda: (
                session_info(run_dir).get("current_step", 0) >= 1
                or (run_dir / ".so8t.lock.json").exists()
            ),
            proc=proc,
            what="trainer start",
        )
        wait_for(lambda: "session_id" in session_info(run_dir), proc=proc, what="session")
        out = run_resume(tmp_path, store, "resume.dry_run=true")
        assert out.returncode == 0 and "alive" in out.stdout and f"PID {proc.pid}" in out.stdout
        out = run_resume(tmp_path, store)
        assert out.returncode == 0 and "nothing to resume" in out.stdout
        out = run_resume(tmp_path, store, f"resume.run_id={session_info(run_dir)['session_id']}")
        assert out.returncode == 4 and "not resumable" in out.stderr
        recorded = session_info(run_dir)["overrides"]
        second = run_train(tmp_path, store, run_dir, "trainer.max_steps=7")
        assert second.returncode == 3
        assert f"in use by PID {proc.pid}" in second.stderr
        # the refused start must not change what a later resume would relaunch with
        assert session_info(run_dir)["overrides"] == recorded
        assert "+experiment=smoke" in recorded
        assert proc.poll() is None  # the live trainer was left alone
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    _client, run = only_run(store)
    assert run.info.status == "KILLED"


def test_crash_loop_is_given_up(tmp_path, store):
    env = subprocess_env(tmp_path, SO8T_FAULT_FAIL_AT_STEP="6")
    first = run_train(tmp_path, store, tmp_path / "run", *OVERRIDES, env=env)
    assert first.returncode == 1
    out = run_resume(tmp_path, store, "resume.max_attempts=1", env=env)
    assert out.returncode == 1  # the resumed trainer failed again at the same step
    out = run_resume(tmp_path, store, "resume.max_attempts=1", env=env)
    assert out.returncode == 0 and "give_up" in out.stdout
    assert "given_up" in out.stderr  # the console notifier
    _client, run = only_run(store)
    assert run.info.status == "FAILED" and run.data.tags["so8t.given_up"]
    out = run_resume(tmp_path, store, env=env)
    assert "nothing to resume" in out.stdout


def test_a_run_in_any_folder_a_user_can_have_is_resumed(tmp_path):
    """Non-ASCII, spaces, both quotes, ``=``, ``,``, brackets and ``&()`` in the session
    folder and in the store's path: the launcher's overrides are quoted for Hydra. (Not
    ``${``: Hydra itself reads its output folder back as an interpolation.)"""
    odd = tmp_path / 'データ it\'s "q" a=b,c [x] {y} &(z) ~$w'
    store = sqlite_uri(odd / "mlruns" / "mlflow.db")
    run_dir = odd / "run"
    cmd = [sys.executable, "-m", "so8t_exp.train", override("tracking.uri", store)]
    cmd += [override("hydra.run.dir", str(run_dir)), "trainer.progress_bar=false", *OVERRIDES]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(tmp_path))
    wait_for(lambda: session_info(run_dir).get("current_step", 0) >= 8, proc=proc, what="step 8")
    proc.kill()
    proc.wait(30)
    run_id = session_info(run_dir)["session_id"]
    out = subprocess.run(
        [sys.executable, "-m", "so8t_exp.resume", override("tracking.uri", store)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_finished_once(store, run_id)
    assert session_info(run_dir)["status"] == "completed"
