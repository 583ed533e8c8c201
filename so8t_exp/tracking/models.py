"""MLflow models: a run's artifacts as export sources, the exported model as an MLflow
model (a ``pyfunc``), model versions in the registry and the alias that follows the best.

Why ``pyfunc`` and not the ``transformers`` flavour: what a user (and ``/think`` serving)
wants from the model is an answer *and* the safety head's label, which no transformers
pipeline returns; the pyfunc wraps the exported Hugging Face folder (itself loadable by
``AutoModelForCausalLM``) with the head's small runtime, and is defined from code, so
loading it needs torch, transformers and safetensors but not so8t_exp.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from so8t_exp.config import ConfigError
from so8t_exp.tracking.core import Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
VERSION_METRIC_TAG = "so8t.metric."  # + metric name: the version's value of that metric


class RunArtifacts:
    """A finished (or running) run's session folder and artifacts, by run id."""

    def __init__(self, tracking_uri: str | None, run_id: str) -> None:
        self.client = MlflowClient(resolve_tracking_uri(tracking_uri))
        self.run_id = run_id
        try:
            self.run = self.client.get_run(run_id)
        except MlflowException as err:
            raise ConfigError(
                f"export.source={run_id}: neither a folder nor a run in "
                f"{self.client.tracking_uri} ({err.error_code})"
            ) from None

    def session_dir(self) -> Path | None:
        """The run's session folder, if it exists on this machine."""
        tag = self.run.data.tags.get("so8t.session_dir")
        return Path(tag) if tag and Path(tag).is_dir() else None

    def newest_checkpoint(self, kind: str) -> str | None:
        tracker = Tracker(self.client.tracking_uri)
        tracker.run_id = self.run_id
        names = sorted(n for n in tracker.list_checkpoints() if n.startswith(f"{kind}-step"))
        return names[-1] if names else None  # zero-padded steps sort as numbers

    def download(self, path: str, dest: Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, path, str(dest)))

    def metric_at(self, key: str, step: int) -> float | None:
        """The run's ``key`` logged at ``step`` (the evaluation of an exported state)."""
        points = self.client.get_metric_history(self.run_id, key)
        at = [m.value for m in points if m.step == step]
        return at[-1] if at else None


def registered_version(
    tracking_uri: str | None, name: str, alias: str | None, number: str | None
) -> tuple[str, str]:
    """(version, storage location of its files) of ``name``'s version ``number`` or the one
    ``alias`` points to; :class:`ConfigError` when the registry has no such version."""
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri, registry_uri=uri)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, number)
        return str(mv.version), client.get_model_version_download_uri(name, mv.version)
    except MlflowException as err:
        which = f"@{alias}" if alias else f"/{number}"
        raise ConfigError(
            f"models:/{name}{which} is not in the registry at {uri} ({err.error_code})"
        ) from None


def logged_model_of_run(tracking_uri: str | None, run_id: str) -> tuple[str, str, str] | None:
    """(run name, model id, storage location) of the newest MLflow model ``model`` that
    ``run_id`` logged; None when it logged none. :class:`ConfigError` for an unknown run."""
    run = RunArtifacts(tracking_uri, run_id).run
    logged = run_client(tracking_uri).search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    if not logged:
        return None
    return run.info.run_name or run_id, logged[0].model_id, logged[0].artifact_location


def download_folder(artifact_uri: str, dest: Path, tracking_uri: str | None) -> None:
    """The files at ``artifact_uri`` (a storage location, not ``models:/``, which MLflow
    would resolve against its process-wide registry) as folder ``dest``: complete or absent."""
    from mlflow.artifacts import download_artifacts

    from so8t_exp import fsutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fsutil.temp_sibling(dest)
    try:
        tmp.mkdir()
        local = download_artifacts(
            artifact_uri=artifact_uri,
            dst_path=str(tmp),
            tracking_uri=resolve_tracking_uri(tracking_uri),
        )
        fsutil.replace_dir(Path(local), dest)  # (a folder lands in tmp/<its name>)
    finally:
        fsutil.rmtree(tmp, ignore_errors=True)


def run_client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(resolve_tracking_uri(tracking_uri))


def log_pyfunc_model(
    tracking_uri: str | None, run_id: str, export_dir: Path, model_code: Path, runtime: Path
) -> str:
    """Log ``export_dir`` as the run's MLflow model (``model``); returns its URI."""
    import mlflow
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema(
            [
                ColSpec("string", "answer"),
                ColSpec("string", "safety_label"),
                ColSpec("double", "safety_confidence"),
            ]
        ),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )
    example = pd.DataFrame({"prompt": ["Is it safe to mix bleach and ammonia?"]})
    # Created here, in the run's experiment (Model.log alone would use the active or the
    # Default experiment); Model.log, not pyfunc.log_model: only it takes a run id.
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, MODEL_ARTIFACT, source_run_id=run_id)
    info = Model.log(
        None,
        mlflow.pyfunc,
        name=MODEL_ARTIFACT,
        run_id=run_id,
        python_model=str(model_code),
        artifacts={"hf_model": str(export_dir)},
        code_paths=[str(runtime)],
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
        model_id=logged.model_id,
    )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "pandas")]


def register_version(
    tracking_uri: str | None,
    name: str,
    model_uri: str,
    run_id: str,
    metric: tuple[str, float | None, str],
    alias: str | None,
    description: str = "",
) -> tuple[str, bool]:
    """Register ``model_uri`` as a new version of ``name``; move ``alias`` to it when its
    ``metric`` (key, value, ``min``/``max``) beats the current holder's (or there is none).
    Returns (version, whether the alias moved)."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="SO8T models exported by so8t_exp")
    key, value, mode = metric
    tags = {VERSION_METRIC_TAG + key: repr(value)} if value is not None else {}
    created = client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags, description=description
    )
    version = created.version
    if not alias:
        return version, False
    holder = _alias_holder(client, name, alias)
    held = _tag_value(holder, key) if holder else None
    better = holder is None or _better(value, held, mode)
    if better:
        client.set_registered_model_alias(name, alias, version)
    log.info(
        "registered %s version %s (%s=%s); alias %s %s",
        name,
        version,
        key,
        value,
        alias,
        "moved to it" if better else f"stays on version {holder.version} ({held})",
    )
    return version, better


def _alias_holder(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _tag_value(version, key: str) -> float | None:
    text = version.tags.get(VERSION_METRIC_TAG + key)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _better(value: float | None, held: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if held is None or not math.isfinite(held):
        return True
    return value < held if mode == "min" else value > held


def log_dataset_inputs(client: MlflowClient, run_id: str, files: dict[str, str]) -> None:
    """Record each data file as a dataset input of the run (digest: its sha256)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for path, sha in files.items():
        dataset = Dataset(
            name=os.path.basename(path),
            digest=sha[:36],
            source_type="local",
            source=Path(path).resolve().as_uri(),
            schema=None,
            profile=None,
        )
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", "training")]))
    client.log_inputs(run_id, datasets=inputs)
