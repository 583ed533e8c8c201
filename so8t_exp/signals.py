"""Turn stop signals into a request honoured at the next optimizer-step boundary.

SIGINT (Ctrl-C), SIGTERM, SIGHUP (terminal closed) and, on Windows, SIGBREAK (Ctrl-Break)
set a flag; the loop then takes an emergency checkpoint and exits. A second signal raises
KeyboardInterrupt at once, for a step that would take too long; once the emergency path has
begun (:meth:`StopRequest.shield`), further signals are only logged.

Windows ends a process as soon as its console-control handler returns from a close, logoff
or shutdown event, so there a handler registered with ``SetConsoleCtrlHandler`` sets the
flag and *waits* (up to the ~5 s Windows allows) until :meth:`StopRequest.done` is called
after the emergency checkpoint is on disk.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = [s for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, s)]
_CLOSE_EVENTS = {2: "close", 5: "logoff", 6: "shutdown"}  # CTRL_*_EVENT
_WINDOWS_GRACE_SECONDS = 4.5


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.shielded = False
        self._previous: dict[int, object] = {}
        self._done = threading.Event()
        self._console_handler = None  # kept referenced while registered (ctypes callback)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
            if os.name == "nt":
                self._register_console_handler(True)
        return self

    def __exit__(self, *exc) -> None:
        self.done()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._console_handler is not None:
            self._register_console_handler(False)

    def shield(self) -> None:
        """From now on signals are only logged (the emergency path is already running)."""
        self.shielded = True
        self.signum = self.signum or signal.SIGINT

    def done(self) -> None:
        """The emergency checkpoint (if any) is on disk: a waiting Windows handler may return."""
        self._done.set()

    def _handle(self, signum: int, _frame) -> None:
        if self.shielded:
            log.warning(
                "received %s while stopping: finishing the emergency checkpoint first",
                signal.Signals(signum).name,
            )
            return
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
        self.signum = signum
        log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)

    def _register_console_handler(self, add: bool) -> None:  # Windows only; untested on CI
        import ctypes
        from ctypes import wintypes

        if add:

            @ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)
            def handler(ctrl_type: int) -> bool:
                if ctrl_type not in _CLOSE_EVENTS:
                    return False  # Ctrl-C / Ctrl-Break: the C runtime raises SIGINT/SIGBREAK
                log.warning("console %s: emergency checkpoint", _CLOSE_EVENTS[ctrl_type])
                self.signum = self.signum or signal.SIGBREAK
                self._done.wait(_WINDOWS_GRACE_SECONDS)
                return True

            self._console_handler = handler
        ctypes.windll.kernel32.SetConsoleCtrlHandler(self._console_handler, add)
        if not add:
            self._console_handler = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)
