"""Runs as the resume launcher and the sessions CLI see them: search, read, tag, claim."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from so8t_exp.tracking.claims import Claim, claim_run
from so8t_exp.tracking.core import HEARTBEAT_TAG, iso, resolve_tracking_uri
from so8t_exp.tracking.errors import set_tag_racing
from so8t_exp.tracking.sweep import is_parent, is_study_sweep

log = logging.getLogger(__name__)

# Tags the launcher keeps on a run (the trainer writes heartbeat/step/checkpoint ones).
GIVEN_UP = "so8t.given_up"
EXPIRED = "so8t.expired"
RESUME_COUNT = "so8t.resume.count"  # resumes ever made
ATTEMPTS = "so8t.resume.attempts"  # consecutive resumes without progress in step
LAST_STEP = "so8t.resume.last_step"  # newest checkpoint step at the last resume
CLAIM_TIME = "so8t.resume.claim_time"
CLAIM_BY = "so8t.resume.claim_by"


WORLD_SIZE_TAG = "so8t.world_size"  # set by a run of several processes


@dataclass
class RunRecord:
    run_id: str
    name: str
    experiment: str
    status: str
    start_time: float  # seconds
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def tag_float(self, key: str, default: float | None = None) -> float | None:
        try:
            return float(self.tags[key])
        except (KeyError, ValueError):
            return default

    @property
    def is_sweep_parent(self) -> bool:
        """A multirun's parent run: no session of its own, never resumed or listed."""
        return is_parent(self.tags)

    @property
    def world_size(self) -> int:
        """How many processes (torchrun) the run trains with."""
        return int(self.tag_float(WORLD_SIZE_TAG, 1.0))

    @property
    def session_dir(self) -> Path | None:
        value = self.tags.get("so8t.session_dir")
        return Path(value) if value else None

    @property
    def heartbeat(self) -> float:
        """Last sign of life: the heartbeat tag, else the run's start time."""
        return self.tag_float(HEARTBEAT_TAG, self.start_time)

    @property
    def checkpoint_step(self) -> int:
        return int(self.tag_float("so8t.checkpoint.latest_step", 0) or 0)


class RunRegistry:
    def __init__(self, uri: str | None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    def _record(self, run, experiment: str) -> RunRecord:
        return RunRecord(
            run_id=run.info.run_id,
            name=run.info.run_name or "",
            experiment=experiment,
            status=run.info.status,
            start_time=(run.info.start_time or 0) / 1000,
            tags=dict(run.data.tags),
            params=dict(run.data.params),
        )

    def runs(
        self, experiments: list[str], unfinished_only: bool = True, sweeps: bool = False
    ) -> list[RunRecord]:
        """Session runs of ``experiments``, newest first; with ``sweeps``, also the parent
        runs of Optuna sweeps (never those of grid sweeps: not sessions, nothing to do)."""
        exps = {
            e.experiment_id: e.name
            for name in experiments
            if (e := self.client.get_experiment_by_name(name)) is not None
        }
        if not exps:
            return []
        query = "attributes.status != 'FINISHED'" if unfinished_only else ""
        out, token = [], None
        while True:
            page = self.client.search_runs(
                list(exps),
                query,
                max_results=1000,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
            records = (self._record(r, exps[r.info.experiment_id]) for r in page)
            out += [
                r for r in records if not r.is_sweep_parent or (sweeps and is_study_sweep(r.tags))
            ]
            token = page.token
            if not token:
                return out

    def get(self, run_id: str) -> RunRecord:
        run = self.client.get_run(run_id)
        return self._record(run, self.client.get_experiment(run.info.experiment_id).name)

    def set_tags(self, run_id: str, tags: dict) -> None:
        for key, value in tags.items():
            set_tag_racing(self.client, run_id, key, str(value))

    def claim(self, run_id: str, claimant: str, after: int) -> Claim | None:
        """Claim the run for ``claimant`` as claim ``after + 1`` (see :mod:`.claims`): the
        claim if won, None if another claimant was first. Also tagged, for people."""
        claim = claim_run(self.client, run_id, claimant, after)
        if os.environ.get("SO8T_FAULT_DIE_AFTER_CLAIM"):  # (the fault suite: die half way)
            os._exit(137)
        if claim is not None:
            now = time.time()
            self.set_tags(
                run_id,
                {
                    RESUME_COUNT: claim.number - 1,  # claim 1 is the run's first trainer
                    CLAIM_TIME: f"{now:.3f}",
                    CLAIM_TIME + "_iso": iso(now),
                    CLAIM_BY: claimant,
                },
            )
        return claim

    def recorded_overrides(self, run: RunRecord) -> list[str]:
        """The Hydra task overrides the run was last started with: from its session file
        (written by the process that held the lock), else from its ``hydra/overrides.yaml``
        artifact (uploaded by that process)."""
        info = run.session_dir / "session_info.json" if run.session_dir else None
        if info is not None and info.is_file():
            try:
                recorded = json.loads(info.read_text(encoding="utf-8")).get("overrides")
                if recorded is not None:
                    return list(recorded)
            except ValueError:
                pass
        try:
            text = self.client.download_artifacts(run.run_id, "hydra/overrides.yaml")
            return list(yaml.safe_load(Path(text).read_text(encoding="utf-8")) or [])
        except Exception as err:
            log.warning("run %s: no recorded overrides (%s); using none", run.run_id, err)
            return []
