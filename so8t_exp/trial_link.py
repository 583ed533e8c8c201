"""The in-process bridge from a trainer's evaluations to the Optuna trial it is training.

The sweeper (:mod:`so8t_exp.sweeper`) runs each trial with Hydra's BasicLauncher, in its
own process, so it can hand the trainer a live link: :func:`attach` before the launch,
:func:`detach` after. The trainer asks :func:`current` for the link *of its own session
folder* (never a stale one) and reports every evaluation; the link says whether to prune.
No optuna import here: this module loads with every training run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from so8t_exp.fsutil import atomic_write_json

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

    def report(self, metrics: Mapping[str, float], step: int) -> bool:
        """Record one evaluation at optimizer ``step``; True: prune the trial now."""
        value = objective_value(metrics, self.objective)
        if value is None or not math.isfinite(value):
            return False
        self.final_value, self.final_step = value, step
        # A resumed trainer may repeat an evaluation: the first value of a step stays.
        if step not in self.trial._cached_frozen_trial.intermediate_values:
            self.trial.report(value, step)
        # should_prune is a function of the storage only: a trainer killed between the
        # report and this decision makes the same decision after its resume.
        self.pruned = self.prune and self.trial.should_prune()
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
    """The link of the trial trained in ``session_dir``, if a sweeper attached one."""
    if _active is not None and _active.job_dir == session_dir.resolve():
        return _active
    return None
