"""Child process of ``bench/_launcher_scale.py``: time the resume launcher choosing a run.

It runs apart from the benchmark process so that it imports what ``python -m
so8t_exp.resume`` imports (MLflow, Hydra's config classes, no torch): the garbage collector's
work while MLflow builds thousands of row objects grows with everything else in the heap,
and a process that has loaded torch and transformers pays ~3x for the same search.

    python bench/_select.py <tracking uri> <repeats>    # prints one JSON line
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

from so8t_exp.config import ResumeConfig
from so8t_exp.launcher import Launcher
from so8t_exp.notify import Notifiers


def main() -> None:
    uri, repeats = sys.argv[1], int(sys.argv[2])
    selection, search = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        launcher = Launcher(ResumeConfig(), uri, ["so8t"], Notifiers({}))
        decisions = launcher.decisions()
        chosen = next((d for d in decisions if d.action == "resume"), None)
        selection.append(time.perf_counter() - started)
        started = time.perf_counter()
        launcher.registry.runs(["so8t"])
        search.append(time.perf_counter() - started)
    actions = Counter(f"{d.action}/{d.state}" for d in decisions)
    print(
        json.dumps(
            {
                "selection": selection,
                "search": search,
                "actions": dict(sorted(actions.items())),
                "chosen": chosen.reason if chosen else None,
            }
        )
    )


if __name__ == "__main__":
    main()
