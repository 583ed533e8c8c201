"""Hydra sweep syntax to Optuna distributions, and trial values back to Hydra overrides.

Adapted from hydra-optuna-sweeper's ``_impl.py`` (Copyright (c) Facebook, Inc. and its
affiliates; MIT), with the fixes Hydra 1.3.8's parser needs: ``interval`` always gives
floats (``int(interval(a, b))`` is the way to an integer), ``range`` excludes its stop,
and values are quoted so strings with commas, spaces, quotes or ``null`` round-trip.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)


@dataclass
class SearchSpace:
    """The sweep's arguments split: what Optuna samples, and what every trial gets as is."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)  # overrides passed to every job verbatim

    def fingerprint(self) -> str:
        """Changes when the search space does (a resumed study must not change it)."""
        text = json.dumps(
            {k: distribution_to_json(d) for k, d in sorted(self.distributions.items())}
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """One trial's job overrides: its sampled values, then the fixed ones."""
        return [f"{k}={hydra_value(v)}" for k, v in params.items()] + self.fixed


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (``choice``, ``range``, ``interval``)."""
    value = override.value()
    if override.is_choice_sweep():
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode))
        )
    if override.is_range_sweep():
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if value.shuffle or not values:
            return CategoricalDistribution(values)
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            # Hydra's range excludes stop; Optuna's high is inclusive: the last element.
            return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
        return IntDistribution(int(values[0]), int(values[-1]), step=int(value.step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ValueError(f"{override.input_line}: not a sweep the Optuna sweeper supports")


def search_space(params: dict[str, str], arguments: list[str]) -> SearchSpace:
    """``hydra.sweeper.params`` then the command line's arguments (the command line wins on
    a key); non-sweep arguments such as ``hparams_search=so8t`` go to every job, because
    Hydra recomposes each job from the primary config and that job's overrides only."""
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    space, fixed = SearchSpace(), {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            fixed.pop(key, None)
            space.distributions[key] = distribution(override)
        else:
            space.distributions.pop(key, None)
            fixed[key] = override.input_line
    space.fixed = list(fixed.values())
    return space


def hydra_value(v: Any) -> str:
    """A value as a Hydra override's right-hand side that parses back to exactly ``v``."""
    if isinstance(v, str):
        return "'" + v.replace("'", "\\'") + "'"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)
