"""Each use of MLflow beyond its documented client API (so8t_exp.tracking.mlflow_internals),
checked against MLflow's public API on a real sqlite store: when an MLflow upgrade changes
one, its test here fails and says which."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from so8t_exp.tracking import mlflow_internals
from so8t_exp.tracking.core import Tracker


@pytest.fixture
def run(store: str) -> tuple[MlflowClient, str]:
    tracker = Tracker(store)  # its experiment keeps artifacts beside the database
    tracker.start("internals", "run")
    tracker.metrics.close()
    return tracker.client, tracker.run_id


def _history_max(client: MlflowClient, run_id: str) -> dict[str, int]:
    keys = client.get_run(run_id).data.metrics
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def test_latest_steps_match_the_metric_history(run) -> None:
    client, run_id = run
    assert mlflow_internals.latest_steps(client, run_id) == {}
    points = [Metric("a", float(s), 1000 + s, s) for s in range(6)]
    # Out of order and with a later timestamp at a lower step: the answer is still the
    # highest step, as the public (slow) history says.
    points += [Metric("a", 9.0, 5000, 3), Metric("b/c", 1.0, 10, 7), Metric("b/c", 2.0, 20, 2)]
    client.log_batch(run_id, metrics=points)
    fast = mlflow_internals.latest_steps(client, run_id)
    assert fast == {"a": 5, "b/c": 7}, (
        "MLflow changed what RunData.to_proto().metrics carries: Tracker.logged_steps "
        "(resuming a run without logging any step twice) needs another way"
    )
    assert fast == _history_max(client, run_id)


def test_artifact_repository_does_what_the_tracker_asks(run, tmp_path: Path) -> None:
    client, run_id = run
    uri = client.get_run(run_id).info.artifact_uri
    repo = mlflow_internals.artifact_repository(uri, client.tracking_uri)
    assert repo.artifact_uri == uri  # Tracker._upload reads it
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(b"x")
    repo.log_artifacts(str(src), "checkpoints/one")
    repo.log_artifact(str(src / "x.bin"), "checkpoints/two")
    listed = repo.list_artifacts("checkpoints")
    assert sorted((e.path, e.is_dir) for e in listed) == [
        ("checkpoints/one", True),
        ("checkpoints/two", True),
    ]
    (tmp_path / "dl").mkdir()
    got = repo.download_artifacts("checkpoints/one", str(tmp_path / "dl"))
    assert (Path(got) / "x.bin").read_bytes() == b"x"
    repo.delete_artifacts("checkpoints/one")
    public = [e.path for e in client.list_artifacts(run_id, "checkpoints")]
    assert public == ["checkpoints/two"], "the repository and the client disagree"


def test_a_file_linked_into_the_local_artifact_dir_is_an_artifact(run, tmp_path: Path) -> None:
    client, run_id = run
    uri = client.get_run(run_id).info.artifact_uri
    folder = mlflow_internals.local_artifact_dir(uri)
    assert folder is not None, f"{uri!r} is local but not recognised as such"
    (folder / "checkpoints" / "c").mkdir(parents=True)
    os.link(_file(tmp_path, b"weights"), folder / "checkpoints" / "c" / "w.bin")
    assert [e.path for e in client.list_artifacts(run_id, "checkpoints/c")] == [
        "checkpoints/c/w.bin"
    ], "MLflow's local store no longer keeps artifact a/b as <artifact dir>/a/b"
    got = client.download_artifacts(run_id, "checkpoints/c/w.bin", str(tmp_path / "dl"))
    assert Path(got).read_bytes() == b"weights"


def _file(folder: Path, data: bytes) -> Path:
    path = folder / "w.bin"
    path.write_bytes(data)
    return path


_LOCAL = Path("/tmp/a b%/artifacts").resolve()  # a space and a percent sign, URI-quoted


@pytest.mark.parametrize(
    ("uri", "folder"),
    [
        ("mlflow-artifacts:/1/abc/artifacts", None),
        ("s3://bucket/1/abc/artifacts", None),
        ("http://host:5000/api/2.0/mlflow-artifacts/artifacts/1", None),
        (_LOCAL.as_uri(), _LOCAL),
        (str(_LOCAL), _LOCAL),
    ],
)
def test_local_artifact_dir_only_for_local_uris(uri: str, folder: Path | None) -> None:
    assert mlflow_internals.local_artifact_dir(uri) == folder
