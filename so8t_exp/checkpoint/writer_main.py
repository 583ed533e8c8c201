"""The checkpoint writer process: ``python -m so8t_exp.checkpoint.writer_main``.

Started by :class:`so8t_exp.checkpoint.writer_process.ProcessWriter`. Each job is one
checkpoint to write (folder, name, the shared-memory arena and where each tensor lies in it,
the JSON docs, retention). It serialises, checksums, fsyncs, renames into place and prunes
old rolling checkpoints — the Python work of a save — in its own interpreter, so the
training thread never waits for its GIL. It imports no torch (a start of ~0.1 s). How it
starts, ignores stop signals and ends: :mod:`so8t_exp.line_worker`; ended in mid-write,
it leaves the staged folder a killed trainer leaves, which the next start recovers.
"""

from __future__ import annotations

import contextlib
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

from so8t_exp.checkpoint import format as fmt
from so8t_exp.checkpoint.mirror import prune
from so8t_exp.line_worker import serve


class _Arenas:
    """The trainer's arenas, mapped on first use. Before Python 3.13 attaching registers
    the block with this process's resource tracker, which would unlink it (the trainer's)
    when this process ends: registration is turned off here."""

    def __init__(self) -> None:
        self._open: dict[str, shared_memory.SharedMemory] = {}
        resource_tracker.register = lambda *_a, **_k: None  # (this process creates none)

    def get(self, name: str) -> shared_memory.SharedMemory:
        shm = self._open.get(name)
        if shm is None:
            for old in self._open.values():  # (the trainer replaced its arena)
                with contextlib.suppress(BufferError):
                    old.close()
            self._open = {name: (shm := shared_memory.SharedMemory(name=name))}
        return shm


def write(job: dict, arenas: _Arenas) -> dict:
    """Write the checkpoint one job describes, then apply local retention."""
    buf = arenas.get(job["arena"]).buf
    groups = {
        group: [(n, code, shape, buf[off : off + size]) for n, code, shape, off, size in entries]
        for group, entries in job["groups"].items()
    }
    root = Path(job["root"])
    fmt.write_files(root, job["name"], groups, job["docs"], job.get("pause", 0.0))
    del groups
    prune(root, job["keep"])
    return {}


def main() -> None:
    arenas = _Arenas()
    serve(lambda job: write(job, arenas))


if __name__ == "__main__":
    main()
