"""A rank other than 0 of a torchrun run: build the same trainer as rank 0, then do what it
says, step by step, until it says to end.

It writes nothing: rank 0 holds the session folder, the MLflow run and the checkpoints.
A follower asked to stop (Ctrl-C, SIGTERM) tells rank 0 with its next step's sums; every
rank then stops at that step, and rank 0 saves their RNG states with the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

from omegaconf import OmegaConf

from so8t_exp import build, data
from so8t_exp.cli_errors import EXIT_FAILED, EXIT_PEER_LOST
from so8t_exp.distributed import team
from so8t_exp.distributed import world as w
from so8t_exp.distributed.world import World
from so8t_exp.signals import StopRequest
from so8t_exp.trainer import TrainingDiverged

log = logging.getLogger(__name__)


def follow(world: World) -> int:
    """The whole life of rank ``world.rank`` (> 0); its exit code."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"[rank {world.rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        with StopRequest(escalate=False) as stop:
            start = team.broadcast_start(None)
            if "exit" in start:  # nothing to train (done, refused, failed at the start)
                return start["exit"]
            return _train(world, start, stop)
    except Exception as err:
        lost = w.peer_lost(err)
        if lost is None:
            log.exception("rank %d failed", world.rank)
            return EXIT_FAILED
        log.error("%s", lost)
        return EXIT_PEER_LOST
    finally:
        w.leave()


def _train(world: World, start: dict, stop: StopRequest) -> int:
    cfg = OmegaConf.create(start["cfg"])
    group = w.run_group(cfg.trainer.distributed_timeout_seconds)
    # The same build, in the same order, as rank 0's (so8t_exp.run.TrainingRun._build).
    build.seed_everything(cfg.seed, cfg.trainer.deterministic)
    device, precision = build.resolve_device(cfg.trainer)
    dataset = data.load_dataset(cfg.data)
    built = build.build_training(
        cfg, build.build_source(cfg), dataset, device, precision, world, group
    )
    trainer = built.trainer
    trainer.stopping = lambda: stop.requested
    if start["payload"] is not None:
        trainer.restore(start["payload"], world.rank)
        if start["extend_from"]:  # (trained longer: the schedules keep their horizon)
            p = trainer.progress
            p.schedule_steps = p.schedule_steps or start["extend_from"]
        trainer.sync_schedules()
    del start
    while True:
        command, arg = team.receive_command(group)
        if command == team.STEP:
            # (diverged: rank 0 saw the same numbers and ends the run)
            with contextlib.suppress(TrainingDiverged):
                trainer.train_step()
        elif command == team.SAVE:
            team.gather_rng(group, trainer.rng_at_boundary())
        elif command == team.EXIT:
            if arg and stop.requested:
                log.warning("stopped (%s)", signal.Signals(stop.signum).name)
            return arg
