"""One run from a composed config: build, attach, restore, loop, finish.

``run_training(cfg, session_dir)`` is what ``python -m so8t_exp.train`` calls and what
tests call directly. Starting it on a session folder that already holds a session
re-attaches to that MLflow run and continues from its newest valid checkpoint.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from so8t_exp import build, data
from so8t_exp.checkpoint import Checkpointer, capture
from so8t_exp.cli_errors import EXIT_FAILED, EXIT_PEER_LOST
from so8t_exp.config import validate
from so8t_exp.continuation import continuation, known_run
from so8t_exp.distributed import team
from so8t_exp.distributed.world import check_world_size, peer_lost
from so8t_exp.evaluations import Evaluations
from so8t_exp.fingerprint import config_fingerprint
from so8t_exp.lock import SessionLock
from so8t_exp.progress_bar import ProgressBar
from so8t_exp.progress_log import StepWindow
from so8t_exp.run_end import RunEnd
from so8t_exp.run_inputs import record_inputs
from so8t_exp.session import FINAL, Session, SessionInfo, now_iso
from so8t_exp.signals import StopRequest
from so8t_exp.system_stats import Monitor
from so8t_exp.takeover import take_over
from so8t_exp.tracking import Tracker
from so8t_exp.tracking.fencing import EXIT_FENCED, Fenced
from so8t_exp.tracking.run_page import RunPage
from so8t_exp.tracking.runs import WORLD_SIZE_TAG
from so8t_exp.trainer import TrainingDiverged

log = logging.getLogger(__name__)


def run_training(cfg: DictConfig, session_dir: Path, hydra_dir: Path | None = None) -> int:
    """Train (or continue) the session in ``session_dir``; returns the process exit code."""
    validate(cfg)
    return TrainingRun(cfg, session_dir.resolve(), hydra_dir).execute()


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the garbage collector off everything that exists before the loop (modules,
    model, MLflow client: ~700k objects). Otherwise the allocations of the tracking threads
    trigger full collections that scan it all with the GIL held — a ~0.3 s stall of the
    training thread every few seconds on a 2-core CPU (bench/run.py, overhead ratio)."""
    gc.collect()  # (garbage frozen now would never be freed: a previous session's model)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # a launcher running several sessions in turn frees them again


