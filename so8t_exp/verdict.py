"""What the resume launcher would do with one run, and why (reads; changes nothing).

A run is resumable when it is not FINISHED, not a sweep's parent, not given up, not expired
and not alive. Alive is decided where the run's owner (the host of its newest claim) is:
on this host, the session folder's OS lock (a SIGKILLed trainer holds no lock, however
fresh its heartbeat); on another host, a heartbeat that this launcher has seen change,
on its own clock, within ``resume.stale_after_seconds`` — two machines' clocks are never
compared, so clock skew cannot make a live run look dead.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from so8t_exp import sweep_resume
from so8t_exp.config import ResumeConfig
from so8t_exp.fsutil import atomic_write_json
from so8t_exp.host import host_id
from so8t_exp.lock import describe_holder, is_locked
from so8t_exp.tracking import HEARTBEAT_TAG
from so8t_exp.tracking.claims import Claim, newest_claim
from so8t_exp.tracking.runs import ATTEMPTS, EXPIRED, GIVEN_UP, LAST_STEP, RunRecord

log = logging.getLogger(__name__)

_STATES = {"give_up": "given-up", "expire": "expired", "watch": "unknown"}


@dataclass
class Decision:
    run: RunRecord
    action: str  # resume | skip | give_up | expire | watch (not judged yet: being watched)
    reason: str
    attempt: int = 0  # consecutive attempts without progress, counting this one
    progress: int | None = None  # what "progress" counted (None: the newest checkpoint step)

    @property
    def state(self) -> str:
        """alive / dead / expired / given-up / finished / unknown, for tables."""
        if self.run.status == "FINISHED":
            return "finished"
        if self.action in _STATES:
            return _STATES[self.action]
        if GIVEN_UP in self.run.tags:
            return "given-up"
        if EXPIRED in self.run.tags:
            return "expired"
        return "alive" if self.reason.startswith("alive") else "dead"


def owner_host(run: RunRecord) -> str | None:
    """The host of the run's newest claim (else of its last trainer)."""
    claim = newest_claim(run.params)
    return claim.host if claim else run.tags.get("so8t.host")


def is_local(run: RunRecord) -> bool:
    return owner_host(run) in (None, host_id())


def progress_step(run: RunRecord) -> int:
    """Newest checkpoint step: from the session file where this host has it (the MLflow tag
    lags while uploads are slow), else from the tag."""
    info = run.session_dir / "session_info.json" if run.session_dir and is_local(run) else None
    try:
        local = json.loads(info.read_text(encoding="utf-8"))["current_step"] if info else 0
    except (OSError, ValueError, KeyError):
        local = 0
    return max(int(local or 0), run.checkpoint_step)


def claimant_alive(claim: Claim) -> bool:
    """Whether the process that made ``claim`` may still be starting the run. On this host
    its PID tells (a launcher killed right after claiming must not block the run for the
    whole grace period); another host's is given the benefit of the doubt."""
    if claim.host != host_id() or claim.pid is None:
        return True
    return psutil.pid_exists(claim.pid)


class HeartbeatWatch:
    """How long this host has seen each run's heartbeat (and newest claim) unchanged, on
    this host's clock, kept in a small file so that the next launcher goes on counting.

    Only an unbroken watch counts: reads more than ``max_gap`` seconds apart (this host
    could not reach the server, or no launcher ran) start the count again — the trainer
    may have been unable to beat for the same reason."""

    def __init__(self, path: Path | None, max_gap: float) -> None:
        self.path, self.max_gap = path, max_gap
        self.seen: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self.seen = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.seen = {}

    def unchanged_for(self, run: RunRecord, now: float | None = None) -> float:
        now = now or time.time()
        claim = newest_claim(run.params)
        token = f"{run.tags.get(HEARTBEAT_TAG)}|{claim and claim.value}|{run.status}"
        seen = self.seen.get(run.run_id)
        if seen and len(seen) == 3 and seen[0] == token and 0 <= now - seen[2] <= self.max_gap:
            seen[2] = now
            return now - seen[1]
        self.seen[run.run_id] = [token, now, now]  # token, unchanged since, last read
        return 0.0

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # sessions/boot: no Hydra dir
            atomic_write_json(self.path, self.seen)
        except OSError as err:  # only costs the next launcher a longer watch
            log.warning("could not keep heartbeat observations in %s: %s", self.path, err)


