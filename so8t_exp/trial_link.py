"""The in-process bridge from a trainer's evaluations to the Optuna trial it is training.

The sweeper (:mod:`so8t_exp.sweeper`) runs each trial with Hydra's BasicLauncher, in its
own process, so it can hand the trainer a live link: :func:`attach` before the launch,
:func:`detach` after. With ``n_jobs`` > 1 each trial trains in a child process, which
rebuilds its link from ``SO8T_TRIAL`` (:mod:`so8t_exp.sweeper.parallel`).
The trainer asks :func:`current` for the link *of its own session
folder* (never a stale one) and reports every evaluation; the link says whether to prune.
No optuna import here: this module loads with every training run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from so8t_exp.fsutil import atomic_write_json

log = logging.getLogger(__name__)

TRIAL_ENV = "SO8T_TRIAL"  # the trial of a trainer started by a sweeper (JSON, see _link_from)
_WATCH_SECONDS = 1.0
RESULT_FILE = "trial_result.json"  # in the job folder: a final verdict (PRUNED), see read_result
SO8T_OBJECTIVE = "so8t"  # REFUSE recall + macro-F1 - ECE


def objective_value(metrics: Mapping[str, float], objective: str) -> float | None:
    """The objective from one evaluation's metrics; None when it was not computed (no head,
    no labelled validation examples)."""
    if objective == SO8T_OBJECTIVE:
        parts = [metrics.get(k) for k in ("eval/refuse_recall", "eval/macro_f1", "eval/ece")]
        if any(p is None for p in parts):
            return None
        recall, f1, ece = (float(p) for p in parts)
        return recall + f1 - ece
    value = metrics.get(objective)
    return None if value is None else float(value)


class TrialLink:
    """One trial as its trainer sees it. ``trial`` is an ``optuna.trial.Trial``."""

    def __init__(self, trial: Any, objective: str, job_dir: Path, prune: bool) -> None:
        self.trial, self.objective, self.prune = trial, objective, prune
        self.job_dir = job_dir.resolve()
        self.final_value: float | None = None
        self.final_step: int | None = None
        self.pruned = False

    def report(self, metrics: Mapping[str, float], step: int, final: bool = False) -> bool:
        """Record one evaluation at optimizer ``step``; True: prune the trial now (never at
        the ``final`` one)."""
        value = objective_value(metrics, self.objective)
        if value is None or not math.isfinite(value):
            return False
        self.final_value, self.final_step = value, step
        # A resumed trainer may repeat an evaluation: the first value of a step stays.
        if step not in self.trial._cached_frozen_trial.intermediate_values:
            self.trial.report(value, step)
        # should_prune is a function of the storage only: a trainer killed between the
        # report and this decision makes the same decision after its resume.
        self.pruned = self.prune and not final and self.trial.should_prune()
        if self.pruned:  # final: a re-run tells PRUNED without training again
            write_result(self.job_dir, {"state": "PRUNED", "value": value, "step": step})
        return self.pruned


def write_result(job_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_json(job_dir / RESULT_FILE, result)


def read_result(job_dir: Path) -> dict[str, Any] | None:
    """The verdict written into ``job_dir`` (None: none, or unreadable)."""
    try:
        return json.loads((job_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_active: TrialLink | None = None


def attach(link: TrialLink) -> None:
    global _active
    _active = link


def detach() -> None:
    global _active
    _active = None


def current(session_dir: Path) -> TrialLink | None:
    """The link of the trial trained in ``session_dir``: attached by the sweeper in this
    process, or described in ``SO8T_TRIAL`` by a sweeper that started this process."""
    if _active is not None and _active.job_dir == session_dir.resolve():
        return _active
    spec = os.environ.get(TRIAL_ENV)
    if spec:
        spec = json.loads(spec)
        if Path(spec["job_dir"]).resolve() == session_dir.resolve():
            attach(_link_from(spec))
            return _active
    return None


def _link_from(spec: dict[str, Any]) -> TrialLink:
    """The link of a trial trained in a child process of its sweeper (``n_jobs`` > 1):
    the trial re-attached from the study's storage, and a watch on the sweeper."""
    import optuna  # (only in a sweep's trial process)

    from so8t_exp.sweeper.study import build_pruner

    study = optuna.load_study(
        study_name=spec["study"], storage=spec["storage"], pruner=build_pruner(spec["pruner"])
    )
    trial = optuna.trial.Trial(study, spec["trial_id"])
    watch_sweeper()  # (started at the process's start already: see so8t_exp.train.main)
    return TrialLink(trial, spec["objective"], Path(spec["job_dir"]), spec["pruner"] is not None)


_watching = False


def watch_sweeper() -> None:
    """In a trial's child process (``SO8T_TRIAL`` set): stop as SIGTERM would (emergency
    checkpoint once training, trial left to resume) when the sweeper that started it is
    gone — nobody would tell its result, and the sweeper's next run must find its folder
    free. Started as the process starts, before it waits for the folder's lock or loads
    anything; once per process."""
    global _watching
    spec = os.environ.get(TRIAL_ENV)
    if not spec or _watching:
        return
    _watching = True
    import psutil

    pid = int(json.loads(spec)["sweeper_pid"])
    try:
        sweeper = psutil.Process(pid)
    except psutil.NoSuchProcess:
        sweeper = None

    def alive() -> bool:
        try:  # (a zombie is gone too: exited, not yet reaped by its own parent)
            return sweeper.is_running() and sweeper.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while sweeper is not None and alive():
            time.sleep(_WATCH_SECONDS)
        log.warning("the sweeper (pid %d) is gone: stopping this trial to resume later", pid)
        # (delivered to the main thread's handler, the one a real SIGTERM reaches)
        signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=watch, name="so8t-sweeper-watch", daemon=True).start()
