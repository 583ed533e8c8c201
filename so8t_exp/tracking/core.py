"""Everything MLflow: runs, params, tags, artifacts and buffered metrics.

The only module that imports mlflow. It uses ``MlflowClient`` with explicit run ids (never
the fluent "active run"), so a failed multirun job cannot leave state that breaks the next.
After the run is open, no tracking failure is allowed to stop training: calls are retried
or logged and dropped, and metrics wait in the buffer until the server is back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from so8t_exp import fsutil
from so8t_exp.fsutil import link_or_copy
from so8t_exp.host import host_id
from so8t_exp.line_worker import LineWorker, WorkerUnavailable
from so8t_exp.paths import default_tracking_uri
from so8t_exp.tracking import mlflow_internals
from so8t_exp.tracking.describe import git_commit
from so8t_exp.tracking.errors import bound_http_retries, check_store, run_must_exist
from so8t_exp.tracking.fencing import Lease
from so8t_exp.tracking.masking import mask_secrets
from so8t_exp.tracking.metrics import MetricBuffer, retry, startup_timeout

log = logging.getLogger(__name__)

_MAX_PARAMS = 100  # ... and of params
CHECKPOINT_ARTIFACTS = "checkpoints"
HEARTBEAT_TAG = "so8t.heartbeat"


def iso(epoch: float) -> str:
    """``epoch`` as an ISO-8601 UTC time: the readable twin of a raw epoch tag."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def resolve_tracking_uri(uri: str | None) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else sqlite under ``<project>/mlruns``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole values."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _artifact_location(uri: str) -> str | None:
    # Keep artifacts beside a local sqlite database (as a file URI, which works on Windows);
    # a tracking server chooses its own.
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


