"""Find what a run trained: its config, the weights of its final or best state, the step.

``export.source`` is a session folder or an MLflow run id. A run id is looked up in the
tracking store: its session folder (tag ``so8t.session_dir``) when that folder is on this
machine, else its config and checkpoint are downloaded from the run's artifacts (another
machine reading the same tracking server).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from so8t_exp.checkpoint import format as fmt
from so8t_exp.config import ConfigError


@dataclass
class TrainedState:
    """The trainable weights of one evaluated state of a run, and what rebuilds it."""

    cfg: DictConfig  # the run's resolved training config
    weights: dict[str, torch.Tensor]  # trainable parameters (all, if saved in full)
    step: int
    checkpoint: str  # e.g. "final-step00000300"
    run_id: str | None
    metrics: dict  # the checkpoint's progress (best value, step, ...)
    session: Path | None = None  # the session folder, when it is on this machine


def locate(source: str, kind: str, tracking_uri: str | None) -> TrainedState:
    """The newest valid ``kind`` (``final`` or ``best``) checkpoint of ``source``."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _from_session(folder.resolve(), kind, run_id=None)
    from so8t_exp.tracking.models import RunArtifacts

    run = RunArtifacts(tracking_uri, source)  # raises ConfigError for an unknown run id
    local = run.session_dir()
    if local is not None and (local / "checkpoints").is_dir():
        return _from_session(local, kind, run_id=source)
    staging = Path(tempfile.mkdtemp(prefix="so8t-export-"))
    name = run.newest_checkpoint(kind)
    if name is None:
        raise ConfigError(f"export.source={source}: the run has no {kind} checkpoint in MLflow")
    ckpt = run.download(f"checkpoints/{name}", staging)
    config = run.download("hydra/config.yaml", staging)
    return _state(ckpt, _load_config(config), run_id=source)


def _from_session(session: Path, kind: str, run_id: str | None) -> TrainedState:
    folder = fmt.newest_valid(session / "checkpoints", kind)  # a corrupt one is skipped
    if folder is None:
        raise ConfigError(
            f"export.source={session}: no valid {kind} checkpoint in {session / 'checkpoints'}"
        )
    config = session / "final_model" / "config.yaml"
    if not config.is_file():
        config = session / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"export.source={session}: neither final_model/ nor .hydra/ config")
    state = _state(folder, _load_config(config), run_id)
    state.session = session
    return state


def _load_config(path: Path) -> DictConfig:
    import so8t_exp.paths  # noqa: F401  (registers the resolvers a raw .hydra config uses)

    cfg = OmegaConf.load(path)
    OmegaConf.resolve(cfg)
    return cfg


def _state(folder: Path, cfg: DictConfig, run_id: str | None) -> TrainedState:
    payload = fmt.read(folder)
    state = payload.docs["state"]
    progress = state.get("progress", {})
    return TrainedState(
        cfg=cfg,
        weights=payload.tensors["weights"],
        step=int(progress.get("step", 0)),
        checkpoint=folder.name,
        run_id=run_id or state.get("run_id"),
        metrics=progress,
    )
