"""An OS file lock on a session folder: held by the trainer for its whole life.

The operating system releases it however the process ends (SIGKILL, power loss, crash), so
"can I take the lock?" is the truth about whether a session is alive on this host, whatever
its heartbeat says. The lock itself is ``filelock`` (``flock`` on POSIX, ``msvcrt.locking``
on Windows) on ``.so8t.lock``; who holds it is written beside it in ``.so8t.lock.json`` (a
locked byte range cannot be read on Windows).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from filelock import FileLock, Timeout

from so8t_exp.fsutil import atomic_write_json
from so8t_exp.host import host_id

LOCK_FILE = ".so8t.lock"
HOLDER_FILE = ".so8t.lock.json"
_POLL_SECONDS = 0.2


def os_lock(path: Path) -> FileLock:
    """The OS lock on ``path`` that a :class:`SessionLock` is made of.

    ``preserve_lock_file``: the file is never deleted. Were it deleted on release, a process
    that had opened the old file could lock that unlinked inode while another creates and
    locks a new file of the same name: two holders of "the" lock. It also rules out
    filelock's soft (PID file) fallback on file systems without ``flock``, a lock that a
    SIGKILL would not release. ``thread_local=False``: the lock is the process's, whichever
    thread releases it.
    """
    return FileLock(path, thread_local=False, preserve_lock_file=True, fallback_to_soft=False)


class SessionLocked(RuntimeError):
    """The session folder is in use by another live process."""


class SessionLock:
    """The lock on one session folder; one object per acquisition (taking it twice, even
    through the same object, fails like any other holder would)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock: FileLock | None = None

    def acquire(self, purpose: str = "train", wait: float = 0.0) -> SessionLock:
        """Take the lock, retrying for up to ``wait`` seconds; :class:`SessionLocked` names
        the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # A new FileLock each time: the same object would re-enter (filelock counts nested
        # acquisitions), and a second acquire must fail instead.
        lock = os_lock(self.folder / LOCK_FILE)
        try:
            lock.acquire(timeout=max(wait, 0.0), poll_interval=_POLL_SECONDS)
        except Timeout:
            raise SessionLocked(
                f"session folder {self.folder} is in use by {describe_holder(self.folder)}"
            ) from None
        self._lock = lock
        atomic_write_json(
            self.folder / HOLDER_FILE,
            {
                "pid": os.getpid(),
                "host": host_id(),
                "purpose": purpose,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        return self

    def release(self) -> None:
        """Give the lock up (the holder file stays: it only ever describes the last holder)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock is not None

    def __enter__(self) -> SessionLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[Path, SessionLock] = {}


def hold(folder: Path, purpose: str) -> SessionLock:
    """This process's lock of ``folder``, taken once: a later call from another part of the
    same process (a sweep's callback, then its sweeper) gets the same lock back instead of
    failing on it. :class:`SessionLocked` when another process holds it."""
    key = folder.resolve()
    lock = _HELD.get(key)
    if lock is None or not lock.held:
        lock = _HELD[key] = SessionLock(key).acquire(purpose=purpose)
    return lock


def is_locked(folder: Path) -> bool:
    """True if a live process holds ``folder``'s lock (checked by trying to take it)."""
    path = folder / LOCK_FILE
    if not path.exists():
        return False
    probe = os_lock(path)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()  # the file stays (see os_lock): a holder arriving now is unaffected
    return False


def describe_holder(folder: Path) -> str:
    try:
        h = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"PID {h['pid']} on {h['host']} ({h['purpose']}, since {h['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"
