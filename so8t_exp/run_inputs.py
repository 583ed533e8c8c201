"""What a run records about its inputs: the params (the resolved config, each data file's
sha256, record counts and labels) and the data files as MLflow dataset inputs."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from so8t_exp import data
from so8t_exp.tracking import Tracker, flatten
from so8t_exp.tracking.models import log_dataset_inputs


def run_params(cfg: DictConfig, fingerprint: dict, dataset: data.Dataset) -> dict:
    config = flatten(OmegaConf.to_container(cfg, resolve=True))
    sha = {k: v for k, v in fingerprint.items() if k.startswith("data.files_sha256")}
    return {
        **config,
        **sha,
        "data.train_records": len(dataset.train),
        "data.val_records": len(dataset.val),
        "data.skipped_records": dataset.skipped,
        # what the head's eval metrics are read against (the majority-class baseline)
        "data.val_labels": data.label_counts(dataset.val),
    }


def record_inputs(
    tracker: Tracker, cfg: DictConfig, fingerprint: dict, dataset: data.Dataset, new_run: bool
) -> None:
    """Log the params; on a new run, the data files as dataset inputs (digest: sha256)."""
    tracker.safely("log params", tracker.log_params, run_params(cfg, fingerprint, dataset))
    if new_run:
        files = cfg.data.files
        sha = {f: fingerprint[f"data.files_sha256.{i}"] for i, f in enumerate(files)}
        tracker.safely("log datasets", log_dataset_inputs, tracker.client, tracker.run_id, sha)
