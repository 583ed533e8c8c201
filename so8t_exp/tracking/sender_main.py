"""The metric sender process: ``python -m so8t_exp.tracking.sender_main``.

A trainer's metric thread (:class:`so8t_exp.tracking.metrics.MetricBuffer`) hands each
batch of metric points (and the tags riding along) here, and this process makes the
``log_batch`` call: MLflow's client and SQLAlchemy are Python work that would otherwise take
the training thread's GIL at every flush. Each job names its tracking URI and run; the
answer comes once the store has the batch, or says why not (the trainer keeps the points and
tries again). How it starts, ignores stop signals and ends: :mod:`so8t_exp.line_worker`.
"""

from __future__ import annotations

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from so8t_exp.line_worker import serve


def main() -> None:
    clients: dict[str, MlflowClient] = {}

    def send(job: dict) -> dict:
        uri = job["uri"]
        client = clients.get(uri) or clients.setdefault(uri, MlflowClient(tracking_uri=uri))
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in job["metrics"]]
        tags = [RunTag(k, v) for k, v in job["tags"].items()]
        client.log_batch(job["run_id"], metrics=metrics, tags=tags)
        return {}

    serve(send)


if __name__ == "__main__":
    main()
