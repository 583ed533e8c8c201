"""Up to ``hydra.sweeper.n_jobs`` trials at once, each trained by its own
``python -m so8t_exp.train`` child process in its own job folder.

The guarantees of a sequential sweep hold — one folder and one MLflow run per trial
number, interrupted trials finished first in their own folders, exactly ``n_trials``
finished — except one: which values TPE asks for depends on which trials had finished at
that moment, so a parallel sweep's parameters are not reproducible (set
``hydra.sweeper.sampler.constant_liar=true`` so running trials count in the asks).

A child reports its evaluations to the study itself (``trial_link``: the trial's id in
``SO8T_TRIAL``), so pruning works as in-process. It also watches this sweeper: when the
sweeper dies (killed, power cut of the parent only), the child stops as if sent SIGTERM —
emergency checkpoint, trial left RUNNING — and the next run of the sweep continues it. A
trial killed by a signal, or whose folder is locked, stops the sweep once the others have
ended (their exit code is the sweep's); the next run continues it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.trial import FrozenTrial

from so8t_exp import trial_link
from so8t_exp.cli_errors import shell_exit_code
from so8t_exp.overrides import override
from so8t_exp.paths import storage_url
from so8t_exp.session import Session
from so8t_exp.sweeper import report
from so8t_exp.sweeper.stop import NOT_THE_TRIAL
from so8t_exp.tracking.sweep import SweepJob

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.5
# A trial's folder may still be held by a trainer of a killed sweeper, finishing its
# emergency checkpoint: its successor waits for it this long.
_LOCK_WAIT_SECONDS = 180
# Hydra overrides of the sweep that do not belong on a single trial's command line.
_SWEEP_ONLY = ("hydra.mode", "hydra.run.dir", "hydra.sweep.", "hydra.sweeper.", "hydra/sweeper")


@dataclass
class _Running:
    trial: object  # optuna.trial.Trial
    job_dir: Path
    proc: subprocess.Popen
    output: object  # the open log file of its output


class ParallelTrials:
    """Schedules the trials of one sweep over ``n_jobs`` child processes."""

    def __init__(self, runner, n_jobs: int) -> None:
        self.runner, self.n_jobs = runner, n_jobs
        self.running: dict[int, _Running] = {}
        self.stop_code: int | None = None

    def run(self, interrupted: list[FrozenTrial]) -> None:
        """Finish ``interrupted`` (in order), then ask new trials until ``n_trials`` are
        finished; exits with the stopping trial's code if one was killed or locked."""
        queue = list(interrupted)
        while True:
            while self.stop_code is None and len(self.running) < self.n_jobs:
                frozen = queue.pop(0) if queue else None
                done = len(report.finished(self.runner.study))
                if frozen is None and done + len(self.running) >= self.runner.sweeper.n_trials:
                    break
                prepared = self.runner.prepare(frozen)
                if prepared is not None:
                    self._start(*prepared)
            if not self.running:
                break
            time.sleep(_POLL_SECONDS)
            self.runner.stop.check()  # (its trials see it gone and stop themselves)
            for number in [n for n, r in self.running.items() if r.proc.poll() is not None]:
                self._ended(self.running.pop(number))
        if self.stop_code is not None:
            sys.exit(self.stop_code)

    def _start(self, trial, job_dir: Path) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        self._write_job(trial, job_dir)
        cmd = [sys.executable, "-m", "so8t_exp.train", *self._overrides(trial, job_dir)]
        env = {**os.environ, trial_link.TRIAL_ENV: json.dumps(self._spec(trial, job_dir))}
        output = open(job_dir / "trial_output.log", "a", encoding="utf-8")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT)
        self.running[trial.number] = _Running(trial, job_dir, proc, output)
        log.info(
            "trial %d: started (pid %d, %d running; output in %s)",
            trial.number,
            proc.pid,
            len(self.running),
            (job_dir / "trial_output.log").as_posix(),
        )

    def _overrides(self, trial, job_dir: Path) -> list[str]:
        hc = self.runner.sweeper.config.hydra
        kept = [str(o) for o in hc.overrides.hydra if not str(o).startswith(_SWEEP_ONLY)]
        return [
            *self.runner.space.overrides(trial.params),
            *kept,
            override("hydra.run.dir", job_dir.as_posix()),
            f"session.lock_wait_seconds={_LOCK_WAIT_SECONDS}",
        ]

    def _spec(self, trial, job_dir: Path) -> dict:
        sw = self.runner.sweeper
        return {
            "storage": storage_url(sw.storage),
            "study": self.runner.study.study_name,
            "trial_id": trial._trial_id,
            "objective": sw.objective,
            "pruner": sw.pruner_kwargs,
            "job_dir": str(job_dir.resolve()),
            "sweeper_pid": os.getpid(),
        }

    def _write_job(self, trial, job_dir: Path) -> None:
        """What Hydra's sweep callback writes for an in-process job: the child run's link
        to the sweep's parent run (a child process is a single run to Hydra)."""
        parent, hc = self.runner.parent, self.runner.sweeper.config.hydra
        if parent is None:
            return
        SweepJob(
            parent_run_id=parent.run_id,
            parent_name=parent.name,
            num=trial.number,
            overrides=self.runner.space.overrides(trial.params),
            sweep_dir=str(self.runner.sweep_dir),
            study=self.runner.study.study_name,
        ).write(job_dir / hc.output_subdir)

    def _ended(self, done: _Running) -> None:
        code = done.proc.returncode
        done.output.close()
        trial, job_dir = done.trial, done.job_dir
        code = shell_exit_code(code)
        if code >= 128 or code in NOT_THE_TRIAL or (code == 1 and not _failed(job_dir)):
            # (exit 1 without a failed session: killed hard, as Windows' taskkill /F does)
            log.error(
                "trial %d stopped (exit %d); left RUNNING, the sweep stops", trial.number, code
            )
            self.stop_code = self.stop_code or code
            return
        result = trial_link.read_result(job_dir) or {}
        pruned = result.get("state") == "PRUNED"
        self.runner.conclude(trial, job_dir, code or None, pruned, None)


def _failed(job_dir: Path) -> bool:
    """Whether the trial's trainer recorded a failure (its session says ``failed``)."""
    info = Session(job_dir).load()
    return info is not None and info.status == "failed"
