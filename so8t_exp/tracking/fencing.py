"""Fencing: a trainer writes to its run only while it is the run's newest claimant.

Across hosts "that trainer is dead" is a judgement from outside (its heartbeat stopped
changing), so it can be wrong: a trainer cut off from the tracking server, or frozen, may
come back after another host has claimed its run. The :class:`Lease` makes that harmless:

* the heartbeat thread confirms, with each beat, that the newest claim is still ours;
* every write to MLflow (metric, tag, param, artifact, checkpoint, status) first asks
  :meth:`Lease.writable`: only while the last confirmation is younger than ``seconds``;
* once another claim is seen the lease is fenced for good: the trainer stops at the next
  step boundary without writing anything more (exit code 5).

A launcher on another host declares a run dead only after its heartbeat has not changed
for ``resume.stale_after_seconds`` on the launcher's own clock; with the lease shorter
than that (minus the longest one MLflow call may take), an old trainer has stopped
writing before a new one can exist.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mlflow.tracking import MlflowClient

from so8t_exp.tracking.claims import Claim, newest_claim

log = logging.getLogger(__name__)

EXIT_FENCED = 5  # another process took over this run; this one stopped without writing


class Fenced(RuntimeError):
    """Another process has claimed this run since this trainer did."""


class Lease:
    """This process's claim on ``run_id``, confirmed against the store."""

    def __init__(self, client: MlflowClient, run_id: str, claim: Claim, seconds: float) -> None:
        self.client, self.run_id, self.claim, self.seconds = client, run_id, claim, seconds
        self.confirmed_at = time.monotonic()  # (the claim was just written or read)
        self.fenced_by: Claim | None = None
        self._last_renewal = float("-inf")

    def check(self) -> bool:
        """Read the newest claim: True if still ours (the lease is renewed), False if
        another process has claimed the run (fenced from now on). Raises if the store
        cannot be read (the lease then runs out on its own)."""
        asked = time.monotonic()  # the answer holds from the moment we asked
        newest = newest_claim(self.client.get_run(self.run_id).data.params)
        if newest is not None and newest.number > self.claim.number:
            if self.fenced_by is None:
                self.fenced_by = newest
                log.error("%s", self.reason)
            return False
        if self.fenced_by is None:
            self.confirmed_at = max(self.confirmed_at, asked)
        return self.fenced_by is None

    @property
    def fenced(self) -> bool:
        return self.fenced_by is not None

    @property
    def reason(self) -> str:
        by = self.fenced_by
        return (
            f"fenced: run {self.run_id} was claimed by {by.by if by else '?'} (claim "
            f"{by.number if by else '?'}) after this trainer's claim {self.claim.number}; "
            "stopping without writing anything more"
        )

    def renew(self) -> bool:
        """For a writer the lease held back: check now (at most once every ``seconds / 3``)
        instead of waiting for the next beat, so writes go on as soon as the tracking
        server is back. False if still not writable."""
        now = time.monotonic()
        if self.fenced or now - self._last_renewal < self.seconds / 3:
            return False
        self._last_renewal = now
        try:
            self.check()
        except Exception:  # still unreachable: the writer keeps its data and retries
            return False
        return self.writable()

    def writable(self) -> bool:
        """Whether a write may start now: ours, and confirmed within the lease."""
        return not self.fenced and time.monotonic() - self.confirmed_at < self.seconds


class Heartbeat:
    """The liveness beat on a thread of its own (nothing else can delay it): every
    ``interval`` seconds confirm the lease, then ``beat()`` (which writes the heartbeat tags).
    ``on_fenced`` is called once when another claim appears."""

    def __init__(
        self,
        lease: Lease,
        beat: Callable[[], None],
        interval: float,
        on_fenced: Callable[[], None] = lambda: None,
    ) -> None:
        self.lease, self.beat, self.interval, self.on_fenced = lease, beat, interval, on_fenced
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="so8t-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if self.lease.check():
                    self.beat()
                else:
                    self.on_fenced()
                    return
            except Exception as err:  # an outage: the lease runs out unless renewed in time
                log.warning("heartbeat: MLflow unreachable (%s)", str(err)[:200])
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)
