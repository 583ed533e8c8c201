"""The ways a training run ends, as methods of :class:`so8t_exp.run.TrainingRun`: complete
(final checkpoint, export, FINISHED), stopped (emergency checkpoint, KILLED or FAILED) or
fenced (another process owns the run now: nothing more is written)."""

from __future__ import annotations

import logging

from so8t_exp import shutdown_budget
from so8t_exp.evaluations import Evaluations
from so8t_exp.export import export_final
from so8t_exp.export.pipeline import log_run_models
from so8t_exp.shutdown_budget import Grace
from so8t_exp.signals import StopRequest
from so8t_exp.tracking.fencing import EXIT_FENCED, Fenced

log = logging.getLogger("so8t_exp.run")


class RunEnd:
    """Mixin of :class:`~so8t_exp.run.TrainingRun` (uses its trainer, checkpointer, tracker,
    page, session and notifiers)."""

    def _complete(self) -> None:
        tr = self.trainer
        if not self.checkpointer.has_valid("final", tr.progress.step):  # (resumed from it)
            self._save("final", wait=True)
            if not self.checkpointer.has_valid("final", tr.progress.step):
                raise RuntimeError("the final checkpoint could not be written (disk full?)")
        self.team.release(0)  # (the other ranks have nothing left to do)
        if not self.checkpointer.drain_mirror(self.cfg.checkpoint.mirror_timeout_seconds):
            log.warning("the final checkpoint is not in MLflow yet (tracking server down?)")
        folder = export_final(
            self.session_dir / "final_model",
            tr.params,
            self.tokenizer,
            self.cfg,
            self.source.describe(),
            tr.so8t_state(),
        )
        self.tracker.log_artifacts(folder, "final_model")
        report = Evaluations.report(tr.progress, self.session_dir / "eval")
        if report is not None:
            self.tracker.log_artifacts(report, "eval")
        # "completed" only once MLflow says FINISHED: otherwise a restart finishes the job
        # (from the final checkpoint) instead of believing it done.
        if not self.page.finish("FINISHED", tr.progress.step):
            if self.tracker.lease.fenced:  # (taken over while closing: not ours to finish)
                raise Fenced(self.tracker.lease.reason)
            log.error("the run is trained but not FINISHED in MLflow: start it again to close it")
            return  # (no model logged into a run this process may no longer own)
        # A trial its sweep pruned is final too, but not "completed": it stopped early.
        pruned = self.evals.pruned
        self.session.save(status="pruned" if pruned else "completed", current_step=tr.progress.step)
        self.notify(
            "finished",
            f"run {self.tracker.run_id}: {tr.progress.step} steps"
            f"{' (pruned by its sweep)' if pruned else ''}, "
            f"best {self.cfg.checkpoint.best_metric} {tr.progress.best_value}",
        )
        if pruned:  # (not worth a registered model; the final one is in final_model/)
            return
        # Last, once the run is complete: rebuilding the model in float32 needs memory, and
        # running out of it here must not leave a finished run unfinished (a crash loop).
        log_run_models(self.session_dir, list(self.cfg.tracking.log_models), self.tracker.uri)

    def _fenced(self, stop: StopRequest, err: Fenced) -> int:
        """Another process owns the run now: no checkpoint, metric, tag or status from
        here on (it continues from the newest checkpoint in MLflow); only say so."""
        stop.shield()
        log.error("%s", err)
        if self.tracker.metrics is not None:
            self.tracker.metrics.close(timeout=0)  # (points it holds are dropped)
        self.notify("failed", f"run {self.tracker.run_id} on this host: {err}")
        stop.done()
        return EXIT_FENCED

    def _stopped(
        self, stop: StopRequest, status: str, mlflow_status: str, code: int, reason: str = ""
    ) -> int:
        """Emergency checkpoint at the last step boundary (if one can be had and, after a
        Windows console close, fits in its grace), then close.
        Further signals are only logged from here on: this is the way out."""
        stop.shield()
        tr = getattr(self, "trainer", None)
        step = tr.progress.step if tr else None
        if stop.close_claimed:  # the console handler closed the run: Windows ends us now
            return code
        if (
            tr is not None
            and not tr.applying
            and tr.progress.step > self.checkpointer.last_save_step
            and not self.tracker.lease.fenced
            and self._emergency_fits(stop.grace)
        ):
            try:
                self._save("emergency", wait=True)
            except Exception as err:
                log.error("emergency checkpoint failed: %s", err)
        elif stop.grace is not None and tr is not None and step == self.checkpointer.last_save_step:
            log.warning(
                "console %s: no emergency checkpoint needed: the newest is of step %d",
                stop.grace.event,
                step,
            )
        if not stop.claim_close():  # (the save outlasted the grace: the handler closed it)
            stop.done()
            return code
        self._close_run(status, mlflow_status, step, stop.grace)
        if stop.grace is not None:  # the run is closed: a sound or webhook gets no grace
            stop.done()
        self.notify(
            "interrupted" if status == "interrupted" else "failed",
            f"run {self.tracker.run_id} {status} at step {step or 0}"
            + (f": {reason}" if reason else ""),
        )
        stop.done()
        return code

    def _emergency_fits(self, grace: Grace | None) -> bool:
        """Always, but after a console close: only if the last save says it fits."""
        if grace is None:
            return True
        estimate = self.checkpointer.save_estimate()
        fits, line = shutdown_budget.emergency_decision(
            grace, estimate, self.checkpointer.newest_step()
        )
        log.warning("console %s: %s", grace.event, line)
        return fits

    def _close_run(
        self, status: str, mlflow_status: str, step: int | None, grace: Grace | None
    ) -> None:
        """Session file, buffered metrics and MLflow status say how the run ended."""
        try:  # (a full disk must not keep MLflow from hearing how the run ended)
            self.session.save(status=status)
        except OSError as err:
            log.error("could not update %s: %s", self.session.path, err)
        if grace is not None:  # a closing console: no time for retries or the mirror
            self.tracker.finish(mlflow_status, retry_seconds=0.0, step=step)
            return
        self.checkpointer.drain_mirror(10.0)  # (the local copy is what counts)
        self.page.finish(mlflow_status, step)

    def _console_close(self, grace: Grace, saving: bool) -> None:
        """:attr:`StopRequest.closer`: the console handler's thread closes the run when the
        training thread has not, with only the reserve of the grace left (``saving``: the
        training thread is in its emergency save)."""
        log.warning(shutdown_budget.overrun_message(grace, saving, self.checkpointer.newest_step()))
        tr = getattr(self, "trainer", None)
        self._close_run("interrupted", "KILLED", tr.progress.step if tr else None, grace)
