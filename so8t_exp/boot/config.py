"""The ``boot`` settings: a plain dataclass (registered with Hydra by the entry point)."""

from __future__ import annotations

from dataclasses import dataclass, field

from so8t_exp.config import ResumeAppConfig

MODES = ("logon", "startup")


@dataclass
class BootConfig:
    mode: str = "logon"  # logon (current user) | startup (SYSTEM; Windows only)
    name: str | None = None  # default: unit so8t-resume.service / task "so8t_exp resume"
    delay_seconds: int = 30  # after logon/startup, before the launcher starts
    restart_count: int = 3  # Task Scheduler: restarts of a task that failed to run


@dataclass
class BootAppConfig(ResumeAppConfig):
    boot: BootConfig = field(default_factory=BootConfig)
