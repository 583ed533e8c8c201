"""A resumable Optuna sweep over Hydra jobs: ``python -m so8t_exp.train -m hparams_search=X``.

One trial at a time, ask/tell. Killed anywhere, the same command continues: the trials
left RUNNING are finished first, each in its own job folder (``<sweep dir>/<number>``),
where the trainer resumes its own checkpoints and MLflow run; then new trials are asked
until ``n_trials`` are finished (COMPLETE, PRUNED or FAIL). Samplers are seeded per trial
number, so the values equal those of an uninterrupted sweep (see :mod:`.study`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from so8t_exp import trial_link
from so8t_exp.cli_errors import EXIT_BAD_INPUT, EXIT_LOCKED, fail
from so8t_exp.sweep import record_study_sweep
from so8t_exp.sweeper import report
from so8t_exp.sweeper.parallel import ParallelTrials
from so8t_exp.sweeper.space import SearchSpace, search_space
from so8t_exp.sweeper.stop import NOT_THE_TRIAL, BetweenTrials
from so8t_exp.sweeper.study import SweepBusy, lock_sweep, open_study, sampler_for

log = logging.getLogger(__name__)


def run_sweep(sweeper, arguments: list[str]) -> Any:
    """The sweep of :class:`hydra_plugins.so8t_sweeper.so8t_sweeper.So8tOptunaSweeper`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir = Path(sweeper.config.hydra.sweep.dir).resolve()
    try:
        # Held until this process exits, not just to the end of this function: its parent
        # run is closed after (Hydra's callback), and a sweeper started in between would
        # see that close land on its own, reopened run.
        lock_sweep(sweep_dir)
    except SweepBusy as err:  # (exit 3, like a locked session: the launcher moves on)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_LOCKED)
    with BetweenTrials() as stop:
        try:
            space = search_space(sweeper.params, arguments)
            study = open_study(sweeper, space, sweep_dir)
        except ValueError as err:  # (a bad search space, a changed study: one line, exit 2)
            fail(str(err), EXIT_BAD_INPUT)
        record_study_sweep(sweeper.config, sweep_dir)  # (accepted: the command to continue)
        runner = TrialRunner(sweeper, study, space, sweep_dir, stop)
        runner.parent = report.start(sweeper, sweep_dir, study)
        _run_trials(runner)
        report.resync(study, runner.parent)
        return report.finish(study, sweep_dir, runner.parent)


def _run_trials(runner: TrialRunner) -> None:
    sweeper, study = runner.sweeper, runner.study
    interrupted = sorted(_trials(study, TrialState.RUNNING), key=lambda t: t.number)
    if sweeper.n_jobs > 1:
        ParallelTrials(runner, sweeper.n_jobs).run(interrupted)
        return
    # 1) what a killed sweep left RUNNING, in order, so a new ask sees what an
    #    uninterrupted sweep saw (no RUNNING trials: constant_liar would use them)
    for frozen in interrupted:
        runner.run(frozen)
    # 2) new trials until n_trials are finished
    while len(report.finished(study)) < sweeper.n_trials:
        runner.run(None)


