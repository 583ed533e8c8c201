"""Benchmark 5: the resume launcher choosing a run in a store of 1,000 runs.

The store is filled once per invocation through ``MlflowClient`` (timed and reported
apart). Every run carries what the trainer writes: the flattened composed config as params
(masked as the trainer masks them), a latest value for each training metric, and the tags
``so8t.session_dir``, ``so8t.host``, ``so8t.pid``, ``so8t.heartbeat``, ``so8t.step`` and
``so8t.checkpoint.latest{,_step,_time}``. The mix: 88 % FINISHED, 5 % KILLED, 4 % FAILED,
3 % RUNNING. Among the unfinished ones some session folders exist on this host (with a
``session_info.json``; a few of them locked by this process, i.e. alive), some are gone,
some live on another host with a fresh heartbeat; runs are spread over four weeks, so most
unfinished ones are older than ``resume.max_age_hours`` (80 % of those already tagged
expired, as an earlier boot's launcher leaves them); a few are tagged given-up.

Timed: ``Launcher(ResumeConfig(), uri, ["so8t"], Notifiers({})).decisions()`` then picking
the first ``resume`` decision, as ``python -m so8t_exp.resume`` does before it claims, in a
child process importing what the launcher imports (``bench/_select.py``); the median of a
few repeats after a first one that also sets up MLflow's engine (reported apart).
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from _common import compose_train, log, median, subprocess_env
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from so8t_exp.lock import SessionLock
from so8t_exp.tracking import Tracker, flatten, mask_secrets

METRICS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_sec",
    "train/alpha",
    "train/pet_loss",
    "train/pet_weight",
    "train/epoch",
    "so8t/ortho_error",
    "so8t/det_error",
    "so8t/lambda_abs_mean",
    "eval/loss",
    "eval/perplexity",
    "eval/macro_f1",
    "eval/refuse_recall",
    "eval/ece",
    "eval/accuracy",
    "checkpoint/blocked_seconds",
    "system/cpu_percent",
    "system/ram_used_gb",
    "system/ram_percent",
    "system/process_rss_gb",
]
STATUSES = ["FINISHED"] * 88 + ["KILLED"] * 5 + ["FAILED"] * 4 + ["RUNNING"] * 3


@dataclass
class Results:
    n_runs: int = 0
    setup_seconds: float = 0.0
    first: float = 0.0  # the first selection in the process (engine set-up included)
    selection: list[float] = field(default_factory=list)
    search: list[float] = field(default_factory=list)  # RunRegistry.runs() alone
    actions: Counter = field(default_factory=Counter)
    chosen: str | None = None


def build_store(root: Path, store: str, n: int, seed: int = 0) -> tuple[float, list]:
    """Fill ``store`` with ``n`` runs; returns (seconds, session locks held = alive runs)."""
    rng = random.Random(seed)
    client = MlflowClient(tracking_uri=store)
    exp = Tracker(store).experiment_id("so8t")
    cfg = OmegaConf.to_container(compose_train(store), resolve=True)
    base_params = mask_secrets(flatten(cfg))
    host, now, locks = socket.gethostname(), time.time(), []
    started = time.perf_counter()
    for i in range(n):
        status = rng.choice(STATUSES)
        start = now - (n - i) * 2400 - rng.uniform(0, 600)  # ~4 weeks, newest last
        step = rng.randrange(0, 300)
        session = root / "sessions" / f"run-{i:04d}"
        run_host, heartbeat = host, start + step * 2.0
        if status != "FINISHED":
            kind = rng.random()
            if kind < 0.6:  # the folder is here: lock file, session_info.json
                session.mkdir(parents=True)
                (session / ".so8t.lock").touch()
                (session / "session_info.json").write_text(
                    json.dumps({"session_id": "", "current_step": step, "status": "running"})
                )
                if status == "RUNNING" and rng.random() < 0.5:
                    locks.append(SessionLock(session).acquire())  # alive on this host
            elif kind < 0.75:  # on another machine, heartbeat fresh
                run_host, heartbeat = "gpu-box-2", now - rng.uniform(5, 120)
        tags = {
            "so8t.session_dir": str(session),
            "so8t.host": run_host,
            "so8t.pid": str(rng.randrange(1000, 60000)),
            "so8t.heartbeat": f"{heartbeat:.3f}",
            "so8t.step": str(step),
            "so8t.checkpoint.latest": f"rolling-step{step:08d}",
            "so8t.checkpoint.latest_step": str(step),
            "so8t.checkpoint.latest_time": f"{heartbeat:.3f}",
            "mlflow.source.git.commit": f"{rng.getrandbits(160):040x}",
        }
        if status != "FINISHED" and now - heartbeat > 168 * 3600 and rng.random() < 0.8:
            tags["so8t.expired"] = "last heartbeat > resume.max_age_hours"  # an earlier boot
        elif status != "FINISHED" and rng.random() < 0.05:
            tags["so8t.given_up"] = "3 resumes without progress"
        run = client.create_run(exp, start_time=int(start * 1000), tags=tags)
        lr = f"{rng.uniform(1e-4, 3e-3):.2e}"
        params = {**base_params, "seed": str(i), "trainer.optimizer.lr": lr}
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, rng.random(), int(heartbeat * 1000), step) for k in METRICS],
            params=[Param(k, v) for k, v in params.items()],
        )
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status, end_time=int(heartbeat * 1000))
    return time.perf_counter() - started, locks


def run(root: Path, store: str, n: int, reps: int) -> Results:
    res = Results(n_runs=n)
    res.setup_seconds, locks = build_store(root, store, n)
    log(f"  launcher: {n} runs created in {res.setup_seconds:.1f} s")
    try:  # the first of the repeats pays for MLflow's engine and schema check
        out = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("_select.py")), store, str(reps + 1)],
            capture_output=True,
            text=True,
            check=True,
            env=subprocess_env(root),
        )
    finally:
        for lock in locks:
            lock.release()
    got = json.loads(out.stdout.strip().splitlines()[-1])
    res.first = got["selection"][0]
    res.selection, res.search = got["selection"][1:], got["search"][1:]
    res.actions, res.chosen = Counter(got["actions"]), got["chosen"]
    for i, seconds in enumerate(res.selection):
        log(f"  launcher round {i + 1}/{reps}: chose in {seconds:.3f} s")
    return res


def summary(res: Results) -> dict[str, float]:
    return {"selection_seconds": median(res.selection), "search_seconds": median(res.search)}
