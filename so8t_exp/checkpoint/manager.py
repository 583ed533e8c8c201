"""When to save, the background writer, retention, and the MLflow mirror.

The training thread hands over a host-memory :class:`Payload` and goes on; one worker
thread writes it, verifies nothing is lost on the way (checksums in the manifest), prunes
old rolling checkpoints locally and in MLflow, uploads the new one and reports it.
Saves never overlap: a rolling save due while the worker is busy waits for the next step;
emergency and final saves wait for the worker and then for their own write.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from so8t_exp.checkpoint import format as fmt
from so8t_exp.config import CheckpointConfig

log = logging.getLogger(__name__)


class ArtifactMirror(Protocol):
    """What the checkpointer needs from the tracking module."""

    def upload_checkpoint(self, folder: Path) -> bool: ...
    def delete_checkpoint(self, name: str) -> bool: ...
    def list_checkpoints(self) -> list[str]: ...
    def download_checkpoint(self, name: str, dest: Path) -> bool: ...


class Checkpointer:
    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        mirror: ArtifactMirror | None,
        on_saved: Callable[[str, int, str], None],
        on_failed: Callable[[str, Exception], None],
    ) -> None:
        self.root, self.cfg, self.mirror = root, cfg, mirror
        self.on_saved, self.on_failed = on_saved, on_failed
        self.root.mkdir(parents=True, exist_ok=True)
        fmt.remove_leftovers(self.root)
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.last_save_seconds = 0.0  # training time at the last rolling save
        self.last_save_step = -1
        # Fault injection for tests: seconds to pause inside each write.
        self._pause = float(os.environ.get("SO8T_FAULT_CHECKPOINT_PAUSE", "0") or 0)

    # -- when -------------------------------------------------------------------------
    def rolling_due(self, step: int, train_seconds: float) -> bool:
        if step <= self.last_save_step:
            return False
        # "At least N steps since the last one" (not step % N): a save postponed because
        # the worker was busy happens at the next step.
        n = self.cfg.every_n_steps
        by_steps = n > 0 and step - max(self.last_save_step, 0) >= n
        by_time = (
            self.cfg.interval_seconds > 0
            and train_seconds - self.last_save_seconds >= self.cfg.interval_seconds
        )
        return by_steps or by_time

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    # -- save -------------------------------------------------------------------------
    def save(self, kind: str, step: int, payload: fmt.Payload, wait: bool = False) -> None:
        """Hand ``payload`` to the worker (after any save in flight); ``wait`` blocks until
        it is on disk."""
        self.drain()
        self._idle.clear()
        name = fmt.checkpoint_name(kind, step)
        self._thread = threading.Thread(
            target=self._write,
            args=(name, kind, step, payload),
            name="so8t-checkpoint",
            daemon=False,
        )
        self._thread.start()
        if kind == "rolling":
            self.last_save_step = step
        if wait:
            self.drain()

    def drain(self) -> None:
        """Block until the save in flight (if any) has finished."""
        self._idle.wait()

    def _write(self, name: str, kind: str, step: int, payload: fmt.Payload) -> None:
        try:
            folder = fmt.write(self.root, name, payload, self._pause)
            pruned = self._prune_local()
            if self.mirror is not None and self.cfg.mirror_to_mlflow:
                self.mirror.upload_checkpoint(folder)
                self._prune_mirror(pruned)
            self.on_saved(name, step, kind)
        except Exception as err:  # a failed save must not kill training; the next may work
            log.error("checkpoint %s failed: %s", name, err)
            shutil.rmtree(self.root / f".tmp-{name}-{os.getpid()}", ignore_errors=True)
            self.on_failed(name, err)
        finally:
            self._idle.set()

    # -- retention --------------------------------------------------------------------
    def _rolling_beyond_keep(self, names: list[str]) -> list[str]:
        rolling = sorted(
            (p for n in names if (p := fmt.parse_name(n)) and p[0] == "rolling"),
            key=lambda p: p[1],
            reverse=True,
        )
        return [fmt.checkpoint_name(kind, step) for kind, step in rolling[self.cfg.keep :]]

    def _prune_local(self) -> list[str]:
        names = [p.name for _s, _k, p in fmt.candidates(self.root)]
        doomed = self._rolling_beyond_keep(names)
        for name in doomed:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return doomed

    def _prune_mirror(self, pruned: list[str]) -> None:
        remote = self.mirror.list_checkpoints()
        for name in set(pruned + self._rolling_beyond_keep(remote)) & set(remote):
            self.mirror.delete_checkpoint(name)

    def local_names(self) -> list[str]:
        return [p.name for _s, _k, p in fmt.candidates(self.root)]

    # -- load -------------------------------------------------------------------------
    def newest(self) -> tuple[Path, fmt.Payload] | None:
        """The newest valid checkpoint: local first, else downloaded from MLflow."""
        folder = fmt.newest_valid(self.root)
        if folder is None and self.mirror is not None:
            folder = self._fetch_from_mirror()
        if folder is None:
            return None
        log.info("resuming from checkpoint %s", folder)
        return folder, fmt.read(folder)

    def _fetch_from_mirror(self) -> Path | None:
        remote = sorted(
            (
                (p[1], fmt.KINDS.index(p[0]), n)
                for n in self.mirror.list_checkpoints()
                if (p := fmt.parse_name(n))
            ),
            reverse=True,
        )
        for _step, _kind, name in remote:
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".tmp-download-") as tmp:
                staged = Path(tmp) / name
                if not self.mirror.download_checkpoint(name, staged):
                    continue
                problem = fmt.verify(staged)
                if problem:
                    log.warning("skipping MLflow checkpoint %s: %s", name, problem)
                    continue
                target = self.root / name
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staged, target)
                log.info("restored checkpoint %s from MLflow artifacts", name)
                return target
        return None
