"""Helpers shared by the benchmarks in ``bench/run.py``: configs, stores, machine, stats."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

import so8t_exp.config  # noqa: F401  (registers the train_schema / resume_schema nodes)
from so8t_exp.paths import config_dir, sqlite_uri


def quiet() -> None:
    """Keep library chatter (MLflow's DB creation, HF warnings) out of the table."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("mlflow", "alembic", "transformers", "so8t_exp", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_train(store: str, *overrides: str) -> DictConfig:
    """``conf/train.yaml`` composed with Hydra's compose API (as tests/conftest.py does)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"tracking.uri={store}", "trainer.progress_bar=false", *overrides],
        )


def new_store(folder: Path) -> str:
    """A sqlite MLflow store in ``folder``, its tables created now (so no benchmark pays for
    the schema migration)."""
    uri = sqlite_uri(folder / "mlruns" / "mlflow.db")
    (folder / "mlruns").mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def subprocess_env(home: Path) -> dict[str, str]:
    """Environment for ``python -m so8t_exp.*`` children: outputs under ``home``."""
    env = {**os.environ, "SO8T_EXP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def machine() -> dict[str, object]:
    import mlflow
    import transformers

    return {
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "mlflow": mlflow.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def steps_per_second(ends: Sequence[float]) -> float:
    """Steps/s over the window from the end of the first step to the end of the last one
    (the first step, with its warm-up, is left out). ``ends``: seconds, one per step."""
    return (len(ends) - 1) / (ends[-1] - ends[0])


def median_step(ends: Sequence[float]) -> float:
    """Median step duration (s): the noise-robust view, blind to periodic stalls."""
    return median([b - a for a, b in zip(ends, ends[1:], strict=False)])


def log(msg: str) -> None:
    """Progress lines go to stderr; stdout holds the table and the final JSON line."""
    print(msg, file=sys.stderr, flush=True)


class OtherLoad:
    """CPU the rest of the machine used meanwhile (in cores: all busy time, steal included,
    minus this process and its children), to read the figures against: the machine is
    shared."""

    def __enter__(self) -> OtherLoad:
        self._t, self._sys, self._own = time.monotonic(), _busy(), _own()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.monotonic() - self._t
        self.cores = max(0.0, (_busy() - self._sys) - (_own() - self._own)) / elapsed


def _busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def rotated_rounds(kinds: Sequence[str], rounds: int, budget_s: float):
    """``(i, kinds in this round's order)`` for up to ``rounds`` rounds, the order rotated
    each round (a, b, c; b, c, a; ...) so drift and position hit all alike; a round starts
    only while the previous one's duration still fits in ``budget_s``."""
    started = last = time.monotonic()
    for i in range(rounds):
        now = time.monotonic()
        if i and now - started + (now - last) > budget_s:
            return
        last = now
        k = i % len(kinds)
        yield i, [*kinds[k:], *kinds[:k]]
