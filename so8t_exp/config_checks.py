"""Checks of a composed config that its schema's types cannot make: keys added with ``+``
outside the schema, intervals and timeouts that must not be negative, data files, the keys
of ``_target_`` nodes.

Kept apart from :mod:`so8t_exp.config` (the schemas) so both stay short; what lives here
(:class:`ConfigError`, :func:`check_target`, :func:`validate_resume`, ...) is re-exported
there.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration problem found before any model is loaded."""


def check_schema_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Refuse keys the schema does not have.

    Hydra applies ``+key=value`` inside ``open_dict``, which lifts the schema's struct
    flag, so ``+trainer.max_step=10`` (what Hydra's own error suggests for a misspelled
    key) would be accepted and then ignored. Open dicts (``tracking.tags``,
    ``notify.notifiers``, ``_target_`` nodes) take any key and are not checked here.
    """
    schema = OmegaConf.get_type(cfg)
    fields = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in cfg:
        name = f"{prefix}{key}"
        if fields is not None and key not in fields:
            hint = schema_hint(str(key), fields, prefix)
            raise ConfigError(f"{name}: not a key of the schema ({schema.__name__}){hint}")
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_schema_keys(node, f"{name}.")


def schema_hint(key: str, fields: set[str], prefix: str) -> str:
    """``"; did you mean <prefix><closest field>?"``, or ``""`` when none is close."""
    close = difflib.get_close_matches(key, sorted(fields), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def check_not_negative(cfg: DictConfig, keys: list[str]) -> None:
    """Each key is >= 0 (0 means "off" or "at once" where the key says so). A negative
    interval would silently switch a protection off."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")


def check_above_zero(cfg: DictConfig, keys: list[str]) -> None:
    """Each key is > 0: a period of 0 would make its background thread spin."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value}: must be > 0")


# 0 means "off" (checkpoints by time or steps) or "at once" (waits, timeouts).
NOT_NEGATIVE = [
    "checkpoint.interval_seconds",
    "checkpoint.every_n_steps",
    "checkpoint.mirror_timeout_seconds",
    "session.lock_wait_seconds",
    "tracking.startup_timeout_seconds",
]
# Periods of background threads: 0 would make them spin.
ABOVE_ZERO = [
    "tracking.flush_interval_seconds",
    "tracking.system_stats_interval_seconds",
    "progress.interval_seconds",
    "session.heartbeat_seconds",
    "trainer.distributed_timeout_seconds",
]


def validate_resume(cfg: DictConfig) -> None:
    """:func:`validate` for ``resume.yaml`` (the launcher and the sessions CLI)."""
    check_schema_keys(cfg)
    check_not_negative(cfg, ["tracking.startup_timeout_seconds", "resume.claim_grace_seconds"])
    check_above_zero(cfg, ["resume.stale_after_seconds", "resume.max_age_hours"])
    check_positive(cfg, ["resume.max_attempts"])
    for name, node in cfg.notify.notifiers.items():
        check_target(node, f"notify.notifiers.{name}")


def check_data_file(i: int, name: str) -> None:
    """``data.files[i]`` names a readable file (a folder is told as a folder)."""
    path = Path(name)
    if path.is_dir():
        raise ConfigError(f"data.files[{i}]: {name} is a folder; name the JSONL files in it")
    if not path.is_file():
        raise ConfigError(f"data.files[{i}]: no such file: {name}")


def check_positive(cfg: DictConfig, keys: list[str]) -> None:
    """Each key is >= 1."""
    for key in keys:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be >= 1")


def check_target(node: Any, key: str, skip: tuple[str, ...] = ()) -> None:
    """Check that ``node`` is a ``_target_`` node whose keys the target accepts."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key}: needs a _target_ naming a class or function")
    try:
        target = get_object(node._target_)
    except Exception as err:
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported: {err}") from err
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in node:
        if name.startswith("_") or name in skip:
            continue
        if name not in params:
            accepted = sorted(p for p in params if p not in skip and p != "self")
            raise ConfigError(
                f"{key}.{name}: not accepted by {node._target_} (accepted keys: {accepted})"
            )
