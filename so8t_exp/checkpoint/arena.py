"""Host buffers in shared memory: the training thread copies a checkpoint's tensors into
one arena that the writer process (:mod:`.writer_process`) maps as well, so the bytes
reach it without a pickle or a second copy, and its work never takes this interpreter's
lock.

One arena serves every save while the layout (names, dtypes, shapes) stays the same;
saves never overlap (the checkpointer drains before the next capture), so reusing it is
safe. Where shared memory is short (a container's 64 MB ``/dev/shm``) the copies are
plain host tensors and the checkpoint is written by a thread, as before.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import psutil
import torch

from so8t_exp.checkpoint.format import dtype_code
from so8t_exp.checkpoint.state import HostBuffers

log = logging.getLogger(__name__)

ALIGN = 64  # bytes: every tensor starts on a cache line
# Shared memory left free for the rest of the machine, on top of the arena itself.
_HEADROOM = 0.10


@dataclass(frozen=True)
class Slot:
    group: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def signature(groups: dict[str, dict[str, torch.Tensor]]) -> list[tuple]:
    """What decides the layout: each tensor's group, name, dtype and shape, in order."""
    return [(g, n, t.dtype, tuple(t.shape)) for g, ts in groups.items() for n, t in ts.items()]


def layout(sig: list[tuple]) -> tuple[list[Slot], int]:
    """Where each tensor of ``sig`` goes in the arena, and the arena's size in bytes."""
    slots, offset = [], 0
    for group, name, dtype, shape in sig:
        nbytes = math.prod(shape) * dtype.itemsize
        slots.append(Slot(group, name, dtype, shape, offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return slots, max(offset, 1)


def shm_room(nbytes: int) -> bool:
    """Whether ``nbytes`` of shared memory can be had without filling it (Linux keeps it in
    ``/dev/shm``; a full one would end the process with SIGBUS, not an error)."""
    if not os.path.isdir("/dev/shm") or not hasattr(os, "statvfs"):
        return True  # (Windows: the paging file; macOS: no such mount)
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize >= nbytes * (1 + _HEADROOM)


class Arena(HostBuffers):
    """:class:`HostBuffers` whose copies live in one shared-memory block."""

    def __init__(self) -> None:
        super().__init__()
        self._shm: shared_memory.SharedMemory | None = None
        self._signature: list[tuple] = []
        self._views: dict[tuple[str, str], torch.Tensor] = {}
        self._described: dict | None = None  # (the same while the layout is)
        self._short_warned = False

    def fill(self, groups: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, dict | None]:
        if not self._ensure(signature(groups)):
            return super().fill(groups)
        out = {
            g: {n: self._views[(g, n)].copy_(t.detach()) for n, t in ts.items()}
            for g, ts in groups.items()
        }
        return out, self._described

    def _ensure(self, sig: list[tuple]) -> bool:
        """The arena laid out for ``sig``: the current one, or a new one (False: no shared
        memory to be had; the caller copies into plain buffers)."""
        if self._shm is not None and sig == self._signature:
            return True
        self.close()
        slots, size = layout(sig)
        if not shm_room(size):
            if not self._short_warned:
                log.warning(
                    "checkpoints: %.0f MB of shared memory not free; writing from a thread "
                    "of the training process instead",
                    size / 2**20,
                )
                self._short_warned = True
            return False
        remove_leftovers()
        try:
            self._shm = shared_memory.SharedMemory(
                name=f"so8t-{os.getpid()}-{secrets.token_hex(4)}", create=True, size=size
            )
        except OSError as err:
            log.warning("checkpoints: no shared memory (%s); writing from a thread", err)
            return False
        self._signature = sig
        groups: dict[str, list] = {}
        for s in slots:
            self._views[(s.group, s.name)] = _view(self._shm, s)
            entry = [s.name, dtype_code(s.dtype), list(s.shape), s.offset, s.nbytes]
            groups.setdefault(s.group, []).append(entry)
        # What the writer process needs to find each tensor (JSON).
        self._described = {"arena": self._shm.name, "groups": groups}
        return True

    def close(self) -> None:
        """Free the arena (after the last write that reads it)."""
        shm, self._shm = self._shm, None
        self._views.clear()
        self._signature, self._described = [], None
        if shm is None:
            return
        # (BufferError: a payload still refers to it; the mapping goes with that payload)
        with contextlib.suppress(BufferError):
            shm.close()
        with contextlib.suppress(OSError):
            shm.unlink()


_LEFTOVER = re.compile(r"^so8t-(\d+)-[0-9a-f]{8}$")


def remove_leftovers() -> None:
    """Free the arenas of trainers that are gone. Python's resource tracker frees a killed
    trainer's arena, but not when it was killed with it (a SIGKILL to the whole process
    group: systemd's final kill, ``kill -9 -PGID``); on Linux the block would hold its
    memory in ``/dev/shm`` until the next boot. (Windows frees it with its last handle.)"""
    folder = "/dev/shm"
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        m = _LEFTOVER.match(name)
        if m and not psutil.pid_exists(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                log.info("freed shared memory %s, left by a killed trainer", name)


def _view(shm: shared_memory.SharedMemory, s: Slot) -> torch.Tensor:
    if s.nbytes == 0:  # (frombuffer refuses an empty count)
        return torch.empty(s.shape, dtype=s.dtype)
    raw = torch.frombuffer(shm.buf, dtype=torch.uint8, count=s.nbytes, offset=s.offset)
    return raw.view(s.dtype).view(s.shape)