def _trials(study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


class TrialRunner:
    """Runs one trial (new or interrupted) as a Hydra job and tells Optuna how it ended."""

    def __init__(
        self, sweeper, study: optuna.Study, space: SearchSpace, sweep_dir: Path, stop: BetweenTrials
    ) -> None:
        self.sweeper, self.study, self.space, self.sweep_dir = sweeper, study, space, sweep_dir
        self.stop = stop
        self.failures = len(_trials(study, TrialState.FAIL))
        self.parent: report.Parent | None = None

    def run(self, frozen: FrozenTrial | None) -> None:
        """Run a trial in this process (Hydra's launcher: the trainer sees the live link)."""
        prepared = self.prepare(frozen)
        if prepared is None:
            return
        trial, job_dir = prepared
        sw = self.sweeper
        overrides = self.space.overrides(trial.params)
        link = trial_link.TrialLink(trial, sw.objective, job_dir, sw.pruner_kwargs is not None)
        sw.validate_batch_is_legal([overrides])
        trial_link.attach(link)
        try:  # same number: same folder, same hydra.job.num, so the same session and run
            ret = sw.launcher.launch([overrides], initial_job_idx=trial.number)[0]
        finally:  # (a SystemExit from a signal passes: the trial stays RUNNING, resumable)
            trial_link.detach()
        code = ret.return_value if ret.status == JobStatus.COMPLETED else None
        if code in NOT_THE_TRIAL:
            self.stop_sweep(trial, job_dir, code)
        # (_return_value: the exception of a failed job, the exit code of a returned one;
        # the return_value property would re-raise the exception)
        failed = (
            None if code in (0, None) and ret.status == JobStatus.COMPLETED else ret._return_value
        )
        self.conclude(trial, job_dir, failed, link.pruned, link.final_value)

    def prepare(self, frozen: FrozenTrial | None) -> tuple[optuna.trial.Trial, Path] | None:
        """Ask a new trial (``frozen`` None) or re-attach an interrupted one; None when it
        was pruned before its sweep was killed (told PRUNED now, nothing to train)."""
        self.stop.check()
        sw, study = self.sweeper, self.study
        number = frozen.number if frozen else len(study.get_trials(deepcopy=False))
        study.sampler = sampler_for(sw.seed, number, sw.sampler_kwargs)
        if frozen is None:
            trial = study.ask(self.space.distributions)
            if trial.number != number:  # (a WAITING trial from enqueue_trial, or a 2nd sweeper)
                raise RuntimeError(f"asked for trial {number}, got {trial.number}")
        else:  # re-attach: stored values come back; a kill mid-suggest samples the rest
            trial = optuna.trial.Trial(study, frozen._trial_id)
            for name, dist in self.space.distributions.items():
                trial._suggest(name, dist)
        job_dir = self.sweep_dir / str(number)
        done = trial_link.read_result(job_dir)
        if done is not None and done.get("state") == "PRUNED":  # pruned, then killed
            self._tell(trial, job_dir, TrialState.PRUNED, None)
            return None
        log.info("trial %d%s: %s", number, " (resumed)" if frozen else "", trial.params)
        return trial, job_dir

    def stop_sweep(self, trial, job_dir: Path, code: int) -> None:
        """The trial's trainer stopped for a reason of its own (:data:`NOT_THE_TRIAL`):
        stop, leaving the trial RUNNING for the next run of the sweep."""
        log.error(
            "trial %d stopped (exit %d, see %s); the sweep stops", trial.number, code, job_dir
        )
        sys.exit(code)

    def conclude(
        self, trial, job_dir: Path, failed: object, pruned: bool, value: float | None
    ) -> None:
        """Tell how the trial's job ended: ``failed`` (its exception or exit code), else
        pruned, else complete with ``value`` (None: read from its MLflow run)."""
        sw = self.sweeper
        if failed is not None:
            self._fail(trial, job_dir, failed)
        elif pruned:
            self._tell(trial, job_dir, TrialState.PRUNED, None)
        else:
            if value is None:  # trained to the end by an earlier process (died before the
                # tell), in a child process, or by the resume launcher: its last evaluation
                # is in its MLflow run
                metrics = report.final_metrics(job_dir, self._uri())
                value = trial_link.objective_value(metrics or {}, sw.objective)
            if value is None:
                log.error("trial %d: no %s from its evaluations", trial.number, sw.objective)
                self._tell(trial, job_dir, TrialState.FAIL, None)
            else:
                self._tell(trial, job_dir, TrialState.COMPLETE, value)

    def _fail(self, trial, job_dir: Path, why: object) -> None:
        log.error("trial %d failed (%s)", trial.number, why)
        self._tell(trial, job_dir, TrialState.FAIL, None)
        self.failures += 1
        if self.failures > self.sweeper.max_failures:
            why = (
                f"{self.failures} failed trials (hydra.sweeper.max_failures="
                f"{self.sweeper.max_failures}); see {job_dir}"
            )
            # Final for the resume launcher (each boot would fail one more trial); running
            # the sweep's command by hand, say with a larger max_failures, clears it.
            report.give_up(self.parent, why)
            raise RuntimeError(why)

    def _tell(self, trial, job_dir: Path, state: TrialState, value: float | None) -> None:
        trial.set_user_attr("job_dir", job_dir.as_posix())
        values = None if state != TrialState.COMPLETE else value
        frozen = self.study.tell(trial, values, state=state, skip_if_finished=True)
        log.info("trial %d: %s %s", trial.number, frozen.state.name, frozen.value)
        self.parent = report.trial_ended(self.study, frozen, job_dir, self._uri()) or self.parent

    def _uri(self) -> str | None:
        return OmegaConf.select(self.sweeper.config, "tracking.uri")
