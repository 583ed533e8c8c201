"""The resume launcher's choice among prepared runs in a real sqlite store, and its claim."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from so8t_exp.config import ResumeConfig
from so8t_exp.host import host_id
from so8t_exp.launcher import Launcher, judge
from so8t_exp.lock import SessionLock, SessionLocked, is_locked
from so8t_exp.notify import Notifiers
from so8t_exp.overrides import override
from so8t_exp.paths import config_dir
from so8t_exp.tracking.claims import claim_run, newest_claim
from so8t_exp.tracking.runs import GIVEN_UP, RunRegistry
from so8t_exp.verdict import HeartbeatWatch


class Recorder:
    """A notifier that remembers what it was told (a real object, not a mock)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def notify(self, event: str, message: str) -> None:
        self.events.append((event, message))


def make_run(
    client: MlflowClient,
    tmp_path: Path,
    name: str,
    status: str,
    *,
    folder: bool = True,
    heartbeat_age: float = 600,
    host: str | None = None,
    **tags,
) -> str:
    exp = client.get_experiment_by_name("so8t") or client.create_experiment("so8t")
    exp_id = exp if isinstance(exp, str) else exp.experiment_id
    run = client.create_run(exp_id, run_name=name)
    session = tmp_path / name
    if folder:
        session.mkdir()
    all_tags = {
        "so8t.session_dir": str(session),
        "so8t.host": host or host_id(),
        "so8t.heartbeat": f"{time.time() - heartbeat_age:.3f}",
        **tags,
    }
    for key, value in all_tags.items():
        client.set_tag(run.info.run_id, key, str(value))
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def holder(tmp_path: Path):
    """A real other process holding a session lock."""
    procs = []

    def _hold(folder: Path) -> subprocess.Popen:
        code = (
            "import sys, time; from pathlib import Path; from so8t_exp.lock import "
            "SessionLock; lock = SessionLock(Path(sys.argv[1])).acquire(); print('ok', flush=True);"
            " time.sleep(120)"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ok"
        procs.append(proc)
        return proc

    yield _hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_launcher_choices_among_prepared_runs(tmp_path: Path, store: str, holder):
    client = MlflowClient(store)
    ids = {
        "finished": make_run(client, tmp_path, "finished", "FINISHED"),
        "dead_running": make_run(client, tmp_path, "dead_running", "RUNNING", heartbeat_age=1),
        "live_running": make_run(client, tmp_path, "live_running", "RUNNING"),
        "killed": make_run(client, tmp_path, "killed", "KILLED"),
        "failed_within": make_run(
            client,
            tmp_path,
            "failed_within",
            "FAILED",
            **{
                "so8t.resume.attempts": 2,
                "so8t.resume.last_step": 40,
                "so8t.checkpoint.latest_step": 40,
            },
        ),
        "failed_past": make_run(
            client,
            tmp_path,
            "failed_past",
            "FAILED",
            **{
                "so8t.resume.attempts": 3,
                "so8t.resume.last_step": 40,
                "so8t.checkpoint.latest_step": 40,
            },
        ),
        "progressed": make_run(
            client,
            tmp_path,
            "progressed",
            "FAILED",
            **{
                "so8t.resume.attempts": 3,
                "so8t.resume.last_step": 40,
                "so8t.checkpoint.latest_step": 48,
            },
        ),
        "expired": make_run(client, tmp_path, "expired", "KILLED", heartbeat_age=200 * 3600),
        "given_up": make_run(client, tmp_path, "given_up", "KILLED", **{GIVEN_UP: "user"}),
        "remote_fresh": make_run(
            client,
            tmp_path,
            "remote_fresh",
            "RUNNING",
            folder=False,
            host="other-host",
            heartbeat_age=10,
        ),
        "remote_stale": make_run(
            client,
            tmp_path,
            "remote_stale",
            "RUNNING",
            folder=False,
            host="other-host",
            heartbeat_age=3600,
        ),
    }
    holder(tmp_path / "live_running")
    cfg = ResumeConfig(max_attempts=3, stale_after_seconds=300, max_age_hours=168)
    decisions = {
        d.run.name: d for d in (judge(r, cfg) for r in RunRegistry(store).runs(["so8t"], False))
    }
    expect = {
        "finished": "skip",
        "dead_running": "resume",
        "live_running": "skip",
        "killed": "resume",
        "failed_within": "resume",
        "failed_past": "give_up",
        "progressed": "resume",
        "expired": "expire",
        "given_up": "skip",
        "remote_fresh": "skip",
        "remote_stale": "resume",
    }
    assert {n: d.action for n, d in decisions.items()} == expect
    assert "holds the lock" in decisions["live_running"].reason
    assert "PID" in decisions["live_running"].reason
    assert decisions["failed_within"].attempt == 3 and decisions["progressed"].attempt == 1
    assert "other-host" in decisions["remote_fresh"].reason
    assert {d.state for n, d in decisions.items() if n in ("killed", "dead_running")} == {"dead"}
    assert decisions["live_running"].state == "alive"
    # unfinished runs only, newest first
    unfinished = RunRegistry(store).runs(["so8t"])
    assert [r.name for r in unfinished][0] == "remote_stale"
    assert "finished" not in {r.name for r in unfinished}

    recorder = Recorder()
    launcher = Launcher(cfg, store, ["so8t"], Notifiers({"rec": recorder}))
    for d in decisions.values():
        launcher.record(d)
    assert client.get_run(ids["failed_past"]).data.tags[GIVEN_UP].startswith("3 resumes")
    assert client.get_run(ids["expired"]).data.tags["so8t.expired"]
    assert [e for e, _ in recorder.events] == ["given_up"]
    again = judge(RunRegistry(store).get(ids["failed_past"]), cfg)
    assert again.action == "skip" and again.state == "given-up"


def test_claim_is_won_by_exactly_one_of_many(tmp_path: Path, store: str):
    client = MlflowClient(store)
    run_id = make_run(client, tmp_path, "contested", "KILLED")
    results: list[bool] = []
    start = threading.Barrier(6)

    def claim(i: int) -> None:
        registry = RunRegistry(store)
        start.wait()
        results.append(registry.claim(run_id, f"h:{i}:launcher", 0) is not None)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    run = client.get_run(run_id)
    assert newest_claim(run.data.params).number == 1
    assert run.data.tags["so8t.resume.count"] == "0"


def test_a_claimant_that_died_half_way_does_not_wedge_the_run(tmp_path: Path, store: str):
    """Claim 1 written, nothing after it (the launcher died): the next claim is 2 and wins."""
    client = MlflowClient(store)
    run_id = make_run(client, tmp_path, "half_claimed", "KILLED")
    client.log_param(run_id, "so8t.resume.claim.1", "h:1:dead@1700000000.000")
    claim = RunRegistry(store).claim(run_id, "h:2:next", 1)
    assert claim is not None and claim.number == 2
    assert newest_claim(client.get_run(run_id).data.params) == claim


def test_a_locked_database_delays_a_claim_instead_of_losing_it(tmp_path: Path, store: str):
    """A real sqlite write lock held by another connection: MLflow's writes fail with
    "database is locked" until it is released; the claim is retried and won."""
    client = MlflowClient(store)
    run_id = make_run(client, tmp_path, "busy_db", "KILLED")
    db = sqlite3.connect(
        tmp_path / "mlruns" / "mlflow.db", timeout=0, isolation_level=None, check_same_thread=False
    )
    db.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(4.0, lambda: db.execute("COMMIT"))
    released.start()
    try:
        claim = claim_run(MlflowClient(store), run_id, "h:3:patient", 0, retry_seconds=60)
    finally:
        released.join()
        db.close()
    assert claim is not None and claim.number == 1


def _claim_param(number: int, by: str, age: float) -> dict[str, str]:
    return {f"so8t.resume.claim.{number}": f"{by}@{time.time() - age:.3f}"}


def test_fresh_claim_is_respected(tmp_path: Path, store: str):
    client = MlflowClient(store)
    run_id = make_run(client, tmp_path, "claimed", "KILLED")
    for key, value in _claim_param(1, f"{host_id()}:1:x", 5).items():
        client.log_param(run_id, key, value)
    decision = judge(RunRegistry(store).get(run_id), ResumeConfig(claim_grace_seconds=120))
    assert decision.action == "skip" and f"being resumed by {host_id()}:1:x" in decision.reason
    decision = judge(RunRegistry(store).get(run_id), ResumeConfig(claim_grace_seconds=1))
    assert decision.action == "resume"


def test_another_hosts_run_is_judged_on_this_hosts_clock(tmp_path: Path, store: str):
    """The other host's clock is a day behind: its heartbeat tag looks a day old, but it
    changes, so the run is alive; once it stops changing for stale_after_seconds (on
    this host's clock) it is dead."""
    client = MlflowClient(store)
    run_id = make_run(
        client, tmp_path, "skewed", "RUNNING", folder=False, host="far", heartbeat_age=86400
    )
    cfg = ResumeConfig(stale_after_seconds=60)
    watch = HeartbeatWatch(tmp_path / "seen.json", max_gap=30)
    t0 = time.time()
    run = RunRegistry(store).get(run_id)
    first = judge(run, cfg, now=t0, watch=lambda r: watch.unchanged_for(r, t0))
    assert first.action == "watch" and "far" in first.reason and first.state == "unknown"
    watch.save()
    client.set_tag(run_id, "so8t.heartbeat", f"{t0 - 86400 + 30:.3f}")  # a beat, skewed
    later = HeartbeatWatch(tmp_path / "seen.json", max_gap=30)  # the next launcher goes on
    run = RunRegistry(store).get(run_id)

    def at(t: float):
        return judge(run, cfg, now=t0 + t, watch=lambda r: later.unchanged_for(r, t0 + t))

    assert at(20).action == "watch"  # it changed: counting starts over
    assert [at(t).action for t in (45, 70)] == ["watch", "watch"]
    quiet = at(85)  # unchanged for 65 s of unbroken watching
    assert quiet.action == "resume" and "last on far" in quiet.reason
    assert at(200).action == "watch"  # a gap in the watch: it may have been cut off too


def test_a_run_resumable_now_is_not_held_up_by_watching_another_host(tmp_path, store):
    """At boot the local dead run starts at once; another host's run is watched (minutes)
    only when nothing can be resumed now, or with ``resume.all``."""
    client = MlflowClient(store)
    make_run(client, tmp_path, "local-dead", "KILLED")
    remote = make_run(client, tmp_path, "remote", "RUNNING", folder=False, host="far")
    cfg = ResumeConfig(stale_after_seconds=3)
    started = time.monotonic()
    decisions = Launcher(cfg, store, ["so8t"], Notifiers({})).decisions()
    assert time.monotonic() - started < 2.5  # no watch: it would take 3 s and more
    by_name = {d.run.name: d.action for d in decisions}
    assert by_name == {"local-dead": "resume", "remote": "watch"}
    cfg_all = ResumeConfig(stale_after_seconds=3, all=True)
    decisions = Launcher(cfg_all, store, ["so8t"], Notifiers({})).decisions()
    assert {d.run.run_id: d.action for d in decisions}[remote] == "resume"  # watched: dead


def test_session_lock_is_exclusive_and_names_the_holder(tmp_path: Path, holder):
    folder = tmp_path / "s"
    assert not is_locked(folder)
    proc = holder(folder)
    assert is_locked(folder)
    with pytest.raises(SessionLocked, match=f"PID {proc.pid}"):
        SessionLock(folder).acquire()
    proc.kill()
    proc.wait()
    assert not is_locked(folder)  # the OS released it when the holder died
    with SessionLock(folder) as lock:
        assert lock.held and is_locked(folder)
    assert not is_locked(folder)


def test_claim_of_a_dead_launcher_on_this_host_is_ignored(tmp_path: Path, store: str):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = MlflowClient(store)
    run_id = make_run(client, tmp_path, "orphan_claim", "RUNNING")
    for key, value in _claim_param(1, f"{host_id()}:{dead.pid}:abcd", 5).items():
        client.log_param(run_id, key, value)
    decision = judge(RunRegistry(store).get(run_id), ResumeConfig(claim_grace_seconds=120))
    assert decision.action == "resume", decision.reason


@pytest.mark.parametrize(
    "value",
    [
        "/home/ユーザー/実験 1/run",
        "C:\\Users\\it's me\\run\\",
        'a "b" = c, [d] {e} &(f) ${g}',
        "sqlite:////tmp/x y/mlflow.db",
        "\\",
    ],
)
def test_quoted_override_values_come_back_unchanged_through_hydra(value: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[override("tracking.uri", value)])
    assert cfg.tracking.uri == value
