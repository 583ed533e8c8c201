"""The Optuna sweeps in ``python -m so8t_exp.sessions``: one row per sweep (trials finished
of ``n_trials``, best value so far and its trial, state, what the resume launcher would do)
with its trials' rows under it; a sweep's ``show`` page; why a trial is not abandoned alone.

A trial's run is a session of its own in MLflow, but it lives and resumes only with its
sweep (:mod:`so8t_exp.sweep_resume`): it is listed under its sweep, never again as a loose
session. Grid sweeps' parents are no sessions and stay out, their jobs listed as sessions.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Collection
from dataclasses import dataclass

import yaml

from so8t_exp.config import ResumeConfig
from so8t_exp.launcher import Decision, judge
from so8t_exp.lock import is_locked
from so8t_exp.sessions import eta_text, local_folder, progress_lines, row
from so8t_exp.sweep_resume import describe_progress, settled, sweep_folder, trials_of
from so8t_exp.tracking.metrics import retry
from so8t_exp.tracking.runs import RunRecord, RunRegistry
from so8t_exp.tracking.sweep import (
    BEST_PARAMS,
    BEST_TRIAL,
    JOB_NUM,
    JOB_OVERRIDES,
    N_TRIALS,
    PARENT_RUN,
    STUDY,
    TRIAL_NUMBER,
    TRIAL_PARAM,
    TRIAL_STATE,
    TRIALS_DONE,
)
from so8t_exp.tracking.sweep import BEST_VALUE_METRIC as BEST_VALUE
from so8t_exp.tracking.sweep import OBJECTIVE_METRIC as OBJECTIVE

PARAM = TRIAL_PARAM  # (parameter values are tagged as Python reprs)


def is_trial(run: RunRecord) -> bool:
    """A trial of an Optuna sweep: a child run that resumes only with its sweep."""
    return bool(run.tags.get(STUDY)) and not run.is_sweep_parent


def trial_number(run: RunRecord) -> int | None:
    """The trial's number: Optuna's tag once it ended, else its job number (the same)."""
    try:
        return int(run.tags.get(TRIAL_NUMBER) or run.tags[JOB_NUM])
    except (KeyError, ValueError):
        return None


@dataclass
class Sweep:
    """One Optuna sweep as the table shows it."""

    parent: RunRecord
    trials: list[RunRecord]  # by trial number
    decision: Decision  # what the resume launcher would do with the sweep
    states: dict[str, str]  # run id -> COMPLETE/PRUNED/FAIL (Optuna's), alive, dead, finished
    values: dict[int, float]  # trial number -> objective value, for COMPLETE trials

    @property
    def study(self) -> str:
        return self.parent.tags.get(STUDY, "?")

    @property
    def best_trial(self) -> int | None:
        try:
            return int(self.parent.tags[BEST_TRIAL])
        except (KeyError, ValueError):
            return None

    @property
    def best_value(self) -> float | None:
        return None if self.best_trial is None else self.values.get(self.best_trial)

    @property
    def param_names(self) -> set[str]:
        """The search space's parameters, as the ended trials and the best one name them."""
        names = {k[len(PARAM) :] for t in self.trials for k in t.tags if k.startswith(PARAM)}
        try:
            return names | set(json.loads(self.parent.tags.get(BEST_PARAMS, "{}")))
        except (ValueError, TypeError):
            return names

    @property
    def done(self) -> str:
        """``finished/n_trials``, finished as Optuna counts it (COMPLETE, PRUNED or FAIL)."""
        done = int(self.parent.tag_float(TRIALS_DONE, 0) or 0)
        return f"{done}/{self.parent.tags.get(N_TRIALS, '?')}"

    @property
    def state(self) -> str:
        """alive / dead / finished / given-up / expired / unknown."""
        reason = self.decision.reason
        if reason == "finished":  # (ended: also when its parent run's status lags)
            return "finished"
        if reason.startswith("a sweep of "):  # another host's: only its trials' beats tell
            return "alive" if "alive" in self.states.values() else "unknown"
        return self.decision.state


