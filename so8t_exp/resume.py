"""``python -m so8t_exp.resume``: continue the newest unfinished, dead MLflow run.

Run it at boot (``launchers/``) or by hand. Exit codes:

* 0 — the resumed run finished, or there was nothing to resume (also ``dry_run``);
* 2 — bad configuration;
* 4 — ``resume.run_id`` names a run that is not resumable (the reason is printed);
* anything else — the resumed trainer's own exit code (1 failed, 3 session locked,
  128+N stopped by signal N).
"""

from __future__ import annotations

import gc
import logging
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from so8t_exp.config import ConfigError, ResumeConfig, check_target
from so8t_exp.launcher import Decision, Launcher
from so8t_exp.notify import Notifiers
from so8t_exp.paths import config_dir

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_CONFIG, EXIT_NOT_RESUMABLE = 0, 2, 4


def run_resume(cfg: DictConfig) -> int:
    """The launcher's whole job for a composed ``resume.yaml``; returns the exit code."""
    rcfg: ResumeConfig = OmegaConf.to_object(cfg.resume)
    for name, node in cfg.notify.notifiers.items():
        check_target(node, f"notify.notifiers.{name}")
    notify = Notifiers({n: instantiate(node) for n, node in cfg.notify.notifiers.items()})
    launcher = Launcher(
        rcfg, cfg.tracking.uri, rcfg.experiments or [cfg.tracking.experiment], notify
    )
    decisions = launcher.decisions()
    for d in decisions:
        print(f"{d.run.run_id}  {d.run.name[:24]:24}  {d.run.status:8}  {d.action:8}  {d.reason}")
    if rcfg.dry_run:
        return EXIT_OK
    for d in decisions:
        if d.action in ("give_up", "expire"):
            launcher.record(d)
    todo = [d for d in decisions if d.action == "resume"]
    if rcfg.run_id and not todo:
        print(f"run {rcfg.run_id} is not resumable: {decisions[0].reason}", file=sys.stderr)
        return EXIT_NOT_RESUMABLE
    return _resume_some(launcher, todo, rcfg)


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
            return launcher.launch(None, [f"tracking.uri={launcher.registry.uri}"])
    return first_failure or EXIT_OK


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="resume")
def _app(cfg: DictConfig) -> None:
    try:
        code = run_resume(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_BAD_CONFIG
    sys.exit(code)


def main() -> None:
    # Everything imported so far lives to the end: keep the collector off it, which makes
    # reading a thousand runs ~2x faster (bench/run.py, selection_seconds_1000_runs).
    gc.freeze()
    _app()


if __name__ == "__main__":
    main()
