"""``python -m so8t_exp.boot``: set up, inspect and remove boot-time resume.

    python -m so8t_exp.boot install [key=value ...]   # register the task / write the unit
    python -m so8t_exp.boot status  [key=value ...]   # installed? what it runs, last start,
                                                      # and what the launcher would do now
    python -m so8t_exp.boot remove  [key=value ...]   # undo install
    python -m so8t_exp.boot print   [key=value ...]   # the task XML / unit, registering nothing

Linux: a systemd user unit in ``$XDG_CONFIG_HOME/systemd/user``. Windows: a Task Scheduler task
from XML (``boot.mode=startup``: at startup as SYSTEM, from an elevated prompt).
``key=value`` overrides are conf/boot.yaml's (``boot.*``) and, for ``status``'s dry run,
the resume launcher's (``tracking.uri=...``, ``resume.*``).

Exit codes: 0 done (also when no service manager answered: the unit is written and the
commands to enable it are printed); 1 the OS refused (schtasks failed); 2 bad arguments or
config; 6 (status) the tracking store is unreachable.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from so8t_exp.boot.actions import BootError, Target, definition, install, installed_status, remove
from so8t_exp.boot.config import MODES, BootAppConfig, BootConfig
from so8t_exp.cli_errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_TRACKING,
    config_error_line,
    config_errors,
    pipe_safe,
    report,
)
from so8t_exp.config_checks import ConfigError
from so8t_exp.overrides import compose

ACTIONS = ("install", "status", "remove", "print")
_USAGE = "python -m so8t_exp.boot install | status | remove | print [key=value ...]"


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/boot.yaml`` with the overrides, checked."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="boot_schema", node=BootAppConfig)
    cfg = compose("boot", overrides)
    if cfg.boot.mode not in MODES:
        raise ConfigError(f"boot.mode={cfg.boot.mode!r}: must be one of {', '.join(MODES)}")
    # (Task Scheduler's restart count is a byte)
    for key, top in (("delay_seconds", 86400), ("restart_count", 255)):
        if not 0 <= cfg.boot[key] <= top:
            raise ConfigError(f"boot.{key}={cfg.boot[key]}: must be in 0..{top}")
    return cfg


def status(cfg: DictConfig, target: Target) -> int:
    """What is installed, its last start, then the launcher's dry run on the same config."""
    from so8t_exp.resume import run_resume
    from so8t_exp.tracking import resolve_tracking_uri
    from so8t_exp.tracking.errors import TrackingUnavailable

    boot: BootConfig = OmegaConf.to_object(cfg.boot)
    installed_status(boot, target)
    print("runs the launcher would resume now (its dry run):")
    cfg.resume.dry_run = True
    try:
        return run_resume(cfg)
    except TrackingUnavailable as err:
        uri = resolve_tracking_uri(cfg.tracking.uri)
        return report(f"{err} (tracking.uri={uri})", EXIT_TRACKING)


def main(argv: list[str] | None = None, target: Target | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0 if argv else EXIT_BAD_INPUT
    action, overrides = argv[0], argv[1:]
    if action not in ACTIONS:
        return report(f"unknown action {action!r}: {_USAGE}", EXIT_BAD_INPUT)
    if stray := [a for a in overrides if "=" not in a and not a.startswith(("+", "~"))]:
        return report(f"unexpected {' '.join(stray)!r}: {_USAGE}", EXIT_BAD_INPUT)
    target = target or Target()
    try:
        cfg = compose_config(overrides)
        boot: BootConfig = OmegaConf.to_object(cfg.boot)
        if action == "print":
            print(definition(boot, target), end="")
            return 0
        if action == "install":
            return install(boot, target)
        if action == "remove":
            return remove(boot, target)
        return status(cfg, target)
    except config_errors() as err:
        return report(config_error_line(err), EXIT_BAD_INPUT)
    except BootError as err:
        return report(str(err), EXIT_BAD_INPUT)
    except FileNotFoundError as err:  # schtasks (or systemctl) itself is missing
        return report(str(err), EXIT_FAILED)


def cli() -> None:
    """``python -m so8t_exp.boot`` and the ``so8t-boot`` console script."""
    sys.exit(pipe_safe(main))


if __name__ == "__main__":
    cli()
