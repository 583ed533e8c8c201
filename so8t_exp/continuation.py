"""Where a start of ``python -m so8t_exp.train`` continues from: which MLflow run (or a new
one), which checkpoint, and whether a completed session is to be trained longer.

Reads only (session file, store, checkpoints): nothing is written to MLflow here, so a
start that finds nothing to do, or a config it must refuse, leaves the run untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from so8t_exp.checkpoint import Checkpointer
from so8t_exp.checkpoint.format import Payload
from so8t_exp.fingerprint import check_fingerprint, longer_only
from so8t_exp.notify import Notifiers
from so8t_exp.session import SessionInfo
from so8t_exp.takeover import handed_claim
from so8t_exp.tracking import Tracker
from so8t_exp.tracking.errors import TrackingUnavailable

log = logging.getLogger(__name__)


@dataclass
class Continuation:
    run_id: str | None  # None: a new run
    restored: tuple[Path, Payload] | None  # the checkpoint to restore
    extend_from: int | None = None  # a completed session trained longer: its old max_steps

    @property
    def step(self) -> int:
        return self.restored[1].docs["state"]["progress"]["step"] if self.restored else 0


def known_run(info: SessionInfo | None, tracker: Tracker, experiment: str, folder: Path):
    """The session's run id: from its file, else the one a launcher handed over (a folder
    new on this host), else the run recorded for the folder; ``"FINISHED"`` or None."""
    if info is not None:
        return info.session_id
    handed = handed_claim()
    return handed[0] if handed else tracker.find_session_run(experiment, folder)


def continuation(
    run_id: str | None,
    completed: bool,
    checkpointer: Checkpointer,
    fingerprint: dict[str, str],
    allow_config_change: bool,
    notify: Notifiers,
    mirrored_step: Callable[[], int],
) -> Continuation | None:
    """What to continue from; None if there is nothing to do (a completed session, its
    config unchanged). Raises ``ConfigError`` for a config the checkpoint forbids, and
    ``TrackingUnavailable`` when MLflow has checkpoints of the run (``mirrored_step``: the
    newest one's step, by the run's tags) that could not be fetched: starting over then
    would throw them away."""
    if run_id is None:
        checkpointer.set_aside_foreign()
        return Continuation(None, None)
    restored = checkpointer.newest()
    saved = restored[1].docs["state"]["config"] if restored else None
    if completed:
        extend_from = longer_only(saved, fingerprint) if saved is not None else None
        return Continuation(run_id, restored, extend_from) if extend_from else None
    if saved is not None:
        check_fingerprint(saved, fingerprint, allow_config_change)
        return Continuation(run_id, restored)
    seen_invalid = checkpointer.local_names() or checkpointer.mirror.rejected
    if checkpointer.mirror.store is not None and not seen_invalid and (step := mirrored_step()):
        raise TrackingUnavailable(
            f"run {run_id} has checkpoints in MLflow (the newest at step {step}) but none "
            "could be fetched (tracking server unreachable?); start it again later"
        )
    start_over(checkpointer, run_id, notify)
    return Continuation(run_id, restored)


def start_over(checkpointer: Checkpointer, run_id: str, notify: Notifiers) -> None:
    """A known run without a checkpoint to continue from: say so plainly (and keep any
    invalid ones aside) instead of "resuming" from nothing."""
    bad, aside = checkpointer.set_aside_invalid()
    if not bad:
        log.warning("no checkpoint yet: starting from step 0 in the same run")
        return
    where = f"; the local ones are kept in {aside}" if aside else ""
    message = (
        f"no valid checkpoint: starting over from step 0 in the same run "
        f"({len(bad)} invalid: {', '.join(bad)}{where})"
    )
    log.warning("%s", message)
    notify("checkpoint_failed", f"run {run_id}: {message}")
