"""Turn stop signals into a request honoured at the next optimizer-step boundary.

SIGINT (Ctrl-C), SIGTERM, SIGHUP (terminal closed) and, on Windows, SIGBREAK (Ctrl-Break)
set a flag; the loop then takes an emergency checkpoint and exits. A second signal raises
KeyboardInterrupt at once, for a step that would take too long; once the emergency path has
begun (:meth:`StopRequest.shield`), further signals are only logged.

Windows ends a process as soon as its console-control handler returns from a close, logoff
or shutdown event, or when its ~5 s timeout runs out. There a handler registered with
``SetConsoleCtrlHandler`` sets the flag and a :class:`~so8t_exp.shutdown_budget.Grace`,
then *waits* until :meth:`StopRequest.done` says the run is closed. If the training thread
has not closed it with :data:`~so8t_exp.shutdown_budget.CLOSE_RESERVE_SECONDS` left (a long
step, an evaluation, a slow emergency save), the handler calls :attr:`StopRequest.closer`
itself; :meth:`StopRequest.claim_close` makes sure only one of the two closes the run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from so8t_exp import shutdown_budget
from so8t_exp.shutdown_budget import Grace

log = logging.getLogger(__name__)

STOP_SIGNALS = [s for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, s)]
_RETIRED_HANDLERS: list = []  # unregistered ctypes callbacks, never freed
_CLOSE_EVENTS = {2: "close", 5: "logoff", 6: "shutdown"}  # CTRL_*_EVENT
_WINDOWS = os.name == "nt"  # (a name tests can switch)
SIGBREAK = getattr(signal, "SIGBREAK", 21)  # (its Windows number, for tests elsewhere)


_pending: list[int] = []  # a stop signal that came before this process's StopRequest


def note_pending(signum: int) -> None:
    """A stop signal caught by another handler of this process (a sweeper between trials)
    while a run may be starting: the next :class:`StopRequest` starts out requested, so the
    run stops at its first step boundary instead of training to its end."""
    _pending.append(signum)


class StopRequest:
    def __init__(self, escalate: bool = True) -> None:
        """``escalate``: a second signal interrupts at once (KeyboardInterrupt); off for
        the ranks of a torchrun run, where Ctrl-C and torchrun's own SIGTERM arrive
        together and a rank interrupted mid-step would leave the others in it."""
        self.signum: int | None = None
        self.escalate = escalate
        self.shielded = False
        self._previous: dict[int, object] = {}
        self._done = threading.Event()
        self._console_handler = None  # kept referenced while registered (ctypes callback)
        self.grace: Grace | None = None  # set by a console close, logoff or shutdown event
        # Closes the run (session file, metrics, MLflow status) from the handler's thread
        # when the training thread does not get to it in time; set by the run.
        # (called with the grace and whether the emergency path has begun)
        self.closer: Callable[[Grace, bool], None] | None = None
        self._close_lock = threading.Lock()
        self.close_claimed = False
        # The run is completing (final save, export, FINISHED): the handler must not close
        # it as interrupted meanwhile; if Windows ends the process first, it stays resumable.
        self.completing = False

    def __enter__(self) -> StopRequest:
        if _pending:
            self.signum = _pending.pop()
            _pending.clear()
            log.warning(
                "received %s while starting: stopping at the first step boundary",
                signal.Signals(self.signum).name,
            )
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
            if _WINDOWS:
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
        """The run is closed (emergency checkpoint, if any, on disk): a waiting Windows
        handler may return, which lets Windows end the process."""
        self._done.set()

    def claim_close(self) -> bool:
        """True for the first caller only: it, and nobody else, closes the run."""
        with self._close_lock:
            first, self.close_claimed = not self.close_claimed, True
            return first

    def _handle(self, signum: int, _frame) -> None:
        if self.shielded:
            log.warning(
                "received %s while stopping: finishing the emergency checkpoint first",
                signal.Signals(signum).name,
            )
            return
        if self.signum is not None:
            if not self.escalate:
                return
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
        self.signum = signum
        log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)

    def on_console_event(self, ctrl_type: int) -> bool:
        """What the Windows console handler does (in a thread Windows starts for it): for a
        close, logoff or shutdown, request the stop and hold Windows off until the run is
        closed, closing it from here if the training thread is late. False: not ours."""
        event = _CLOSE_EVENTS.get(ctrl_type)
        if event is None:
            return False  # Ctrl-C / Ctrl-Break: the C runtime raises SIGINT/SIGBREAK
        # (a second event, say shutdown after close, gets no more time than the first)
        grace = self.grace = self.grace or Grace(event)
        log.warning("console %s: stopping within the %.1f s Windows allows", event, grace.seconds)
        self.signum = self.signum or SIGBREAK
        if not self._done.wait(max(0.0, grace.left() - shutdown_budget.CLOSE_RESERVE_SECONDS)):
            closer = self.closer
            if closer is not None and not self.completing and self.claim_close():
                try:
                    closer(grace, self.shielded)
                except Exception:  # (returning in time matters more than this close)
                    log.exception("closing the run from the console handler failed")
            # An emergency save still running may yet finish: it is worth the rest.
            self._done.wait(grace.left())
        return True

    def _register_console_handler(self, add: bool) -> None:  # Windows only
        import ctypes
        from ctypes import wintypes

        if add:
            # (kept in an attribute: a collected callback would crash the process)
            self._console_handler = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)(
                self.on_console_event
            )
        ctypes.windll.kernel32.SetConsoleCtrlHandler(self._console_handler, add)
        if not add:  # (a handler thread may still be returning through it: keep it alive)
            _RETIRED_HANDLERS.append(self._console_handler)
            self._console_handler = None

    def request(self, signum: int, why: str) -> None:
        """Stop at the next step boundary as if ``signum`` had arrived (``why``: logged)."""
        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping at the next step boundary", why)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)
