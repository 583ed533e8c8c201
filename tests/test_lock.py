"""The session lock (``so8t_exp.lock``) with real processes: one holder at a time, the
holder named, a probe that does not disturb it, the lock file never removed.
(SIGKILL releasing it: tests/test_launcher.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from so8t_exp.lock import HOLDER_FILE, LOCK_FILE, SessionLock, SessionLocked, is_locked

# Each process takes and gives up the lock in a loop; inside it, it creates a marker file
# exclusively: a second holder at the same moment finds the marker there and says so.
_CONTENDER = """
import os, sys, time
from pathlib import Path
from so8t_exp.lock import SessionLock, SessionLocked
folder, marker, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
end, held = time.monotonic() + seconds, 0
while time.monotonic() < end:
    lock = SessionLock(folder)
    try:
        lock.acquire(purpose="race", wait=0.05)
    except SessionLocked:
        continue
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print("TWO HOLDERS", flush=True)
        sys.exit(1)
    os.close(fd)
    time.sleep(0.002)
    os.unlink(marker)
    lock.release()
    held += 1
print("held", held, flush=True)
"""


def test_one_holder_at_a_time_across_processes(tmp_path: Path) -> None:
    folder, marker = tmp_path / "s", tmp_path / "inside"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(folder), str(marker), "3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sum(int(o.split()[-1]) for o in outs) > 10, outs  # they did take turns
    assert (folder / LOCK_FILE).is_file()  # never deleted: waiters share one file


def test_second_acquire_in_the_same_process_fails(tmp_path: Path) -> None:
    """Also from the same thread and the same object: the lock is not re-entrant."""
    lock = SessionLock(tmp_path).acquire(purpose="train")
    try:
        with pytest.raises(SessionLocked, match=f"PID {os.getpid()} on "):
            SessionLock(tmp_path).acquire()
        with pytest.raises(SessionLocked, match="train"):
            lock.acquire()
        assert lock.held
    finally:
        lock.release()
    assert not lock.held and not is_locked(tmp_path)
    lock.release()  # twice: harmless


def test_is_locked_does_not_disturb_the_holder(tmp_path: Path) -> None:
    assert not is_locked(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()  # asking creates nothing
    with SessionLock(tmp_path) as lock:
        for _ in range(5):
            assert is_locked(tmp_path)
        assert lock.held
        with pytest.raises(SessionLocked):
            SessionLock(tmp_path).acquire()
    assert not is_locked(tmp_path)
    assert (tmp_path / LOCK_FILE).exists() and (tmp_path / HOLDER_FILE).exists()


def test_acquire_waits_for_the_holder(tmp_path: Path) -> None:
    first = SessionLock(tmp_path).acquire()
    threading.Timer(0.5, first.release).start()
    start = time.monotonic()
    second = SessionLock(tmp_path).acquire(purpose="resume", wait=10.0)
    try:
        assert second.held and 0.3 < time.monotonic() - start < 5.0
    finally:
        second.release()


def test_released_from_another_thread(tmp_path: Path) -> None:
    """The lock is the process's: a thread other than the one that took it may release it."""
    lock = SessionLock(tmp_path).acquire()
    t = threading.Thread(target=lock.release)
    t.start()
    t.join()
    assert not is_locked(tmp_path)
