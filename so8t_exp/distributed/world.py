"""The process group: which rank this process is, joining and leaving, and collectives that
end with a clear :class:`PeerLost` instead of hanging when another rank is gone."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from so8t_exp.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# The first exchange (rank 0 composes the config and finds the run while the others wait)
# uses this; everything after it the run's ``trainer.distributed.timeout_seconds``.
JOIN_TIMEOUT_SECONDS = 1800.0


_GONE = "another process of the run is gone or stuck"


class PeerLost(RuntimeError):
    """Another rank of the run ended, or did not answer within the timeout."""


@dataclass(frozen=True)
class World:
    """This process's place in the run; ``World()`` is a single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """From the variables ``torchrun`` sets (none set: a single process)."""
        env = os.environ
        size = int(env.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return cls()
        return cls(int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"])))


SOLO = World()  # a single-process run


def backend() -> str:
    """gloo for CPU tensors (and the small control messages), NCCL for CUDA ones."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def join(world: World) -> None:
    """Join the process group ``torchrun`` set up (MASTER_ADDR/PORT in the environment)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(
        backend(),
        rank=world.rank,
        world_size=world.size,
        timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_SECONDS),
    )


def run_group(timeout_seconds: float):
    """The group every collective of the run uses: all ranks, the run's timeout. Called by
    every rank at the same point."""
    return dist.new_group(backend=backend(), timeout=datetime.timedelta(seconds=timeout_seconds))


def leave() -> None:
    """Destroy the process group: after a peer was lost, exiting without this aborts the
    process in gloo's destructor (and skips whatever exit code we chose)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # (the group may be half broken already)
            log.debug("destroying the process group: %s", err)


def collective(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one collective; a broken or timed-out peer raises :class:`PeerLost`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # gloo and NCCL report a lost peer as RuntimeError
        raise PeerLost(f"{what}: {_GONE} ({err})") from err


# What gloo's and NCCL's own errors say when a peer is gone.
_PEER_SIGNS = ("Connection reset", "Connection closed", "Timed out", "timed out", "gloo", "NCCL")


def peer_lost(err: BaseException) -> PeerLost | None:
    """``err`` as a :class:`PeerLost` when another rank caused it, else None. DDP's gradient
    all-reduce runs inside ``backward()``, outside :func:`collective`: gloo and NCCL raise
    their own RuntimeError there, which gets the same clear message here. Our own errors
    (a tracking store that timed out, say) tell what they are: never taken for a lost peer."""
    if isinstance(err, PeerLost):
        return err
    ours = type(err).__module__.startswith("so8t_exp.")
    if ours or not isinstance(err, RuntimeError) or not any(s in str(err) for s in _PEER_SIGNS):
        return None
    return PeerLost(f"exchanging gradients: {_GONE} ({err})")


def check_world_size(restored: tuple | None, size: int) -> None:
    """Refuse to continue a checkpoint written by a run with another number of processes:
    each rank's data and RNG states belong to its place in the run."""
    if restored is None:
        return
    saved = restored[1].docs["state"].get("world_size", 1)
    if saved != size:
        how = (
            f"torchrun --nproc_per_node={saved} -m so8t_exp.train"
            if saved > 1
            else "python -m so8t_exp.train"
        )
        raise ConfigError(
            f"checkpoint {restored[0].name} was written by a run of {saved} process(es); "
            f"this start has {size}. Each rank's share of the data and its RNG states "
            f"belong to its place in the run: start it again as `{how} ...` "
            "(python -m so8t_exp.resume does), or start a new run"
        )
