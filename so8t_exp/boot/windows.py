"""The Windows boot task: registered with ``schtasks /Create /XML`` from :mod:`task_xml`.

``schtasks`` is a parameter so the tests can hand a stand-in (run under Wine) on Linux.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from so8t_exp.boot.task_xml import TaskSpec, parse_task, task_bytes

DEFAULT_TASK = "so8t_exp resume"
# A task's path is expanded by Task Scheduler: %NAME% of a defined variable would change.
_ENV_REFERENCE = re.compile(r"%([^%\\/:*?\"<>|]+)%")


def current_user() -> str:
    """``DOMAIN\\user`` of whoever registers the task (the logon trigger's account)."""
    user = os.environ.get("USERNAME", "")
    domain = os.environ.get("USERDOMAIN", "")
    return f"{domain}\\{user}" if domain and user else user


def is_admin() -> bool:
    """Whether this process is elevated (registering a SYSTEM task needs it)."""
    try:
        import ctypes

        return bool(ctypes.windll.shell32.IsUserAnAdmin())
    except (AttributeError, OSError):  # not on Windows: schtasks itself will say
        return True


def expanded_names(root: str) -> list[str]:
    """``%NAME%`` parts of ``root`` that Task Scheduler would replace by a variable's value."""
    return [m.group(0) for m in _ENV_REFERENCE.finditer(root) if m.group(1) in os.environ]


def run_schtasks(
    schtasks: Sequence[str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``schtasks ARGS``. Into a pipe it writes the OEM code page (Windows), decoded
    leniently; a missing ``schtasks`` is a :class:`FileNotFoundError` naming it."""
    encoding = "oem" if sys.platform == "win32" else None
    try:
        return subprocess.run(
            [*schtasks, *args],
            capture_output=True,
            encoding=encoding,
            text=True,
            errors="replace",
            timeout=120,
            cwd=cwd,
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{schtasks[0]} not found: Task Scheduler is needed") from err


def register(
    spec: TaskSpec, task: str, xml_file: Path, schtasks: Sequence[str]
) -> subprocess.CompletedProcess[str]:
    """Write the task's XML to ``xml_file`` (kept: it is what ``status`` compares against)
    and register it, replacing a task of the same name."""
    xml_file.parent.mkdir(parents=True, exist_ok=True)
    xml_file.write_bytes(task_bytes(spec))
    return run_schtasks(
        schtasks, "/Create", "/TN", task, "/XML", str(xml_file), "/F", cwd=xml_file.parent
    )


def query(task: str, schtasks: Sequence[str]) -> tuple[dict[str, str] | None, str]:
    """``(settings and action of the registered task, "")``, or ``(None, schtasks' own
    words)`` when it shows no such task to this user (a SYSTEM task is visible from an
    elevated prompt only; schtasks' message is localised, so it is shown, not parsed)."""
    out = run_schtasks(schtasks, "/Query", "/TN", task, "/XML")
    if out.returncode != 0:
        return None, " ".join((out.stderr or out.stdout or "").split())
    start = out.stdout.find("<")
    try:
        xml = out.stdout[start:].encode("utf-8").replace(b'"UTF-16"', b'"UTF-8"')
        return parse_task(xml), ""
    except Exception:  # an unreadable answer still means "installed"
        return {}, ""


def delete(task: str, schtasks: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return run_schtasks(schtasks, "/Delete", "/TN", task, "/F")
