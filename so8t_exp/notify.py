"""Notifications: one small interface, back-ends chosen by config (``notify`` group).

Events: started, resumed, finished, failed, interrupted, given_up, checkpoint_failed.
A notifier never raises into training or the launcher: :class:`Notifiers` catches and logs.
Several can be combined (``notify.notifiers`` is a dict of ``_target_`` nodes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
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


class SoundNotifier:
    """Plays a WAV file synchronously (so a boot task does not exit mid-sound).

    Windows: ``winsound.PlaySound`` (synchronous), a beep when the file is missing or
    playback fails. Elsewhere: the first of paplay, aplay, afplay found, else the terminal
    bell. ``events``: which events make a sound (default: all).
    """

    def __init__(self, wav: str | None = None, events: list[str] | None = None) -> None:
        self.wav = Path(wav).expanduser() if wav else None
        self.events = set(events or EVENTS)

    def notify(self, event: str, message: str) -> None:
        if event in self.events:
            play(self.wav)


def sound_backend(
    platform: str = sys.platform, which: Callable[[str], str | None] = shutil.which
) -> str:
    """``winsound``, a player command on PATH, or ``bell``."""
    if platform == "win32":
        return "winsound"
    for player in ("paplay", "aplay", "afplay"):
        if which(player):
            return player
    return "bell"


def play(wav: Path | None, backend: str | None = None) -> str:
    """Play ``wav`` (or beep); returns what was actually used."""
    backend = backend or sound_backend()
    have_file = wav is not None and wav.is_file()
    if backend == "winsound":
        import winsound  # Windows only

        try:
            if have_file:
                winsound.PlaySound(str(wav), winsound.SND_FILENAME)
                return "winsound"
        except RuntimeError as err:
            log.warning("sound: %s", err)
        winsound.Beep(880, 300)
        return "beep"
    if backend != "bell" and have_file:
        try:
            done = subprocess.run([backend, str(wav)], capture_output=True, timeout=30)
            if done.returncode == 0:
                return backend
            log.warning("sound: %s exited %d", backend, done.returncode)
        except (OSError, subprocess.SubprocessError) as err:  # missing, hung, not runnable
            log.warning("sound: %s failed: %s", backend, type(err).__name__)
    sys.stderr.write("\a")
    sys.stderr.flush()
    return "bell"


class WebhookNotifier:
    """POSTs JSON to a webhook: ``text`` (Slack, ntfy-style), ``content`` (Discord),
    plus ``event`` and ``title``. Short timeout, a few retries; failures are logged (without
    the URL, which is a secret) and never raised.

    Give the URL in ``url`` or, better, name an environment variable in ``url_env`` so it is
    never in a config file; either way it is masked in MLflow params.
    """

    def __init__(
        self,
        url: str | None = None,
        url_env: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        events: list[str] | None = None,
        title: str = "so8t_exp",
    ) -> None:
        self.url = url or (os.environ.get(url_env) if url_env else None)
        self.timeout, self.retries, self.title = timeout, retries, title
        self.events = set(events or EVENTS)

    def notify(self, event: str, message: str) -> None:
        if event not in self.events:
            return
        if not self.url:
            log.warning("webhook notifier has no URL; event %s not sent", event)
            return
        text = f"[{self.title}] {event}: {message}"
        body = json.dumps(
            {"text": text, "content": text, "event": event, "title": self.title, "message": message}
        ).encode("utf-8")
        for attempt in range(1, self.retries + 1):
            request = urllib.request.Request(
                self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    if resp.status < 300:
                        return
                    problem = f"HTTP {resp.status}"
            except Exception as err:  # noqa: BLE001 - any failure is logged, never raised
                problem = type(err).__name__ + (f" {err.code}" if hasattr(err, "code") else "")
            log.warning(
                "webhook %s: attempt %d/%d failed (%s)", event, attempt, self.retries, problem
            )
            if attempt < self.retries:
                time.sleep(min(2.0, 0.25 * 2**attempt))


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
                log.warning("notifier %s failed on %s: %s", name, event, type(err).__name__)
