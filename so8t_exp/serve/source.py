"""What ``serve.model`` names, as an exported model folder on this machine.

* ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a registered version, read
  from the registry of ``tracking.uri`` and downloaded once into
  ``<cache_dir>/<name>/<version>`` (complete or absent: downloaded beside it, then
  renamed), so a restart or a second server on the machine does not download it again;
* a run id: that run's logged MLflow model (``model``), or, if it has none, its final
  checkpoint exported as ``python -m so8t_exp.export`` would;
* a folder: an export (``config.json``), an MLflow model (``MLmodel``), or a session
  folder (exported first).

The name and version go to ``/health`` and to every audit row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from so8t_exp import fsutil
from so8t_exp.config import ConfigError

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_MODEL_ARTIFACT = "model"  # so8t_exp.tracking.models.MODEL_ARTIFACT


@dataclass
class ServedModel:
    folder: Path  # an exported Hugging Face folder with the safety head beside it
    name: str
    version: str
    uri: str  # what serve.model said


def resolve(spec: str, tracking_uri: str | None, cache_dir: str) -> ServedModel:
    """The exported folder ``spec`` names; :class:`ConfigError` when it names nothing."""
    if spec.startswith("models:/"):
        return _registered(spec, tracking_uri, Path(cache_dir).expanduser())
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _folder(folder.resolve(), spec, tracking_uri)
    if _RUN_ID.match(spec):
        return _run(spec, tracking_uri)
    raise ConfigError(
        f"serve.model={spec}: not models:/<name>@<alias>, models:/<name>/<version>, "
        "a run id or an existing folder"
    )


def _registered(spec: str, tracking_uri: str | None, cache: Path) -> ServedModel:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from so8t_exp.tracking.core import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    name, alias, number = _parse_models_uri(spec)
    client = MlflowClient(uri, registry_uri=uri)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, number)
        )
    except MlflowException as err:
        raise ConfigError(
            f"serve.model={spec}: not in the registry at {uri} ({err.error_code})"
        ) from None
    dest = cache / _safe(name) / str(mv.version)
    if not (dest / "MLmodel").is_file():
        _download(client.get_model_version_download_uri(name, mv.version), dest, uri)
    served = _folder(dest, spec, tracking_uri)
    return ServedModel(served.folder, name, str(mv.version), spec)


def _download(artifact_uri: str, dest: Path, tracking_uri: str) -> None:
    """``artifact_uri``'s files into ``dest``. Given the storage location itself, not a
    ``models:/`` URI, which MLflow would resolve against its process-wide registry URI."""
    from mlflow.artifacts import download_artifacts

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fsutil.temp_sibling(dest)
    try:
        tmp.mkdir()
        local = download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=tracking_uri
        )
        fsutil.replace_dir(Path(local), dest)  # (a folder lands in tmp/<its name>)
    finally:
        fsutil.rmtree(tmp, ignore_errors=True)


def _run(run_id: str, tracking_uri: str | None) -> ServedModel:
    from mlflow.tracking import MlflowClient

    from so8t_exp.tracking.core import resolve_tracking_uri
    from so8t_exp.tracking.models import RunArtifacts

    uri = resolve_tracking_uri(tracking_uri)
    run = RunArtifacts(uri, run_id).run  # ConfigError for an unknown run
    client = MlflowClient(uri)
    logged = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{_MODEL_ARTIFACT}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    if logged:
        from so8t_exp.paths import project_root

        dest = project_root() / "cache" / "runs" / run_id / logged[0].model_id
        if not (dest / "MLmodel").is_file():
            _download(logged[0].artifact_location, dest, uri)
        served = _folder(dest, run_id, uri)
    else:
        served = _exported(run_id, uri)
    return ServedModel(served.folder, run.info.run_name or run_id, served.version, run_id)


def _folder(folder: Path, spec: str, tracking_uri: str | None) -> ServedModel:
    if (folder / "MLmodel").is_file():
        folder = _hf_model_of(folder)
    elif (folder / "checkpoints").is_dir() and not (folder / "config.json").is_file():
        return _exported(str(folder), tracking_uri)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"serve.model={spec}: {folder} holds no exported model (config.json)")
    info_file = folder / "so8t_export.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    version = info.get("checkpoint") or "unknown"
    if info.get("run_id"):
        version = f"{info['run_id'][:8]}/{version}"
    return ServedModel(folder, folder.name, version, spec)


def _hf_model_of(mlmodel_dir: Path) -> Path:
    """The exported folder inside an MLflow pyfunc model (its ``hf_model`` artifact)."""
    spec = yaml.safe_load((mlmodel_dir / "MLmodel").read_text(encoding="utf-8"))
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    path = artifacts.get("hf_model", {}).get("path")
    if not path:
        raise ConfigError(f"{mlmodel_dir}: an MLflow model, but not one so8t_exp exported")
    return mlmodel_dir / path


def _exported(source: str, tracking_uri: str | None) -> ServedModel:
    from so8t_exp.config import ExportConfig
    from so8t_exp.export.pipeline import run_export

    result = run_export(ExportConfig(source=source, log_model=False), tracking_uri)
    return _folder(result.folder, source, tracking_uri)


def _parse_models_uri(spec: str) -> tuple[str, str | None, str | None]:
    rest = spec.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    name, _, number = rest.rpartition("/")
    if not name or not number.isdigit():
        raise ConfigError(f"serve.model={spec}: models:/<name>@<alias> or models:/<name>/<n>")
    return name, None, number


def _safe(name: str) -> str:
    """A registered name as one folder name on any OS (no ``:`` ``/`` ``\\`` …)."""
    return re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", name).strip(" .") or "_"
