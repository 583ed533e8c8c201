"""``export.*`` config -> exported folder -> MLflow model -> registered version."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from so8t_exp.config import ConfigError, ExportConfig
from so8t_exp.export.locate import TrainedState, locate
from so8t_exp.export.merge import plain_model, rebuild
from so8t_exp.export.write import RUNTIME_FILE, write_export

log = logging.getLogger(__name__)


@dataclass
class Exported:
    folder: Path
    state: TrainedState
    model_uri: str | None = None
    version: str | None = None
    alias_moved: bool = False


def run_export(ecfg: ExportConfig, tracking_uri: str | None) -> Exported:
    """Everything ``python -m so8t_exp.export`` does; returns what it made."""
    if ecfg.checkpoint not in ("final", "best"):
        raise ConfigError(f"export.checkpoint={ecfg.checkpoint!r}: final or best")
    if ecfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"export.dtype={ecfg.dtype!r}: auto, float32, bfloat16 or float16")
    if ecfg.mode not in (None, "min", "max"):
        raise ConfigError(f"export.mode={ecfg.mode!r}: min or max")
    if ecfg.register and not ecfg.log_model:
        raise ConfigError("export.register needs export.log_model=true (a version needs a model)")
    state = locate(ecfg.source, ecfg.checkpoint, tracking_uri)
    out = Path(ecfg.out).expanduser() if ecfg.out else _default_out(state)
    started = time.perf_counter()
    rebuilt = rebuild(state)
    model, head = plain_model(rebuilt)
    provenance = {
        "run_id": state.run_id,
        "checkpoint": state.checkpoint,
        "step": state.step,
        "alpha": rebuilt.alpha,
        "base_model": state.cfg.model.source.get("name_or_path", "tiny_phi3"),
        "safety_head": head is not None,
    }
    folder = write_export(out, model, rebuilt.tokenizer, head, ecfg.dtype, provenance)
    log.info("exported %s to %s in %.1f s", state.checkpoint, folder, time.perf_counter() - started)
    result = Exported(folder, state)
    if ecfg.log_model and state.run_id:
        _log_and_register(result, ecfg, tracking_uri)
    return result


def log_run_models(session: Path, kinds: list[str], tracking_uri: str | None) -> None:
    """At the end of a run: export each of ``kinds`` (``final``, ``best``) of the session
    and log it as the run's MLflow model. A failure is logged, never raised: the run is
    done, and ``python -m so8t_exp.export`` can do it again."""
    for kind in kinds:
        try:
            ecfg = ExportConfig(source=str(session), checkpoint=kind, register=None)
            with _no_progress_bars():
                run_export(ecfg, tracking_uri)
        except Exception as err:  # noqa: BLE001  (an export must not fail a finished run)
            log.warning("could not export the %s model: %s", kind, err)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Inside a training run (often unattended, its output in a log file), the progress
    bars of transformers and MLflow would only be noise between timestamped lines."""
    from transformers.utils import logging as hf_logging

    key, before = (
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
        os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"),
    )
    was_enabled = hf_logging.is_progress_bar_enabled()
    os.environ[key] = "false"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
        if was_enabled:
            hf_logging.enable_progress_bar()


def _default_out(state: TrainedState) -> Path:
    if state.session is not None:
        return state.session / "export" / state.checkpoint
    from so8t_exp.paths import project_root

    return project_root() / "exports" / f"{state.run_id}-{state.checkpoint}"


def _log_and_register(result: Exported, ecfg: ExportConfig, tracking_uri: str | None) -> None:
    from so8t_exp.tracking import models

    code = Path(models.__file__).with_name("pyfunc_model.py")
    result.model_uri = models.log_pyfunc_model(
        tracking_uri, result.state.run_id, result.folder, code, result.folder / RUNTIME_FILE
    )
    log.info("logged MLflow model %s", result.model_uri)
    if not ecfg.register:
        return
    run_cfg = result.state.cfg.checkpoint
    key = ecfg.metric or run_cfg.best_metric or "eval/loss"
    mode = ecfg.mode or run_cfg.best_mode or "min"
    value = models.RunArtifacts(tracking_uri, result.state.run_id).metric_at(key, result.state.step)
    state = result.state
    about = f"{state.checkpoint} of run {state.run_id}: {key} = {value} ({mode} is better)"
    result.version, result.alias_moved = models.register_version(
        tracking_uri,
        ecfg.register,
        result.model_uri,
        state.run_id,
        (key, value, mode),
        ecfg.alias,
        about,
    )
