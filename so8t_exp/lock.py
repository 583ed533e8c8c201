"""An OS file lock on a session folder: held by the trainer for its whole life.

The operating system releases it however the process ends (SIGKILL, power loss, crash), so
"can I take the lock?" is the truth about whether a session is alive on this host, whatever
its heartbeat says. ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows. Who holds it is
written beside it in ``.so8t.lock.json`` (a locked byte range cannot be read on Windows).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from so8t_exp.fsutil import atomic_write_json

LOCK_FILE = ".so8t.lock"
HOLDER_FILE = ".so8t.lock.json"


class SessionLocked(RuntimeError):
    """The session folder is in use by another live process."""


class SessionLock:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fh = None

    def acquire(self, purpose: str = "train", wait: float = 0.0) -> SessionLock:
        """Take the lock, retrying for up to ``wait`` seconds; :class:`SessionLocked` names
        the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.folder / LOCK_FILE, "a+b")  # noqa: SIM115 (held for the process's life)
        deadline = time.monotonic() + wait
        while True:
            try:
                _lock(fh)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    fh.close()
                    raise SessionLocked(
                        f"session folder {self.folder} is in use by {describe_holder(self.folder)}"
                    ) from None
                time.sleep(0.2)
        self._fh = fh
        atomic_write_json(
            self.folder / HOLDER_FILE,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "purpose": purpose,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        return self

    def release(self) -> None:
        if self._fh is not None:
            _unlock(self._fh)
            self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self) -> SessionLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(folder: Path) -> bool:
    """True if a live process holds ``folder``'s lock (checked by trying to take it)."""
    path = folder / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a+b") as fh:
        try:
            _lock(fh)
        except OSError:
            return True
        _unlock(fh)
    return False


def describe_holder(folder: Path) -> str:
    try:
        h = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"PID {h['pid']} on {h['host']} ({h['purpose']}, since {h['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


if os.name == "nt":
    import msvcrt

    def _lock(fh) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(fh) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(fh) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fh) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
