"""Hydra command-line overrides that any value survives: paths with spaces, quotes, ``=``,
``,``, brackets, ``&()``, non-ASCII characters, a trailing backslash, ``${``."""

from __future__ import annotations

import re


def quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override value that parses back to ``value``.

    In Hydra's grammar only quotes and the backslashes right before a quote (or the end)
    are escapes; ``${`` would start an interpolation, so it is escaped too.
    """
    body = value.replace("'", "\\'")
    body = re.sub(r"(\\+)(?=\\'|$)", lambda m: m.group(1) * 2, body)
    return "'" + body.replace("${", "\\${") + "'"


def override(key: str, value: str) -> str:
    """``key='value'``, quoted for Hydra."""
    return f"{key}={quoted(value)}"


def without(overrides: list[str], keys: tuple[str, ...]) -> list[str]:
    """``overrides`` less those that set (``k=``, ``+k=``, ``++k=``, ``~k``) one of ``keys``."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys]


def compose(config_name: str, overrides: list[str]):
    """The primary config ``conf/<config_name>.yaml`` with ``overrides``, composed outside
    ``@hydra.main`` (the commands with sub-commands: sessions, boot)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from so8t_exp.paths import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)
