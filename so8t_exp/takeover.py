"""How a trainer becomes its run's owner before it writes anything: it adopts the claim its
resume launcher made for it (handed over in ``SO8T_CLAIM``), or claims the run itself; then
its heartbeat keeps the lease (:mod:`so8t_exp.tracking.fencing`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from so8t_exp.tracking import Tracker
from so8t_exp.tracking.claims import Claim, claim_run, new_claimant, parse_claim
from so8t_exp.tracking.errors import run_must_exist
from so8t_exp.tracking.fencing import Fenced, Heartbeat, Lease
from so8t_exp.tracking.metrics import retry

CLAIM_ENV = "SO8T_CLAIM"  # "<run id> <claim param key> <claim value>": the launcher's claim
LEASE_BEATS = 3  # a lease lasts this many heartbeat intervals without a confirmation


def lease_seconds(heartbeat_seconds: float) -> float:
    """How long a confirmed claim lets the trainer write; ``resume.stale_after_seconds``
    must exceed it plus the longest MLflow call (README, "Fencing")."""
    return LEASE_BEATS * heartbeat_seconds


def handed_claim(env: Mapping[str, str] = os.environ) -> tuple[str, Claim] | None:
    """The run and the claim a launcher made for this trainer, if any."""
    parts = env.get(CLAIM_ENV, "").split(" ", 2)
    claim = parse_claim(parts[1], parts[2]) if len(parts) == 3 else None
    return (parts[0], claim) if claim else None


@contextmanager
def handing_over(run_id: str, claim: Claim) -> Iterator[dict[str, str]]:
    """``SO8T_CLAIM`` set for a trainer started in this process or as a child (the
    environment to give a child is yielded)."""
    previous = os.environ.get(CLAIM_ENV)
    os.environ[CLAIM_ENV] = f"{run_id} {claim.key} {claim.value}"
    try:
        yield dict(os.environ)
    finally:
        if previous is None:
            os.environ.pop(CLAIM_ENV, None)
        else:
            os.environ[CLAIM_ENV] = previous


def take_over(tracker: Tracker, heartbeat_seconds: float, step: Callable[[], int]) -> Heartbeat:
    """Own ``tracker``'s run: adopt the launcher's claim or make one, check it is the newest
    (else :class:`Fenced`), and start the heartbeat that keeps it."""
    run_id = tracker.run_id
    handed = handed_claim()
    claim = handed[1] if handed and handed[0] == run_id else None
    if claim is None:
        with run_must_exist(run_id, tracker.uri):
            claim = claim_run(tracker.client, run_id, new_claimant(), None, tracker.startup_seconds)
        if claim is None:
            raise Fenced(f"run {run_id} was claimed by another process at the same moment")
    lease = Lease(tracker.client, run_id, claim, lease_seconds(heartbeat_seconds))
    if not retry("confirm the claim", tracker.startup_seconds, lease.check):
        raise Fenced(lease.reason)
    tracker.lease = lease
    return Heartbeat(lease, lambda: tracker.heartbeat(step()), heartbeat_seconds).start()
