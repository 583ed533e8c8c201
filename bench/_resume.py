"""Benchmark 3: how long until a resumed run trains again, against a fresh start.

Each round prepares a resumable run — ``python -m so8t_exp.train +experiment=smoke`` with
more steps and a rolling checkpoint every 2 steps, SIGKILLed as soon as its
``session_info.json`` lists a checkpoint — then times, alternately:

* fresh: ``python -m so8t_exp.train`` (same overrides, another experiment so the launcher
  never sees it) from ``Popen`` to its first optimizer step;
* resumed: ``python -m so8t_exp.resume tracking.uri=<store>`` from ``Popen`` to the first
  NEW optimizer step of the killed run (launcher start-up, judging, claim, relaunch,
  checkpoint verification and restore included).

"Step reached" is read the same way for both: the MLflow timestamp (ms since the epoch,
stamped in the trainer when the step's metrics are handed to the tracker) of the earliest
``train/loss`` point with a step above the checkpoint's, minus ``time.time()`` taken in this
process just before ``Popen``. The store is created beforehand and both experiments exist,
so neither pays for the schema migration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import log, median, subprocess_env
from mlflow.tracking import MlflowClient

from so8t_exp.checkpoint import format as fmt
from so8t_exp.tracking import Tracker

TRAIN = [
    "+experiment=smoke",
    "trainer.max_steps=400",
    "checkpoint.every_n_steps=2",
    "trainer.progress_bar=false",
]


@dataclass
class Results:
    fresh: list[float] = field(default_factory=list)
    resumed: list[float] = field(default_factory=list)
    launcher: list[float] = field(default_factory=list)  # resume Popen -> "launching:" line
    recomputed: list[int] = field(default_factory=list)  # steps redone but not re-logged
    prepare_seconds: float = 0.0


class Bench:
    def __init__(self, root: Path, store: str) -> None:
        self.root, self.store = root, store
        self.env = subprocess_env(root)
        self.client = MlflowClient(tracking_uri=store)
        tracker = Tracker(store)
        for name in ("so8t", "bench_fresh"):  # as the trainer would create them
            tracker.experiment_id(name)

    def _train(self, session: Path, *extra: str) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "so8t_exp.train",
            f"tracking.uri={self.store}",
            f"hydra.run.dir={session.as_posix()}",
            *TRAIN,
            *extra,
        ]
        with open(self.root / f"{session.name}.log", "w") as out:  # the child keeps its copy
            return subprocess.Popen(
                cmd, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    # -- the steps of a round ---------------------------------------------------------
    def prepare(self, i: int) -> tuple[str, int, int]:
        """A dead run with a checkpoint: (run id, checkpoint step, highest step in the store).

        A resumed trainer recomputes the steps between the two without logging them again,
        so only when the store holds nothing past the checkpoint is its first logged step
        the first new one."""
        session = self.root / f"resumable-{i}"
        proc = self._train(session)
        try:
            info = _wait(lambda: _checkpointed(session), proc, 180)
        finally:
            proc.kill()  # SIGKILL
            proc.wait()
        newest = fmt.newest_valid(session / "checkpoints")
        ckpt = fmt.parse_name(newest.name)[1] if newest else 0
        logged = max([0, *(m.step for m in self._loss_points(info["session_id"]))])
        return info["session_id"], ckpt, logged

    def fresh(self, i: int) -> float:
        session = self.root / f"fresh-{i}"
        started = time.time()
        proc = self._train(session, "tracking.experiment=bench_fresh")
        try:
            run_id = _wait(lambda: _info(session).get("session_id"), proc, 180)
            first = _wait(lambda: self._first_point(run_id, 0, started), proc, 180)
        finally:
            proc.kill()
            proc.wait()
        return first - started

    def resume(self, i: int, run_id: str, after_step: int) -> tuple[float, float]:
        """(seconds to the first new step, seconds until the launcher starts the trainer)."""
        launched: list[float] = []
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={self.store}"],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its trainer child dies with it
        )
        reader = threading.Thread(
            target=_read, args=(proc, self.root / f"resume-{i}.log", launched), daemon=True
        )
        reader.start()
        try:
            first = _wait(lambda: self._first_point(run_id, after_step, started), proc, 180)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(5)
        # Out of the launcher's way for the next round (it resumes the newest dead run).
        self.client.set_terminated(run_id, "FINISHED")
        return first - started, (launched[0] - started) if launched else float("nan")

    # -- store reads ------------------------------------------------------------------
    def _loss_points(self, run_id: str) -> list:
        return self.client.get_metric_history(run_id, "train/loss")

    def _first_point(self, run_id: str, after_step: int, not_before: float) -> float | None:
        stamps = [
            m.timestamp / 1000
            for m in self._loss_points(run_id)
            if m.step > after_step and m.timestamp >= not_before * 1000 - 1
        ]
        return min(stamps) if stamps else None


def _info(session: Path) -> dict:
    try:
        return json.loads((session / "session_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _checkpointed(session: Path) -> dict | None:
    info = _info(session)
    return info if info.get("checkpoints") else None


def _wait(probe, proc: subprocess.Popen, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode} too early")
        time.sleep(every)
    raise TimeoutError(f"{proc.args[:3]}: nothing after {timeout} s")


def _read(proc: subprocess.Popen, path: Path, launched: list[float]) -> None:
    with open(path, "w") as fh:
        for line in proc.stdout:
            if not launched and "launching:" in line:
                launched.append(time.time())
            fh.write(line)


def run(root: Path, store: str, reps: int, deadline: float, tries: int = 3) -> Results:
    """Up to ``reps`` rounds (at least one; none started that the previous round's duration
    says would end after ``deadline``, a ``time.monotonic()`` value)."""
    bench, res = Bench(root, store), Results()
    last = 0.0
    for i in range(reps):
        started = time.monotonic()
        if i and started + last > deadline:
            break
        for t in range(tries):  # until the store holds nothing past the checkpoint
            run_id, ckpt, logged = bench.prepare(i * tries + t)
            if logged <= ckpt:
                break
            bench.client.set_terminated(run_id, "FINISHED")  # not this one
        res.prepare_seconds += time.monotonic() - started
        res.recomputed.append(max(0, logged - ckpt))
        res.fresh.append(bench.fresh(i))
        log(f"  resume round {i + 1}/{reps} fresh  : {res.fresh[-1]:6.2f} s to the first step")
        seconds, launcher = bench.resume(i, run_id, max(ckpt, logged))
        res.resumed.append(seconds)
        res.launcher.append(launcher)
        log(
            f"  resume round {i + 1}/{reps} resumed: {seconds:6.2f} s to the first new step"
            f" (checkpoint step {ckpt}, {res.recomputed[-1]} steps redone unlogged)"
        )
        last = time.monotonic() - started
    return res


def summary(res: Results) -> dict[str, float]:
    return {
        "fresh_seconds": median(res.fresh),
        "resumed_seconds": median(res.resumed),
        "launcher_seconds": median(res.launcher),
        "ratio": median(res.resumed) / median(res.fresh),
    }