def split(runs: list[RunRecord]) -> tuple[list[RunRecord], list[tuple[RunRecord, list]]]:
    """``(loose sessions, [(sweep parent, its trials)])`` of ``runs`` (as
    ``RunRegistry.runs(..., sweeps=True)`` gives them): each trial under its sweep only. A
    trial whose parent is not among ``runs`` stays a session: better shown than lost."""
    parents = [r for r in runs if r.is_sweep_parent]
    ids = {p.run_id for p in parents}
    loose = [
        r
        for r in runs
        if not r.is_sweep_parent and not (is_trial(r) and r.tags.get(PARENT_RUN) in ids)
    ]
    return loose, [(p, trials_of(p, runs)) for p in parents]


def trial_state(run: RunRecord, cfg: ResumeConfig, now: float) -> str:
    """Optuna's state once the trial ended; before, alive or dead as for a session: the
    lock of its folder on this host, its heartbeat on another host's clock elsewhere."""
    if run.tags.get(TRIAL_STATE):
        return run.tags[TRIAL_STATE]
    if run.status == "FINISHED":  # (trained, not yet told: the sweep died in between)
        return "finished"
    folder = local_folder(run)
    if folder is not None:
        return "alive" if folder.is_dir() and is_locked(folder) else "dead"
    fresh = run.status == "RUNNING" and now - run.heartbeat < cfg.stale_after_seconds
    return "alive" if fresh else "dead"


def load(
    registry: RunRegistry,
    parent: RunRecord,
    trials: list[RunRecord],
    cfg: ResumeConfig,
    now: float,
    seconds: float,
) -> Sweep:
    """The sweep with its verdict, trial states and objective values (one read of the
    parent's ``sweep/objective`` history: a value per COMPLETE trial, at its number)."""
    read = registry.client.get_metric_history
    history = retry("read the sweep's objective", seconds, read, parent.run_id, OBJECTIVE)
    values = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    trials = sorted(trials, key=lambda t: (trial_number(t) is None, trial_number(t) or 0))
    states = {t.run_id: trial_state(t, cfg, now) for t in trials}
    best = parent.tags.get(BEST_TRIAL)
    if best and best.isdigit() and int(best) not in values:  # (objective not logged)
        values[int(best)] = _best_value(registry, parent, int(best), seconds)
    values = {k: v for k, v in values.items() if v is not None}
    return Sweep(parent, trials, judge(parent, cfg, now, trials=trials), states, values)


def _best_value(registry: RunRegistry, parent: RunRecord, best: int, seconds: float):
    read = registry.client.get_metric_history
    history = retry("read the sweep's best value", seconds, read, parent.run_id, BEST_VALUE)
    at_best = [m for m in history if m.step == best] or history
    return max(at_best, key=lambda m: m.timestamp).value if at_best else None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):  # (not a literal: kept as the text)
        return text


def params(run: RunRecord, names: Collection[str] = ()) -> dict[str, object]:
    """The trial's sampled parameters: its ``optuna.param.*`` tags once it ended; before,
    the overrides of its job (``so8t.job.overrides``) for the parameter ``names``."""
    tagged = {k[len(PARAM) :]: _literal(v) for k, v in run.tags.items() if k.startswith(PARAM)}
    if tagged or not names:
        return tagged
    pairs = (o.partition("=") for o in run.tags.get(JOB_OVERRIDES, "").split())
    return {k: _literal(v) for k, _, v in pairs if k in names}


def params_text(values: dict[str, object]) -> str:
    """``lr=1.33e-04 weight_decay=0.0951``: last key parts, unless two would be the same."""
    short = [k.rsplit(".", 1)[-1] for k in values]
    keys = short if len(set(short)) == len(short) else list(values)
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in zip(keys, values.values(), strict=True)
    )


def sweep_rows(sweep: Sweep, cfg: ResumeConfig, now: float) -> list[dict[str, str]]:
    """The sweep's row, then one per trial, in trial order."""
    best = sweep.best_trial
    value = "-" if sweep.best_value is None else f"{_number(sweep.best_value)} (trial {best})"
    rows = [
        {
            "sweep": f"sweep {sweep.study}",
            "run_id": sweep.parent.run_id,
            "status": f"{sweep.parent.status}/{sweep.state}",
            "trials": sweep.done,
            "value": value,
            "step": "-",
            "loss": "-",
            "eta": "-",
            "launcher": sweep.decision.action,
            "folder": str(sweep_folder(sweep.parent) or "-"),
            "name": sweep.parent.name,
        }
    ]
    return rows + [_trial_row(sweep, trial, cfg, now) for trial in sweep.trials]


