"""Stop signals that reach the sweeper itself, between trials.

While a trial trains in this process its trainer has the handlers (emergency checkpoint,
exit ``128+N``, which stops the sweep too). Between trials — telling the study, tagging
runs, asking the next trial — a SIGTERM would otherwise kill the sweeper on the spot
(its parent run left RUNNING); here it is remembered, and the sweep stops before its next
trial with the same ``128+N``, never in the middle of telling the study.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from so8t_exp.cli_errors import EXIT_FENCED, EXIT_LOCKED, EXIT_RUN_LOST, EXIT_TRACKING
from so8t_exp.signals import STOP_SIGNALS

log = logging.getLogger(__name__)

# A trainer's exit codes that say nothing about the trial's parameters: its folder is in use
# (3), another process took its run over (5), the tracking store is unreachable (6) or lost
# the run (7). The trial stays RUNNING and the sweep stops with that code, to be continued
# (a FAIL would be final, and count against max_failures).
NOT_THE_TRIAL = (EXIT_LOCKED, EXIT_FENCED, EXIT_TRACKING, EXIT_RUN_LOST)


class BetweenTrials:
    """A context: the sweep's stop request; :meth:`check` before each trial."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> BetweenTrials:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:  # a second one: the user means it
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
        self.signum = signum
        log.warning(
            "received %s: the sweep stops before its next trial", signal.Signals(signum).name
        )

    def check(self) -> None:
        """Exit ``128+N`` if a stop signal came."""
        if self.signum is not None:
            log.warning("sweep stopped; the same command (or so8t_exp.resume) continues it")
            sys.exit(128 + self.signum)
