"""Checkpoints: the only package that touches checkpoint files."""

from so8t_exp.checkpoint.format import Payload, checkpoint_name, newest_valid, parse_name, verify
from so8t_exp.checkpoint.manager import Checkpointer
from so8t_exp.checkpoint.state import RNGState, capture, restore

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
