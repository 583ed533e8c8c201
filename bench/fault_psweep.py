"""Scenario ``sweep_parallel`` of ``bench/faults.py``: the Optuna sweep of scenario ``sweep``
(``bench/fault_sweep.py``: its ``Sweep``, ``Legs`` and checks) with two trials at once
(``hydra.sweeper.n_jobs=2``: each trial a ``python -m so8t_exp.train`` child of the sweeper),
killed at moments drawn from the suite's seeded RNG: while both trials train (after a
checkpoint of each), and when a trial has finished and the next one is starting. Kills:
SIGKILL of the sweeper process only (its trial processes must see it gone and stop by
themselves: emergency checkpoint, trial left RUNNING), SIGKILL of the whole process group,
SIGTERM to the group. Continuations alternate between the sweep's command and the resume
launcher. A parallel sweep's parameters are not reproducible: no reference sweep.

``psweep_kills`` signals delivered; ``psweep_trials_expected`` ``n_trials``;
``psweep_trials_finished`` COMPLETE or PRUNED trials; ``psweep_trials_duplicated`` and
``psweep_trials_orphaned`` as ``sweep_trials_*`` (plus trial numbers 0..n-1 without their
run or job folder); ``psweep_orphan_trainers`` trainer processes still alive 30 s after their
sweeper was killed (must be 0).
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from dataclasses import dataclass

import psutil
from fault_sweep import Legs, Sweep, Tally, check_after_end, check_record

SLOW = {"SO8T_FAULT_STEP_SECONDS": "0.8"}  # a trial trains ~5 s: kills land mid-training
ORPHAN_SECONDS = 30  # a trainer must stop by itself within this after its sweeper was killed


@dataclass(frozen=True)
class Kill:
    """A signal and its target: the whole process group, or the sweeper process only."""

    sig: signal.Signals
    group: bool

    @property
    def name(self) -> str:
        return f"{self.sig.name} of the {'process group' if self.group else 'sweeper only'}"


SWEEPER_KILL = Kill(signal.SIGKILL, group=False)
KILLS = (SWEEPER_KILL, Kill(signal.SIGKILL, group=True), Kill(signal.SIGTERM, group=True))


def psweep_plan(rng: random.Random, kills: int, n_trials: int):
    """(moment, Kill) per kill, then the continuation of each leg after the first. Moments
    alternate training / between (a trial finished, the next starting), training first, as
    long as a trial is still to start after one finishes (two run at once: n_trials - 2
    times at most); the first kill is the sweeper's alone, while both trials train (with
    more kills than kinds, also the first launcher leg's); each kind at least once."""
    moments, betweens = [], 0
    for i in range(kills):
        if i % 2 and betweens < n_trials - 2:
            moments.append("between")
            betweens += 1
        else:
            moments.append("training")
    kinds = ["command", "launcher"]
    rng.shuffle(kinds)
    conts = [kinds[i % 2] for i in range(kills + 12)]
    # the sweeper's alone: in the first leg; with room, also in the first launcher's leg
    # (the launcher, the sweeper's parent, outlives it)
    alone = {0, 1 + conts.index("launcher")} if kills > len(KILLS) else {0}
    rest = list(KILLS[1:]) + [rng.choice(KILLS) for _ in range(kills - len(alone) - 2)]
    rng.shuffle(rest)
    sigs = [SWEEPER_KILL if i in alone else rest.pop() for i in range(kills)]
    return list(zip(moments, sigs, strict=True)), conts


