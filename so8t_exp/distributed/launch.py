"""``torchrun ... -m so8t_exp.train``: every rank joins the process group; rank 0 runs the
Hydra app as a single process would, the others follow it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from so8t_exp.cli_errors import EXIT_FAILED, EXIT_PEER_LOST, report
from so8t_exp.distributed import follower, team
from so8t_exp.distributed import world as w
from so8t_exp.distributed.world import World

log = logging.getLogger(__name__)


def run_rank(world: World, leader: Callable[[], None]) -> int:
    """This rank's whole life; its exit code. ``leader``: rank 0's app (may ``sys.exit``)."""
    try:
        w.join(world)
    except Exception as err:  # (torchrun's rendezvous is done: a peer died at once)
        return report(
            f"rank {world.rank} could not join the other processes: {err}", EXIT_PEER_LOST
        )
    if not world.leader:
        return follower.follow(world)
    own = team.Team(world)
    team.set_current(own)
    code = EXIT_FAILED
    try:
        leader()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:  # (whatever ended it: the others must not wait for a start that never comes)
        own.release(code)
    return code


def refuse_multirun() -> None:
    """A sweep under torchrun is not supported: say so instead of half running it."""
    print(
        "error: hydra multirun (-m) cannot run under torchrun; run the sweep's trials one "
        "by one with torchrun, or sweep with one process per trial",
        file=sys.stderr,
    )
