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

from so8t_exp.config import ConfigError
from so8t_exp.data import DataError
from so8t_exp.lock import SessionLocked
from so8t_exp.paths import config_dir
from so8t_exp.run import run_training

EXIT_BAD_INPUT = 2  # a config key/value or a data line is wrong (the message names it)
EXIT_LOCKED = 3  # the session folder is in use by another live process
# An interrupted run exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM);
# a failed one with 1.


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _app(cfg: DictConfig) -> int:
    hc = HydraConfig.get()
    session_dir = Path(hc.runtime.output_dir)
    try:
        code = run_training(cfg, session_dir, session_dir / hc.output_subdir)
    except (ConfigError, DataError) as err:
        # A bad config or data line: one clear line, no traceback, nothing started.
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except SessionLocked as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_LOCKED
    # Hydra drops the return value; a single run reports it as the exit code, while a
    # sweep goes on to its next job.
    # ... unless it was stopped by a signal: then the whole sweep stops.
    if code and (hc.mode == RunMode.RUN or code >= 128):
        sys.exit(code)
    return code


def main() -> None:
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