class Tracker:
    """One MLflow run: create or re-attach, then log to it by id."""

    def __init__(
        self,
        uri: str | None,
        flush_interval: float = 2.0,
        startup_seconds: float | None = None,
        metrics_process: bool = False,
    ) -> None:
        """``startup_seconds``: how long :meth:`start` retries an unreachable store
        (default: this process's ``tracking.startup_timeout_seconds``). A local sqlite
        store that cannot be used raises :class:`TrackingUnavailable` here, at once.
        ``metrics_process``: metric batches are sent by a helper process
        (:mod:`so8t_exp.tracking.sender_main`), off this process's GIL."""
        bound_http_retries()  # (in os.environ: the sender process inherits them)
        self.uri = resolve_tracking_uri(uri)
        check_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.flush_interval = flush_interval
        self.startup_seconds = startup_timeout() if startup_seconds is None else startup_seconds
        self.run_id: str | None = None
        self._repos: dict[str, Any] = {}  # run id -> its artifact repository
        self.metrics: MetricBuffer | None = None
        self.lease: Lease | None = None  # set once this process has claimed the run
        self._sender = LineWorker("so8t_exp.tracking.sender_main") if metrics_process else None

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # MLflow 3's UI files it under "Machine learning" (its runs table), not "GenAI apps".
        kind = {"mlflow.experimentKind": "custom_model_development"}
        return self.client.create_experiment(
            name, artifact_location=_artifact_location(self.uri), tags=kind
        )

    def start(
        self,
        experiment: str,
        run_name: str | Callable[[str], str] | None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Open a new run, or re-attach to ``run_id`` (its status goes back to RUNNING).
        ``run_name`` may be a function of the experiment id (to make it unique there);
        ``tags`` are set when the run is created (``mlflow.user`` only counts then).
        At boot the tracking server may not be up yet: tries for ``startup_seconds``, then
        raises :class:`TrackingUnavailable`; a ``run_id`` the store does not have raises
        :class:`RunNotFound` at once."""
        return retry(
            "start the run", self.startup_seconds, self._start, experiment, run_name, run_id, tags
        )

    def _start(self, experiment: str, run_name, run_id: str | None, tags) -> str:
        if run_id is None:
            exp_id = self.experiment_id(experiment)
            name = run_name(exp_id) if callable(run_name) else run_name
            run = self.client.create_run(exp_id, run_name=name, tags=dict(tags or {}))
            self.run_id, logged = run.info.run_id, {}
        else:
            self.run_id = run_id
            with run_must_exist(run_id, self.uri):
                self.client.update_run(run_id, status="RUNNING")
            logged = self.logged_steps()
        self.metrics = MetricBuffer(self._send_metrics, self.flush_interval, logged)
        return self.run_id

    def find_session_run(self, experiment: str, session_dir: Path) -> str | None:
        """The newest run recorded for ``session_dir`` (its folder may have been lost):
        its id, ``"FINISHED"`` if that run is finished, or None. Retried like :meth:`start`."""
        path = str(session_dir.resolve()).replace("'", "\\'")

        def find() -> str | None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                return None
            runs = self.client.search_runs(
                [exp.experiment_id],
                f"tags.`so8t.session_dir` = '{path}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if not runs:
                return None
            return "FINISHED" if runs[0].info.status == "FINISHED" else runs[0].info.run_id

        return retry("look up the session's run", self.startup_seconds, find)

    def logged_steps(self) -> dict[str, int]:
        """The highest step already logged for each metric key of this run (one ``get_run``:
        a history read per key would cost minutes on a long run)."""
        return mlflow_internals.latest_steps(self.client, self.run_id)

    def may_write(self) -> bool:
        """Whether this process may write to its run now (see :mod:`.fencing`): always
        before it has claimed the run, then only while its lease is confirmed."""
        return self.lease is None or self.lease.writable() or self.lease.renew()

    def _write(self, what: str, fn: Callable, *args, **kwargs) -> bool:
        """A write to the run: fenced by the lease, then like :meth:`safely`."""
        if not self.may_write():
            log.debug("MLflow: not writing (%s): lease not confirmed or fenced", what)
            return False
        return self.safely(what, fn, *args, **kwargs)

    def _send_metrics(self, batch: list, tags: Mapping[str, str]) -> None:
        if not self.may_write():  # (the buffer keeps the points until the lease is back)
            fenced = self.lease.fenced
            raise RuntimeError(
                "another process owns the run now"
                if fenced
                else "lease not confirmed (tracking server unreachable?)"
            )
        if self._sender is not None:
            rows = [[m.key, m.value, m.timestamp, m.step] for m in batch]
            job = {"uri": self.uri, "run_id": self.run_id, "metrics": rows, "tags": dict(tags)}
            try:
                self._sender.call(job)  # (WorkerFailed: the buffer keeps the points)
                return
            except WorkerUnavailable as err:
                log.warning("%s; metrics are sent from this process from now on", err)
                self._sender = None
        self.client.log_batch(
            self.run_id, metrics=batch, tags=[RunTag(k, v) for k, v in tags.items()]
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.may_write():
            return
        masked = mask_secrets(params)
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in masked.items() if k not in existing]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        self._write("set tags", self.client.log_batch, self.run_id, tags=items)

    def standard_tags(self, session_dir: Path) -> dict[str, Any]:
        return {
            "mlflow.source.git.commit": git_commit(),
            "so8t.host": host_id(),
            "so8t.pid": os.getpid(),
            "so8t.session_dir": str(session_dir.resolve()),
        }

    def heartbeat(self, step: int | None = None) -> None:
        """Liveness for launchers on other hosts: a timestamp, host, PID and step as tags."""
        now = time.time()
        self.set_tags(
            {
                HEARTBEAT_TAG: f"{now:.3f}",  # raw epoch: what launchers compare
                HEARTBEAT_TAG + "_iso": iso(now),
                "so8t.step": step,
                "so8t.host": host_id(),
                "so8t.pid": os.getpid(),
            }
        )

    def mirrored_step(self, run_id: str) -> int:
        """The step of the run's newest checkpoint in MLflow, by its tags (0: none)."""
        with run_must_exist(run_id, self.uri):
            run = retry("read the run", self.startup_seconds, self.client.get_run, run_id)
        return int(float(run.data.tags.get("so8t.checkpoint.latest_step", 0) or 0))

    def checkpoint_mirrored(self, name: str, step: int) -> None:
        """The newest checkpoint in MLflow, as tags (raw epoch for launchers, ISO for people),
        sent at once with the metric points pending (one call): the checkpoint listing
        itself is what resuming trusts."""
        now = time.time()
        tags = {
            "so8t.checkpoint.latest": name,
            "so8t.checkpoint.latest_step": step,
            "so8t.checkpoint.latest_time": f"{now:.3f}",
            "so8t.checkpoint.latest_time_iso": iso(now),
        }
        if self.metrics is not None:
            self.metrics.add_tags(tags)
        else:
            self.set_tags(tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.metrics is not None:
            self.metrics.add(metrics, step)

    def unsent_metrics(self) -> list[list]:
        return self.metrics.unsent() if self.metrics else []

    def requeue_metrics(self, rows: list[list]) -> None:
        if self.metrics is not None:
            self.metrics.add_unsent(rows)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> bool:
        return self._write(
            f"upload {local_dir}",
            lambda: self._artifact_repo().log_artifacts(str(local_dir), artifact_path),
        )

    # -- checkpoint mirror (used by so8t_exp.checkpoint.Checkpointer) --------------------
    def upload_checkpoint(self, folder: Path) -> bool:
        """Upload under ``checkpoints/<name>/``, manifest last: a cut-short upload has no
        manifest (or mismatching files) and never verifies."""
        dest = f"{CHECKPOINT_ARTIFACTS}/{folder.name}"
        files = sorted(folder.iterdir(), key=lambda p: p.name == "manifest.json")
        return all(self._write(f"upload {p.name}", self._upload, p, dest) for p in files)

    def _upload(self, path: Path, dest: str) -> None:
        repo = self._artifact_repo()
        folder = mlflow_internals.local_artifact_dir(repo.artifact_uri)
        if folder is not None:
            # Same machine: a hard link costs no disk and no copy, and skips the path checks
            # MLflow makes per file — Python work that would hold the GIL the training
            # thread needs (checkpoint files are never changed in place, so sharing is safe).
            link_or_copy(path, folder / dest / path.name)
        else:
            repo.log_artifact(str(path), dest)

    def _artifact_repo(self):
        """The run's artifact repository, resolved once per run: going through the client
        costs a ``get_run`` per call, which loads the whole run (every param, tag and latest
        metric) — most of the mirror thread's time, and GIL the training thread waits for."""
        repo = self._repos.get(self.run_id)
        if repo is None:
            uri = self.client.get_run(self.run_id).info.artifact_uri
            repo = mlflow_internals.artifact_repository(uri, self.client.tracking_uri)
            self._repos[self.run_id] = repo
        return repo

    def delete_checkpoint(self, name: str) -> bool:
        return self._write(
            f"delete checkpoint {name}",
            lambda: self._artifact_repo().delete_artifacts(f"{CHECKPOINT_ARTIFACTS}/{name}"),
        )

    def list_checkpoints(self) -> list[str]:
        try:
            entries = self._artifact_repo().list_artifacts(CHECKPOINT_ARTIFACTS)
        except Exception as err:
            log.warning("MLflow: could not list checkpoints: %s", err)
            return []
        return [e.path.rsplit("/", 1)[-1] for e in entries if e.is_dir]

    def download_checkpoint(self, name: str, dest: Path) -> bool:
        """Materialise artifact folder ``checkpoints/<name>`` as ``dest``."""
        staging = dest.parent / f"{dest.name}.download"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            got = self._artifact_repo().download_artifacts(
                f"{CHECKPOINT_ARTIFACTS}/{name}", str(staging)
            )
            fsutil.replace(Path(got), dest)  # retried while Windows refuses it for a moment
            return True
        except Exception as err:
            log.warning("MLflow: could not download checkpoint %s: %s", name, err)
            return False

    def finish(self, status: str, retry_seconds: float = 60.0, step: int | None = None) -> bool:
        """Flush metrics and close the run as FINISHED, FAILED or KILLED, retrying while the
        tracking server is unreachable (a clean exit must not leave the run RUNNING).
        ``step``: the last step, left in ``so8t.step``. False if the status could not be set."""
        if step is not None:
            self.set_tags({"so8t.step": step})
        if self.metrics is not None:
            self.metrics.close()
            if self.metrics.dropped_on_close:
                log.error("%d metric points could not be sent", self.metrics.dropped_on_close)
        self.close_sender()
        assert status in ("FINISHED", "FAILED", "KILLED")
        deadline = time.monotonic() + retry_seconds
        while not self._write("end run", self.client.set_terminated, self.run_id, status):
            if time.monotonic() > deadline or (self.lease and self.lease.fenced):
                log.error("run %s could not be marked %s", self.run_id, status)
                return False
            time.sleep(2.0)
        return True

    def close_sender(self) -> None:
        """End the metric sender process, if one runs (a later batch starts it again)."""
        if self._sender is not None:
            self._sender.close()

    @staticmethod
    def safely(what: str, fn: Callable, *args, **kwargs) -> bool:
        """Call ``fn``; on failure log a warning and go on (tracking never stops training)."""
        try:
            fn(*args, **kwargs)
        except Exception as err:
            log.warning("MLflow: could not %s: %s", what, err)
            return False
        return True


# Before any MlflowClient exists: every module that makes one imports this one.
bound_http_retries()
