"""What a sweep leaves in MLflow and in its folder: each trial's child run tagged with its
trial, the parent run with the best trial and the objective's history, and
``optimization_results.yaml`` in the sweep folder. Tracking trouble is logged, never fatal:
the study in Optuna's storage is the record that counts."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from so8t_exp.session import Session
from so8t_exp.tracking import resolve_tracking_uri
from so8t_exp.tracking.core import HEARTBEAT_TAG, Tracker
from so8t_exp.tracking.errors import set_tag_racing
from so8t_exp.tracking.sweep import (
    BEST_PARAMS,
    BEST_TRIAL,
    BEST_VALUE_METRIC,
    N_TRIALS,
    OBJECTIVE_METRIC,
    TRIAL_NUMBER,
    TRIAL_PARAM,
    TRIAL_STATE,
    TRIALS_DONE,
    SweepJob,
    find_parent,
)

log = logging.getLogger(__name__)

OPTUNA_STUDY = "optuna.study"
RESULTS_FILE = "optimization_results.yaml"


@dataclass
class Parent:
    uri: str
    run_id: str
    name: str = ""


def start(sweeper, sweep_dir: Path, study: optuna.Study) -> Parent | None:
    """The sweep's parent run (opened by its Hydra callback, which also recorded the sweep's
    command), with the count of finished trials brought up to date."""
    uri = resolve_tracking_uri(OmegaConf.select(sweeper.config, "tracking.uri"))
    try:
        tracker = Tracker(uri)
        exp_id = tracker.experiment_id(sweeper.config.tracking.experiment)
        run = find_parent(tracker.client, exp_id, str(sweep_dir))
        if run is None:
            return None
        # (the accepted n_trials: the callback tagged the command line's before it was)
        set_tag_racing(tracker.client, run.info.run_id, N_TRIALS, str(sweeper.n_trials))
        _progress(tracker.client, run.info.run_id, study)
        return Parent(uri, run.info.run_id, run.info.run_name or "")
    except Exception as err:  # (the study is the record; MLflow is the view)
        log.warning("could not find the sweep's MLflow run: %s", err)
        return None


def _progress(client, run_id: str, study: optuna.Study) -> None:
    """The finished trials' count, and a heartbeat: a sweep between trials (or whose trial
    has no run yet) is still alive to the launcher's ``resume.max_age_hours``."""
    # (parallel workers of one sweep write these at once: the first writes race)
    set_tag_racing(client, run_id, TRIALS_DONE, str(len(finished(study))))
    set_tag_racing(client, run_id, HEARTBEAT_TAG, f"{time.time():.3f}")


def give_up(parent: Parent | None, why: str) -> None:
    """Tag the sweep given up (``so8t.given_up``, as the launcher does for a run)."""
    if parent is None:
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(parent.uri).set_tag(parent.run_id, "so8t.given_up", why)
    except Exception as err:
        log.warning("could not mark the sweep given up: %s", err)


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count towards ``n_trials`` (COMPLETE, PRUNED or FAIL)."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return study.get_trials(deepcopy=False, states=done)


def _child_run_id(job_dir: Path) -> str | None:
    info = Session(job_dir).load()
    return info.session_id if info else None


def final_metrics(job_dir: Path, uri: str | None) -> dict[str, float] | None:
    """The latest value of each metric of the trial's child run: the last evaluation of a
    trial trained to the end by an earlier process (or by ``so8t_exp.resume``), which this
    sweeper never saw."""
    from mlflow.tracking import MlflowClient

    run_id = _child_run_id(job_dir)
    if run_id is None:
        return None
    try:
        return dict(MlflowClient(resolve_tracking_uri(uri)).get_run(run_id).data.metrics)
    except Exception as err:
        log.warning("could not read the metrics of run %s: %s", run_id, err)
        return None


def trial_ended(
    study: optuna.Study, trial: FrozenTrial, job_dir: Path, uri: str | None
) -> Parent | None:
    """Tag the trial's child run; log the objective, the best trial and the count of
    finished trials on the parent."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    job = SweepJob.read(job_dir / ".hydra")
    try:
        client = MlflowClient(uri)
        _tag_child(client, study, trial, job_dir)
        if job is None:
            return None
        parent = Parent(uri, job.parent_run_id, job.parent_name)
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            client.log_metric(parent.run_id, OBJECTIVE_METRIC, trial.value, step=trial.number)
        _log_best(client, parent.run_id, study)
        _progress(client, parent.run_id, study)
        return parent
    except Exception as err:  # (the study is the record; MLflow is the view)
        log.warning("could not record trial %d in MLflow: %s", trial.number, err)
        return None


def _tag_child(client, study: optuna.Study, trial: FrozenTrial, job_dir: Path) -> None:
    """The trial's number, state and parameters as tags of its own run (one request)."""
    from mlflow.entities import RunTag

    child = _child_run_id(job_dir)
    if child is None:
        return
    tags = {OPTUNA_STUDY: study.study_name, TRIAL_NUMBER: str(trial.number)}
    tags[TRIAL_STATE] = trial.state.name
    tags.update({f"{TRIAL_PARAM}{k}": repr(v) for k, v in trial.params.items()})
    client.log_batch(child, tags=[RunTag(k, v) for k, v in tags.items()])


def resync(study: optuna.Study, parent: Parent | None) -> None:
    """Bring MLflow up to the study at the end of a sweep: a sweep killed between a trial's
    tell and its recording left that trial's run untagged, its objective point missing from
    the parent (and the parent's best trial stale); no later trial would go back to them."""
    if parent is None:
        return
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(parent.uri)
        logged = {m.step for m in client.get_metric_history(parent.run_id, OBJECTIVE_METRIC)}
        for trial in finished(study):
            job_dir = trial.user_attrs.get("job_dir")
            if job_dir:
                _tag_child(client, study, trial, Path(job_dir))
            if trial.state == TrialState.COMPLETE and trial.number not in logged:
                client.log_metric(parent.run_id, OBJECTIVE_METRIC, trial.value, step=trial.number)
        _log_best(client, parent.run_id, study)
        _progress(client, parent.run_id, study)
    except Exception as err:
        log.warning("could not bring the sweep's MLflow runs up to date: %s", err)


def _log_best(client, run_id: str, study: optuna.Study) -> None:
    try:
        best = study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return
    set_tag_racing(client, run_id, BEST_TRIAL, str(best.number))
    set_tag_racing(client, run_id, BEST_PARAMS, json.dumps(best.params))
    client.log_metric(run_id, BEST_VALUE_METRIC, float(best.value), step=best.number)


def finish(study: optuna.Study, sweep_dir: Path, parent: Parent | None) -> dict:
    """Write ``optimization_results.yaml`` (best trial, states) into the sweep folder."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    results: dict = {"study": study.study_name, "trials": {k: v for k, v in states.items() if v}}
    try:
        best = study.best_trial
        results.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    except ValueError:
        results["best_trial"] = None
    path = sweep_dir / RESULTS_FILE
    path.write_text(yaml.safe_dump(results, sort_keys=False), encoding="utf-8")
    log.info("sweep done: %s", results)
    if parent is not None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(parent.uri).log_artifact(parent.run_id, str(path))
        except Exception as err:
            log.warning("could not attach %s to the sweep run: %s", path, err)
    return results
