"""Checkpoints: the only package that touches checkpoint files.

Its names are loaded on first use (PEP 562): the checkpoint writer process
(:mod:`so8t_exp.checkpoint.writer_main`) imports this package and must not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "Payload": "format",
    "checkpoint_name": "format",
    "newest_valid": "format",
    "parse_name": "format",
    "verify": "format",
    "Checkpointer": "manager",
    "RNGState": "state",
    "capture": "state",
    "restore": "state",
}

__all__ = [
    "Checkpointer",
    "Payload",
    "RNGState",
    "capture",
    "checkpoint_name",
    "newest_valid",
    "parse_name",
    "restore",
    "verify",
]

if TYPE_CHECKING:
    from so8t_exp.checkpoint.format import (
        Payload,
        checkpoint_name,
        newest_valid,
        parse_name,
        verify,
    )
    from so8t_exp.checkpoint.manager import Checkpointer
    from so8t_exp.checkpoint.state import RNGState, capture, restore


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
