"""What rank 0 tells the other ranks, and when.

Rank 0 runs the run as a single process would; at each point where the others must act it
broadcasts a command: ``STEP`` (train one step), ``SAVE`` (send your RNG states for the
checkpoint rank 0 writes) or ``EXIT`` (with the exit code). Before training it broadcasts
the start: the resolved config, the run id and the checkpoint to continue from, or an
exit code when there is nothing to train. Every collective has the run's timeout and a
lost peer raises :class:`PeerLost`: no rank waits forever.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from so8t_exp.checkpoint import RNGState
from so8t_exp.distributed import world as w
from so8t_exp.distributed.world import SOLO, PeerLost, World

log = logging.getLogger(__name__)

STEP, SAVE, EXIT = 1, 2, 3


def send_command(group, code: int, arg: int = 0) -> None:
    msg = torch.tensor([code, arg], dtype=torch.int64)
    w.collective("sending a command to the other ranks", dist.broadcast, msg, 0, group=group)


def receive_command(group) -> tuple[int, int]:
    msg = torch.zeros(2, dtype=torch.int64)
    w.collective("waiting for rank 0", dist.broadcast, msg, 0, group=group)
    return int(msg[0]), int(msg[1])


def broadcast_start(message: dict | None) -> dict:
    """Rank 0 sends ``message``, the others receive it (on the joining group)."""
    box = [message]
    w.collective("the start of the run", dist.broadcast_object_list, box, 0)
    return box[0]


def gather_rng(group, own: RNGState) -> list[RNGState] | None:
    """Every rank's RNG states at rank 0 (None elsewhere)."""
    world = dist.get_world_size()
    out = [None] * world if dist.get_rank() == 0 else None
    w.collective("gathering RNG states for a checkpoint", dist.gather_object, own, out, 0, group)
    return out


class Team:
    """Rank 0's side of the protocol; with one process every method does nothing."""

    def __init__(self, world: World = SOLO) -> None:
        self.world = world
        self.group = None
        self.started = self.released = False
        self.synced = True  # False from a STEP until that step's collectives are done

    def start(self, message: dict, timeout_seconds: float) -> None:
        """Hand the other ranks what they need to train (see :mod:`follower`)."""
        if not self.world.distributed:
            return
        broadcast_start(message)
        self.started = True
        self.group = w.run_group(timeout_seconds)

    def step(self) -> None:
        if self.world.distributed:
            self.synced = False
            send_command(self.group, STEP)

    def step_done(self) -> None:
        self.synced = True

    def rng_of_peers(self, own: RNGState) -> dict[int, RNGState]:
        """The other ranks' RNG states for a checkpoint of this step."""
        if not self.world.distributed:
            return {}
        if not self.synced:  # (they are inside a step this rank left: no exchange now)
            raise PeerLost("the ranks are not at the same step boundary")
        send_command(self.group, SAVE)
        states = gather_rng(self.group, own)
        return {r: s for r, s in enumerate(states) if r}

    def release(self, code: int) -> None:
        """Tell the other ranks to end with ``code`` (once; best effort), leave the group."""
        if not self.world.distributed or self.released:
            return
        self.released = True
        try:
            if not self.started:
                broadcast_start({"exit": code})
            elif self.synced:
                send_command(self.group, EXIT, code)
        except PeerLost as err:
            log.warning("%s", err)
        w.leave()


_current = Team()


def current() -> Team:
    """This process's team (a single-process one unless ``torchrun`` started it)."""
    return _current


def set_current(team: Team) -> None:
    global _current
    _current = team
