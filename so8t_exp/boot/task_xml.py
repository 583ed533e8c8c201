"""The Task Scheduler definition of the Windows boot task, as XML for ``schtasks /XML``.

One source for ``python -m so8t_exp.boot install`` and ``register_boot_task.bat`` (which calls
it). ``schtasks /Create`` on its own leaves Task Scheduler's defaults, which end a multi-day
run: stop after 72 hours, never start or keep running on battery, below-normal priority. The
XML says otherwise, and every path goes through XML escaping, so any folder name works
(``&``, ``(``, ``)``, ``!``, ``%``, spaces, Japanese).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import PureWindowsPath

NS = "http://schemas.microsoft.com/windows/2004/02/mit/task"
SYSTEM_SID = "S-1-5-18"  # LocalSystem: the account of a task that runs at startup
# Task Scheduler's priority 5 is NORMAL_PRIORITY_CLASS with normal threads (its default, 7,
# is below normal: a training run would lose the CPU to anything a user starts).
NORMAL_PRIORITY = 5
RESTART_INTERVAL = "PT5M"


@dataclass(frozen=True)
class TaskSpec:
    """What the task runs and when; ``root`` is the checkout's Windows path."""

    root: str
    mode: str = "logon"  # logon (of ``user``) | startup (as SYSTEM)
    user: str = ""  # DOMAIN\\name; the logon trigger's and the principal's account
    delay_seconds: int = 30
    restart_count: int = 3

    @property
    def script(self) -> str:
        return str(PureWindowsPath(self.root, "launchers", "windows", "run_hidden.vbs"))

    @property
    def arguments(self) -> str:
        # wscript.exe takes the script path as one argument: quoted, it may hold spaces; a
        # Windows path cannot hold a double quote, so no escaping is needed inside. //B: a
        # script error is logged, never a dialog that would hold a hidden task forever.
        return f'//B //Nologo "{self.script}"'


def task_xml(spec: TaskSpec) -> str:
    """The task's XML (Task Scheduler schema 1.2: Windows 7 and newer)."""
    ET.register_namespace("", NS)
    task = _el(None, "Task", version="1.2")
    info = _el(task, "RegistrationInfo")
    _el(info, "Description", text=f"Resume the newest unfinished so8t_exp run in {spec.root}")
    _trigger(_el(task, "Triggers"), spec)
    _principal(_el(task, "Principals"), spec)
    _settings(_el(task, "Settings"), spec)
    exec_ = _el(_el(task, "Actions", Context="Author"), "Exec")
    _el(exec_, "Command", text="wscript.exe")
    _el(exec_, "Arguments", text=spec.arguments)
    _el(exec_, "WorkingDirectory", text=str(PureWindowsPath(spec.root)))
    ET.indent(task)
    body = ET.tostring(task, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-16"?>\n{body}\n'


def task_bytes(spec: TaskSpec) -> bytes:
    """The XML as ``schtasks /XML`` reads it best: UTF-16 with a byte-order mark."""
    return task_xml(spec).replace("\n", "\r\n").encode("utf-16")


def _el(parent: ET.Element | None, tag: str, text: str | None = None, **attrib: str):
    name = f"{{{NS}}}{tag}"
    el = ET.Element(name, attrib) if parent is None else ET.SubElement(parent, name, attrib)
    if text is not None:
        el.text = text
    return el


def _trigger(triggers: ET.Element, spec: TaskSpec) -> None:
    if spec.mode == "startup":
        trigger = _el(triggers, "BootTrigger")
    else:
        trigger = _el(triggers, "LogonTrigger")
    _el(trigger, "Enabled", text="true")
    if spec.mode != "startup" and spec.user:
        _el(trigger, "UserId", text=spec.user)  # this user's logon only, not anyone's
    if spec.delay_seconds > 0:
        _el(trigger, "Delay", text=f"PT{spec.delay_seconds}S")


def _principal(principals: ET.Element, spec: TaskSpec) -> None:
    principal = _el(principals, "Principal", id="Author")
    if spec.mode == "startup":
        _el(principal, "UserId", text=SYSTEM_SID)
        _el(principal, "RunLevel", text="HighestAvailable")
    else:
        if spec.user:
            _el(principal, "UserId", text=spec.user)
        _el(principal, "LogonType", text="InteractiveToken")  # no stored password
        _el(principal, "RunLevel", text="LeastPrivilege")


def _settings(settings: ET.Element, spec: TaskSpec) -> None:
    values = {
        "MultipleInstancesPolicy": "IgnoreNew",  # one launcher at a time from this task
        "DisallowStartIfOnBatteries": "false",
        "StopIfGoingOnBatteries": "false",
        "AllowHardTerminate": "true",
        "StartWhenAvailable": "true",  # a missed start runs as soon as it can
        "RunOnlyIfNetworkAvailable": "false",  # a local store needs no network
        "AllowStartOnDemand": "true",  # `schtasks /Run` for a check by hand
        "Enabled": "true",
        "Hidden": "false",
        "RunOnlyIfIdle": "false",
        "WakeToRun": "false",
        "ExecutionTimeLimit": "PT0S",  # no limit: a training run takes days
        "Priority": str(NORMAL_PRIORITY),
    }
    for tag, text in values.items():
        _el(settings, tag, text=text)
    idle = _el(settings, "IdleSettings")
    _el(idle, "StopOnIdleEnd", text="false")
    _el(idle, "RestartOnIdle", text="false")
    if spec.restart_count > 0:
        restart = _el(settings, "RestartOnFailure")
        _el(restart, "Interval", text=RESTART_INTERVAL)
        _el(restart, "Count", text=str(spec.restart_count))


def parse_task(xml: str | bytes) -> dict[str, str]:
    """The task's settings and action as ``{tag: text}`` (``Settings`` children, ``Command``,
    ``Arguments``, ``WorkingDirectory``, the trigger's kind): for ``status`` and the tests."""
    root = ET.fromstring(xml)
    found: dict[str, str] = {}
    for part in ("Settings", "Actions/*", "Principals/*"):
        for parent in root.findall(_path(part)):
            for child in parent:
                if len(child) == 0:
                    found[_local(child.tag)] = child.text or ""
    triggers = root.find(_path("Triggers"))
    if triggers is not None and len(triggers):
        found["Trigger"] = _local(triggers[0].tag)
        for child in triggers[0]:
            found[f"Trigger.{_local(child.tag)}"] = child.text or ""
    for name in ("RestartOnFailure", "IdleSettings"):
        for child in root.findall(_path(f"Settings/{name}/*")):
            found[f"{name}.{_local(child.tag)}"] = child.text or ""
    return found


def _path(relative: str) -> str:
    return "/".join(p if p == "*" else f"{{{NS}}}{p}" for p in relative.split("/"))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