def _trial_row(sweep: Sweep, trial: RunRecord, cfg: ResumeConfig, now: float) -> dict[str, str]:
    lines, state, number = progress_lines(trial), sweep.states[trial.run_id], trial_number(trial)
    cells = row(trial, cfg, now, lines)  # (step and loss as for any session)
    value = _number(sweep.values.get(number)) if number is not None else "-"
    return {
        "sweep": f"  trial {'?' if number is None else number}",
        "run_id": trial.run_id,
        "status": f"{trial.status}/{state}",
        "trials": "-",
        "value": f"{value} (best)" if number == sweep.best_trial and value != "-" else value,
        "step": cells["step"],
        "loss": cells["loss"],
        "eta": eta_text(lines, state == "alive", now),  # (row() judges a trial never alive)
        "launcher": "-",  # (never alone: with its sweep)
        "folder": cells["folder"],
        "name": params_text(params(trial, sweep.param_names)) or trial.name,
    }


def objective(sweep: Sweep) -> str | None:
    """``eval/loss (minimize)``, from a trial's Hydra config where this host has one."""
    for trial in sweep.trials:
        folder = local_folder(trial)
        if folder is None:
            continue
        try:
            hydra = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text("utf-8"))
            sweeper = hydra["hydra"]["sweeper"]
            return f"{sweeper['objective']} ({sweeper['direction']})"
        except (OSError, TypeError, KeyError, yaml.YAMLError):
            continue
    return None


def show(sweep: Sweep, cfg: ResumeConfig, now: float) -> dict:
    """``sessions show`` of a sweep's parent run: the sweep, then each of its trials."""
    parent, decision = sweep.parent, sweep.decision
    try:
        best_params = json.loads(parent.tags.get(BEST_PARAMS, "null"))
    except ValueError:
        best_params = parent.tags[BEST_PARAMS]
    trials = []
    for cells, trial in zip(sweep_rows(sweep, cfg, now)[1:], sweep.trials, strict=True):
        number = trial_number(trial)
        trials.append(
            {
                "trial": number,
                "run_id": trial.run_id,
                "status": trial.status,
                "state": sweep.states[trial.run_id],
                "value": sweep.values.get(number),
                "params": params(trial, sweep.param_names),
                **{k: cells[k] for k in ("step", "loss", "eta", "folder")},
            }
        )
    return {
        "run_id": parent.run_id,
        "name": parent.name,
        "kind": "optuna sweep",
        "study": sweep.study,
        "status": f"{parent.status}/{sweep.state}",
        "trials_finished": sweep.done,
        "objective": objective(sweep),
        "best_trial": sweep.best_trial,
        "best_value": sweep.best_value,
        "best_params": best_params,
        "folder": str(sweep_folder(parent) or "-"),
        "host": parent.tags.get("so8t.host"),
        "launcher_would": decision.action,
        "because": decision.reason,
        "trials": trials,
        "tags": {k: v for k, v in sorted(parent.tags.items()) if k.startswith("so8t.")},
    }


def trial_refusal(run: RunRecord) -> str:
    """Why ``abandon`` of a trial's run is refused, and what to abandon instead."""
    parent = run.tags.get(PARENT_RUN, "?")
    return (
        f"run {run.run_id} is trial {trial_number(run)} of sweep {run.tags.get(STUDY)}: a "
        "trial is resumed only with its sweep, so give up the sweep instead: "
        f"python -m so8t_exp.sessions abandon {parent}"
    )


def abandoned(parent: RunRecord) -> str:
    """What ``abandon`` of a sweep's parent run did (and did not: stop a live sweep)."""
    alive = settled(parent) or ""
    text = (
        f"sweep {parent.run_id} ({parent.tags.get(STUDY)}, {describe_progress(parent)} "
        "finished) marked given-up; the resume launcher will not run it again"
    )
    if alive.startswith("alive"):  # (a tag cannot stop a process)
        text += f". It is running now ({alive}): stop that process to stop it"
    return text
