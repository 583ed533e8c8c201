"""``python -m so8t_exp.sessions``: what every session and Optuna sweep is doing, and what
the launcher would do with it.

    python -m so8t_exp.sessions [list] [key=value ...]         # tables
    python -m so8t_exp.sessions show RUN_ID [key=value ...]
    python -m so8t_exp.sessions abandon RUN_ID [key=value ...]  # tag given-up: left alone

``list`` prints the sessions, then the Optuna sweeps (``train -m hparams_search=...``): a
row per sweep (trials finished of ``n_trials``, best value so far and its trial, state,
what the launcher would do) with its trials' rows under it; a trial is listed there only.
``show`` of a sweep's parent run gives the sweep (study, folder, best trial, parameters
and value, why the launcher would continue it or not) and each trial; ``abandon`` of it
gives the whole sweep up. A trial is not abandoned alone: it resumes only with its sweep.

``key=value`` overrides are the resume launcher's (conf/resume.yaml), as for
``python -m so8t_exp.resume``: ``tracking.uri=...``, ``tracking.experiment=...``,
``resume.experiments=[a,b]``, ``resume.stale_after_seconds=...``,
``tracking.startup_timeout_seconds=...``.

Exit codes: 0 done; 2 bad arguments or config, or ``abandon`` of a sweep's trial (the
message names its sweep's run id); 4 no such run; 6 the tracking store is unreachable
(after ``tracking.startup_timeout_seconds``) or unusable.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from so8t_exp.cli_errors import (
    EXIT_BAD_INPUT,
    EXIT_NOT_FOUND,
    EXIT_TRACKING,
    config_error_line,
    config_errors,
    pipe_safe,
    report,
)
from so8t_exp.config import ResumeConfig, validate_resume
from so8t_exp.host import host_id
from so8t_exp.launcher import judge
from so8t_exp.overrides import compose
from so8t_exp.progress_log import newest, tail
from so8t_exp.sweep_resume import trials_of
from so8t_exp.tracking import resolve_tracking_uri
from so8t_exp.tracking.errors import TrackingUnavailable, check_store, is_missing
from so8t_exp.tracking.metrics import retry
from so8t_exp.tracking.runs import GIVEN_UP, RESUME_COUNT, RunRecord, RunRegistry
from so8t_exp.tracking.sweep import PARENT_RUN, is_study_sweep
from so8t_exp.verdict import is_local

COMMANDS = ("list", "show", "abandon")
# The flags of earlier versions, still understood: they set these keys.
_LEGACY = {"--tracking-uri": "tracking.uri", "--experiment": "resume.experiments"}


def age_text(seconds: float | None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``; ``-`` for None."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def local_folder(run: RunRecord) -> Path | None:
    """The run's session folder if it is this host's (another host's path may name an
    unrelated folder here, or an old copy)."""
    written_here = run.tags.get("so8t.host") in (None, host_id())
    return run.session_dir if run.session_dir and written_here and is_local(run) else None


def progress_lines(run: RunRecord) -> list[dict]:
    """The newest lines of the run's progress log, newest first; ``[]`` when there is none
    here. The log, not the session file: it is written every ``progress.interval_seconds``
    (the session file only at checkpoints) and survives resumes, and a torn last line is
    skipped."""
    folder = local_folder(run)
    return tail(folder / "progress_logs" / "progress.jsonl") if folder else []


def eta_text(lines: list[dict], alive: bool, now: float) -> str:
    """``MM-DD HH:MM (left)`` in this host's time, from the newest line; only for a run that
    is training now (a dead or finished run's last estimate would mislead)."""
    try:
        eta = datetime.fromisoformat(lines[0]["eta"]) if alive and lines else None
    except (KeyError, TypeError, ValueError):
        eta = None
    if eta is None:
        return "-"
    return f"{eta.astimezone():%m-%d %H:%M} ({age_text(max(eta.timestamp() - now, 0))})"


def row(
    run: RunRecord, cfg: ResumeConfig, now: float, lines: list[dict] | None = None
) -> dict[str, str]:
    """One table row; ``lines``: the run's progress lines (read here when not given)."""
    decision = judge(run, cfg, now)
    lines = progress_lines(run) if lines is None else lines
    loss = newest(lines, "train/loss")
    latest = run.tag_float("so8t.checkpoint.latest_time")
    step = max(int(run.tag_float("so8t.step", 0) or 0), run.checkpoint_step)
    if lines and isinstance(lines[0].get("step"), int):  # (newer than the heartbeat's tag)
        step = max(step, lines[0]["step"])
    return {
        "run_id": run.run_id,
        "name": run.name,
        "status": f"{run.status}/{decision.state}",
        "step": f"{step}/{run.params.get('trainer.max_steps', '?')}",
        "loss": f"{loss:.4g}" if isinstance(loss, (int, float)) else "-",
        "eta": eta_text(lines, decision.state == "alive", now),
        "checkpoint": run.tags.get("so8t.checkpoint.latest", "-"),
        "ckpt_age": age_text(now - latest if latest else None),
        "resumes": run.tags.get(RESUME_COUNT, "0"),
        "folder": str(run.session_dir or "-"),
    }


def print_table(rows: list[dict[str, str]]) -> None:
    """Left-aligned columns under the first row's keys; ``no sessions`` when empty."""
    if not rows:
        print("no sessions")
        return
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    print("  ".join(k.ljust(w) for k, w in widths.items()).rstrip())
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in widths.items()).rstrip())