def _is_train(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE and "so8t_exp.train" in proc.cmdline()
    except psutil.Error:
        return False


def _alive(proc: psutil.Process) -> bool:
    try:  # (a zombie has exited: only its parent has not reaped it yet)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ParallelLegs(Legs):
    """``Legs`` with the moments and kills of two trials at once, and the trainer processes
    that outlive their killed sweeper."""

    def __init__(self, suite, sw: Sweep, rng: random.Random) -> None:
        super().__init__(suite, sw, rng)
        self.orphan_trainers = 0

    def family(self, procs) -> tuple[psutil.Process | None, list[psutil.Process]]:
        """(the sweeper, its trainers) among the leg's processes: the sweeper is the
        ``so8t_exp.train`` the leg started (itself, or the launcher's child), the trainers
        are its ``so8t_exp.train`` children."""
        sweeper = None
        for p in procs:
            if p.poll() is not None:
                continue
            try:
                root = psutil.Process(p.pid)
                found = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            sweeper = sweeper or next((q for q in found if _is_train(q)), None)
        if sweeper is None:
            return None, []
        try:
            return sweeper, [q for q in sweeper.children() if _is_train(q)]
        except psutil.Error:
            return sweeper, []

    def training(self, snap: dict) -> bool:
        """Every trial that can train now (two, or the last one left) has made a checkpoint
        in this leg."""
        now = self.sw.folders()
        completed = sum(i.get("status") == "completed" for i in now.values())
        need = min(2, self.sw.n_trials - completed)
        moved = [
            n
            for n, i in now.items()
            if i.get("status") != "completed"
            and i.get("current_step", 0) > snap.get(n, {}).get("current_step", 0)
        ]
        return need > 0 and len(moved) >= need

    def moment(self, moment: str, procs, kind: str) -> tuple[bool, str]:
        snap = self.sw.folders()
        if moment == "training":
            delay = self.rng.uniform(0.0, 0.6)
            what = f"a checkpoint of each training trial, then {delay:.2f}s"
            if self.wait(lambda: self.training(snap), procs, 300, what):
                time.sleep(delay)
            return self.alive(procs), what
        delay = self.rng.uniform(0.0, 1.5)  # the sweeper polls its trials every 0.5 s

        def ended() -> bool:
            return any(
                i.get("status") == "completed" and snap.get(n, {}).get("status") != "completed"
                for n, i in self.sw.folders().items()
            )

        what = f"a trial's session completed, then {delay:.2f}s (the next trial starting)"
        if self.wait(ended, procs, 300, what):
            time.sleep(delay)
        return self.alive(procs), what

    def signal(self, procs, kill: Kill) -> list[int]:
        f = self.f
        self.note_killed()
        sweeper, trainers = self.family(procs)
        if kill.group or sweeper is None:
            if not kill.group:
                self.suite.say("no sweeper process found: the whole group is SIGKILLed")
            for p in procs:
                if p.poll() is None:
                    f.kill_group(p.pid, kill.sig)
        else:
            with contextlib.suppress(psutil.Error):
                sweeper.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        pgids = [p.pid for p in procs]
        # (a trainer started between the look and the kill: any so8t_exp.train of the group)
        known = {t.pid for t in trainers} | {sweeper.pid if sweeper else None}
        for pid in [m for g in pgids for m in f.group_members(g)]:
            if sweeper is not None and pid not in known:
                try:
                    extra = psutil.Process(pid)
                except psutil.Error:
                    continue
                if _is_train(extra):
                    trainers.append(extra)
        while any(_alive(t) for t in trainers) and time.monotonic() - t0 < ORPHAN_SECONDS:
            time.sleep(0.1)
        left = [t for t in trainers if _alive(t)]
        gone = time.monotonic() - t0
        self.suite.say(
            f"{len(trainers)} trainer(s) at the kill; all gone after {gone:.1f}s"
            if not left
            else f"{len(left)} of {len(trainers)} trainer(s) alive {ORPHAN_SECONDS}s after"
        )
        if left:
            self.orphan_trainers += len(left)
            self.suite.problem(
                f"trainer process(es) alive {ORPHAN_SECONDS}s after their sweeper was killed "
                f"({kill.name})",
                f"pids {[t.pid for t in left]}; {self.sw.where()}",
                [self.sw.dir / str(n) / "trial_output.log" for n in self.sw.folders()],
            )
            for t in left:
                with contextlib.suppress(psutil.Error):
                    t.kill()
        codes = [f.wait_exit(p, 180, "signalled sweep or launcher") for p in procs]
        for g in pgids:
            if not f.wait_group_gone(g, 60):
                raise f.Stuck(f"process group {g} alive 60s after {kill.name}")
        return codes


def scenario_sweep_parallel(suite) -> dict:
    """An Optuna sweep with two trials at once killed anywhere: it continues exactly."""
    rng = suite.rng("sweep_parallel")
    n_trials, kills = (3, 3) if suite.args.quick else (4, 5)
    plan, conts = psweep_plan(rng, kills, n_trials)
    suite.say(f"{n_trials} trials, 2 at once; kills {[(m, k.name) for m, k in plan]}")
    suite.say(f"continuations after the first leg: {conts[:kills]}, then {conts[kills:]}")
    sw = Sweep(suite, "sweep_parallel", n_trials, ("hydra.sweeper.n_jobs=2",), **SLOW)
    legs = ParallelLegs(suite, sw, rng)
    legs.run(plan, conts)
    tally = Tally(sw, legs)
    missing = {f"trial {n}: no child run" for n in range(n_trials) if n not in tally.by_trial}
    missing |= {f"trial {n}: no job folder" for n in range(n_trials) if n not in tally.folders}
    if missing:
        suite.problem("trial numbers without their run or job folder", "; ".join(sorted(missing)))
    check_record(suite, sw, legs, tally)
    check_after_end(suite, sw)
    return {
        "psweep_kills": legs.kills,
        "psweep_trials_expected": n_trials,
        "psweep_trials_finished": len(tally.finished),
        "psweep_trials_duplicated": len(tally.duplicated),
        "psweep_trials_orphaned": len(tally.orphaned | missing),
        "psweep_orphan_trainers": legs.orphan_trainers,
    }