class TrainingRun(RunEnd):
    def __init__(self, cfg: DictConfig, session_dir: Path, hydra_dir: Path | None) -> None:
        self.cfg, self.session_dir, self.hydra_dir = cfg, session_dir, hydra_dir
        self.session = Session(session_dir)
        self.pending_metrics: dict[str, float] = {}
        self.notify = build.build_notifiers(cfg)
        self.source = build.build_source(cfg)
        self.heartbeat = None
        self.restored = None  # (checkpoint folder, payload) until the model has it
        self.extend_from: int | None = None  # a completed run trained longer: its old length
        self.team = team.current()  # the other ranks of a torchrun run (none: a no-op)

    # -- attach and restore -----------------------------------------------------------
    def execute(self) -> int:
        # Bad data fails here, before anything is created in MLflow or on disk.
        self.dataset = data.load_dataset(self.cfg.data)
        # Held until this process ends, however it ends: a second trainer (or a resume
        # launcher) on this folder sees it and leaves the session alone.
        lock = SessionLock(self.session_dir).acquire(wait=self.cfg.session.lock_wait_seconds)
        try:
            return self._attach_and_run()
        except Fenced as err:  # before this process wrote anything: say why and go
            log.error("%s", err)
            return EXIT_FENCED
        finally:
            if getattr(self, "checkpointer", None) is not None:  # (its writer is done first)
                self.checkpointer.close()
            if getattr(self, "tracker", None) is not None:
                self.tracker.close_sender()
            if self.heartbeat is not None:
                self.heartbeat.stop()
            lock.release()

    def _attach_and_run(self) -> int:
        t = self.cfg.tracking
        self.tracker = Tracker(t.uri, t.flush_interval_seconds, metrics_process=t.metrics_process)
        self.page = RunPage(self.tracker, self.cfg.tracking, self.session_dir, self.hydra_dir)
        info = self.session.load()
        run_id = known_run(info, self.tracker, self.cfg.tracking.experiment, self.session_dir)
        if run_id == "FINISHED":
            log.info("the MLflow run of %s is already finished", self.session_dir)
            return 0
        self.tracker.run_id = run_id
        store = self.tracker if self.cfg.checkpoint.mirror_to_mlflow else None
        self.checkpointer = Checkpointer(
            self.session_dir / "checkpoints",
            self.cfg.checkpoint,
            store,
            self._saved,
            self._save_failed,
            self.tracker.checkpoint_mirrored,
        )
        self.fingerprint = config_fingerprint(self.cfg)
        completed = info is not None and info.status in FINAL
        cont = continuation(
            run_id,
            completed,
            self.checkpointer,
            self.fingerprint,
            self.cfg.checkpoint.allow_config_change,
            self.notify,
            lambda: self.tracker.mirrored_step(run_id),
        )
        if cont is None:
            log.info("session %s is already completed; nothing to do", self.session_dir)
            return 0
        if run_id is not None:  # own the run before writing to it
            self._take_over()
            self.checkpointer.drop_rejected_copies()
        # Handed over, not kept in a frame that lives as long as the session: the host copy
        # of the trained state is freed as soon as the model has it.
        step, self.restored, self.extend_from = cont.step, cont.restored, cont.extend_from
        del cont
        check_world_size(self.restored, self.team.world.size)
        self.page.open(run_id, step, self._hydra_overrides())
        if run_id is None:
            self._take_over()
        self._open_session(info, resumed=run_id is not None)
        with StopRequest() as stop:
            stop.closer = self._console_close  # (Windows: a console close with no time left)
            return self._guarded(stop)

    def _take_over(self) -> None:
        step = lambda: self._state_for_monitor()["step"]  # noqa: E731
        self.heartbeat = take_over(self.tracker, self.cfg.session.heartbeat_seconds, step)

    def _open_session(self, info: SessionInfo | None, resumed: bool) -> None:
        if info is None:
            self.session.info = SessionInfo(session_id=self.tracker.run_id)
        self.session.save(
            # A run trained longer stays "completed" until its first new checkpoint: a crash
            # before it must find the same train-longer start, not a changed config.
            status="completed" if self.extend_from else "running",
            total_steps=self.cfg.trainer.max_steps,
            tracking_uri=self.tracker.uri,
            resumes=self.session.info.resumes + int(resumed),
            overrides=self._hydra_overrides(),
        )
        tags = {**self.tracker.standard_tags(self.session_dir), **self.cfg.tracking.tags}
        if self.team.world.distributed:  # (a launcher relaunches it with as many)
            tags[WORLD_SIZE_TAG] = self.team.world.size
        self.tracker.set_tags(tags)
        record_inputs(self.tracker, self.cfg, self.fingerprint, self.dataset, not resumed)
        if self.hydra_dir and self.hydra_dir.is_dir():
            self.tracker.log_artifacts(self.hydra_dir, "hydra")
        event = "resumed" if resumed else "started"
        self.notify(event, f"run {self.tracker.run_id} in {self.session_dir}")

    def _hydra_overrides(self) -> list[str] | None:
        """This start's overrides, kept in the session file by the lock holder (Hydra's own
        copy in .hydra/ is rewritten even by a start that is then refused)."""
        path = self.hydra_dir / "overrides.yaml" if self.hydra_dir else None
        if path is None or not path.is_file():
            return self.session.info and self.session.info.overrides
        return [str(o) for o in OmegaConf.load(path)]

    # -- build ------------------------------------------------------------------------
    def _build(self) -> None:
        restored, self.restored = self.restored, None
        build.seed_everything(self.cfg.seed, self.cfg.trainer.deterministic)
        device, precision = build.resolve_device(self.cfg.trainer)
        world, group = self.team.world, self.team.group
        built = build.build_training(
            self.cfg, self.source, self.dataset, device, precision, world, group
        )
        trainer = built.trainer
        self.tokenizer = built.tokenizer
        self.evals = Evaluations(
            self.cfg, built.val_batches, self.tracker.log_metrics, self.session_dir
        )
        self.tracker.safely(
            "log params", self.tracker.log_params, {"data.too_long_records": built.too_long}
        )
        if restored:
            state = trainer.restore(restored[1])
            self.checkpointer.last_save_step = trainer.progress.step
            self.checkpointer.last_save_seconds = state["last_save_seconds"]
            self.tracker.requeue_metrics(state.get("metrics_unsent", []))
            if self.extend_from:
                self._train_longer(trainer.progress)
            trainer.sync_schedules()
            log.info("continuing from step %d (%s)", trainer.progress.step, restored[0].name)
        # Only now: a restore that fails must not look like a state worth an emergency save.
        self.trainer = trainer

    def _train_longer(self, progress) -> None:
        old, new = self.extend_from, self.cfg.trainer.max_steps
        progress.schedule_steps = progress.schedule_steps or old
        log.warning(
            "training longer: %d -> %d steps in the same run; the LR, alpha and PET schedules "
            "keep their horizon of %d steps, so the added steps run at their final values",
            old,
            new,
            progress.schedule_steps,
        )
        self.tracker.set_tags({"so8t.trained_longer": f"{old} -> {new}"})

    # -- loop -------------------------------------------------------------------------
    def _guarded(self, stop: StopRequest) -> int:
        code = EXIT_FAILED
        try:
            code = self._train_and_end(stop)
            return code
        finally:  # (the other ranks end with this rank's code)
            self.team.release(code)

    def _start_team(self) -> None:
        """The other ranks of a torchrun run build from this config and continue from
        this checkpoint."""
        if self.team.world.distributed:
            message = {
                "cfg": OmegaConf.to_container(self.cfg, resolve=True),
                "run_id": self.tracker.run_id,
                "payload": self.restored[1] if self.restored else None,
                "extend_from": self.extend_from,
            }
            self.team.start(message, self.cfg.trainer.distributed_timeout_seconds)

    def _train_and_end(self, stop: StopRequest) -> int:
        monitor = None
        try:
            self._start_team()
            self._build()
            self.window = StepWindow(self.trainer.progress.step)
            monitor = Monitor(
                self.tracker.log_metrics,
                self._state_for_monitor,
                self.session_dir,
                {
                    "stats": self.cfg.tracking.system_stats_interval_seconds,
                    "progress": self.cfg.progress.interval_seconds,
                },
                self.window,
                self.cfg.trainer.max_steps,
            ).start()
            with _frozen_heap():
                self._loop(stop)
            if stop.requested:
                return self._stopped(stop, "interrupted", "KILLED", stop.exit_code)
            stop.completing = True
            self._complete()
            return 0
        except KeyboardInterrupt:
            return self._stopped(stop, "interrupted", "KILLED", stop.exit_code)
        except Fenced as err:
            return self._fenced(stop, err)
        except TrainingDiverged as err:  # a clear message; a traceback would add nothing
            log.error("%s", err)
            self.tracker.log_metrics(err.metrics, self.trainer.progress.step)
            return self._stopped(stop, "failed", "FAILED", 1, reason=str(err))
        except BaseException as err:
            lost = peer_lost(err) if self.team.world.distributed else None
            if lost is not None:
                log.error("%s", lost)
                return self._stopped(stop, "interrupted", "KILLED", EXIT_PEER_LOST, str(lost))
            log.exception("training failed")
            self._stopped(stop, "failed", "FAILED", 1)
            raise
        finally:
            if monitor is not None:
                monitor.stop()
            self.checkpointer.close()

    def _loop(self, stop: StopRequest) -> None:
        t, p = self.cfg.trainer, self.trainer.progress
        bar = ProgressBar(t.max_steps, p.step, enabled=t.progress_bar)
        if self.evals.missed(p):
            self._evaluate()
        lease = self.tracker.lease
        self.trainer.stopping = lambda: stop.requested  # (told to the other ranks)
        # (a sweep's pruner may end the run early: it then completes at this step)
        while p.step < t.max_steps and not stop.requested and not self.evals.pruned:
            if lease.fenced:
                raise Fenced(lease.reason)
            self.team.step()
            metrics = self.trainer.train_step()
            self.team.step_done()
            if self.trainer.parallel is not None and self.trainer.parallel.peers_stopping:
                stop.request(signal.SIGTERM, "another rank of the run was asked to stop")
            # (floats the step has synced already: the progress log's mean costs no sync)
            self.window.add(p.step, metrics)
            metrics.update(self.pending_metrics)
            self.pending_metrics.clear()
            if p.step % t.log_every_n_steps == 0 or p.step == t.max_steps:
                metrics.update(self.trainer.so8t_metrics())
                self.tracker.log_metrics(metrics, p.step)
            if stop.grace is not None:  # a closing console: no time for an eval or a save
                break
            if self.evals.due(p.step):
                self._evaluate()
            if (
                self.checkpointer.rolling_due(p.step, p.train_seconds)
                and not self.checkpointer.busy
            ):
                self._save("rolling")
            bar.update(p.step, metrics)
        bar.close()

    def _evaluate(self) -> None:
        if self.evals.run(self.trainer):
            self._save("best")

    def _state_for_monitor(self) -> dict:
        tr = getattr(self, "trainer", None)
        return tr.progress.as_dict() if tr else {"step": 0}

    # -- save and finish --------------------------------------------------------------
    def _save(self, kind: str, wait: bool = False) -> None:
        if self.tracker.lease.fenced:  # (a checkpoint now would be another owner's history)
            raise Fenced(self.tracker.lease.reason)
        tr = self.trainer
        started = time.perf_counter()
        self.checkpointer.drain()  # the host buffers below are reused: the last write is done
        captured = time.perf_counter()
        state = {
            "progress": tr.progress.as_dict(),
            "config": self.fingerprint,
            "run_id": self.tracker.run_id,
            "kind": kind,
            "time": now_iso(),
            "last_save_seconds": tr.progress.train_seconds,
            "base_model": self.source.describe(),
            "torch": torch.__version__,
            "metrics_unsent": self.tracker.unsent_metrics(),
            "world_size": self.team.world.size,
        }
        params = (
            dict(tr.model.named_parameters()) if self.cfg.checkpoint.save_full_model else tr.params
        )
        payload = capture(
            params=params,
            optimizer=tr.optimizer,
            scheduler=tr.scheduler,
            scaler=tr.scaler,
            rng=tr.rng_at_boundary(),
            state=state,
            buffers=self.checkpointer.buffers,
            peer_rngs=self.team.rng_of_peers(tr.rng_at_boundary()),
        )
        self.checkpointer.last_capture_seconds = time.perf_counter() - captured
        self.checkpointer.last_save_seconds = tr.progress.train_seconds
        self.checkpointer.save(kind, tr.progress.step, payload, wait=wait)
        # Logged with the next step: this step's metrics are already in the checkpoint.
        self.pending_metrics["checkpoint/blocked_seconds"] = time.perf_counter() - started

    def _saved(self, name: str, step: int, kind: str) -> None:
        epoch, _ = self.trainer.plan.position(step)
        p = self.trainer.progress
        names = self.checkpointer.local_names()
        status = self.session.info.status
        self.session.save(
            # (a run trained longer is "running" from its first new checkpoint on)
            status="running" if status == "completed" else status,
            current_step=step,
            current_epoch=epoch,
            best_loss=p.best_value,
            best_metric=self.cfg.checkpoint.best_metric,
            best_checkpoint=next((n for n in names if n.startswith("best-")), None),
            skipped_steps=p.skipped_steps,
            checkpoints=names,
            last_checkpoint_time=now_iso(),
        )

    def _save_failed(self, name: str, err: Exception) -> None:
        self.notify("checkpoint_failed", f"run {self.tracker.run_id}: {name}: {err}")
