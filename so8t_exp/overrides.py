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
