"""When to save, the background writer, and local retention.

The training thread copies the state into host buffers (:meth:`Checkpointer.buffers`: a
shared-memory arena) and goes on; one writer thread hands the save to the writer process
(:mod:`so8t_exp.checkpoint.writer_process`), which writes it (checksums in the manifest)
and prunes old rolling checkpoints, then reports it and queues it for the MLflow mirror
(:mod:`so8t_exp.checkpoint.mirror`, its own thread). With ``checkpoint.writer=thread``, or
where no shared memory or process can be had, the writer thread writes it itself.
Saves never overlap: a rolling save due while the writer is busy waits for the next step;
emergency and final saves wait for the writer and then for their own write.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from so8t_exp import fsutil
from so8t_exp.checkpoint import format as fmt
from so8t_exp.checkpoint.arena import Arena
from so8t_exp.checkpoint.mirror import ArtifactStore, Mirror, prune
from so8t_exp.checkpoint.state import HostBuffers
from so8t_exp.checkpoint.writer_process import ProcessWriter, WorkerUnavailable
from so8t_exp.config import CheckpointConfig

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        store: ArtifactStore | None,
        on_saved: Callable[[str, int, str], None],
        on_failed: Callable[[str, Exception], None],
        on_mirrored: Callable[[str, int], None] = lambda name, step: None,
    ) -> None:
        """``store``: the MLflow artifact store (None: no copy); ``on_saved`` runs in the
        writer thread once a checkpoint is on disk, ``on_mirrored`` in the mirror thread
        once it is in MLflow (or would have been), ``on_failed`` when a write fails."""
        self.root, self.cfg = root, cfg
        self.on_saved, self.on_failed = on_saved, on_failed
        self.root.mkdir(parents=True, exist_ok=True)
        self.mirror = Mirror(root, store, cfg.keep, on_mirrored)
        fmt.recover_leftovers(self.root)
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.last_save_seconds = 0.0  # training time at the last rolling save
        self.last_save_step = -1
        # Measured durations (seconds) of the last save, for the shutdown budget: the host
        # copy on the training thread (set by the caller) and the write in the worker.
        self.last_capture_seconds: float | None = None
        self.last_write_seconds: float | None = None
        self._write_started: float | None = None  # monotonic start of the write in flight
        # Fault injection for tests: seconds to pause inside each write.
        self._pause = float(os.environ.get("SO8T_FAULT_CHECKPOINT_PAUSE", "0") or 0)
        self.writer = ProcessWriter() if cfg.writer == "process" else None
        # Host copies of the state, reused from one save to the next.
        self.buffers: HostBuffers = Arena() if self.writer is not None else HostBuffers()

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
        name = fmt.checkpoint_name(kind, step)
        self._thread = threading.Thread(
            target=self._write,
            args=(name, kind, step, payload),
            name="so8t-checkpoint",
            daemon=False,
        )
        self._idle.clear()
        try:
            self._thread.start()
        except BaseException:  # (a KeyboardInterrupt here must not leave us "busy" forever)
            self._idle.set()
            raise
        if kind in ("rolling", "best"):  # (a best one restarts the rolling cadence too)
            self.last_save_step = step
        if wait:
            self.drain()

    def drain(self) -> None:
        """Block until the save in flight (if any) has finished."""
        self._idle.wait()

    def drain_mirror(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until every saved checkpoint is copied to MLflow."""
        self.drain()
        return self.mirror.drain(timeout)

    def close(self) -> None:
        """No more saves: end the writer process, free the arena, let the mirror thread
        end once its queue is done. Safe to call again."""
        self.drain()
        if self.writer is not None:
            self.writer.close()
        self.buffers.close()
        self.mirror.close()

    def save_estimate(self) -> float | None:
        """Seconds a save started now would take to be on disk, from the last one measured
        (plus what is left of a write in flight); None if none was measured yet."""
        if self.last_write_seconds is None:
            return None
        estimate = (self.last_capture_seconds or 0.0) + self.last_write_seconds
        started = self._write_started
        if self.busy and started is not None:
            estimate += max(0.0, self.last_write_seconds - (time.monotonic() - started))
        return estimate

    def _write(self, name: str, kind: str, step: int, payload: fmt.Payload) -> None:
        self._write_started = started = time.monotonic()
        try:
            self._write_files(name, payload)
            self.last_write_seconds = time.monotonic() - started
            self.on_saved(name, step, kind)
            self.mirror.submit(name, step)
        except Exception as err:  # a failed save must not kill training; the next may work
            log.error("checkpoint %s failed: %s", name, err)
            fsutil.rmtree(fmt.staging_folder(self.root, name), ignore_errors=True)
            self.on_failed(name, err)
        finally:
            self._write_started = None
            self._idle.set()

    def _write_files(self, name: str, payload: fmt.Payload) -> None:
        if payload.shared is not None and self.writer is not None:
            try:
                args = (payload.shared, payload.docs, self.cfg.keep, self._pause)
                return self.writer.write(self.root, name, *args)
            except WorkerUnavailable as err:  # (the payload's tensors are plain ones too)
                log.warning("%s; checkpoints are written by a thread from now on", err)
                self.writer = None
        fmt.write(self.root, name, payload, self._pause)
        prune(self.root, self.cfg.keep)

    def has_valid(self, kind: str, step: int) -> bool:
        folder = self.root / fmt.checkpoint_name(kind, step)
        return folder.is_dir() and fmt.verify(folder) is None

    def set_aside_foreign(self) -> None:
        """A new run in a folder that holds checkpoints (of a run this store does not know):
        move them to ``checkpoints.orphaned-<time>`` so they are neither resumed nor pruned
        against the new run's own."""
        aside = self._set_aside("orphaned")
        if aside is not None:
            log.warning("moved checkpoints of an unknown run to %s", aside)

    def set_aside_invalid(self) -> tuple[list[str], Path | None]:
        """No checkpoint verifies: move the local ones to ``checkpoints.corrupt-<time>`` for
        inspection. The invalid names (local and in MLflow), and where the local ones went."""
        names = self.local_names()
        aside = self._set_aside("corrupt")
        return sorted(set(names) | set(self.mirror.rejected)), aside

    def drop_rejected_copies(self) -> None:
        """Delete from MLflow the copies :meth:`newest` found invalid (they would outrank
        newer valid ones in retention). Only once this process owns the run."""
        store = self.mirror.store
        for name in self.mirror.rejected if store is not None else ():
            store.delete_checkpoint(name)
        self.mirror.rejected.clear()

    def _set_aside(self, label: str) -> Path | None:
        if not self.local_names():
            return None
        aside = self.root.with_name(f"checkpoints.{label}-{int(time.time())}")
        fsutil.replace(self.root, aside)
        self.root.mkdir()
        return aside

    def local_names(self) -> list[str]:
        """Names of the checkpoint folders here, newest first (not verified)."""
        return [p.name for _s, _k, p in fmt.candidates(self.root)]

    def newest_step(self) -> int | None:
        """Step of the newest checkpoint folder here (not verified), None if none."""
        names = self.local_names()
        parsed = fmt.parse_name(names[0]) if names else None
        return parsed[1] if parsed else None

    # -- load -------------------------------------------------------------------------
    def newest(self) -> tuple[Path, fmt.Payload] | None:
        """The newest valid checkpoint: local, unless MLflow has a newer one (written by
        this run on another host since) that verifies."""
        local = fmt.newest_valid(self.root)
        parsed = fmt.parse_name(local.name) if local else None
        folder = self.mirror.fetch_newest(above=parsed[1] if parsed else -1) or local
        if folder is None:
            return None
        log.info("resuming from checkpoint %s", folder)
        return folder, fmt.read(folder)
