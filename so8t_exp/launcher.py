"""The resume launcher's work: judge each run, claim one, relaunch the trainer on it.

Which runs are resumable is :mod:`so8t_exp.verdict`'s call. Exactly once: the launcher
takes the session lock, re-reads the run, then claims it in MLflow with a write-once param
before it lets go of the lock and starts the trainer, which adopts that claim (fencing:
:mod:`so8t_exp.tracking.fencing`) and takes the lock for its own life.
"""

from __future__ import annotations

import gc
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import TextIO

from so8t_exp import sweep_resume
from so8t_exp.cli_errors import EXIT_LOCKED, shell_exit_code
from so8t_exp.config import ResumeConfig
from so8t_exp.host import host_id
from so8t_exp.lock import SessionLock, SessionLocked
from so8t_exp.notify import Notifiers
from so8t_exp.overrides import override, without
from so8t_exp.paths import project_root
from so8t_exp.takeover import handing_over
from so8t_exp.tracking import mask_override
from so8t_exp.tracking.claims import Claim, new_claimant, newest_claim
from so8t_exp.tracking.runs import ATTEMPTS, EXPIRED, GIVEN_UP, LAST_STEP, RunRecord, RunRegistry
from so8t_exp.verdict import Decision, HeartbeatWatch, is_local, judge, progress_step

__all__ = ["Decision", "Launcher", "judge"]

log = logging.getLogger(__name__)

# Overrides the launcher sets itself on a relaunch (recorded values are dropped).
_OWN_KEYS = ("hydra.run.dir", "tracking.uri", "session.lock_wait_seconds")


def _masked(cmd: list[str]) -> list[str]:
    """The command with secret-looking override values (webhook URLs, tokens) hidden."""
    return [mask_override(arg) for arg in cmd]


def session_folder(run: RunRecord) -> Path:
    """Where this host continues ``run``: its own folder if it was last trained here, else
    ``<project>/outputs/<run id>`` (another host's path means nothing here)."""
    # (so8t.host: the host of the trainer that wrote so8t.session_dir)
    written_here = run.tags.get("so8t.host") in (None, host_id())
    if is_local(run) and written_here and run.session_dir is not None:
        return run.session_dir
    return project_root() / "outputs" / run.run_id


