"""Which evaluation is the best so far (``checkpoint.best_metric``, ``checkpoint.best_mode``)."""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


class BestMetric:
    """Decides whether an evaluation beats the best one recorded in the run's progress."""

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