def judge(
    run: RunRecord,
    cfg: ResumeConfig,
    now: float | None = None,
    lock_held: bool = False,
    watch: Callable[[RunRecord], float] | None = None,
    trials: list[RunRecord] | None = None,
) -> Decision:
    """What the launcher would do with ``run``. ``lock_held``: this process holds the
    session lock already (so it is not alive); ``watch``: seconds this host has seen the
    heartbeat unchanged (None: no watcher, so the heartbeat's own time is compared);
    ``trials``: for an Optuna sweep's parent, its trials' runs (:mod:`.sweep_resume`)."""
    now = now or time.time()
    if run.is_sweep_parent and sweep_resume.is_study_sweep(run.tags):
        return _judge_sweep(run, cfg, trials or [])
    settled = _settled(run) or _alive(run, cfg, now, lock_held, watch)
    if settled is not None:
        return settled
    age = now - run.heartbeat
    if age > cfg.max_age_hours * 3600:
        why = f"last heartbeat {age / 3600:.1f}h ago > resume.max_age_hours={cfg.max_age_hours}"
        return Decision(run, "expire", why)
    claim = newest_claim(run.params)
    if (
        claim is not None
        and claim.time is not None
        and now - claim.time < cfg.claim_grace_seconds
        and run.heartbeat < claim.time
        and claimant_alive(claim)
    ):
        why = f"being resumed by {claim.by} ({now - claim.time:.0f}s ago)"
        return Decision(run, "skip", why)
    return _attempt(run, cfg)


def _settled(run: RunRecord) -> Decision | None:
    if run.status == "FINISHED":
        return Decision(run, "skip", "finished")
    if run.is_sweep_parent:
        return Decision(run, "skip", "a sweep's parent run, not a session")
    if sweep_resume.is_study_sweep(run.tags):
        return Decision(run, "skip", sweep_resume.trial_reason(run))
    if run.tags.get(GIVEN_UP):
        return Decision(run, "skip", f"given up ({run.tags[GIVEN_UP]})")
    if run.tags.get(EXPIRED):
        return Decision(run, "skip", "expired")
    return None


def _alive(
    run: RunRecord, cfg: ResumeConfig, now: float, lock_held: bool, watch
) -> Decision | None:
    host, stale = owner_host(run), cfg.stale_after_seconds
    if host in (None, host_id()):
        folder = run.session_dir
        if folder is not None and folder.is_dir() and not lock_held and is_locked(folder):
            return Decision(run, "skip", f"alive: {describe_holder(folder)} holds the lock")
        return None
    if run.status != "RUNNING":  # closed by its own trainer
        return None
    if watch is None:
        age = now - run.heartbeat
        if age < stale:
            return Decision(run, "skip", f"alive on {host} (heartbeat {age:.0f}s ago, its clock)")
        return None
    quiet = watch(run)
    if quiet < stale:
        why = f"on {host}: heartbeat unchanged for {quiet:.0f}s of {stale:.0f}s (watching)"
        return Decision(run, "watch", why)
    return None


def _judge_sweep(parent: RunRecord, cfg: ResumeConfig, trials: list[RunRecord]) -> Decision:
    why = sweep_resume.settled(parent)
    if why is not None:
        return Decision(parent, "skip", why)
    why = sweep_resume.expired(parent, trials, cfg)
    if why is not None:
        return Decision(parent, "expire", why)
    done = sweep_resume.describe_progress(parent)
    attempt = _attempts(parent, cfg, sweep_resume.progress(parent, trials), done)
    if attempt.action == "resume":
        attempt.reason = f"sweep, {parent.status.lower()}, dead, {done} finished"
    return attempt


def _attempts(run: RunRecord, cfg: ResumeConfig, progress: int, where: str) -> Decision:
    """The next attempt, or giving up after ``resume.max_attempts`` without progress."""
    progressed = progress > int(run.tag_float(LAST_STEP, -1))
    attempt = 1 if progressed else int(run.tag_float(ATTEMPTS, 0)) + 1
    if attempt > cfg.max_attempts:
        why = (
            f"{attempt - 1} resumes without progress past {where} "
            f"(resume.max_attempts={cfg.max_attempts})"
        )
        return Decision(run, "give_up", why, attempt, progress)
    return Decision(run, "resume", "", attempt, progress)


def _attempt(run: RunRecord, cfg: ResumeConfig) -> Decision:
    decision = _attempts(run, cfg, progress_step(run), f"step {run.checkpoint_step}")
    if decision.action != "resume":
        return decision
    where = ""
    if not is_local(run):
        where = f" (last on {owner_host(run)}: checkpoint from MLflow)"
    elif run.session_dir is not None and not run.session_dir.is_dir():
        where = " (session folder missing: checkpoint from MLflow)"
    decision.reason = f"{run.status.lower()}, dead, step {run.checkpoint_step}{where}"
    return decision
