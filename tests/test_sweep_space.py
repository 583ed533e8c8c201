"""Hydra sweep syntax to Optuna distributions and back (so8t_exp.sweeper.space), and the
SO8T objective of the pruning bridge (so8t_exp.trial_link)."""

from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from so8t_exp.sweeper.space import hydra_value, search_space
from so8t_exp.trial_link import objective_value


def test_sweep_syntax_becomes_distributions():
    space = search_space(
        {
            "a": "tag(log, interval(1e-5, 1e-2))",
            "b": "int(interval(4, 64))",
            "c": "range(1, 9, 2)",
            "d": "choice(adam, sgd)",
            "e": "interval(1, 10)",
        },
        [],
    )
    d = space.distributions
    assert d["a"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert d["b"] == IntDistribution(4, 64)
    assert d["c"] == IntDistribution(1, 7, step=2)  # Hydra's range excludes its stop
    assert d["d"] == CategoricalDistribution(["adam", "sgd"])
    assert d["e"] == FloatDistribution(1.0, 10.0)  # interval gives floats in Hydra 1.3


def test_command_line_wins_and_fixed_arguments_reach_every_job():
    space = search_space({"a": "interval(0, 1)", "b": "choice(1, 2)"}, ["hparams_search=x", "b=3"])
    assert list(space.distributions) == ["a"]
    assert space.overrides({"a": 0.5}) == ["a=0.5", "hparams_search=x", "b=3"]
    assert space.fingerprint() != search_space({"a": "interval(0, 2)"}, []).fingerprint()


@pytest.mark.parametrize(
    "value", ["x,y", "a b", "it's", "null", "true", "${x}", 1e-05, 0.30000000000000004, True, 3]
)
def test_values_round_trip_through_overrides(value):
    parsed = OverridesParser.create().parse_override(f"k={hydra_value(value)}")
    assert parsed.value() == value and type(parsed.value()) is type(value)


def test_so8t_objective():
    metrics = {"eval/refuse_recall": 0.5, "eval/macro_f1": 0.25, "eval/ece": 0.125}
    assert objective_value(metrics, "so8t") == 0.625
    assert objective_value({"eval/loss": 2.0}, "so8t") is None  # no head: not computed
    assert objective_value({"eval/loss": 2.0}, "eval/loss") == 2.0
