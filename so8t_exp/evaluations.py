"""When a run evaluates, what it does with the result (log it, keep the best state), and
the report it leaves at the end (the safety head's confusion matrix)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from so8t_exp import trial_link
from so8t_exp.confusion import write_confusion
from so8t_exp.evaluate import evaluate

log = logging.getLogger(__name__)


class BestMetric:
    """Decides whether an evaluation beats the best one recorded in the run's progress
    (``checkpoint.best_metric``, ``checkpoint.best_mode``)."""

    def __init__(self, metric: str | None, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self._warned = False

    def improved(self, metrics: dict[str, float], progress) -> bool:
        """True (and ``progress.best_value``/``best_step`` updated) when ``metrics`` hold a
        finite value of the metric better than the best so far."""
        if self.metric is None:
            return False
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            if not self._warned:
                log.warning(
                    "checkpoint.best_metric %s was not computed: no best checkpoint "
                    "from this evaluation",
                    self.metric,
                )
                self._warned = True
            return False
        best = progress.best_value
        better = best is None or (value < best if self.mode == "min" else value > best)
        if better:
            progress.best_value, progress.best_step = value, progress.step
        return better


class Evaluations:
    """The run's evaluations over its validation batches, every
    ``trainer.eval_every_n_steps`` and at the last step."""

    def __init__(
        self, cfg, val_batches: list[dict], log_metrics: Callable, session_dir: Path | None = None
    ) -> None:
        self.every, self.last = cfg.trainer.eval_every_n_steps, cfg.trainer.max_steps
        self.val_batches, self.log_metrics = val_batches, log_metrics
        self.best = BestMetric(cfg.checkpoint.best_metric, cfg.checkpoint.best_mode)
        # An Optuna trial of a sweep (so8t_exp.sweeper): each evaluation is reported to it,
        # and it may prune the run (then the loop stops and the run completes early).
        self.trial = trial_link.current(session_dir) if session_dir else None
        self.pruned = False

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    def missed(self, progress) -> bool:
        """The previous process died inside (or just before) this step's evaluation."""
        return (
            bool(progress.step)
            and progress.last_eval_step != progress.step
            and self.due(progress.step)
        )

    def run(self, trainer) -> bool:
        """Evaluate ``trainer``'s model, log the figures at its step; True when they are
        the best so far (the caller saves a best checkpoint)."""
        tr, p = trainer, trainer.progress
        result = evaluate(tr.model, tr.adapters, tr.head, self.val_batches, tr.device, tr.autocast)
        p.last_eval_step = p.step
        p.confusion = result.confusion or p.confusion
        self.log_metrics(result.metrics, p.step)
        # (the last evaluation is the trial's result, not a reason to stop: nothing is left
        # to save by pruning, and a trained-to-the-end trial reads as COMPLETE)
        final = p.step >= self.last
        if self.trial is not None and self.trial.report(result.metrics, p.step, final):
            log.info("trial pruned at step %d by the sweep's pruner", p.step)
            self.pruned = True
        return self.best.improved(result.metrics, p)

    @staticmethod
    def report(progress, folder: Path) -> Path | None:
        """The confusion matrix of the last evaluation in ``folder`` (None: no head)."""
        if progress.confusion is None:
            return None
        return write_confusion(folder, progress.confusion, progress.last_eval_step)