class UsageError(ValueError):
    """The command line names no known command, or misses a run id."""


def parse_args(argv: list[str]) -> tuple[str, str | None, list[str], dict[str, list[str]]]:
    """``(command, run_id, overrides, legacy flags)``: words without ``=`` are the command
    and its run id; ``key=value`` (and ``+key=``/``~key``) are Hydra overrides."""
    words, overrides, legacy = [], [], {}
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in _LEGACY:
            legacy.setdefault(_LEGACY[flag], []).append(value if eq else next(args, ""))
        elif "=" in arg or arg.startswith(("+", "~")):
            overrides.append(arg)
        else:
            words.append(arg)
    command = words.pop(0) if words and words[0] in COMMANDS else "list"
    if command == "list" and words or len(words) > 1:
        raise UsageError(f"unexpected {' '.join(words)!r}: {_USAGE}")
    if command != "list" and not words:
        raise UsageError(f"{command} needs a RUN_ID: {_USAGE}")
    return command, (words[0] if words else None), overrides, legacy


_USAGE = "python -m so8t_exp.sessions [list | show RUN_ID | abandon RUN_ID] [key=value ...]"


def compose_config(overrides: list[str], legacy: dict[str, list[str]]) -> DictConfig:
    """``conf/resume.yaml`` with the overrides, checked as the launcher checks it."""
    cfg = compose("resume", overrides)
    if "tracking.uri" in legacy:
        cfg.tracking.uri = legacy["tracking.uri"][-1]
    if "resume.experiments" in legacy:
        cfg.resume.experiments = legacy["resume.experiments"]
    validate_resume(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        command, run_id, overrides, legacy = parse_args(argv)
        cfg = compose_config(overrides, legacy)
    except UsageError as err:
        return report(str(err), EXIT_BAD_INPUT)
    except config_errors() as err:
        return report(config_error_line(err), EXIT_BAD_INPUT)
    uri = resolve_tracking_uri(cfg.tracking.uri)
    try:
        check_store(uri)
        return _run(command, run_id, RunRegistry(uri), cfg)
    except TrackingUnavailable as err:
        return report(str(err) if uri in str(err) else f"{err} (tracking.uri={uri})", EXIT_TRACKING)
    except Exception as err:
        if run_id and is_missing(err):
            return report(f"run {run_id} is not in the tracking store {uri}", EXIT_NOT_FOUND)
        raise


def _run(command: str, run_id: str | None, registry: RunRegistry, cfg: DictConfig) -> int:
    # (imported here: the sweep view builds on this module's rows and cells)
    from so8t_exp import sessions_sweeps as sweeps

    rcfg: ResumeConfig = OmegaConf.to_object(cfg.resume)
    seconds, now = cfg.tracking.startup_timeout_seconds, time.time()
    if command == "list":
        experiments = rcfg.experiments or [cfg.tracking.experiment]
        runs = retry("read the runs", seconds, registry.runs, experiments, False, True)
        loose, found = sweeps.split(runs)
        if loose or not found:
            print_table([row(r, rcfg, now) for r in loose])
        rows = []
        for parent, trials in found:
            sweep = sweeps.load(registry, parent, trials, rcfg, now, seconds)
            rows += sweeps.sweep_rows(sweep, rcfg, now)
        if rows:
            if loose:
                print()
            print_table(rows)
        return 0
    run = retry("read the run", seconds, registry.get, run_id)
    study_sweep = run.is_sweep_parent and is_study_sweep(run.tags)
    if command == "abandon":
        if sweeps.is_trial(run):
            return report(sweeps.trial_refusal(run), EXIT_BAD_INPUT)
        text = sweeps.abandoned(run) if study_sweep else None
        registry.set_tags(run.run_id, {GIVEN_UP: "abandoned by the user"})
        print(text or f"run {run.run_id} marked given-up; the resume launcher will leave it")
        return 0
    if study_sweep:
        runs = retry("read the runs", seconds, registry.runs, [run.experiment], False)
        sweep = sweeps.load(registry, run, trials_of(run, runs), rcfg, now, seconds)
        print(json.dumps(sweeps.show(sweep, rcfg, now), indent=2, ensure_ascii=False))
        return 0
    decision, lines = judge(run, rcfg, now), progress_lines(run)
    keys = ("time", "step", "percent_done", "train/loss", "train/lr", "steps_per_sec")
    trial = {}
    if sweeps.is_trial(run):  # (its sweep: what to show, continue or abandon instead)
        number, state = sweeps.trial_number(run), sweeps.trial_state(run, rcfg, now)
        trial = {"sweep_run_id": run.tags.get(PARENT_RUN), "trial": number, "state": state}
    print(
        json.dumps(
            {
                **row(run, rcfg, now, lines),
                **trial,
                "last_progress_line": {k: lines[0][k] for k in keys if k in lines[0]}
                if lines
                else None,
                "launcher_would": decision.action,
                "because": decision.reason,
                "tags": {k: v for k, v in sorted(run.tags.items()) if k.startswith("so8t.")},
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


def cli() -> None:
    """``python -m so8t_exp.sessions`` and the ``so8t-sessions`` console script."""
    sys.exit(pipe_safe(main))


if __name__ == "__main__":
    cli()
