"""Notifications: one small interface, back-ends chosen by config (``notify`` group).

Events: started, resumed, finished, failed, interrupted, given_up, checkpoint_failed.
A notifier must never raise into training: :class:`Notifiers` catches and logs.
"""

from __future__ import annotations

import logging
import sys
from typing import Protocol

log = logging.getLogger(__name__)

EVENTS = (
    "started",
    "resumed",
    "finished",
    "failed",
    "interrupted",
    "given_up",
    "checkpoint_failed",
)


class Notifier(Protocol):
    def notify(self, event: str, message: str) -> None: ...


class ConsoleNotifier:
    """Prints one line to stderr (which the boot log captures)."""

    def __init__(self, prefix: str = "[so8t]") -> None:
        self.prefix = prefix

    def notify(self, event: str, message: str) -> None:
        print(f"{self.prefix} {event}: {message}", file=sys.stderr, flush=True)


class Notifiers:
    """Fans an event out to every configured notifier; failures are logged, never raised."""

    def __init__(self, notifiers: dict[str, Notifier]) -> None:
        self.notifiers = notifiers

    def __call__(self, event: str, message: str) -> None:
        assert event in EVENTS, event
        for name, notifier in self.notifiers.items():
            try:
                notifier.notify(event, message)
            except Exception as err:
                log.warning("notifier %s failed on %s: %s", name, event, err)
