"""The resume launcher's work: judge each run, claim one, relaunch the trainer on it.

A run is resumable when it is not FINISHED, not a sweep's parent, not given up, not expired
and not alive.
Alive: on this host the session folder's OS lock decides (a SIGKILLed trainer holds no lock,
however fresh its heartbeat); for a folder this host does not have, a heartbeat younger
than ``resume.stale_after_seconds``. Exactly once: the launcher takes the session lock,
re-reads the run, then claims it in MLflow with a write-once param before it lets go of the
lock and starts the trainer, which takes the lock for its own life.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

import psutil

from so8t_exp.config import ResumeConfig
from so8t_exp.lock import SessionLock, SessionLocked, describe_holder, is_locked
from so8t_exp.notify import Notifiers
from so8t_exp.paths import project_root
from so8t_exp.tracking import mask_override
from so8t_exp.tracking.runs import (
    ATTEMPTS,
    CLAIM_BY,
    CLAIM_TIME,
    EXPIRED,
    GIVEN_UP,
    LAST_STEP,
    RESUME_COUNT,
    RunRecord,
    RunRegistry,
)

log = logging.getLogger(__name__)

# Overrides the launcher sets itself on a relaunch (recorded values are dropped).
_OWN_KEYS = ("hydra.run.dir", "tracking.uri", "session.lock_wait_seconds")


@dataclass
class Decision:
    run: RunRecord
    action: str  # resume | skip | give_up | expire
    reason: str
    attempt: int = 0  # consecutive attempts without progress, counting this one

    @property
    def state(self) -> str:
        """alive / dead / expired / given-up / finished, for tables."""
        if self.run.status == "FINISHED":
            return "finished"
        if self.action in ("give_up", "expire"):
            return {"give_up": "given-up", "expire": "expired"}[self.action]
        if GIVEN_UP in self.run.tags:
            return "given-up"
        if EXPIRED in self.run.tags:
            return "expired"
        return "alive" if self.reason.startswith("alive") else "dead"


def progress_step(run: RunRecord) -> int:
    """Newest checkpoint step: from the session file where this host has it (the MLflow tag
    lags while uploads are slow), else from the tag."""
    info = run.session_dir / "session_info.json" if run.session_dir else None
    try:
        local = json.loads(info.read_text(encoding="utf-8"))["current_step"] if info else 0
    except (OSError, ValueError, KeyError):
        local = 0
    return max(int(local or 0), run.checkpoint_step)


def claimant_alive(claim_by: str) -> bool:
    """Whether the launcher that claimed a run may still be starting it. On this host its
    PID tells (a launcher killed right after claiming must not block the run for the whole
    grace period); another host's launcher is given the benefit of the doubt."""
    host, _, rest = claim_by.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return psutil.pid_exists(int(pid))


def judge(
    run: RunRecord, cfg: ResumeConfig, now: float | None = None, lock_held: bool = False
) -> Decision:
    """What the launcher would do with ``run`` (reads the lock; changes nothing).
    ``lock_held``: this process holds the session lock already (so it is not alive)."""
    now = now or time.time()
    age = now - run.heartbeat
    if run.status == "FINISHED":
        return Decision(run, "skip", "finished")
    if run.is_sweep_parent:
        return Decision(run, "skip", "a sweep's parent run, not a session")
    if run.tags.get(GIVEN_UP):
        return Decision(run, "skip", f"given up ({run.tags[GIVEN_UP]})")
    if run.tags.get(EXPIRED):
        return Decision(run, "skip", "expired")
    folder = run.session_dir
    if folder is not None and folder.is_dir():
        if not lock_held and is_locked(folder):
            return Decision(run, "skip", f"alive: {describe_holder(folder)} holds the lock")
    elif (
        run.tags.get("so8t.host") != socket.gethostname()
        and run.status == "RUNNING"
        and age < cfg.stale_after_seconds
    ):
        return Decision(
            run, "skip", f"alive on {run.tags.get('so8t.host')} (heartbeat {age:.0f}s ago)"
        )
    if age > cfg.max_age_hours * 3600:
        return Decision(
            run,
            "expire",
            f"last heartbeat {age / 3600:.1f}h ago > resume.max_age_hours={cfg.max_age_hours}",
        )
    claimed = run.tag_float(CLAIM_TIME)
    if (
        claimed is not None
        and now - claimed < cfg.claim_grace_seconds
        and run.tag_float("so8t.heartbeat", 0) < claimed
        and claimant_alive(run.tags.get(CLAIM_BY, ""))
    ):
        return Decision(
            run, "skip", f"being resumed by {run.tags.get(CLAIM_BY)} ({now - claimed:.0f}s ago)"
        )
    progressed = progress_step(run) > int(run.tag_float(LAST_STEP, -1))
    attempt = 1 if progressed else int(run.tag_float(ATTEMPTS, 0)) + 1
    if attempt > cfg.max_attempts:
        return Decision(
            run,
            "give_up",
            f"{attempt - 1} resumes without progress past step "
            f"{run.checkpoint_step} (resume.max_attempts="
            f"{cfg.max_attempts})",
            attempt,
        )
    where = (
        ""
        if folder is None or folder.is_dir()
        else " (session folder missing: checkpoint from MLflow)"
    )
    return Decision(
        run, "resume", f"{run.status.lower()}, dead, step {run.checkpoint_step}{where}", attempt
    )


