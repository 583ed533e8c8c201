"""Who owns a run: write-once claim params, the only compare-and-set an MLflow store offers.

Every process that trains a run claims it first — a resume launcher for the trainer it
starts (which adopts that claim), a trainer started by hand for itself. Claim ``n`` is the
param ``so8t.resume.claim.<n>`` = ``<host>:<pid>:<nonce>@<epoch>``. The highest number is
the owner: any other process that finds it is no longer the newest stops (fencing). The
next number comes from the claims themselves, and the claimant and its time are one
write, so a claimant that dies half way cannot wedge the run for the next one.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from so8t_exp.host import host_id
from so8t_exp.tracking.metrics import retry

log = logging.getLogger(__name__)

CLAIM_PREFIX = "so8t.resume.claim."


@dataclass(frozen=True)
class Claim:
    number: int
    by: str  # <host>:<pid>:<nonce>
    time: float | None = None  # the claimant's clock (readable, never compared across hosts)

    @property
    def key(self) -> str:
        return f"{CLAIM_PREFIX}{self.number}"

    @property
    def value(self) -> str:
        return f"{self.by}@{self.time:.3f}" if self.time is not None else self.by

    @property
    def host(self) -> str:
        return self.by.partition(":")[0]

    @property
    def pid(self) -> int | None:
        pid = self.by.partition(":")[2].partition(":")[0]
        return int(pid) if pid.isdigit() else None


def new_claimant() -> str:
    """A claimant id unique to this process and call: ``<host>:<pid>:<nonce>``."""
    return f"{host_id()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def parse_claim(key: str, value: str) -> Claim | None:
    number = key.removeprefix(CLAIM_PREFIX)
    if not key.startswith(CLAIM_PREFIX) or not number.isdigit():
        return None
    by, _, stamp = value.rpartition("@")
    try:
        return Claim(int(number), by, float(stamp)) if by else Claim(int(number), value)
    except ValueError:  # (a claim written before claims carried their time)
        return Claim(int(number), value)


def newest_claim(params: Mapping[str, str]) -> Claim | None:
    """The run's current owner: its highest-numbered claim, or None if never claimed."""
    claims = (parse_claim(k, v) for k, v in params.items() if k.startswith(CLAIM_PREFIX))
    return max((c for c in claims if c is not None), key=lambda c: c.number, default=None)


class _Unsettled(TimeoutError):
    """The claim write failed and nobody else's claim took its number: like a timeout,
    worth another try."""


def claim_run(
    client: MlflowClient,
    run_id: str,
    claimant: str,
    after: int | None = None,
    retry_seconds: float = 60.0,
) -> Claim | None:
    """Claim ``run_id`` for ``claimant``: the claim if it is ours, None if another claimant
    took the number first. ``after``: the newest claim number the caller judged the run
    by (0: none), so only claim ``after + 1`` is tried — a launcher must not take over a
    run someone claimed since it looked; None: the next free number (a trainer taking over
    its own run). A failed write (``database is locked``, a timeout) is read back and
    retried for ``retry_seconds`` (then ``TrackingUnavailable``), never taken for a lost
    race; anything else (a run the store does not have) is raised at once."""
    return retry("claim the run", retry_seconds, _claim_once, client, run_id, claimant, after)


def _claim_once(
    client: MlflowClient, run_id: str, claimant: str, after: int | None
) -> Claim | None:
    if after is None:
        current = newest_claim(client.get_run(run_id).data.params)
        after = current.number if current else 0
    claim = Claim(after + 1, claimant, round(time.time(), 3))
    try:
        client.log_param(run_id, claim.key, claim.value)
    except MlflowException as err:
        # A lost race, or a write whose answer was lost: the store's content decides.
        log.debug("claim %d of run %s: %s", claim.number, run_id, err)
    got = client.get_run(run_id).data.params.get(claim.key)
    taken = parse_claim(claim.key, got) if got is not None else None
    if taken is not None and taken.by == claimant:  # (maybe an earlier try's write)
        return taken
    if got is not None:
        log.info("claim %d of run %s lost to %s", claim.number, run_id, got)
        return None
    raise _Unsettled(f"claim {claim.number} was not written")
