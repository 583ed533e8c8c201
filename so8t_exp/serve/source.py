"""What ``serve.model`` names, as an exported model folder on this machine.

* ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a registered version, read
  from the registry of ``tracking.uri`` and downloaded once into
  ``<cache_dir>/<name>-<hash of registry and name>/<version>`` (complete or absent:
  downloaded beside it, then renamed; the source location recorded in it), so a restart
  or a second server on the machine does not download it again;
* a run id: that run's logged MLflow model (``model``, downloaded once into
  ``<cache_dir>/runs/<run id>/<model id>``), or, if it has none, its final checkpoint
  exported as ``python -m so8t_exp.export`` would;
* a folder: an export (``config.json``), an MLflow model (``MLmodel``), or a session
  folder (exported first).

The name and version go to ``/health`` and to every audit row.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from so8t_exp import fsutil
from so8t_exp.config import ConfigError
from so8t_exp.fsutil import atomic_write_json
from so8t_exp.lock import os_lock

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SOURCE_FILE = "so8t_source.json"  # in a cached download: where it came from


@dataclass
class ServedModel:
    folder: Path  # an exported Hugging Face folder with the safety head beside it
    name: str
    version: str
    uri: str  # what serve.model said


def resolve(spec: str, tracking_uri: str | None, cache_dir: str) -> ServedModel:
    """The exported folder ``spec`` names; :class:`ConfigError` when it names nothing."""
    cache = Path(cache_dir).expanduser()
    if spec.startswith("models:/"):
        return _registered(spec, tracking_uri, cache)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _folder(folder.resolve(), spec, tracking_uri)
    if _RUN_ID.match(spec):
        return _run(spec, tracking_uri, cache)
    raise ConfigError(
        f"serve.model={spec}: not models:/<name>@<alias>, models:/<name>/<version>, "
        "a run id or an existing folder"
    )


def _registered(spec: str, tracking_uri: str | None, cache: Path) -> ServedModel:
    from so8t_exp.tracking import models, resolve_tracking_uri

    name, alias, number = _parse_models_uri(spec)
    try:
        version, location = models.registered_version(tracking_uri, name, alias, number)
    except ConfigError as err:
        raise ConfigError(f"serve.model={spec}: {err}") from None
    registry = resolve_tracking_uri(tracking_uri)
    tag = hashlib.sha256(f"{registry}\0{name}".encode()).hexdigest()[:8]
    dest = _cached(cache / f"{_safe(name)}-{tag}" / version, location, tracking_uri)
    served = _folder(dest, spec, tracking_uri)
    return ServedModel(served.folder, name, version, spec)


def _run(run_id: str, tracking_uri: str | None, cache: Path) -> ServedModel:
    from so8t_exp.tracking import models

    logged = models.logged_model_of_run(tracking_uri, run_id)  # ConfigError: no such run
    if logged is None:  # export it, as python -m so8t_exp.export would
        served = _exported(run_id, tracking_uri)
        return ServedModel(served.folder, served.name, served.version, run_id)
    run_name, model_id, location = logged
    dest = _cached(cache / "runs" / run_id / model_id, location, tracking_uri)
    served = _folder(dest, run_id, tracking_uri)
    return ServedModel(served.folder, run_name, served.version, run_id)


def _cached(dest: Path, location: str, tracking_uri: str | None) -> Path:
    """``dest``, holding the files at ``location``: downloaded unless already there from
    that same location (a re-registered name reuses version numbers). One process
    downloads at a time; another waiting for it then finds the folder ready."""
    from so8t_exp.tracking import models

    marker = dest / SOURCE_FILE

    def ready() -> bool:
        try:
            return json.loads(marker.read_text(encoding="utf-8"))["location"] == location
        except (OSError, ValueError, KeyError, TypeError):
            return False

    if not ready():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with os_lock(dest.with_name(dest.name + ".lock")):
            fsutil.recover_aside(dest)  # what a crash in an earlier download left
            for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
                fsutil.rmtree(stale, ignore_errors=True)
            if not ready():
                models.download_folder(location, dest, tracking_uri)
                atomic_write_json(marker, {"location": location})
    return dest


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