def _masked(cmd: list[str]) -> list[str]:
    """The command with secret-looking override values (webhook URLs, tokens) hidden."""
    return [mask_override(arg) for arg in cmd]


class Launcher:
    def __init__(
        self, cfg: ResumeConfig, tracking_uri: str | None, experiments: list[str], notify: Notifiers
    ) -> None:
        self.cfg, self.notify = cfg, notify
        self.registry = RunRegistry(tracking_uri)
        self.experiments = experiments
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def decisions(self) -> list[Decision]:
        if self.cfg.run_id:
            return [judge(self.registry.get(self.cfg.run_id), self.cfg)]
        return [judge(run, self.cfg) for run in self.registry.runs(self.experiments)]

    def record(self, decision: Decision) -> None:
        """Persist a give-up or expiry as tags (and tell the user about a give-up)."""
        run = decision.run
        if decision.action == "give_up":
            self.registry.set_tags(run.run_id, {GIVEN_UP: decision.reason})
            self.notify("given_up", f"run {run.run_id} ({run.name}): {decision.reason}")
        elif decision.action == "expire":
            self.registry.set_tags(run.run_id, {EXPIRED: decision.reason})

    def resume(self, decision: Decision) -> int | None:
        """Claim and relaunch; the trainer's exit code, or None if another launcher won."""
        run = decision.run
        folder = run.session_dir
        lock = SessionLock(folder) if folder is not None else None
        try:
            if lock is not None:
                lock.acquire(purpose="resume")
            # Re-read after taking the lock: another launcher may have just claimed it.
            fresh = judge(self.registry.get(run.run_id), self.cfg, lock_held=lock is not None)
            if fresh.action != "resume":
                log.info("run %s: %s", run.run_id, fresh.reason)
                return None
            number = int(fresh.run.tag_float(RESUME_COUNT, 0)) + 1
            if not self.registry.claim(run.run_id, number, self.claimant):
                return None
            self.registry.set_tags(
                run.run_id, {ATTEMPTS: fresh.attempt, LAST_STEP: progress_step(fresh.run)}
            )
        except SessionLocked as err:
            log.info("run %s: %s", run.run_id, err)
            return None
        finally:
            if lock is not None:
                lock.release()
        return self.launch(run, self.relaunch_overrides(run))

    def relaunch_overrides(self, run: RunRecord) -> list[str]:
        recorded = [
            o
            for o in self.registry.recorded_overrides(run)
            if o.split("=", 1)[0].lstrip("+~") not in _OWN_KEYS
        ]
        folder = run.session_dir or project_root() / "outputs" / run.run_id
        return [
            *recorded,
            f"hydra.run.dir={folder.as_posix()}",
            f"tracking.uri={self.registry.uri}",
            "session.lock_wait_seconds=30",
        ]

    def launch(self, run: RunRecord | None, overrides: list[str]) -> int:
        """Run the trainer in the foreground (in this process unless ``resume.in_process``
        is off); its output goes to the console and a log file."""
        logs = (
            self.cfg.log_dir
            and Path(self.cfg.log_dir)
            or (run.session_dir / "resume_logs" if run and run.session_dir else None)
        )
        cmd = [sys.executable, "-m", "so8t_exp.train", *overrides]
        where = "in this process" if self.cfg.in_process else "as a child process"
        log.info("launching: %s (%s)", " ".join(_masked(cmd)), where)
        with _tee_output(logs):
            if self.cfg.in_process:
                from so8t_exp.train import run_in_process  # torch & co. load only now

                return run_in_process(overrides)
            return _run_child(cmd)


def _run_child(cmd: list[str]) -> int:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    # Ctrl-C reaches the trainer too, which stops cleanly; the launcher stays to report
    # how it ended instead of dying first with a traceback.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code  # killed by signal N: 128+N, as a shell


class _Tee:
    """A text stream that also copies everything to a log file."""

    def __init__(self, stream: TextIO, copy: TextIO) -> None:
        self._stream, self._copy = stream, copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        self._copy.flush()  # the log must hold everything up to a crash
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno, ... of the console
        return getattr(self._stream, name)


@contextmanager
def _tee_output(folder: Path | None) -> Iterator[None]:
    """Copy stdout and stderr to ``folder/train_<time>.log`` while the trainer runs."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out, err = sys.stdout, sys.stderr
    with open(folder / f"train_{stamp}.log", "a", encoding="utf-8", errors="replace") as copy:
        sys.stdout, sys.stderr = _Tee(out, copy), _Tee(err, copy)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
