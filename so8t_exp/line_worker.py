"""A helper process that takes JSON jobs, one line each, and answers each with one line.

The training process hands Python-heavy work that need not run in its own interpreter to
such a process (the checkpoint writer, the metric sender), so that work never takes the
training thread's GIL; the thread that hands it over waits in a pipe read, which holds
none. Both sides live here: :class:`LineWorker` (the trainer's) and :func:`serve` (the
helper's ``main``).

The helper is started on first use as ``sys.executable -m <module>`` (never by fork: the
same on Windows), started again after it died, and ends when its stdin closes — closed by
:meth:`LineWorker.close`, or by the trainer's end, whatever that is (a SIGKILL included).
Stop signals are the trainer's to answer: a Ctrl-C or SIGTERM sent to the whole process
group must not end a helper before the trainer's emergency checkpoint has used it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

# Windows: no console of its own and none shared with the trainer, so a Ctrl-C or a closing
# console window reaches only the trainer.
_NO_CONSOLE = 0x08000000  # CREATE_NO_WINDOW
CLOSE_TIMEOUT_SECONDS = 10.0


class WorkerUnavailable(RuntimeError):
    """The helper process could not be started, or ended before answering its first job
    (a broken install, say): do the work in this process instead."""


class WorkerFailed(RuntimeError):
    """The helper ended during a job, or answered that the job failed."""


class LineWorker:
    def __init__(self, module: str, *args: str) -> None:
        self.cmd = [sys.executable, "-m", module, *args]
        self._proc: subprocess.Popen | None = None
        self._answered = 0  # jobs the running process answered
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def call(self, job: dict) -> dict:
        """Hand ``job`` over and wait for its answer (a dict with ``ok`` true). Raises
        :class:`WorkerUnavailable` or :class:`WorkerFailed`."""
        line = (json.dumps(job) + "\n").encode("utf-8")
        with self._lock:
            try:
                self._send(line)
            except OSError:  # (it had died since the last job: once more, a new one)
                self._reap()
                self._send(line)
            answer = self._proc.stdout.readline()
            if not answer:
                answered, code = self._answered, self._reap()
                why = f"{self.cmd[2]} ended (exit code {code})"
                raise WorkerFailed(why) if answered else WorkerUnavailable(why)
            self._answered += 1
        reply = json.loads(answer)
        if not reply.get("ok"):
            raise WorkerFailed(reply.get("error", "failed"))
        return reply

    def _send(self, line: bytes) -> None:
        proc = self._running()
        proc.stdin.write(line)
        proc.stdin.flush()

    def _running(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._answered = 0
        try:
            self._proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                creationflags=_NO_CONSOLE if os.name == "nt" else 0,
            )
        except OSError as err:
            raise WorkerUnavailable(f"cannot start {' '.join(self.cmd)}: {err}") from err
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
        """End the helper (after the job in flight, if any)."""
        with self._lock:
            self._reap()


def serve(handle: Callable[[dict], dict]) -> None:
    """The helper's main loop: ``handle`` each job line in a worker thread, answer
    ``{"ok": true, **result}`` or ``{"ok": false, "error": ...}``; end at once when stdin
    closes, even in mid-job (the trainer no longer wants it)."""
    for name in ("SIGINT", "SIGTERM", "SIGBREAK", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    jobs: queue.Queue = queue.Queue()
    out = sys.stdout.buffer

    def work() -> None:
        while True:
            job = jobs.get()
            try:
                reply = {"ok": True, **(handle(job) or {})}
            except Exception as err:  # reported to the trainer, which logs it and goes on
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            out.write((json.dumps(reply) + "\n").encode("utf-8"))
            out.flush()

    threading.Thread(target=work, daemon=True).start()
    for line in sys.stdin.buffer:
        jobs.put(json.loads(line))
    os._exit(0)