class Launcher:
    def __init__(
        self, cfg: ResumeConfig, tracking_uri: str | None, experiments: list[str], notify: Notifiers
    ) -> None:
        self.cfg, self.notify = cfg, notify
        self.registry = RunRegistry(tracking_uri)
        self.experiments = experiments
        self.claimant = new_claimant()
        self.watch = HeartbeatWatch(
            project_root() / "logs" / "resume" / "heartbeats.json", cfg.stale_after_seconds / 2
        )

    def decisions(self) -> list[Decision]:
        """The verdict on every candidate run; runs owned by another host are watched
        (up to ``resume.stale_after_seconds``; not in a dry run, nor while a run can be
        resumed at once without ``resume.all``) until their heartbeat changes (alive) or it
        is clear that it will not (dead)."""
        if self.cfg.run_id:
            runs = [self.registry.get(self.cfg.run_id)]
            if runs[0].is_sweep_parent:  # (its trials tell whether the sweep progresses)
                runs += self.registry.runs([runs[0].experiment])
        else:
            runs = self.registry.runs(self.experiments, sweeps=True)
        out = [self._judge(run, runs) for run in runs]
        if self.cfg.run_id:
            out = out[:1]
        if not self.cfg.dry_run:
            out = self._watched(out)
        self.watch.save()
        return out

    def _judge(self, run: RunRecord, runs: list[RunRecord], lock_held: bool = False) -> Decision:
        trials = sweep_resume.trials_of(run, runs) if run.is_sweep_parent else None
        return judge(
            run, self.cfg, lock_held=lock_held, watch=self.watch.unchanged_for, trials=trials
        )

    def _watched(self, decisions: list[Decision]) -> list[Decision]:
        waiting = [d for d in decisions if d.action == "watch"]
        if not waiting:
            return decisions
        if not self.cfg.all and any(d.action == "resume" for d in decisions):
            # A run can be resumed now: minutes of watching another host's run would only
            # delay it. The observations are kept, so a later launcher judges those sooner.
            log.info("not watching %d run(s) of other hosts: one resumes now", len(waiting))
            return decisions
        stale = self.cfg.stale_after_seconds
        print(
            f"watching {len(waiting)} run(s) last trained on another host for up to "
            f"{stale:.0f}s (resume.stale_after_seconds): a live trainer's heartbeat changes",
            flush=True,
        )
        poll, deadline = min(5.0, max(0.2, stale / 10)), time.monotonic() + stale + 5
        while any(d.action == "watch" for d in decisions) and time.monotonic() < deadline:
            time.sleep(poll)
            decisions = [self._rewatch(d) if d.action == "watch" else d for d in decisions]
        return decisions

    def _rewatch(self, decision: Decision) -> Decision:
        try:
            run = self.registry.get(decision.run.run_id)
        except Exception as err:  # unreachable: no observation (the watch restarts after)
            log.warning("watching run %s: %s", decision.run.run_id, str(err)[:200])
            return decision
        return judge(run, self.cfg, watch=self.watch.unchanged_for)

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
        if run.is_sweep_parent:
            return self.resume_sweep(decision)
        folder = session_folder(run)
        lock = SessionLock(folder)
        try:
            lock.acquire(purpose="resume")
            # Re-read after taking the lock: another launcher may have just claimed it.
            # (A beat or claim since the watch shows as a change: alive after all.)
            fresh = judge(
                self.registry.get(run.run_id),
                self.cfg,
                lock_held=True,
                watch=self.watch.unchanged_for,
            )
            if fresh.action != "resume":
                log.info("run %s: %s", run.run_id, fresh.reason)
                return None
            judged = newest_claim(fresh.run.params)
            claim = self.registry.claim(run.run_id, self.claimant, judged.number if judged else 0)
            if claim is None:
                return None
            self.registry.set_tags(
                run.run_id, {ATTEMPTS: fresh.attempt, LAST_STEP: progress_step(fresh.run)}
            )
        except SessionLocked as err:
            log.info("run %s: %s", run.run_id, err)
            return None
        finally:
            lock.release()
        return self.launch(run, self.relaunch_overrides(run, folder), claim)

    def resume_sweep(self, decision: Decision) -> int | None:
        """Run the sweep's command again, in a child process: its exit code, or None when
        another sweeper holds the sweep (two launchers at once continue it once)."""
        run, folder = decision.run, sweep_resume.sweep_folder(decision.run)
        why = sweep_resume.settled(self.registry.get(run.run_id))
        if why is not None:
            log.info("sweep %s: %s", run.run_id, why)
            return None
        self.registry.set_tags(
            run.run_id, {ATTEMPTS: decision.attempt, LAST_STEP: decision.progress}
        )
        cmd = [
            sys.executable,
            "-m",
            "so8t_exp.train",
            *sweep_resume.command(run, self.registry.uri),
        ]
        log.info("continuing sweep %s: %s", run.name, " ".join(_masked(cmd)))
        with _tee_output(self.cfg.log_dir and Path(self.cfg.log_dir) or folder / "resume_logs"):
            code = _run_child(cmd, None)
        return None if code == EXIT_LOCKED else code

    def relaunch_overrides(self, run: RunRecord, folder: Path | None = None) -> list[str]:
        recorded = without(self.registry.recorded_overrides(run), _OWN_KEYS)
        folder = folder or session_folder(run)
        return [
            *recorded,
            override("hydra.run.dir", folder.as_posix()),
            override("tracking.uri", self.registry.uri),
            "session.lock_wait_seconds=30",
        ]

    def launch(
        self, run: RunRecord | None, overrides: list[str], claim: Claim | None = None
    ) -> int:
        """Run the trainer in the foreground (in this process unless ``resume.in_process``
        is off), handing it ``claim``; its output goes to the console and a log file."""
        logs = (
            self.cfg.log_dir
            and Path(self.cfg.log_dir)
            or (session_folder(run) / "resume_logs" if run else None)
        )
        size = run.world_size if run else 1
        cmd = train_command(overrides, size)
        in_process = self.cfg.in_process and size == 1  # (torchrun: always a child)
        where = "in this process" if in_process else "as a child process"
        log.info("launching: %s (%s)", " ".join(_masked(cmd)), where)
        handover = handing_over(run.run_id, claim) if run and claim else nullcontext()
        with _tee_output(logs), handover as env:
            if in_process:
                from so8t_exp.train import run_in_process  # torch & co. load only now

                try:
                    return run_in_process(overrides)
                finally:
                    _free_session()
            return _run_child(cmd, env)


def train_command(overrides: list[str], world_size: int = 1) -> list[str]:
    """The command that trains with ``overrides``: a run of several processes is started
    again as it was, under torchrun, all of them on this machine."""
    if world_size <= 1:
        return [sys.executable, "-m", "so8t_exp.train", *overrides]
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"]
    return [sys.executable, *torchrun, "-m", "so8t_exp.train", *overrides]


def _free_session() -> None:
    """Free what the finished in-process session left (cyclic garbage, the CUDA cache) before
    the launcher starts the next one: two models must never share the GPU."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_child(cmd: list[str], env: dict[str, str] | None) -> int:
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    # Ctrl-C, and systemd's SIGTERM to the unit's every process at shutdown, reach the
    # trainer too, which stops cleanly; the launcher stays to pass on its last lines and
    # report how it ended instead of dying first (the trainer would write into a dead pipe).
    ignored = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return shell_exit_code(code)


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
