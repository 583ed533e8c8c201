"""A trainer's run as its MLflow page shows it: opened with a name, a description and
provenance tags; resumed with one more history line (name and description kept); closed
with its last step, and its sweep's parent settled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from so8t_exp.tracking import describe
from so8t_exp.tracking.core import Tracker
from so8t_exp.tracking.sweep import SweepJob, settle_parent


class RunPage:
    """Opens and closes ``tracker``'s run for the session in ``session_dir``.

    ``tracking``: the ``tracking`` config (``experiment``, ``run_name``); ``hydra_dir``: the
    session's ``.hydra`` folder, where a sweep job finds its parent.
    """

    def __init__(
        self, tracker: Tracker, tracking: Any, session_dir: Path, hydra_dir: Path | None = None
    ) -> None:
        self.tracker, self.session_dir = tracker, session_dir
        self.experiment, self.run_name = tracking.experiment, tracking.run_name
        self.sweep = SweepJob.read(hydra_dir)
        self.overrides: list[str] = []

    def open(
        self, run_id: str | None, from_step: int = 0, overrides: list[str] | None = None
    ) -> str:
        """Create the run, or re-attach to ``run_id`` continuing from step ``from_step``.
        ``overrides``: this start's Hydra task overrides (name and command come from them)."""
        self.overrides = list(overrides or [])
        if run_id is None:
            tags = {**describe.provenance_tags(), describe.NOTE: self._note("started")}
            self.tracker.start(self.experiment, self._name, tags={**tags, **self._sweep_tags()})
            return self.tracker.run_id
        self.tracker.start(self.experiment, None, run_id)
        self.tracker.safely("describe the run", self._resumed, from_step)
        return run_id

    def _name(self, experiment_id: str) -> str:
        # An explicit name is the user's choice, duplicates included.
        if self.run_name:
            return self.run_name
        base = describe.base_name(self.overrides)
        return describe.unique_name(self.tracker.client, experiment_id, base)

    def _note(self, first: str) -> str:
        sweep = self.sweep.describe() if self.sweep else None
        return describe.session_note(self.overrides, self.session_dir, sweep, first)

    def _sweep_tags(self) -> dict[str, str]:
        return self.sweep.tags() if self.sweep else {}

    def _resumed(self, step: int) -> None:
        what = f"resumed from step {step}"
        current = self.tracker.client.get_run(self.tracker.run_id).data.tags.get(describe.NOTE)
        text = describe.with_history(current, what, self._note(what))
        # A job resumed on its own (the launcher) keeps its parent: same tags again.
        self.tracker.set_tags({describe.NOTE: text, **self._sweep_tags()})

    def finish(self, status: str, step: int | None = None) -> bool:
        """Close the run (``so8t.step`` = ``step``); a finished sweep job may end its sweep."""
        done = self.tracker.finish(status, step=step)
        if done and status == "FINISHED":
            client, run_id = self.tracker.client, self.tracker.run_id
            self.tracker.safely("settle the sweep run", settle_parent, client, run_id)
        return done
