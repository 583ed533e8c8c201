"""``python -m so8t_exp.train``: the Hydra entry point. It only composes and calls.

Examples::

    python -m so8t_exp.train                                  # tiny default, CPU, ~1 min
    python -m so8t_exp.train +experiment=borea                # Borea-Phi-3.5-mini, GPU
    python -m so8t_exp.train -m trainer.optimizer.lr=1e-4,3e-4
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from so8t_exp import trial_link
from so8t_exp.cli_errors import (
    EXIT_BAD_INPUT,
    EXIT_LOCKED,
    EXIT_RUN_LOST,
    EXIT_TRACKING,
    config_error_line,
    hydra_config_errors,
    report,
)
from so8t_exp.config import ConfigError
from so8t_exp.data import DataError
from so8t_exp.distributed import team
from so8t_exp.distributed.launch import refuse_multirun, run_rank
from so8t_exp.distributed.world import World
from so8t_exp.lock import SessionLocked
from so8t_exp.paths import config_dir
from so8t_exp.run import run_training
from so8t_exp.session import Session
from so8t_exp.tracking import resolve_tracking_uri
from so8t_exp.tracking.errors import RunNotFound, TrackingUnavailable
from so8t_exp.tracking.metrics import set_startup_timeout

__all__ = ["EXIT_BAD_INPUT", "EXIT_LOCKED", "main", "run_in_process"]
# An interrupted run exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM);
# a failed one with 1; the other codes are in so8t_exp.cli_errors (and the README).


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _app(cfg: DictConfig) -> int:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and team.current().world.distributed:
        refuse_multirun()
        sys.exit(EXIT_BAD_INPUT)
    session_dir = Path(hc.runtime.output_dir)
    set_startup_timeout(cfg.tracking.startup_timeout_seconds)
    try:
        code = run_training(cfg, session_dir, session_dir / hc.output_subdir)
    except (ConfigError, DataError) as err:
        # A bad config or data line: one clear line, no traceback, nothing started.
        code = report(err, EXIT_BAD_INPUT)
    except OmegaConfBaseException as err:  # e.g. ${oc.env:X} with X unset, resolved late
        code = report(config_error_line(err), EXIT_BAD_INPUT)
    except SessionLocked as err:
        code = report(err, EXIT_LOCKED)
    except TrackingUnavailable as err:
        uri = resolve_tracking_uri(cfg.tracking.uri)
        code = report(err if uri in str(err) else f"{err} (tracking.uri={uri})", EXIT_TRACKING)
    except RunNotFound as err:
        code = report(_run_lost(err, session_dir), EXIT_RUN_LOST)
    # Hydra drops the return value; a single run reports it as the exit code, while a
    # sweep goes on to its next job.
    # ... unless it was stopped by a signal: then the whole sweep stops.
    if code and (hc.mode == RunMode.RUN or code >= 128):
        sys.exit(code)
    return code


def _run_lost(err: RunNotFound, session_dir: Path) -> str:
    """Mark the session ``lost`` (the launcher and people reading the folder see why it
    stopped) and say what to do."""
    session = Session(session_dir)
    if session.load() is not None:
        try:
            session.save(status="lost")
        except OSError as save_err:  # (a full disk must not hide the real message)
            print(f"warning: could not update {session.path}: {save_err}", file=sys.stderr)
    used = session.info.tracking_uri if session.info else None
    where = (
        f"point tracking.uri at {used}, the store this session used"
        if used and used != err.uri
        else "point tracking.uri at a store that has it"
    )
    return (
        f"{err} (deleted, or another store): session {session_dir} marked lost; "
        f"{where}, or start over with a new hydra.run.dir"
    )


def main() -> None:
    """``python -m so8t_exp.train``: Hydra's config errors exit 2 with one line. Under
    ``torchrun`` rank 0 runs this app and the other ranks follow it."""
    world = World.from_env()
    if world.distributed:
        sys.exit(run_rank(world, _hydra_app))
    trial_link.watch_sweeper()  # (a parallel sweep's trial: stop when its sweeper is gone)
    _hydra_app()


def _hydra_app() -> None:
    with hydra_config_errors():
        _app()


def run_in_process(overrides: list[str]) -> int:
    """What ``python -m so8t_exp.train *overrides`` does — Hydra output folder, logs, exit
    code — but in this process, so a caller that has imported the heavy libraries already
    (the resume launcher) does not pay for a second interpreter."""
    argv, root = sys.argv, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    GlobalHydra.instance().clear()  # the caller may be a Hydra app itself
    sys.argv = [argv[0], *overrides]
    try:
        with hydra_config_errors():
            _app()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        # Hydra pointed the root logger at the session's log; give the caller its own back
        # (closed file handlers reopen on the next record).
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return code


if __name__ == "__main__":
    main()
