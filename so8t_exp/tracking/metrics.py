"""Metric points on their way to MLflow: buffered, batched, deduplicated, retried."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from mlflow.entities import Metric

log = logging.getLogger(__name__)

_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch

START_RETRY_SECONDS = 120.0


def retry(what: str, seconds: float, fn: Callable, *args):
    """``fn(*args)``, retried with backoff for up to ``seconds`` while it raises."""
    deadline, delay = time.monotonic() + seconds, 1.0
    while True:
        try:
            return fn(*args)
        except Exception as err:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("MLflow: could not %s (%s); retrying in %.0f s", what, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


class MetricBuffer:
    """Collects metric points and sends them in batches from a background thread.

    A point whose step is not above the last step already logged for its key is dropped:
    after a resume, recomputed steps are not logged twice. Points survive send failures.
    """

    def __init__(
        self,
        send: Callable[[list[Metric]], None],
        interval: float,
        logged_steps: dict[str, int] | None = None,
    ) -> None:
        self._send, self._interval = send, interval
        self._last = dict(logged_steps or {})
        self._pending: list[Metric] = []
        self._inflight: list[Metric] = []
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
            try:
                while self._inflight:
                    chunk = self._inflight[:_MAX_BATCH]
                    self._send(chunk)
                    with self._lock:
                        self._inflight = self._inflight[len(chunk) :]
            except Exception as err:  # an outage must never reach the training thread
                with self._lock:
                    self._pending, self._inflight = self._inflight + self._pending, []
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
