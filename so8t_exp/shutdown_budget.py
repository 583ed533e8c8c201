"""The few seconds Windows allows after a console close, logoff or shutdown event.

Windows ends the process as soon as the console-control handler returns, or when its own
timeout (about 5 s) runs out. Within that grace the run must be left resumable and
consistent: ``session_info.json`` says interrupted, MLflow says KILLED, buffered metrics
are sent. An emergency checkpoint is a bonus, written only if the last measured save says
it fits in what is left; otherwise the newest rolling checkpoint stands. If the training
thread does not get there in time (a long step, an evaluation, a slow save), the handler's
own thread closes the run with :data:`CLOSE_RESERVE_SECONDS` left (see
:mod:`so8t_exp.signals`).

POSIX signals have no such grace (the systemd unit allows 180 s) and keep
the full emergency path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Less than the ~5 s Windows waits for a close event: returning late is being killed.
GRACE_SECONDS = 4.5
# Kept for closing the run (session file, metric flush, MLflow status): ~0.1 s on a local
# sqlite store; the rest is margin for a slow disk.
CLOSE_RESERVE_SECONDS = 1.0


@dataclass
class Grace:
    """The time left to a process after a console ``event`` (close, logoff, shutdown)."""

    event: str
    seconds: float = field(default_factory=lambda: GRACE_SECONDS)  # (read when it starts)
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        """Seconds until Windows ends the process (never negative)."""
        return max(0.0, self.seconds - self.elapsed())


def _stands(newest_step: int | None) -> str:
    if newest_step is None:
        return "no checkpoint yet: the run starts over from step 0"
    return f"newest checkpoint step {newest_step} stands"


def emergency_decision(
    grace: Grace, estimate: float | None, newest_step: int | None
) -> tuple[bool, str]:
    """Whether an emergency checkpoint fits in ``grace``, and the log line that says so.

    ``estimate``: seconds the save would take (the last measured save, see
    ``Checkpointer.save_estimate``), None if none was measured in this process;
    ``newest_step``: the step of the newest checkpoint on disk (None: there is none). It
    fits if the save and :data:`CLOSE_RESERVE_SECONDS` fit in the grace left. With nothing
    measured it is tried only when there is no checkpoint to lose time over: should it
    overrun, the console handler still closes the run in time."""
    left = grace.left()
    kept = f"{left:.1f} s of grace left ({CLOSE_RESERVE_SECONDS:.1f} s of it kept to close the run)"
    if estimate is None:
        if newest_step is None:
            return True, (
                f"emergency checkpoint attempted: no save timed yet and no checkpoint to fall "
                f"back on, {kept}"
            )
        return False, (
            f"emergency checkpoint skipped: no save timed in this process yet, {kept}; "
            f"{_stands(newest_step)}"
        )
    if estimate + CLOSE_RESERVE_SECONDS <= left:
        return True, f"emergency checkpoint: last save took {estimate:.1f} s, {kept}"
    return False, (
        f"emergency checkpoint skipped: last save took {estimate:.1f} s, {kept}; "
        f"{_stands(newest_step)}"
    )


def overrun_message(grace: Grace, saving: bool, newest_step: int | None) -> str:
    """The log line of the console handler closing the run itself: the training thread is
    still in a step (``saving``: in the emergency save) with only the reserve left."""
    where = (
        "is still writing the emergency checkpoint"
        if saving
        else "has not reached a step boundary (a long step or evaluation)"
    )
    then = (
        "it counts if it ends in time, else " + _stands(newest_step)
        if saving
        else "emergency checkpoint skipped; " + _stands(newest_step)
    )
    return (
        f"console {grace.event}: training {where} after {grace.elapsed():.1f} s of the "
        f"{grace.seconds:.1f} s grace; closing the run as interrupted now ({then})"
    )
