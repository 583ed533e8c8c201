"""``install``, ``status``, ``remove`` and ``print`` of the boot task, per OS.

Linux writes a systemd user unit (:mod:`.systemd`); Windows registers a Task Scheduler task
from XML (:mod:`.task_xml`, :mod:`.windows`). ``platform`` and ``schtasks`` are parameters
so the tests can run the Windows side on Linux with a stand-in ``schtasks.exe`` under Wine.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from so8t_exp.boot import systemd, windows
from so8t_exp.boot.boot_log import LOG_NAME, last_start, log_dir
from so8t_exp.boot.config import BootConfig
from so8t_exp.boot.task_xml import TaskSpec, parse_task, task_xml
from so8t_exp.cli_errors import EXIT_FAILED, EXIT_OK, report
from so8t_exp.fsutil import atomic_write_bytes
from so8t_exp.paths import project_root


class BootError(ValueError):
    """The boot task cannot be set up as asked (the message says why and what to do)."""


@dataclass
class Target:
    """Where and how the boot task lives on this machine."""

    platform: str = sys.platform  # win32 -> Task Scheduler; anything else -> systemd
    root: Path = field(default_factory=project_root)
    schtasks: Sequence[str] = ("schtasks",)

    @property
    def windows(self) -> bool:
        return self.platform == "win32"

    def name(self, cfg: BootConfig) -> str:
        return cfg.name or (windows.DEFAULT_TASK if self.windows else systemd.DEFAULT_NAME)


# -- what the task runs ------------------------------------------------------------------------


def task_spec(cfg: BootConfig, target: Target) -> TaskSpec:
    script = target.root / "launchers" / "windows" / "run_hidden.vbs"
    if not script.is_file():
        raise BootError(
            f"{script} is missing: the Windows boot task runs the checkout's launchers; "
            "install from a checkout (pip install -e .)"
        )
    return TaskSpec(
        root=str(target.root),
        mode=cfg.mode,
        user=windows.current_user(),
        delay_seconds=cfg.delay_seconds,
        restart_count=cfg.restart_count,
    )


def unit_spec(cfg: BootConfig, target: Target) -> systemd.UnitSpec:
    if cfg.mode != "logon":
        raise BootError(
            "boot.mode=startup is for Windows; on Linux the user unit starts at boot once "
            f"lingering is on: {systemd.linger_command()}"
        )
    return systemd.UnitSpec(
        root=target.root,
        log_dir=log_dir(),
        delay_seconds=cfg.delay_seconds,
        restart_count=cfg.restart_count,
        environment=tuple(systemd.carried_environment().items()),
    )


def definition(cfg: BootConfig, target: Target) -> str:
    """The text ``install`` would register: the task's XML or the unit file."""
    if target.windows:
        return task_xml(task_spec(cfg, target))
    return systemd.unit_text(unit_spec(cfg, target))


# -- install -----------------------------------------------------------------------------------


def install(cfg: BootConfig, target: Target) -> int:
    """Register (or replace) the boot task; prints what it runs and how to check and undo it."""
    log_dir().mkdir(parents=True, exist_ok=True)
    return _install_windows(cfg, target) if target.windows else _install_linux(cfg, target)


def _install_linux(cfg: BootConfig, target: Target) -> int:
    spec = unit_spec(cfg, target)
    unit = f"{target.name(cfg)}.service"
    path = systemd.unit_dir() / unit
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, systemd.unit_text(spec).encode("utf-8"))
    print(f"wrote {path}")
    print(f"  runs: {' '.join(spec.command)}  (in {target.root})")
    print(f"  log:  {spec.log}")
    for key, value in spec.environment:
        print(f"  with {key}={value} (from this shell)")
    reload = systemd.systemctl("daemon-reload")
    enable = systemd.systemctl("enable", unit) if reload and reload.returncode == 0 else None
    if enable is None or enable.returncode != 0:
        why = _why(enable or reload) or "systemctl not found"
        print(f"no systemd user manager answered ({why}); the unit is written.")
        print("Where one runs (a login session of this user), enable it with:")
        for line in systemd.manual_commands(unit):
            print(f"  {line}")
        return EXIT_OK
    print(f"enabled {unit}: it starts with this user's systemd")
    _print_linger()
    print("Check: python -m so8t_exp.boot status   Remove: python -m so8t_exp.boot remove")
    return EXIT_OK


def _print_linger() -> None:
    if systemd.lingering():
        print("lingering is on: the unit starts at boot, before anyone logs in")
    else:
        print(
            "lingering is off: the unit starts when this user logs in; to start it at boot:\n"
            f"  {systemd.linger_command()}"
        )


