"""``python -m so8t_exp.resume``: continue the newest unfinished, dead MLflow run.

Run it at boot (``launchers/``) or by hand. Exit codes:

* 0 — the resumed run finished, or there was nothing to resume (also ``dry_run``);
* 2 — bad configuration;
* 4 — ``resume.run_id`` names a run that does not exist or is not resumable (the reason
  is printed);
* 6 — the tracking store is unreachable (after ``tracking.startup_timeout_seconds``) or
  unusable;
* anything else — the resumed trainer's own exit code (1 failed, 3 session locked,
  5 fenced, 7 its run is missing from the store, 128+N stopped by signal N).
"""

from __future__ import annotations

import gc
import logging
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from so8t_exp.boot.boot_log import stamped_output
from so8t_exp.cli_errors import (
    EXIT_BAD_INPUT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TRACKING,
    config_error_line,
    config_errors,
    fail,
    hydra_config_errors,
)
from so8t_exp.config import ResumeConfig, validate_resume
from so8t_exp.launcher import Decision, Launcher
from so8t_exp.notify import Notifiers
from so8t_exp.overrides import override
from so8t_exp.paths import config_dir
from so8t_exp.tracking import resolve_tracking_uri
from so8t_exp.tracking.errors import RunNotFound, TrackingUnavailable, check_store, is_missing
from so8t_exp.tracking.metrics import retry, set_startup_timeout

log = logging.getLogger(__name__)

EXIT_BAD_CONFIG, EXIT_NOT_RESUMABLE = EXIT_BAD_INPUT, EXIT_NOT_FOUND  # (older names)


def run_resume(cfg: DictConfig) -> int:
    """The launcher's whole job for a composed ``resume.yaml``; returns the exit code.
    Raises :class:`TrackingUnavailable` or :class:`RunNotFound` for the caller to report."""
    validate_resume(cfg)
    rcfg: ResumeConfig = OmegaConf.to_object(cfg.resume)
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_store(uri)
    notify = Notifiers({n: instantiate(node) for n, node in cfg.notify.notifiers.items()})
    experiments = rcfg.experiments or [cfg.tracking.experiment]
    launcher = Launcher(rcfg, uri, experiments, notify)
    decisions = read_decisions(launcher, rcfg, uri, cfg.tracking.startup_timeout_seconds)
    for d in decisions:
        print(f"{d.run.run_id}  {d.run.name[:24]:24}  {d.run.status:8}  {d.action:8}  {d.reason}")
    if not decisions:
        names = ", ".join(experiments)
        print(f"no unfinished runs in experiment(s) {names} of {uri}")
    if rcfg.dry_run:
        print(f"dry run: {_verdict(decisions, rcfg)}")
        return EXIT_OK
    for d in decisions:
        if d.action in ("give_up", "expire"):
            launcher.record(d)
    todo = [d for d in decisions if d.action == "resume"]
    if rcfg.run_id and not todo:
        print(f"run {rcfg.run_id} is not resumable: {decisions[0].reason}", file=sys.stderr)
        return EXIT_NOT_RESUMABLE
    return _resume_some(launcher, todo, rcfg)


def read_decisions(
    launcher: Launcher, rcfg: ResumeConfig, uri: str, seconds: float
) -> list[Decision]:
    """What the launcher would do with each run, retrying a store that is not up yet (at
    boot the server may still be starting)."""
    try:
        return retry("read the runs", seconds, launcher.decisions)
    except Exception as err:
        if rcfg.run_id and is_missing(err):
            raise RunNotFound(rcfg.run_id, uri) from err
        raise


def _verdict(decisions: list[Decision], rcfg: ResumeConfig) -> str:
    todo = [d.run for d in decisions if d.action == "resume"]
    if todo and not rcfg.all:
        todo = todo[:1]
    if todo:
        return "would resume " + ", ".join(f"{r.run_id} ({r.name})" for r in todo)
    if rcfg.start_new_if_none:
        return "nothing to resume; would start a new run (resume.start_new_if_none)"
    return "nothing to resume"


def _resume_some(launcher: Launcher, todo: list[Decision], rcfg: ResumeConfig) -> int:
    first_failure = None
    resumed = 0
    for d in todo:
        code = launcher.resume(d)
        if code is None:
            continue  # another launcher took it; try the next one
        resumed += 1
        if code != 0 and first_failure is None:
            first_failure = code
        if not rcfg.all:
            break
    if resumed == 0:
        print("nothing to resume")
        if rcfg.start_new_if_none:
            return launcher.launch(None, [override("tracking.uri", launcher.registry.uri)])
    return first_failure or EXIT_OK


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="resume")
def _app(cfg: DictConfig) -> None:
    set_startup_timeout(cfg.tracking.startup_timeout_seconds)
    try:
        code = run_resume(cfg)
    except config_errors() as err:
        fail(config_error_line(err), EXIT_BAD_INPUT)
    except RunNotFound as err:
        fail(f"{err}; `python -m so8t_exp.sessions` lists its runs", EXIT_NOT_FOUND)
    except TrackingUnavailable as err:
        uri = resolve_tracking_uri(cfg.tracking.uri)
        fail(str(err) if uri in str(err) else f"{err} (tracking.uri={uri})", EXIT_TRACKING)
    sys.exit(code)


def main() -> None:
    """``python -m so8t_exp.resume``; Hydra's config errors exit 2 with one line. Under the
    boot scripts (``SO8T_STAMP_LINES=1``) every output line is timestamped."""
    # Everything imported so far lives to the end: keep the collector off it, which makes
    # reading a thousand runs ~2x faster (bench/run.py, selection_seconds_1000_runs).
    gc.freeze()
    with stamped_output("so8t_exp.resume"), hydra_config_errors():
        _app()


if __name__ == "__main__":
    main()
