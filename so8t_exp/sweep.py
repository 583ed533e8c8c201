"""One parent MLflow run per Hydra multirun, registered in ``conf/train.yaml`` as a Hydra
callback (``hydra.callbacks.so8t_sweep``).

Hydra calls ``on_multirun_start`` before the first job and ``on_multirun_end`` only after
the last one; a sweep stopped by a signal (the trainer exits ``128+N``) or by a job's
exception never gets there, so an exit handler closes the parent then (KILLED, or FAILED
after an exception). A SIGKILLed sweep leaves its parent RUNNING until the same sweep
(same ``hydra.sweep.dir``) is started again. The work is in
:mod:`so8t_exp.tracking.sweep`; this module only hooks it in.
"""

from __future__ import annotations

import atexit
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _lock_study_sweep(sweep_dir: Path) -> None:
    """An Optuna sweep's folder lock, taken before its parent run is touched: a second
    sweeper of the same study stops here (exit 3) and leaves the live sweep's run alone."""
    from so8t_exp.cli_errors import EXIT_LOCKED
    from so8t_exp.lock import SessionLocked, hold

    try:
        hold(sweep_dir, "sweep")
    except SessionLocked as err:
        print(f"error: another sweeper is running this sweep: {err}", file=sys.stderr)
        sys.exit(EXIT_LOCKED)


def record_study_sweep(config: DictConfig, sweep_dir: Path, first_only: bool = False) -> None:
    """How to run this Optuna sweep again (``<sweep folder>/sweep_command.json``, what the
    resume launcher runs). The study's name and storage are kept as resolved now: run again
    at boot, from another folder or after the YAML changed, it is the same study.
    ``first_only``: only if there is none yet — a command the sweeper has not accepted yet
    (a changed search space is refused) must not replace one it has."""
    from so8t_exp.fsutil import atomic_write_json
    from so8t_exp.paths import storage_url
    from so8t_exp.tracking.sweep import COMMAND_FILE

    path = sweep_dir / COMMAND_FILE
    if first_only and path.exists():
        return
    hc = config.hydra
    command = {
        "overrides": [str(o) for o in (*hc.overrides.hydra, *hc.overrides.task)],
        "study": str(hc.sweeper.study_name),
        "storage": storage_url(hc.sweeper.storage),
        "n_trials": int(hc.sweeper.n_trials),
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, command)


def _study_tags(config: DictConfig) -> dict[str, str]:
    """The tags that make a parent run an Optuna sweep's (to the launcher and sessions)."""
    from so8t_exp.host import host_id
    from so8t_exp.tracking.sweep import N_TRIALS, STUDY

    sweeper = config.hydra.sweeper
    return {STUDY: str(sweeper.study_name), N_TRIALS: str(sweeper.n_trials), "so8t.host": host_id()}


class SweepParent(Callback):
    """Opens the sweep's parent run, tells each job about it, closes it at the end."""

    def __init__(self) -> None:
        self.uri: str | None = None
        self.parent_id: str | None = None
        self.parent_name = ""
        self.failed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from so8t_exp.tracking.sweep import open_parent  # mlflow loads with the sweep only

        self.uri = config.tracking.uri
        sweep_dir = Path(config.hydra.sweep.dir)
        study_tags = {}
        if OmegaConf.select(config, "hydra.sweeper.study_name"):
            _lock_study_sweep(sweep_dir)
            # (before the parent run exists: a kill from here on leaves the launcher a
            # sweep it can continue)
            record_study_sweep(config, sweep_dir, first_only=True)
            study_tags = _study_tags(config)
        overrides = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task)]
        try:
            run = open_parent(
                self.uri, config.tracking.experiment, sweep_dir, overrides, study_tags
            )
        except Exception as err:  # the jobs still run, ungrouped; each reports its own run
            log.warning("could not open the sweep's MLflow run: %s", err)
            return
        self.parent_id, self.parent_name = run.info.run_id, run.info.run_name
        atexit.register(self._close, "KILLED")
        log.info("sweep run %s (%s)", self.parent_name, self.parent_id)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id is None or config.hydra.output_subdir is None:
            return
        from so8t_exp.tracking.sweep import SweepJob

        hc = config.hydra
        SweepJob(
            parent_run_id=self.parent_id,
            parent_name=self.parent_name,
            num=int(hc.job.num),
            overrides=[str(o) for o in hc.overrides.task],
            sweep_dir=str(Path(hc.sweep.dir).resolve()),
            study=OmegaConf.select(hc, "sweeper.study_name"),
        ).write(Path(hc.runtime.output_dir) / hc.output_subdir)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # An exception in a job ends the sweep (Hydra re-raises it after the job).
        self.failed = self.failed or job_return.status == JobStatus.FAILED

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id is not None:
            atexit.unregister(self._close)
            self._close(None)

    def _close(self, status: str | None) -> None:
        from so8t_exp.tracking.sweep import close_parent

        if status is not None and self.failed:
            status = "FAILED"
        try:
            close_parent(self.uri, self.parent_id, status)
        except Exception as err:
            log.warning("could not close the sweep's MLflow run %s: %s", self.parent_id, err)
