"""The resume launcher's side of Optuna sweeps (``python -m so8t_exp.train -m
hparams_search=...``).

A sweep is continued as a whole: its parent run is "resumed" by running the sweep's own
command again (recorded in ``<sweep folder>/sweep_command.json``), which finishes the
trials left RUNNING, each in its own folder and MLflow run, then asks new ones until
``n_trials`` are finished. A trial's run is never resumed on its own — without its sweeper
nothing would report its evaluations to the study or prune it. The sweeper's folder lock
tells a live sweep, as a session lock tells a live trainer; a sweep lives where its folder
is, so another host's sweep is left to that host.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from so8t_exp.config import ResumeConfig
from so8t_exp.host import host_id
from so8t_exp.lock import describe_holder, is_locked
from so8t_exp.overrides import override, without
from so8t_exp.tracking.runs import EXPIRED, GIVEN_UP, RunRecord
from so8t_exp.tracking.sweep import (
    COMMAND_FILE,
    ENDED,
    JOB_NUM,
    N_TRIALS,
    PARENT_RUN,
    STUDY,
    SWEEP_DIR,
    TRIALS_DONE,
    is_study_sweep,
)

__all__ = ["is_study_sweep"]

# A finished trial outweighs any number of steps in the unfinished ones.
_TRIAL_WEIGHT = 1_000_000_000
# Overrides the launcher sets itself when it runs a sweep again.
_STUDY_KEYS = {"hydra.sweeper.study_name": "study", "hydra.sweeper.storage": "storage"}
_OWN_KEYS = ("hydra.sweep.dir", "tracking.uri", *_STUDY_KEYS)


def trial_reason(run: RunRecord) -> str:
    """Why a trial's run is not resumed by itself."""
    return (
        f"trial {run.tags.get(JOB_NUM, '?')} of sweep {run.tags[STUDY]}: "
        "continues when its sweep does"
    )


def sweep_folder(run: RunRecord) -> Path | None:
    value = run.tags.get(SWEEP_DIR)
    return Path(value) if value else None


def trials_of(parent: RunRecord, runs: list[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if r.tags.get(PARENT_RUN) == parent.run_id]


def progress(parent: RunRecord, trials: list[RunRecord]) -> int:
    """Finished trials, then steps trained in the unfinished ones: grows while the sweep
    gets anywhere (the launcher's measure of "no progress" for ``resume.max_attempts``)."""
    done = int(parent.tag_float(TRIALS_DONE, 0) or 0)
    steps = sum(t.checkpoint_step for t in trials if t.status != "FINISHED")
    return done * _TRIAL_WEIGHT + steps


def describe_progress(parent: RunRecord) -> str:
    done = int(parent.tag_float(TRIALS_DONE, 0) or 0)
    return f"{done}/{parent.tags.get(N_TRIALS, '?')} trials"


def settled(parent: RunRecord) -> str | None:
    """Why the sweep is not to be continued (finished, given up, elsewhere, alive), or None."""
    if parent.status == "FINISHED" or ENDED in parent.tags:
        return "finished"
    if parent.tags.get(GIVEN_UP):
        return f"given up ({parent.tags[GIVEN_UP]})"
    if parent.tags.get(EXPIRED):
        return "expired"
    host = parent.tags.get("so8t.host")
    if host not in (None, host_id()):
        return f"a sweep of {host}: its folder and lock are there; continue it there"
    folder = sweep_folder(parent)
    if folder is None or read_command(folder) is None:
        return f"no readable {COMMAND_FILE} in {folder}: run the sweep's command again"
    if is_locked(folder):
        return f"alive: {describe_holder(folder)} holds the lock"
    return None


def last_activity(parent: RunRecord, trials: list[RunRecord]) -> float:
    return max([parent.heartbeat, *(t.heartbeat for t in trials)])


def read_command(folder: Path) -> dict | None:
    """The sweep's recorded command (None: missing or unreadable)."""
    try:
        recorded = json.loads((folder / COMMAND_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and "overrides" in recorded else None


def command(parent: RunRecord, tracking_uri: str) -> list[str]:
    """The sweep's command line again (``-m`` and its overrides), in its own folder and
    against the store the launcher reads."""
    folder = sweep_folder(parent)
    recorded = read_command(folder)
    kept = without(recorded["overrides"], _OWN_KEYS)
    # (the study as it was resolved when the sweep started: the YAML may name another now)
    study = [override(k, recorded[f]) for k, f in _STUDY_KEYS.items() if recorded.get(f)]
    return [
        "-m",
        *kept,
        *study,
        override("hydra.sweep.dir", folder.as_posix()),
        override("tracking.uri", tracking_uri),
    ]


def expired(parent: RunRecord, trials: list[RunRecord], cfg: ResumeConfig) -> str | None:
    age = time.time() - last_activity(parent, trials)
    if age > cfg.max_age_hours * 3600:
        return f"last activity {age / 3600:.1f}h ago > resume.max_age_hours={cfg.max_age_hours}"
    return None
