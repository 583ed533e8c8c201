"""The session folder's human-readable status file, ``session_info.json``.

A session is one MLflow run; its folder is the Hydra run dir. The file is rewritten
atomically on every checkpoint and status change, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from so8t_exp.fsutil import atomic_write_json

log = logging.getLogger(__name__)

SESSION_FILE = "session_info.json"
# lost: the run is not in the store; pruned: stopped early by its sweep's pruner (final)
STATUSES = ("running", "interrupted", "failed", "completed", "pruned", "lost")
FINAL = ("completed", "pruned")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SessionInfo:
    session_id: str  # the MLflow run id
    start_time: str = field(default_factory=now_iso)
    current_epoch: int = 0
    current_step: int = 0
    total_steps: int = 0
    best_loss: float | None = None  # best value of best_metric (eval/loss by default)
    best_metric: str | None = None
    best_checkpoint: str | None = None
    skipped_steps: int = 0  # non-finite loss or gradient: not applied
    checkpoints: list[str] = field(default_factory=list)
    last_checkpoint_time: str | None = None
    status: str = "running"
    tracking_uri: str | None = None
    resumes: int = 0
    overrides: list[str] | None = None  # Hydra task overrides of the lock holder's start


class Session:
    """Reads and writes ``<folder>/session_info.json``.

    Thread-safe: the checkpoint writer thread and the main thread both call :meth:`save`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / SESSION_FILE
        self.info: SessionInfo | None = None
        # Held across change *and* write, so the file always ends with the newest info: with
        # only the change locked, an older snapshot's rename could land after a newer one's.
        self._lock = threading.RLock()

    def load(self) -> SessionInfo | None:
        """The recorded session, or None if there is none (or it is unreadable)."""
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            known = SessionInfo.__dataclass_fields__
            info = SessionInfo(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as err:
            log.warning("ignoring unreadable %s: %s", self.path, err)
            return None
        with self._lock:
            self.info = info
        return info

    def save(self, **changes) -> None:
        """Apply ``changes`` to the info and rewrite the file atomically. On a failed write
        the changes stay applied in memory, and the next save writes them."""
        with self._lock:
            assert self.info is not None
            for key, value in changes.items():
                setattr(self.info, key, value)
            assert self.info.status in STATUSES, self.info.status
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, asdict(self.info))
