"""The boot log, ``<project>/logs/resume_at_boot.log``: every line timestamped by the launcher
itself (the same format on Windows and Linux), and read back by ``boot status``.

The boot scripts (.bat, .sh, the systemd unit) append the launcher's stdout and stderr to the
log and set ``SO8T_STAMP_LINES=1``; :func:`stamped_output` then prefixes each line written
through ``sys.stdout``/``sys.stderr`` with ``[YYYY-MM-DD HH:MM:SS]`` and writes one
``resume_at_boot: starting ...`` and one ``resume_at_boot: exit code N`` line.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from so8t_exp.paths import project_root

STAMP_ENV = "SO8T_STAMP_LINES"
LOG_NAME = "resume_at_boot.log"
START = "resume_at_boot: starting "
END = "resume_at_boot: exit code "
_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] (.*)$")
# The scripts' own line when they cannot start the launcher (no Python): stamped by cmd.exe's
# %DATE% %TIME% on Windows, whose format depends on the locale.
_SCRIPT_ERROR = re.compile(r"^\[([^\]]+)\] (resume_at_boot: error: .*)$")


def log_dir() -> Path:
    """Where the boot scripts write: ``SO8T_LOG_DIR``, else ``<project>/logs``."""
    env = os.environ.get("SO8T_LOG_DIR")
    return Path(env) if env else project_root() / "logs"


def stamp() -> str:
    return datetime.now().strftime("[%Y-%m-%d %H:%M:%S] ")


class LineStamper:
    """A text stream that writes whole lines, each with a timestamp, to ``stream``.

    Both stdout and stderr share one lock, so their lines never interleave mid-line; a
    partial line waits for its newline (or :meth:`close`). The lock is re-entrant: a signal
    handler that logs runs on the thread that may be inside :meth:`write`."""

    _lock = threading.RLock()

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        with self._lock:
            *lines, partial = (self._partial + text).replace("\r\n", "\n").split("\n")
            # A progress bar redraws with \r and no newline for hours: keep its last frame
            # only, or the partial line grows without end.
            self._partial = partial.rsplit("\r", 1)[-1]
            for line in lines:
                # A progress bar redraws with \r: the log keeps what it last showed.
                self._stream.write(stamp() + line.rsplit("\r", 1)[-1] + "\n")
            if lines:
                self._stream.flush()  # a hard kill loses nothing already written
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        """Write a partial last line (a crash's last words have no newline)."""
        if self._partial:
            self.write("\n")

    def isatty(self) -> bool:
        return False  # a log: no progress-bar redraws, no colours

    def __getattr__(self, name: str):  # encoding, fileno, ... of the real stream
        return getattr(self._stream, name)


@contextmanager
def stamped_output(command: str) -> Iterator[None]:
    """With ``SO8T_STAMP_LINES=1``: timestamp every output line, bracketed by a start and an
    exit-code line (also for ``sys.exit`` and uncaught exceptions). Otherwise nothing."""
    if os.environ.get(STAMP_ENV, "") in ("", "0"):
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = LineStamper(out), LineStamper(err)
    print(f"{START}{sys.executable} -m {command} {' '.join(sys.argv[1:])}".rstrip())
    code: int | str | None = 1
    try:
        yield
        code = 0
    except SystemExit as exit_:
        code = exit_.code
        raise
    except KeyboardInterrupt:
        code = 130  # as the shell reports a Ctrl-C
        raise
    finally:
        code = 0 if code is None else code if isinstance(code, int) else 1
        print(f"{END}{code}")
        sys.stdout.close()
        sys.stderr.close()
        sys.stdout, sys.stderr = out, err


@dataclass
class LastStart:
    """The newest launcher start in the boot log, and how it ended (None: still running, or
    killed before it could say)."""

    started: str
    command: str
    ended: str | None = None
    exit_code: int | None = None
    error: str | None = None  # the script could not start the launcher: its message


def last_start(path: Path) -> LastStart | None:
    """The newest ``starting`` line of the boot log at ``path`` and its ``exit code``."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    found: LastStart | None = None
    for line in text.splitlines():
        failed = _SCRIPT_ERROR.match(line)
        if failed:
            when, message = failed.groups()
            found = LastStart(started=when, command="", ended=when, error=message)
            continue
        match = _LINE.match(line)
        if not match:
            continue
        when, message = match.groups()
        if message.startswith(START):
            found = LastStart(started=when, command=message[len(START) :])
        elif message.startswith(END) and found and found.ended is None:
            found.ended = when
            code = message[len(END) :].strip()
            found.exit_code = int(code) if code.lstrip("-").isdigit() else None
    return found
