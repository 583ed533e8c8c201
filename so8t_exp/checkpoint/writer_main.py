"""The checkpoint writer process: ``python -m so8t_exp.checkpoint.writer_main``.

Started by :class:`so8t_exp.checkpoint.writer_process.ProcessWriter`. Each line on stdin is
one checkpoint to write (JSON: folder, name, the shared-memory arena and where each tensor
lies in it, the JSON docs, retention); each answer is one line on stdout. It serialises,
checksums, fsyncs, renames into place and prunes old rolling checkpoints — the Python work
of a save — in its own interpreter, so the training thread never waits for its GIL.

It imports no torch (a start of ~0.1 s). Stop signals are the trainer's to handle: a
Ctrl-C or a SIGTERM sent to the whole process group must not end the writer before the
emergency checkpoint is written. It ends when its stdin closes — the trainer closed it, or
died — at once, even in mid-write: the staged folder is what a killed trainer leaves, and
the next start recovers it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

from so8t_exp.checkpoint import format as fmt
from so8t_exp.checkpoint.mirror import prune


def _ignore_stop_signals() -> None:
    for name in ("SIGINT", "SIGTERM", "SIGBREAK", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class _Arenas:
    """The trainer's arenas, mapped on first use. Before Python 3.13 attaching registers
    the block with this process's resource tracker, which would unlink it (the trainer's)
    when this process ends: registration is turned off here."""

    def __init__(self) -> None:
        self._open: dict[str, shared_memory.SharedMemory] = {}
        resource_tracker.register = lambda *_a, **_k: None  # (this process creates none)

    def get(self, name: str) -> shared_memory.SharedMemory:
        shm = self._open.get(name)
        if shm is None:
            for old in self._open.values():  # (the trainer replaced its arena)
                old.close()
            self._open = {name: (shm := shared_memory.SharedMemory(name=name))}
        return shm


def write(job: dict, arenas: _Arenas) -> None:
    """Write the checkpoint one job describes, then apply local retention."""
    buf = arenas.get(job["arena"]).buf
    groups = {
        group: [(n, code, shape, buf[off : off + size]) for n, code, shape, off, size in entries]
        for group, entries in job["groups"].items()
    }
    root = Path(job["root"])
    fmt.write_files(root, job["name"], groups, job["docs"], job.get("pause", 0.0))
    del groups
    prune(root, job["keep"])


def _serve(jobs: queue.Queue, out) -> None:
    arenas = _Arenas()
    while True:
        job = jobs.get()
        started = time.monotonic()
        try:
            write(job, arenas)
            reply = {"ok": True, "seconds": time.monotonic() - started}
        except Exception as err:  # reported to the trainer, which logs it and goes on
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        out.write((json.dumps(reply) + "\n").encode("utf-8"))
        out.flush()


def main() -> None:
    _ignore_stop_signals()
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=_serve, args=(jobs, sys.stdout.buffer), daemon=True).start()
    for line in sys.stdin.buffer:
        jobs.put(json.loads(line))
    # stdin closed: the trainer is done or gone. Nothing in flight is worth finishing
    # for a process that no longer owns the folder.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
