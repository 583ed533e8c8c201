"""What can go wrong with the tracking store before a command gets going, told apart:
unreachable (worth retrying), refused or unusable (not), a run it does not have.

Also the bound on MLflow's own HTTP retries: without it one MLflow call may retry for
minutes, so a write started while this process still owned a run could land long after
another process took the run over (the resume launcher's claims rely on the bound). And
the one write error that two processes cause each other (:func:`set_tag_racing`).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

# MLflow's defaults (7 retries, backoff factor 2, 120 s per request, Retry-After obeyed)
# let one call take several minutes. These keep one call under ~30 s: at most 3 tries of
# up to HTTP_TIMEOUT seconds each (connect or read), then backoffs of 0 and 2 s (+jitter).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
    # A 429/503 with "Retry-After: 600" would otherwise sleep ten minutes inside one call.
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}


def bound_http_retries() -> None:
    """Set :data:`HTTP_LIMITS` in the environment where the user has not set them.
    MLflow reads them at each request, so this must run before the first MLflow call;
    child processes inherit them."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    # urllib3 logs each of those retries as a warning with its whole story; the callers
    # that retry (startup, metric flushes) report in one line each instead.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def http_call_bound_seconds() -> float:
    """The longest one MLflow HTTP call can take under the current settings: every try
    timing out, every backoff at its largest (urllib3: none before the first retry, then
    factor·2^(n-1), each plus up to the jitter)."""
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "1.0"))
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
    backoffs = sum(
        min(120.0, (factor * 2 ** (n - 1) if n > 1 else 0) + jitter) for n in range(1, retries + 1)
    )
    return (retries + 1) * timeout + backoffs


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached (after retrying) or cannot be used."""


class RunNotFound(LookupError):
    """The tracking store has no run with this id (a typo, another store, or lost)."""

    def __init__(self, run_id: str, uri: str) -> None:
        super().__init__(f"run {run_id} is not in the tracking store {uri}")
        self.run_id, self.uri = run_id, uri


@contextmanager
def run_must_exist(run_id: str, uri: str) -> Iterator[None]:
    """Turn the store's "no such run" inside the block into :class:`RunNotFound`."""
    try:
        yield
    except Exception as err:
        if is_missing(err):  # permanent: the store was replaced, or is another one
            raise RunNotFound(run_id, uri) from err
        raise


def is_missing(err: BaseException) -> bool:
    """Whether ``err`` is the store saying that a run (or experiment) does not exist."""
    return isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST"


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the store was unreachable, overloaded or busy — not a refusal
    (a 4xx-kind MLflow error) and not a bug in the caller (anything else)."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status >= 500 or status == 429  # connection failures come as 500
    if isinstance(err, RequestException | ConnectionError | TimeoutError):
        return True
    # sqlite under a concurrent writer ("database is locked"), raised by SQLAlchemy.
    return type(err).__name__ == "OperationalError" and "locked" in str(err)


def brief(err: BaseException) -> str:
    """The gist of ``err`` in one short line: MLflow's connection errors nest urllib3's
    whole story; the ``[Errno N] ...`` at its bottom is what a user needs."""
    text = str(err.message if isinstance(err, MlflowException) else err)
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if found:
        return found.group(0).strip()
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "timed out"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def check_store(uri: str) -> None:
    """For a local sqlite store, fail at once with a clear reason if it cannot be used.
    (MLflow itself retries opening it for ~100 s and then ends in a traceback.)"""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if str(db) in ("", ":memory:"):
        return
    where = f"tracking store {uri}"
    if db.is_dir():
        raise TrackingUnavailable(f"{where}: {db} is a folder, not a database file")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingUnavailable(f"{where}: cannot create {db.parent}: {err}") from err
    if not db.exists():
        if not os.access(db.parent, os.W_OK | os.X_OK):
            raise TrackingUnavailable(f"{where}: folder {db.parent} is not writable")
        return
    _check_sqlite_file(db, where)


def _check_sqlite_file(db: Path, where: str) -> None:
    try:
        with closing(
            sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=5)
        ) as con:
            con.execute("PRAGMA schema_version").fetchone()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return  # busy with another writer: MLflow waits for it
        raise TrackingUnavailable(f"{where}: cannot open {db}: {err}") from err
    except sqlite3.DatabaseError as err:
        raise TrackingUnavailable(f"{where}: {db} is not an sqlite database ({err})") from err


def set_tag_racing(client, run_id: str, key: str, value: str) -> None:
    """``set_tag`` that survives another process writing the same new tag at the same moment:
    MLflow's SQL store reads, then inserts, so the slower of two first writers hits the
    unique key (seen with two launchers, or two workers of a sweep, on one sqlite store).
    Once the row exists, the retry is an update."""
    for attempt in range(3):
        try:
            return client.set_tag(run_id, key, value)
        except Exception as err:
            if attempt == 2 or "unique constraint" not in str(err).lower():
                raise
            time.sleep(0.05 * (attempt + 1))
