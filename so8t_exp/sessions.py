"""``python -m so8t_exp.sessions``: what every session is doing, and what the launcher
would do with it.

    python -m so8t_exp.sessions [--tracking-uri URI] [--experiment NAME]     # table
    python -m so8t_exp.sessions show RUN_ID
    python -m so8t_exp.sessions abandon RUN_ID      # tag given-up: the launcher leaves it
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from so8t_exp.config import ResumeConfig
from so8t_exp.launcher import judge
from so8t_exp.tracking.runs import GIVEN_UP, RESUME_COUNT, RunRecord, RunRegistry


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def row(run: RunRecord, cfg: ResumeConfig, now: float) -> dict[str, str]:
    decision = judge(run, cfg, now)
    latest = run.tag_float("so8t.checkpoint.latest_time")
    step = max(int(run.tag_float("so8t.step", 0) or 0), run.checkpoint_step)
    return {
        "run_id": run.run_id,
        "name": run.name,
        "status": f"{run.status}/{decision.state}",
        "step": f"{step}/{run.params.get('trainer.max_steps', '?')}",
        "checkpoint": run.tags.get("so8t.checkpoint.latest", "-"),
        "ckpt_age": _age(now - latest if latest else None),
        "resumes": run.tags.get(RESUME_COUNT, "0"),
        "folder": str(run.session_dir or "-"),
    }


def print_table(rows: list[dict[str, str]]) -> None:
    if not rows:
        print("no sessions")
        return
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in widths.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m so8t_exp.sessions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tracking-uri", default=None, help="default: as the trainer's")
    ap.add_argument("--experiment", action="append", help="default: so8t (repeatable)")
    ap.add_argument("command", nargs="?", default="list", choices=["list", "show", "abandon"])
    ap.add_argument("run_id", nargs="?")
    args = ap.parse_args(argv)
    registry = RunRegistry(args.tracking_uri)
    cfg, now = ResumeConfig(), time.time()
    if args.command == "list":
        runs = registry.runs(args.experiment or ["so8t"], unfinished_only=False)
        print_table([row(r, cfg, now) for r in runs])
        return 0
    if not args.run_id:
        ap.error(f"{args.command} needs a RUN_ID")
    run = registry.get(args.run_id)
    if args.command == "abandon":
        registry.set_tags(run.run_id, {GIVEN_UP: "abandoned by the user"})
        print(f"run {run.run_id} marked given-up; the resume launcher will leave it")
        return 0
    decision = judge(run, cfg, now)
    print(
        json.dumps(
            {
                **row(run, cfg, now),
                "launcher_would": decision.action,
                "because": decision.reason,
                "tags": {k: v for k, v in sorted(run.tags.items()) if k.startswith("so8t.")},
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
