"""CPU seconds of the training process's background threads during one training run: the
Python work that competes with the training thread for the GIL.

    python bench/thread_cpu.py           # three configurations, one run each (~1.5 min)

Runs ``run_training`` in this process on the workload of ``bench/run.py``'s overhead loop
(tiny default model, 61 steps, a checkpoint every 5 steps mirrored to MLflow, system stats
every 1 s, heartbeat and progress every 2 s) once per configuration:

* ``threads``: ``checkpoint.writer=thread tracking.metrics_process=false`` (before issue 15);
* ``writer``: the checkpoint writer process only;
* ``default``: writer process and metric sender process (the defaults).

Each thread's CPU time (``time.thread_time()`` read as it ends; the threads of a run all end
with it) is summed by name. CPU time is what a machine shared with other work cannot blur as
it blurs wall time; on this Python-bound workload, background Python work costs the training
thread about as much wall time (the GIL). Ends with one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import _overhead
import torch
from _common import log, new_store, quiet

CONFIGS = {
    "threads": {"checkpoint.writer": "thread", "tracking.metrics_process": False},
    "writer": {"checkpoint.writer": "process", "tracking.metrics_process": False},
    "default": {"checkpoint.writer": "process", "tracking.metrics_process": True},
}
_cpu: dict[str, float] = {}


def _counting_run(self: threading.Thread) -> None:
    try:
        _thread_run(self)
    finally:
        name = "Thread-N" if self.name.startswith("Thread-") else self.name.split(" ")[0]
        _cpu[name] = _cpu.get(name, 0.0) + time.thread_time()


_thread_run = threading.Thread.run


def measure(work: _overhead.Workload, session: Path, overrides: dict) -> dict[str, float]:
    """Background-thread CPU seconds by thread name over one run with ``overrides``."""
    compose = _overhead.Workload.cfg

    def cfg(w):
        c = compose(w)
        for key, value in overrides.items():
            group, name = key.split(".")
            c[group][name] = value
        return c

    _overhead.Workload.cfg = cfg
    _cpu.clear()
    threading.Thread.run = _counting_run
    try:
        _overhead.ours_loop(work, session)
    finally:
        threading.Thread.run = _thread_run
        _overhead.Workload.cfg = compose
    return dict(sorted(_cpu.items(), key=lambda kv: -kv[1]))


def main() -> None:
    quiet()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    root = Path(tempfile.mkdtemp(prefix="so8t-threadcpu-"))
    work = _overhead.Workload(root, new_store(root), steps=20, windows=3)
    measure(work, root / "warm-up", CONFIGS["default"])  # first-call costs, not counted
    results = {}
    for name, overrides in CONFIGS.items():
        results[name] = measure(work, root / name, overrides)
        log(f"  {name}: {sum(results[name].values()):.3f} s")
    names = sorted(
        {k for r in results.values() for k in r}, key=lambda k: -results["threads"].get(k, 0)
    )
    print(f"{'thread':28}" + "".join(f"{c:>10}" for c in CONFIGS))
    for n in names:
        print(f"{n:28}" + "".join(f"{results[c].get(n, 0.0):10.3f}" for c in CONFIGS))
    totals = {c: sum(r.values()) for c, r in results.items()}
    print(f"{'total':28}" + "".join(f"{totals[c]:10.3f}" for c in CONFIGS))
    ratio = totals["default"] / totals["threads"]
    print(f"background_cpu_ratio_vs_threads  {ratio:.3f}")
    print(
        json.dumps(
            {
                "background_cpu_seconds": results,
                "totals": totals,
                "background_cpu_ratio_vs_threads": round(ratio, 4),
                "steps": work.total,
            }
        )
    )


if __name__ == "__main__":
    main()
