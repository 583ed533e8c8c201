"""The Hydra side of so8t_exp's resumable Optuna sweeper: its config and a thin class.

Hydra imports every module under ``hydra_plugins`` at *every* start (single runs and the
resume launcher too), so this module imports only hydra and dataclasses; optuna, mlflow
and torch load inside :meth:`So8tOptunaSweeper.sweep`, from :mod:`so8t_exp.sweeper`.
The class has to be defined here: Hydra refuses plugin classes outside ``hydra_plugins``.
No ``from __future__ import annotations``: Hydra executes this module without entering it
in ``sys.modules``, and the dataclass machinery (and OmegaConf) need real annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class So8tOptunaSweeperConf:
    """``hydra.sweeper`` of ``conf/hparams_search/*.yaml``."""

    _target_: str = "hydra_plugins.so8t_sweeper.so8t_sweeper.So8tOptunaSweeper"
    study_name: str = MISSING
    # null: sqlite beside the default MLflow store (<project>/mlruns/optuna.db)
    storage: str | None = None
    direction: str = "minimize"  # or maximize
    # An eval metric key (eval/loss, ...) or "so8t" (REFUSE recall + macro-F1 - ECE)
    objective: str = "eval/loss"
    n_trials: int = 10
    seed: int = 0  # trial N samples with TPESampler(seed=seed + N): resumable, reproducible
    # TPESampler kwargs (plain values, no _target_: a fresh sampler is built per trial)
    sampler: dict[str, Any] = field(default_factory=dict)
    # MedianPruner kwargs; null: no pruning
    pruner: dict[str, Any] | None = None
    max_failures: int = 0  # failed trials allowed before the sweep stops
    # Trials at once, each in its own child process (1: one at a time, in this process;
    # only then are the parameters reproducible: see README "Sweeps")
    n_jobs: int = 1
    params: dict[str, str] | None = None  # "trainer.optimizer.lr": "tag(log, interval(...))"


ConfigStore.instance().store(
    group="hydra/sweeper", name="so8t_optuna", node=So8tOptunaSweeperConf, provider="so8t_exp"
)


class So8tOptunaSweeper(Sweeper):
    """Stores its settings; the sweep itself is :func:`so8t_exp.sweeper.run_sweep`."""

    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        objective: str,
        n_trials: int,
        seed: int,
        sampler: dict[str, Any],
        pruner: dict[str, Any] | None,
        max_failures: int,
        params: dict[str, str] | None,
        n_jobs: int = 1,
    ) -> None:
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.objective, self.n_trials, self.seed = objective, n_trials, seed
        self.sampler_kwargs = dict(sampler or {})
        self.pruner_kwargs = None if pruner is None else dict(pruner)
        self.max_failures = max_failures
        if n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs must be at least 1, not {n_jobs}")
        self.n_jobs = n_jobs
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from so8t_exp.sweeper import run_sweep  # optuna loads with a sweep only

        return run_sweep(self, arguments)
