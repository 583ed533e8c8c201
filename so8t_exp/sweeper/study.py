"""The Optuna study of a sweep: storage, per-trial samplers, pruner, and the lock that
keeps one sweeper per study."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import TPESampler

from so8t_exp.lock import SessionLock, SessionLocked, hold
from so8t_exp.paths import storage_url
from so8t_exp.sweeper.space import SearchSpace

log = logging.getLogger(__name__)

# What a resumed study must agree on with the one that started it (user attributes).
SPACE, SEED, OBJECTIVE, DIRECTION, FOLDER, VERSION = (
    "so8t.space",
    "so8t.seed",
    "so8t.objective",
    "so8t.direction",
    "so8t.sweep_dir",
    "so8t.optuna",
)


class SweepBusy(RuntimeError):
    """Another sweeper is running this study."""


def lock_sweep(sweep_dir: Path) -> SessionLock:
    """The lock of the sweep folder (a session folder's lock, so the resume launcher and
    ``sessions`` see a live sweeper the way they see a live trainer), held until the sweep
    ends or the process dies: two sweepers on one study would ask for the same trials."""
    try:
        return hold(sweep_dir, "sweep")  # (taken already by the sweep's callback)
    except SessionLocked as err:
        raise SweepBusy(f"another sweeper is running this sweep: {err}") from None


def sampler_for(seed: int, number: int, kwargs: dict[str, Any]) -> TPESampler:
    """A fresh TPE sampler for trial ``number``. TPE keeps its RNG in memory only, so one
    sampler per process would draw other values after a restart; seeded per trial number,
    a trial's values depend only on the seed, its number and the finished trials."""
    return TPESampler(seed=seed + number, **kwargs)


def build_pruner(kwargs: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """MedianPruner(**kwargs); NopPruner without kwargs. Optuna does not store the pruner:
    every process rebuilds it from the config."""
    if kwargs is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(**kwargs)


def open_study(sweeper, space: SearchSpace, sweep_dir: Path) -> optuna.Study:
    """Create the study, or load it; refuse to continue a study with another search space,
    seed, objective or direction (its trials would not be comparable), or in another sweep
    folder (trial N is folder N: two folders would train one trial twice, and the folder's
    lock would not keep a second sweeper out)."""
    study = optuna.create_study(
        study_name=sweeper.study_name,
        storage=storage_url(sweeper.storage),
        direction=sweeper.direction,
        sampler=sampler_for(sweeper.seed, 0, sweeper.sampler_kwargs),
        pruner=build_pruner(sweeper.pruner_kwargs),
        load_if_exists=True,
    )
    want = {
        SPACE: space.fingerprint(),
        SEED: sweeper.seed,
        OBJECTIVE: sweeper.objective,
        DIRECTION: sweeper.direction,
        FOLDER: sweep_dir.as_posix(),
    }
    have = study.user_attrs
    changed = [k for k, v in want.items() if k in have and have[k] != v]
    if changed:
        raise ValueError(
            f"study {sweeper.study_name} was started with other settings ({', '.join(changed)}): "
            "use a new hydra.sweeper.study_name"
        )
    if have.get(VERSION, optuna.__version__) != optuna.__version__:
        log.warning(
            "study %s was started with optuna %s, this is %s: new trials may differ",
            sweeper.study_name,
            have[VERSION],
            optuna.__version__,
        )
    for key, value in {**want, VERSION: have.get(VERSION, optuna.__version__)}.items():
        if key not in have:
            study.set_user_attr(key, value)
    return study
