"""Checks of a composed config that its schema's types cannot make: keys added with ``+``
outside the schema, and intervals and timeouts that must not be negative.

Kept apart from :mod:`so8t_exp.config` (the schemas) so both stay short;
:class:`ConfigError` lives here and is re-exported there.
"""

from __future__ import annotations

import dataclasses
import difflib

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
