"""The parent MLflow run of a Hydra multirun: one per sweep folder, its jobs as children.

The parent is found by the sweep folder it carries (``so8t.sweep.dir``), so starting the
same sweep again (same ``hydra.sweep.dir``) reopens it instead of making a second one. Each
job learns its parent from ``.hydra/sweep.json`` in its own folder, written before the job
starts; a child keeps its ``mlflow.parentRunId`` however it is resumed later. A parent is
not a session (no folder, nothing to train): the resume launcher and the sessions table
leave it out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from so8t_exp.tracking import describe
from so8t_exp.tracking.core import Tracker
from so8t_exp.tracking.masking import mask_override
from so8t_exp.tracking.metrics import START_RETRY_SECONDS, retry

log = logging.getLogger(__name__)

PARENT = "so8t.sweep.parent"  # "true" on a sweep's parent run
SWEEP_DIR = "so8t.sweep.dir"
ENDED = "so8t.sweep.ended"  # the sweep went through all its jobs (ISO time)
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: the UI nests children under the parent
JOB_NUM = "so8t.job.num"
JOB_OVERRIDES = "so8t.job.overrides"
CHILDREN = "so8t.sweep.children"  # e.g. "1 failed, 2 finished", at the end
JOB_FILE = "sweep.json"
# An Optuna sweep (so8t_exp.sweeper): on the parent and on every trial's child run
STUDY = "so8t.sweep.study"
N_TRIALS = "so8t.sweep.n_trials"  # on the parent: trials the sweep ends with
TRIALS_DONE = "so8t.sweep.trials_finished"  # on the parent, after every trial
COMMAND_FILE = "sweep_command.json"  # in the sweep folder: how to run the sweep again
BEST_TRIAL = "so8t.sweep.best_trial"  # on the parent: the best COMPLETE trial so far
BEST_PARAMS = "so8t.sweep.best_params"  # on the parent: its parameters (JSON)
OBJECTIVE_METRIC, BEST_VALUE_METRIC = "sweep/objective", "sweep/best_value"
# On each trial's run, once it ended
TRIAL_NUMBER, TRIAL_STATE, TRIAL_PARAM = (
    "optuna.trial.number",
    "optuna.trial.state",
    "optuna.param.",
)
# (so8t_exp.tracking.runs' GIVEN_UP and EXPIRED; that module imports this one)
_SETTLED = ("so8t.given_up", "so8t.expired")


def is_study_sweep(tags: Mapping[str, str]) -> bool:
    """A run of an Optuna sweep (parent or trial): it resumes only as part of its sweep."""
    return bool(tags.get(STUDY))


def is_parent(tags: Mapping[str, str]) -> bool:
    return tags.get(PARENT) == "true"


@dataclass
class SweepJob:
    """One job of a sweep, as its trainer needs to know it."""

    parent_run_id: str
    parent_name: str
    num: int
    overrides: list[str]
    sweep_dir: str
    study: str | None = None  # the Optuna study of a so8t_exp.sweeper sweep

    def tags(self) -> dict[str, str]:
        tags = {
            PARENT_RUN: self.parent_run_id,
            JOB_NUM: str(self.num),
            JOB_OVERRIDES: " ".join(map(mask_override, self.overrides)),
            SWEEP_DIR: self.sweep_dir,
        }
        return {**tags, STUDY: self.study} if self.study else tags

    def describe(self) -> str:
        return f"job {self.num} of `{self.parent_name}` (folder `{self.sweep_dir}`)"

    def write(self, hydra_dir: Path) -> None:
        hydra_dir.mkdir(parents=True, exist_ok=True)
        (hydra_dir / JOB_FILE).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def read(cls, hydra_dir: Path | None) -> SweepJob | None:
        """The job written into ``hydra_dir`` by the sweep, or None (not a sweep job)."""
        path = hydra_dir / JOB_FILE if hydra_dir else None
        if path is None or not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as err:
            log.warning("ignoring unreadable %s: %s", path, err)
            return None


def find_parent(client: MlflowClient, experiment_id: str, sweep_dir: str) -> Run | None:
    """The parent run recorded for ``sweep_dir``, newest first."""
    quoted = sweep_dir.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{PARENT}` = 'true' and tags.`{SWEEP_DIR}` = '{quoted}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def open_parent(
    uri: str | None,
    experiment: str,
    sweep_dir: Path,
    overrides: list[str],
    tags: dict[str, str] | None = None,
) -> Run:
    """Create the sweep's parent run (RUNNING), or reopen the one of this sweep folder;
    ``tags`` are set either way. A sweep started again by hand is no longer given up or
    expired: someone wants it to go on."""
    return retry(
        "open the sweep run",
        START_RETRY_SECONDS,
        _open,
        uri,
        experiment,
        sweep_dir,
        overrides,
        tags or {},
    )


def _open(
    uri: str | None, experiment: str, sweep_dir: Path, overrides: list[str], extra: dict[str, str]
) -> Run:
    tracker = Tracker(uri)
    client, folder = tracker.client, str(sweep_dir.resolve())
    exp_id = tracker.experiment_id(experiment)
    found = find_parent(client, exp_id, folder)
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        fallback = _note(overrides, folder, "continued")
        text = describe.with_history(found.data.tags.get(describe.NOTE), "continued", fallback)
        client.set_tag(run_id, describe.NOTE, text)
        for key in (ENDED, *_SETTLED):  # going again: not through until it ends again
            if key in found.data.tags:
                client.delete_tag(run_id, key)
        for key, value in extra.items():
            client.set_tag(run_id, key, value)
        return client.get_run(run_id)
    name = describe.unique_name(client, exp_id, describe.base_name(overrides, "multirun"))
    tags = {
        **describe.provenance_tags(),
        PARENT: "true",
        SWEEP_DIR: folder,
        describe.NOTE: _note(overrides, folder, "started"),
        **extra,
    }
    return client.create_run(exp_id, run_name=name, tags=tags)


def _note(overrides: list[str], folder: str, first: str) -> str:
    facts = {"sweep folder": f"`{folder}`", "jobs": f"child runs, numbered in tag `{JOB_NUM}`"}
    return describe.note(describe.command_line(overrides, multirun=True), facts, first)


def children(client: MlflowClient, parent: Run) -> list[Run]:
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{PARENT_RUN}` = '{parent.info.run_id}'",
        max_results=5000,
    )


def close_parent(uri: str | None, run_id: str, status: str | None = None) -> str:
    """End the parent: ``status`` when the sweep was stopped (KILLED/FAILED); when it went
    through, FINISHED if every child finished, else FAILED. Returns the status set."""
    client = Tracker(uri).client
    parent = client.get_run(run_id)
    states = [c.info.status for c in children(client, parent)]
    summary = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
    tags = {CHILDREN: summary or "none"}
    if status is None:
        # An Optuna sweep that went through ended as it should: its failed trials were
        # within hydra.sweeper.max_failures (more would have stopped it with an error).
        went_through = is_study_sweep(parent.data.tags) or all(s == "FINISHED" for s in states)
        status = "FINISHED" if went_through else "FAILED"
        tags[ENDED] = describe.now_iso()
    what = f"{'ended' if ENDED in tags else 'stopped'} ({status}; runs: {tags[CHILDREN]})"
    tags[describe.NOTE] = describe.with_history(parent.data.tags.get(describe.NOTE), what, "")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)
    return status


def settle_parent(client: MlflowClient, run_id: str) -> None:
    """After a child finished: a sweep that went through and whose children have now all
    finished (a failed job resumed later) is FINISHED too. A stopped sweep is left as it is:
    jobs it never started are nowhere to be seen; running it again finishes it."""
    parent_id = client.get_run(run_id).data.tags.get(PARENT_RUN)
    if not parent_id:
        return
    parent = client.get_run(parent_id)
    if parent.info.status in ("RUNNING", "FINISHED") or ENDED not in parent.data.tags:
        return
    runs = children(client, parent)
    if all(c.info.status == "FINISHED" for c in runs):
        client.set_tag(parent_id, CHILDREN, f"{len(runs)} finished")
        client.set_terminated(parent_id, "FINISHED")