def _install_windows(cfg: BootConfig, target: Target) -> int:
    spec = task_spec(cfg, target)
    task = target.name(cfg)
    if cfg.mode == "startup" and not windows.is_admin():
        raise BootError(
            "boot.mode=startup registers a SYSTEM task: run this from an elevated prompt "
            "(Run as administrator)"
        )
    for name in windows.expanded_names(spec.root):
        print(f"warning: Task Scheduler will replace {name} in the project's path by its value")
    xml_file = log_dir() / "boot" / "so8t_task.xml"
    out = windows.register(spec, task, xml_file, target.schtasks)
    _echo(out.stdout)
    if out.returncode != 0:
        _echo(out.stderr, sys.stderr)
        hint = "" if windows.is_admin() else "; try again from an elevated prompt"
        return report(f"schtasks could not create the task {task!r}{hint}", EXIT_FAILED)
    print(f'registered Task Scheduler task "{task}" ({spec.mode})')
    print(f"  runs: wscript.exe {spec.arguments}")
    print(f"  log:  {log_dir() / LOG_NAME}")
    print(f'  definition: {xml_file}  (registered: schtasks /Query /TN "{task}" /XML)')
    print(f'Remove: python -m so8t_exp.boot remove   (or: schtasks /Delete /TN "{task}" /F)')
    return EXIT_OK


# -- remove ------------------------------------------------------------------------------------


def remove(cfg: BootConfig, target: Target) -> int:
    """Undo :func:`install`; nothing installed is not an error."""
    name = target.name(cfg)
    if target.windows:
        found, why = windows.query(name, target.schtasks)
        if found is None:
            print(f'no Task Scheduler task "{name}" visible here: nothing removed ({why})')
            print("(a boot.mode=startup task is visible from an elevated prompt only)")
            return EXIT_OK
        out = windows.delete(name, target.schtasks)
        _echo(out.stdout)
        if out.returncode != 0:
            _echo(out.stderr, sys.stderr)
            return report(f"schtasks could not delete the task {name!r}", EXIT_FAILED)
        print(f'removed Task Scheduler task "{name}"')
        return EXIT_OK
    unit = f"{name}.service"
    path = systemd.unit_dir() / unit
    if not path.exists():
        print(f"no unit {path}: nothing to remove")
        return EXIT_OK
    disabled = systemd.systemctl("disable", unit)
    path.unlink()
    reload = systemd.systemctl("daemon-reload")
    print(f"removed {path}")
    if not (disabled and disabled.returncode == 0 and reload and reload.returncode == 0):
        print(
            f"(no systemd user manager answered; where one runs: systemctl --user disable {unit})"
        )
    return EXIT_OK


# -- status ------------------------------------------------------------------------------------


def installed_status(cfg: BootConfig, target: Target) -> bool:
    """Print whether the task is installed, what it runs, whether it is what ``install``
    would write now, and its last start from the boot log; returns whether it is installed."""
    name = target.name(cfg)
    if target.windows:
        found, why = windows.query(name, target.schtasks)
        where = f'Task Scheduler task "{name}"' + (f": {why}" if why else "")
        runs = found and f"{found.get('Command', '?')} {found.get('Arguments', '')}".strip()
        current = found is not None and _same_task(found, cfg, target)
    else:
        path = systemd.unit_dir() / f"{name}.service"
        found = path.read_text(encoding="utf-8") if path.exists() else None
        where = str(path)
        runs = found and _exec_start(found)
        current = found is not None and found == _definition_or_none(cfg, target)
    if found is None:
        print(f"boot task: not installed ({where})")
    else:
        print(f"boot task: installed ({where})")
        print(f"  runs: {runs or '?'}")
        if not current:
            print("  differs from what `install` would write now: run install again")
        if not target.windows:
            _print_linger()
    _print_last_start()
    return found is not None


def _print_last_start() -> None:
    log = log_dir() / LOG_NAME
    last = last_start(log)
    if last is None:
        print(f"last start: none logged in {log}")
    elif last.error:
        print(f"last start: {last.started}: the launcher did not start: {last.error}")
    elif last.ended is None:
        print(f"last start: {last.started}: no exit logged (still running, or killed)")
    else:
        print(f"last start: {last.started}, ended {last.ended} with exit code {last.exit_code}")


def _same_task(found: dict[str, str], cfg: BootConfig, target: Target) -> bool:
    try:
        wanted = parse_task(task_xml(task_spec(cfg, target)).replace("UTF-16", "UTF-8"))
    except BootError:
        return False
    # Task Scheduler exports accounts as SIDs, not DOMAIN\\user: those are not compared.
    ignored = {"UserId", "Trigger.UserId"}
    return all(found.get(k) == v for k, v in wanted.items() if k in found and k not in ignored)


def _definition_or_none(cfg: BootConfig, target: Target) -> str | None:
    try:
        return definition(cfg, target)
    except BootError:
        return None


def _exec_start(unit: str) -> str | None:
    """The unit's ``ExecStart=`` as a shell would write it (systemd's escapes undone)."""
    for line in unit.splitlines():
        if line.startswith("ExecStart="):
            value = line.removeprefix("ExecStart=").replace("%%", "%")
            words = [w.replace("$$", "$") for w in shlex.split(value)]
            return shlex.join(words)
    return None


def _why(out) -> str:
    return " ".join((out.stderr or out.stdout or "").split()) if out else ""


def _echo(text: str, stream=None) -> None:
    if text and text.strip():
        print(text.rstrip(), file=stream or sys.stdout)
