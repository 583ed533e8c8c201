"""The trainer's side of the checkpoint writer process (:mod:`.writer_main`): the
checkpointer's writer thread hands each save over and waits for it (see
:mod:`so8t_exp.line_worker` for how the process lives and ends)."""

from __future__ import annotations

from pathlib import Path

from so8t_exp.line_worker import LineWorker, WorkerFailed, WorkerUnavailable

__all__ = ["ProcessWriter", "WorkerFailed", "WorkerUnavailable"]


class ProcessWriter(LineWorker):
    def __init__(self) -> None:
        super().__init__("so8t_exp.checkpoint.writer_main")

    def write(self, root: Path, name: str, shared: dict, docs: dict, keep: int, pause: float):
        """Write checkpoint ``root/name`` (tensors in the arena ``shared`` describes) and
        prune; returns when it is on disk. Raises :class:`WorkerFailed`."""
        job = {"root": str(root), "name": name, "docs": docs, "keep": keep, "pause": pause}
        self.call({**job, "arena": shared["arena"], "groups": shared["groups"]})
