"""The config fingerprint a checkpoint carries, and the check made on resume.

It is the flattened resolved config minus what may change between two legs of one run
without changing its results (where it logs, how often it saves, which machine paths it
reads from), plus the sha256 of every data file, since the data's content matters and
its path does not.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from so8t_exp.config import ConfigError
from so8t_exp.fsutil import file_sha256

# Keys (or prefixes ending in '.') that do not affect the numbers a run produces.
_IGNORED = (
    "tracking.",
    "notify.",
    "progress.",
    "checkpoint.",
    "session.",
    "trainer.progress_bar",
    "trainer.device",
    "trainer.log_every_n_steps",
    "trainer.distributed_timeout_seconds",
    "data.files",
    "model.source.tokenizer_path",
    "model.source.device_map",
)


def _flat(node, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in _IGNORED)


def config_fingerprint(cfg: DictConfig) -> dict[str, str]:
    flat = _flat(OmegaConf.to_container(cfg, resolve=True))
    out = {k: v for k, v in flat.items() if not _ignored(k)}
    for i, name in enumerate(cfg.data.files):
        out[f"data.files_sha256.{i}"] = file_sha256(Path(name))
    return out


def _differences(saved: dict[str, str], current: dict[str, str]) -> tuple[list[str], str]:
    """The keys that differ, and one line per key for people."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    text = "\n".join(
        f"  {k}: checkpoint {saved.get(k, '<absent>')} -> now {current.get(k, '<absent>')}"
        for k in keys
    )
    return keys, text


def longer_only(saved: dict[str, str], current: dict[str, str]) -> int | None:
    """For a completed session: the ``trainer.max_steps`` it was trained to, if the config
    now differs only in a larger one (train longer); None if it does not differ, or only in
    a smaller one (nothing to do). Any other change is refused with the list of keys."""
    keys, text = _differences(saved, current)
    key = "trainer.max_steps"
    if keys == [key]:
        old, new = int(saved[key]), int(current[key])
        return old if new > old else None
    if keys:
        raise ConfigError(
            "the session is completed; only a larger trainer.max_steps continues it (train "
            "longer), but the config differs:\n" + text
        )
    return None


def check_fingerprint(saved: dict[str, str], current: dict[str, str], allow: bool) -> None:
    """Refuse to continue under a different config, listing every differing key."""
    keys, text = _differences(saved, current)
    if not keys:
        return
    message = "the config differs from the checkpoint's:\n" + text
    if not allow:
        raise ConfigError(message + "\nset checkpoint.allow_config_change=true to continue anyway")
    logging.getLogger(__name__).warning("%s\ncontinuing (checkpoint.allow_config_change)", message)
