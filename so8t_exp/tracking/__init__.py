"""Everything MLflow: the only package that imports mlflow.

``core``: one run as the trainer sees it (params, tags, buffered metrics, artifacts, the
checkpoint mirror). ``runs``: many runs as the resume launcher and the sessions CLI see them.
``describe``/``run_page``: a run's name, description and provenance; ``sweep``: the parent
run of a Hydra multirun. ``masking``: which values are secrets.
"""

from so8t_exp.tracking.core import (
    HEARTBEAT_TAG,
    MetricBuffer,
    Tracker,
    flatten,
    resolve_tracking_uri,
)
from so8t_exp.tracking.masking import mask_override, mask_secrets

__all__ = [
    "HEARTBEAT_TAG",
    "MetricBuffer",
    "Tracker",
    "flatten",
    "mask_override",
    "mask_secrets",
    "resolve_tracking_uri",
]
