"""The serving audit log: one row per request, append-only, in sqlite.

A row holds when, which request, a salted hash of the client, the model and version, the
sha256 and byte count of the thinking, the safety label and its probability, the policy
action, status and latency — never the thinking, and the query only with
``serve.audit.log_prompt``. Triggers refuse UPDATE and DELETE, so the file only grows.
"Rotation" therefore starts a new file: the current one is renamed
``audit-<UTC time>.db`` beside it (past ``rotate_mb`` or ``rotate_days``), and rotated
files past ``retention_days`` or beyond ``keep_files`` are deleted.

Each row of ``/think`` is committed (``synchronous=FULL``) before the response is sent: a
request the client saw answered is in the log after a power cut; if the log cannot be
written the request fails with 503. A stream's row is written when it ends; before it
sends anything it checks that the log takes writes (503 if not).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import Timeout

from so8t_exp.config import ConfigError
from so8t_exp.lock import os_lock
from so8t_exp.serve.config import AuditConfig

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, time_iso TEXT NOT NULL, request_id TEXT NOT NULL,
    endpoint TEXT NOT NULL, status INTEGER NOT NULL, reason TEXT,
    client_hash TEXT, model_name TEXT, model_version TEXT,
    safety_label TEXT, safety_confidence REAL, policy_action TEXT,
    thinking_sha256 TEXT, thinking_bytes INTEGER, answer_bytes INTEGER,
    answer_complete INTEGER, finish_reason TEXT, generated_tokens INTEGER,
    latency_ms REAL NOT NULL, prompt TEXT);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@dataclass
class AuditRecord:
    """One request, as the log keeps it."""

    request_id: str
    endpoint: str
    status: int
    latency_ms: float
    reason: str | None = None
    client_hash: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    safety_label: str | None = None
    safety_confidence: float | None = None
    policy_action: str | None = None
    thinking_sha256: str | None = None
    thinking_bytes: int | None = None
    answer_bytes: int | None = None
    answer_complete: bool | None = None
    finish_reason: str | None = None
    generated_tokens: int | None = None
    prompt: str | None = None


class AuditLog:
    """The append-only log at ``cfg.path``; safe to call from many threads. One process
    writes a path at a time (an OS lock beside it): two servers rotating the same file
    would rename it under each other."""

    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._owner = os_lock(self.path.with_name(self.path.name + ".lock"))
        try:
            self._owner.acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"serve.audit.path={self.path} is written by another running server; "
                "give each server its own serve.audit.path"
            ) from None
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._born = time.time()  # when the current file's first row was written
        stem, suffix = self.path.stem, self.path.suffix
        self._rotated = re.compile(re.escape(stem) + r"-\d{8}T\d{12}Z" + re.escape(suffix))
        try:
            self._salt = _salt(self.path.with_name(self.path.name + ".salt"))
            with self._lock:
                self._open()
                self._rotate_if_due()
                self._prune()
        except BaseException:
            self.close()
            raise

    def client_hash(self, client_id: str) -> str:
        """A salted sha256 of a client id: the same client gets the same hash in every
        file, and the address or id cannot be recovered from the log alone."""
        return hashlib.sha256(self._salt + client_id.encode("utf-8", "replace")).hexdigest()

    def write(self, record: AuditRecord) -> None:
        """Commit one row (raises ``sqlite3.Error`` when it cannot)."""
        row = asdict(record)
        if not self.cfg.log_prompt:
            row["prompt"] = None
        now = time.time()
        row["time"] = now
        row["time_iso"] = datetime.fromtimestamp(now, timezone.utc).isoformat()
        columns = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._lock:
            self._open()
            self._rotate_if_due()
            self._open()
            with self._db:  # one transaction, committed on exit
                self._db.execute(f"INSERT INTO audit ({columns}) VALUES ({marks})", row)

    def check_writable(self) -> None:
        """Raise ``sqlite3.Error`` unless a row could be written now (a write lock taken
        and given back): what a stream checks before it sends anything."""
        with self._lock:
            self._open()
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        """Close the file and give the path up (again: nothing)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._owner.is_locked:
                self._owner.release()

    def _open(self) -> None:
        if self._db is not None:
            return
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            first = db.execute("SELECT time FROM audit ORDER BY seq LIMIT 1").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        self._born = first[0] if first else time.time()
        self._db = db

    def _rotate_if_due(self) -> None:
        """Start a new file when this one is too big or too old. A rotation that fails
        (say, a reader holds the file open on Windows) is retried at the next row, which
        meanwhile goes to the current file."""
        pages, page_size = (
            self._db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "page_size")
        )
        size_mb = pages * page_size / 2**20
        age_days = (time.time() - self._born) / 86400
        due = (self.cfg.rotate_mb and size_mb >= self.cfg.rotate_mb) or (
            self.cfg.rotate_days and age_days >= self.cfg.rotate_days
        )
        if not due:
            return
        self._db.close()  # Windows cannot rename an open file
        self._db = None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        try:
            _checkpoint_wal(self.path)
            rotated = f"{self.path.stem}-{stamp}{self.path.suffix}"
            os.replace(self.path, self.path.with_name(rotated))
        except (OSError, sqlite3.Error) as err:
            log.warning("audit log not rotated yet: %s", err)
            return
        log.info("audit log rotated (%.1f MB, %.1f days)", size_mb, age_days)
        self._prune()

    def _prune(self) -> None:
        """Delete rotated files of this log (never other files) past the retention."""
        rotated = sorted(p for p in self.path.parent.iterdir() if self._rotated.fullmatch(p.name))
        keep = self.cfg.keep_files
        doomed = rotated[:-keep] if keep and len(rotated) > keep else []
        if self.cfg.retention_days:
            cutoff = time.time() - self.cfg.retention_days * 86400
            doomed += [p for p in rotated if p.stat().st_mtime < cutoff and p not in doomed]
        for old in doomed:
            old.unlink(missing_ok=True)
            log.info("audit log %s deleted (retention)", old.name)


def _salt(path: Path) -> bytes:
    """The log's secret salt, made once and kept beside it (written whole, then renamed
    into place); owner-only on POSIX, on Windows the folder's permissions apply."""
    try:
        salt = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        salt = b""
    if len(salt) == 32:
        return salt
    if path.exists():  # an unusable salt: no row was hashed with it
        log.warning("audit salt %s is unreadable; making a new one", path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    salt = secrets.token_bytes(32)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(salt.hex())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return salt


def _checkpoint_wal(path: Path) -> None:
    """Fold the write-ahead log into the file, so the renamed file is complete alone."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
