"""The trainer's side of the checkpoint writer process (:mod:`.writer_main`).

The checkpointer's writer thread hands each save over and waits for the answer on a pipe
(blocked in a read, which holds no GIL); the writing itself happens in the other process.
The process is started with the first save (never by fork: ``sys.executable -m``, the same
on Windows), started again if it died, and ended by :meth:`ProcessWriter.close` or by the
trainer's own end, whatever that is (its stdin closes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Windows: no console of its own, and none shared with the trainer: a Ctrl-C or a closing
# console window is the trainer's to answer (with an emergency checkpoint it writes here).
_NO_CONSOLE = 0x08000000  # CREATE_NO_WINDOW
CLOSE_TIMEOUT_SECONDS = 10.0


class WriterUnavailable(RuntimeError):
    """The writer process could not be started: write from a thread instead."""


class WriterFailed(RuntimeError):
    """The writer process ended, or could not write, during a save."""


class ProcessWriter:
    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def write(self, root: Path, name: str, shared: dict, docs: dict, keep: int, pause: float):
        """Write checkpoint ``root/name`` (tensors in the arena ``shared`` describes) and
        prune; returns when it is on disk. Raises :class:`WriterFailed`."""
        job: dict[str, Any] = {"root": str(root), "name": name, "docs": docs, "keep": keep}
        job.update(arena=shared["arena"], groups=shared["groups"], pause=pause)
        line = (json.dumps(job) + "\n").encode("utf-8")
        with self._lock:
            proc = self._running()
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError:  # (it had died since the last save: once more, a new one)
                self._reap()
                proc = self._running()
                proc.stdin.write(line)
                proc.stdin.flush()
            answer = proc.stdout.readline()
            if not answer:
                code = self._reap()
                raise WriterFailed(f"the checkpoint writer process ended (exit code {code})")
        reply = json.loads(answer)
        if not reply["ok"]:
            raise WriterFailed(reply["error"])

    def _running(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        cmd = [sys.executable, "-m", "so8t_exp.checkpoint.writer_main"]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                creationflags=_NO_CONSOLE if os.name == "nt" else 0,
            )
        except OSError as err:
            raise WriterUnavailable(f"cannot start {' '.join(cmd)}: {err}") from err
        return self._proc

    def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            return proc.wait(CLOSE_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        """End the process (no write may be in flight: the checkpointer drains first)."""
        with self._lock:
            self._reap()
