"""The few things so8t_exp needs from MLflow beyond its documented client API, one function
each, so that an MLflow upgrade that changes one breaks one place and one test
(tests/test_mlflow_internals.py), loudly, instead of a training run.

- :func:`latest_steps`: the highest step of every metric of a run in one call.
- :func:`artifact_repository`: a run's artifact store, for deleting checkpoints (the client
  has no delete) and for uploading without a ``get_run`` per file.
- :func:`local_artifact_dir`: where a local store keeps a run's artifacts, so checkpoint
  files can be hard-linked there instead of copied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.tracking import MlflowClient


def latest_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The highest step logged for each metric key of ``run_id``.

    ``get_run`` already carries each key's latest point, step included, but ``RunData``
    shows only its value; its documented ``to_proto()`` (the REST API's ``RunData``, whose
    ``Metric`` has a ``step``) has the step. The public alternative, a ``get_metric_history``
    per key, reads every point ever logged: minutes for a long run's resume.
    MLflow's "latest" point is the one with the highest step (then timestamp, then value).
    """
    data = client.get_run(run_id).data
    return {m.key: int(m.step) for m in data.to_proto().metrics}


def artifact_repository(artifact_uri: str, tracking_uri: str) -> Any:
    """The artifact repository (MLflow's plugin interface: ``log_artifact(s)``,
    ``list_artifacts``, ``download_artifacts``, ``delete_artifacts``) behind
    ``artifact_uri`` (a run's ``info.artifact_uri``).

    Private: ``get_artifact_repository`` is MLflow's internal registry. The client's own
    artifact calls resolve the same object (and cache it since MLflow 2.x), but the client
    cannot delete artifacts, which checkpoint retention needs."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder that holds the artifacts at ``artifact_uri`` when it is on this machine's
    file system (a ``file:`` URI or a plain path), else None.

    Relies on MLflow's local store keeping artifact ``a/b`` as the file ``<folder>/a/b``:
    a file placed there is an artifact, without MLflow reading or copying it."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        remote = parsed.netloc not in ("", "localhost")  # file://server/share: UNC
        return Path(url2pathname(f"//{parsed.netloc}{parsed.path}" if remote else parsed.path))
    if not parsed.scheme or (os.name == "nt" and len(parsed.scheme) == 1):  # C:\...
        return Path(artifact_uri)
    return None
