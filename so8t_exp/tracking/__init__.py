"""Everything MLflow: the only package that imports mlflow.

``core``: one run as the trainer sees it (params, tags, buffered metrics, artifacts, the
checkpoint mirror). ``runs``: many runs as the resume launcher and the sessions CLI see them.
"""

from so8t_exp.tracking.core import (
    HEARTBEAT_TAG,
    MetricBuffer,
    Tracker,
    flatten,
    mask_secrets,
    resolve_tracking_uri,
)

__all__ = [
    "HEARTBEAT_TAG",
    "MetricBuffer",
    "Tracker",
    "flatten",
    "mask_secrets",
    "resolve_tracking_uri",
]
