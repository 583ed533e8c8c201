"""The Linux boot task: a systemd user unit that runs ``python -m so8t_exp.resume``.

Every value is written with systemd's own quoting, so a checkout in any folder (spaces, ``&``,
``%``, quotes, ``$``, Japanese) gives a unit that runs exactly that folder's launcher.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from so8t_exp.boot.boot_log import LOG_NAME, STAMP_ENV

DEFAULT_NAME = "so8t-resume"
LINGER_DIR = Path("/var/lib/systemd/linger")
# Exits that a restart cannot mend: bad config, locked by a live process, run not resumable,
# fenced by another host, run missing from the store.
NO_RESTART_CODES = (2, 3, 4, 5, 7)
# Settings of the installing shell that decide what the launcher resumes and where models
# come from: a unit starts with systemd's environment, not the shell's, so they are carried
# into it (never tokens or URLs with secrets).
CARRIED_ENV = (
    "SO8T_EXP_HOME",
    "SO8T_HOST_ID",
    "MLFLOW_TRACKING_URI",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
)


def carried_environment() -> dict[str, str]:
    """The :data:`CARRIED_ENV` variables set in this process."""
    return {k: os.environ[k] for k in CARRIED_ENV if os.environ.get(k)}


def escape_specifiers(text: str) -> str:
    """``%`` starts a systemd specifier (``%h``, ``%u``): a literal one is ``%%``."""
    return text.replace("%", "%%")


def quote_word(word: str, variables: bool = True) -> str:
    """One word of ``ExecStart=``/``Environment=``: double-quoted with C-style escapes, ``%``
    doubled (specifiers) and, where systemd substitutes variables (arguments, not the
    executable), ``$`` doubled."""
    if "\n" in word or "\r" in word:
        raise ValueError(f"a line break cannot be written into a systemd unit: {word!r}")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    if variables:
        escaped = escaped.replace("$", "$$")
    return f'"{escape_specifiers(escaped)}"'


def plain_value(path: Path) -> str:
    """A path setting (``WorkingDirectory=``, ``StandardOutput=append:``): not split into
    words, so only specifiers need escaping."""
    text = str(path)
    if "\n" in text or "\r" in text:
        raise ValueError(f"a line break cannot be written into a systemd unit: {text!r}")
    return escape_specifiers(text)


@dataclass(frozen=True)
class UnitSpec:
    root: Path  # the project: working directory, home of logs/
    python: str = sys.executable
    log_dir: Path | None = None  # default <root>/logs
    delay_seconds: int = 30
    restart_count: int = 3
    environment: tuple[tuple[str, str], ...] = ()  # extra variables for the launcher

    @property
    def log(self) -> Path:
        return (self.log_dir or self.root / "logs") / LOG_NAME

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "so8t_exp.resume"]

    @property
    def exec_start(self) -> str:
        """``ExecStart=``'s value. systemd refuses an executable whose path holds a quote or
        a backslash, so such a Python is started through ``env`` as an argument."""
        python, *args = self.command
        if set(python) & set("\"'\\"):
            return " ".join(["/usr/bin/env", *(quote_word(w) for w in self.command)])
        return " ".join([quote_word(python, variables=False), *(quote_word(w) for w in args)])


def unit_text(spec: UnitSpec) -> str:
    """The unit file: the launcher's output appended to the boot log, each line timestamped
    by the launcher. At shutdown every process of the unit (launcher and trainer, in-process
    or a child) gets SIGTERM and up to 180 s for the emergency checkpoint — less where the
    user manager itself is stopped first (``user@.service``: 120 s on Debian)."""
    variables = [f"{STAMP_ENV}=1", "PYTHONUNBUFFERED=1", "PYTHONUTF8=1"]
    variables += [f"{k}={v}" for k, v in spec.environment]
    env = " ".join(quote_word(v, variables=False) for v in variables)  # ($ is literal here)
    lines = [
        "# Written by `python -m so8t_exp.boot install`; `... boot remove` deletes it.",
        "[Unit]",
        "Description=Resume the newest unfinished so8t_exp training run",
        "After=default.target",
        f"StartLimitIntervalSec={max(1, spec.restart_count + 1) * 600}",
        f"StartLimitBurst={spec.restart_count + 1}",
        "",
        "[Service]",
        "Type=exec",
        f"WorkingDirectory={plain_value(spec.root)}",
        f"Environment={env}",
    ]
    if spec.delay_seconds > 0:
        lines.append(f"ExecStartPre=sleep {spec.delay_seconds}")
        # The sleep counts against the start timeout (90 s by default).
        lines.append(f"TimeoutStartSec={spec.delay_seconds + 120}")
    lines += [
        f"ExecStart={spec.exec_start}",
        f"StandardOutput=append:{plain_value(spec.log)}",
        "StandardError=inherit",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=180",
        f"Restart={'on-failure' if spec.restart_count > 0 else 'no'}",
        "RestartSec=300",
        f"RestartPreventExitStatus={' '.join(map(str, NO_RESTART_CODES))}",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def unit_dir() -> Path:
    """``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config/systemd/user``)."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def systemctl(*args: str) -> subprocess.CompletedProcess[str] | None:
    """``systemctl --user ARGS``; None where there is no systemctl at all."""
    try:
        return subprocess.run(
            ["systemctl", "--user", *args], capture_output=True, text=True, timeout=60
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None


def lingering(user: str | None = None) -> bool:
    """Whether the user's systemd starts at boot (``loginctl enable-linger``), not at login."""
    user = user or user_name()
    return (LINGER_DIR / user).exists()


def user_name() -> str:
    import getpass

    return getpass.getuser()


def linger_command() -> str:
    """What makes this user's systemd (and so the unit) start at boot, not at login."""
    return f"loginctl enable-linger {shlex.quote(user_name())}"


def manual_commands(unit: str) -> list[str]:
    """What makes the written unit start at boot, for a shell where no manager answered."""
    return [
        "systemctl --user daemon-reload",
        f"systemctl --user enable {shlex.quote(unit)}",
        f"{linger_command()}   # start at boot, not only at login",
    ]
