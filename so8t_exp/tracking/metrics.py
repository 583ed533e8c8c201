"""Metric points on their way to MLflow: buffered, batched, deduplicated, retried."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from mlflow.entities import Metric

from so8t_exp.tracking.errors import TrackingUnavailable, brief, is_transient

log = logging.getLogger(__name__)

_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch

START_RETRY_SECONDS = 120.0  # tracking.startup_timeout_seconds' default
_startup_timeout = START_RETRY_SECONDS


def set_startup_timeout(seconds: float) -> None:
    """This process's ``tracking.startup_timeout_seconds`` (the entry points set it from
    their config): how long a :class:`Tracker` retries an unreachable store at start."""
    global _startup_timeout
    _startup_timeout = float(seconds)


def startup_timeout() -> float:
    """The value :func:`set_startup_timeout` set, else :data:`START_RETRY_SECONDS`."""
    return _startup_timeout


def retry(what: str, seconds: float, fn: Callable, *args):
    """``fn(*args)``, retried with backoff for up to ``seconds`` while the store is
    unreachable (one warning line per failed try); then :class:`TrackingUnavailable`.
    Anything else — a refusal, a run the store does not have, a bug — is raised at once:
    retrying cannot help it."""
    deadline, delay, attempt = time.monotonic() + seconds, 1.0, 1
    while True:
        try:
            return fn(*args)
        except Exception as err:
            if not is_transient(err):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailable(
                    f"could not {what}: tracking store unreachable for {seconds:.0f} s "
                    f"(tracking.startup_timeout_seconds): {brief(err)}"
                ) from err
            wait = min(delay, left)
            log.warning(
                "MLflow: could not %s (%s); try %d failed, next in %.0f s (gives up in %.0f s)",
                what,
                brief(err),
                attempt,
                wait,
                left,
            )
            time.sleep(wait)
            delay, attempt = min(delay * 2, 15.0), attempt + 1


class MetricBuffer:
    """Collects metric points and sends them in batches from a background thread.

    A point whose step is not above the last step already logged for its key is dropped:
    after a resume, recomputed steps are not logged twice. Points survive send failures.
    Tags (:meth:`add_tags`) ride along with a batch: one MLflow call instead of two, and
    MLflow's Python work is what the training thread waits for (the GIL).
    """

    def __init__(
        self,
        send: Callable[[list[Metric], dict[str, str]], None],
        interval: float,
        logged_steps: dict[str, int] | None = None,
    ) -> None:
        self._send, self._interval = send, interval
        self._last = dict(logged_steps or {})
        self._pending: list[Metric] = []
        self._inflight: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.dropped_on_close = 0
        self._thread = threading.Thread(target=self._run, name="so8t-metrics", daemon=True)
        self._thread.start()

    def add(self, metrics: Mapping[str, float], step: int, timestamp: int | None = None) -> None:
        now = timestamp or int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if step <= self._last.get(key, -1):
                    continue
                self._last[key] = step
                self._pending.append(Metric(key, float(value), now, step))

    def add_tags(self, tags: Mapping[str, object], now: bool = True) -> None:
        """Tags sent with a batch (a later value of a key replaces an earlier one): at once,
        with the points pending, or with the next timed batch if not ``now``. A checkpoint's
        tags must not wait for the timer: a trainer killed within the interval would leave
        them unsent, and the run page naming an older checkpoint than the store holds."""
        with self._lock:
            self._tags.update({k: str(v) for k, v in tags.items() if v is not None})
        if now:
            self._wake.set()

    def unsent(self) -> list[list]:
        """Points not yet confirmed by the store (in flight or pending), as JSON-able rows
        ``[key, value, timestamp, step]``. Checkpoints carry them, so a crash right after a
        checkpoint cannot lose the metrics of the steps it covers."""
        with self._lock:
            return [[m.key, m.value, m.timestamp, m.step] for m in self._inflight + self._pending]

    def add_unsent(self, rows: list[list]) -> None:
        """Queue rows from :meth:`unsent` again; those the store already has are dropped."""
        for key, value, timestamp, step in sorted(rows, key=lambda r: r[3]):
            self.add({key: value}, step, timestamp)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Send what is pending; False (and keep it) if the store is unreachable."""
        with self._flush_lock:
            with self._lock:
                self._inflight, self._pending = self._pending, []
                tags, self._tags = self._tags, {}
            try:
                while self._inflight or tags:
                    chunk = self._inflight[:_MAX_BATCH]
                    self._send(chunk, tags)
                    tags = {}
                    with self._lock:
                        self._inflight = self._inflight[len(chunk) :]
            except Exception as err:  # an outage must never reach the training thread
                with self._lock:
                    self._pending, self._inflight = self._inflight + self._pending, []
                    self._tags = {**tags, **self._tags}  # (newer values win)
                log.warning(
                    "metric logging failed, %d points kept for retry: %s", len(self._pending), err
                )
                return False
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and send the rest, retrying until ``timeout``."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(1.0)
        self.dropped_on_close = len(self._pending)
