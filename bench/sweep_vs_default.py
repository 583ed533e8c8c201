"""A real sweep over the bundled data against the default config (issue 13).

    python bench/sweep_vs_default.py [--trials 12] [--keep]

In a fresh project folder (``SO8T_EXP_HOME``): the default training run, then
``python -m so8t_exp.train -m hparams_search=so8t hydra.sweeper.n_trials=N`` (TPE seed 42,
median pruning), both on the embedded tiny model and the bundled sample set, CPU. Prints
the SO8T objective (REFUSE recall + macro-F1 - ECE, of the last evaluation) of the default
run and of every trial, the best trial against the default, and the wall time of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from so8t_exp.paths import sqlite_uri
from so8t_exp.trial_link import SO8T_OBJECTIVE, objective_value

PARTS = ("eval/refuse_recall", "eval/macro_f1", "eval/ece", "eval/loss")
QUIET = ["trainer.progress_bar=false", "tracking.log_models=[]"]


def run(home: Path, args: list[str], log: Path) -> float:
    """``python -m so8t_exp.train *args`` in ``home``; its wall time (exits on failure)."""
    env = {**os.environ, "SO8T_EXP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        cmd = [sys.executable, "-m", "so8t_exp.train", *args, *QUIET]
        code = subprocess.call(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"{' '.join(args)} failed with exit {code}; see {log}")
    return time.monotonic() - start


def figures(metrics: dict) -> dict:
    out = {k: round(metrics[k], 4) for k in PARTS if k in metrics}
    value = objective_value(metrics, SO8T_OBJECTIVE)
    return {"objective": None if value is None else round(value, 4), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12, help="hydra.sweeper.n_trials")
    ap.add_argument("--keep", action="store_true", help="keep the project folder")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="so8t-sweep-bench-"))
    try:
        default_dir = home / "outputs" / "default"
        t_default = run(home, [f"hydra.run.dir={default_dir.as_posix()}"], home / "default.log")
        sweep = ["-m", "hparams_search=so8t", f"hydra.sweeper.n_trials={args.trials}"]
        t_sweep = run(home, sweep, home / "sweep.log")
        client = MlflowClient(sqlite_uri(home / "mlruns" / "mlflow.db"))
        info = json.loads((default_dir / "session_info.json").read_text(encoding="utf-8"))
        default = figures(client.get_run(info["session_id"]).data.metrics)
        exp = client.get_experiment_by_name("so8t").experiment_id
        trials = []
        for r in client.search_runs([exp], "tags.`optuna.trial.number` != ''"):
            tags = r.data.tags
            params = {k.split(".")[-1]: float(v) for k, v in tags.items() if "optuna.param." in k}
            number, state = int(tags["optuna.trial.number"]), tags["optuna.trial.state"]
            trials.append({"trial": number, "state": state, **figures(r.data.metrics), **params})
        trials.sort(key=lambda t: t["trial"])
        for t in trials:
            print(json.dumps(t))
        complete = [t for t in trials if t["state"] == "COMPLETE" and t["objective"] is not None]
        best = max(complete, key=lambda t: t["objective"])
        print(json.dumps({"default": default, "default_seconds": round(t_default)}))
        summary = {
            "trials": len(trials),
            "pruned": sum(t["state"] == "PRUNED" for t in trials),
            "best_trial": best["trial"],
            "best_objective": best["objective"],
            "default_objective": default["objective"],
            "best_minus_default": round(best["objective"] - default["objective"], 4),
            "sweep_seconds": round(t_sweep),
        }
        print(json.dumps(summary))
    finally:
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
