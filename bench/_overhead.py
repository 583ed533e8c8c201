"""Benchmarks 1 (framework overhead) and 4 (tracking cost), measured in one interleaved loop.

Three ways to train the same thing — the tiny default model (``TinyPhi3`` + SO8T adapters
from ``build.build_model`` on a composed config), the bundled sample set encoded by
``so8t_exp.data``, the same micro-batch, steps, seed, LR schedule, alpha gate, PET loss and
grad clipping:

* ``bare``: a plain PyTorch loop (no logging, no saving);
* ``ours``: ``so8t_exp.run.run_training`` in this process (metrics every step, system stats,
  heartbeat, progress log, rolling checkpoints every steps/4 mirrored to MLflow);
* ``hf``: ``transformers.Trainer`` with ``report_to=["mlflow"]``, ``logging_steps=1`` and
  ``save_steps`` = steps/4 (full HF checkpoints: model, optimizer, scheduler, RNG).

Each loop runs ``windows × steps + 1`` steps with a save every ``steps / 4``; its throughput
is measured over ``windows`` consecutive windows of ``steps`` steps each, the first one
starting at the end of step 1. Start-up (model build, MLflow DB and run creation), the first
step, the final evaluation and save are outside every window. ``ours`` is read from the
MLflow timestamps of ``train/loss`` (stamped when the step's metrics are handed to the
tracker, right after the step); ``bare`` and ``hf`` from ``time.perf_counter()`` at the end
of each step (HF: ``on_step_end``). Several short windows per run, over rounds interleaved
with the order rotated, give medians that survive the bursts of a shared machine.

Benchmark 4 comes from the ``ours`` runs: ``so8t_exp.run.Tracker`` is swapped for a subclass
that times every ``log_metrics`` call made by the training thread (two ``perf_counter``
calls per step, well under a microsecond); the fraction is the time inside those calls over
the wall time from the end of step 1 to the end of the last step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import compose_train, log, median, median_step, rotated_rounds, steps_per_second
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

import so8t_exp.run as so8t_run
from so8t_exp import build, data, objective, so8t
from so8t_exp.build import seed_everything
from so8t_exp.run import run_training
from so8t_exp.tracking import Tracker
from so8t_exp.trainer import lr_factor

KINDS = ("bare", "ours", "hf")


@dataclass
class Workload:
    """One benchmark configuration, shared by the three loops."""

    root: Path
    store: str
    steps: int  # per measurement window
    windows: int = 1

    @property
    def total(self) -> int:
        return self.windows * self.steps + 1

    @property
    def save_every(self) -> int:
        return max(1, self.steps // 4)

    def cfg(self) -> DictConfig:
        # Evaluation only at the last step (after the last window); monitor tasks scaled
        # down so each fires several times within a run of a few seconds (defaults: stats
        # 10 s, heartbeat 30 s, progress 180 s).
        return compose_train(
            self.store,
            f"trainer.max_steps={self.total}",
            f"trainer.eval_every_n_steps={self.total}",
            f"checkpoint.every_n_steps={self.save_every}",
            "tracking.system_stats_interval_seconds=1",
            "session.heartbeat_seconds=2",
            "progress.interval_seconds=2",
            "notify=none",
        )


@dataclass
class Results:
    sps: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    step_ms: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    log_fraction: list[float] = field(default_factory=list)
    log_call_us: list[float] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)  # per round: median steps/s

    def add(self, kind: str, ends: list[float], steps: int) -> None:
        """One run's step end times, cut into windows of ``steps`` steps."""
        rates = [steps_per_second(ends[w : w + steps + 1]) for w in range(0, len(ends) - 1, steps)]
        self.sps[kind].extend(rates)
        self.step_ms[kind].append(median_step(ends) * 1000)
        self.rounds[-1][kind] = median(rates)

    def paired(self, kind: str, base: str) -> float:
        """Median over rounds of (``kind`` / ``base``) steps/s within the same round: runs
        a minute apart share the machine's state, so drift in a neighbour's load cancels."""
        return median([r[kind] / r[base] for r in self.rounds if kind in r and base in r])


# -- the three loops ---------------------------------------------------------------------
def _plan(cfg: DictConfig, tokenizer) -> data.BatchPlan:
    examples, _too_long = build.encode_records(cfg, tokenizer, data.load_dataset(cfg.data).train)
    t = cfg.trainer
    return data.BatchPlan(
        examples, t.micro_batch_size, t.grad_accum_steps, cfg.seed, tokenizer.pad_token_id
    )


def _build(cfg: DictConfig):
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    model, tokenizer, adapters, head = build.build_model(cfg, build.build_source(cfg))
    model.train()
    return model, adapters, head, _plan(cfg, tokenizer)


def _scheduler(cfg: DictConfig, optimizer):
    t, s = cfg.trainer, cfg.trainer.scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, s.warmup_steps, t.max_steps, s.name, s.min_lr_ratio)
    )


def bare_loop(cfg: DictConfig) -> list[float]:
    """The same maths as ``so8t_exp.trainer.Trainer.train_step``, nothing else."""
    model, adapters, head, plan = _build(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build.build_optimizer(cfg, params)
    scheduler = _scheduler(cfg, optimizer)
    n, ends = cfg.trainer.max_steps, []
    head_weight = cfg.model.safety_head.loss_weight
    for step in range(n):
        so8t.set_alpha(adapters, so8t.alpha_at(step, cfg.model.so8t.alpha_gate, n))
        pet_weight = so8t.pet_weight_at(step, cfg.model.so8t.pet, n)
        micro = plan.micro_batches(step)
        counts = objective.Counts.of(micro)
        for batch in micro:
            out = objective.forward(model, adapters, head, batch, contextlib.nullcontext)
            out.loss(counts, pet_weight, head_weight).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


class TimedTracker(Tracker):
    """``Tracker`` that times ``log_metrics`` calls made by the main (training) thread."""

    calls: list[tuple[int, bool, float, float]] = []  # (step, is train step, start, seconds)

    def log_metrics(self, metrics, step: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return super().log_metrics(metrics, step)  # monitor thread (system stats)
        started = time.perf_counter()
        super().log_metrics(metrics, step)
        TimedTracker.calls.append(
            (step, "train/loss" in metrics, started, time.perf_counter() - started)
        )


def ours_loop(work: Workload, session: Path) -> tuple[list[float], float, float]:
    """``run_training`` in-process: (step end times, log_metrics fraction, µs per call)."""
    cfg = work.cfg()
    TimedTracker.calls = []
    so8t_run.Tracker = TimedTracker
    try:
        code = run_training(cfg, session)
    finally:
        so8t_run.Tracker = Tracker
    if code != 0:
        raise RuntimeError(f"run_training exited {code}")
    run_id = json.loads((session / "session_info.json").read_text())["session_id"]
    points = MlflowClient(work.store).get_metric_history(run_id, "train/loss")
    ends = [m.timestamp / 1000 for m in sorted(points, key=lambda m: m.step)]
    if len(ends) != work.total:
        raise RuntimeError(f"expected {work.total} train/loss points, got {len(ends)}")
    # Tracking cost over the same window, on the tracker's own clock.
    train = [c for c in TimedTracker.calls if c[1]]
    first, last = train[0][2] + train[0][3], train[-1][2] + train[-1][3]
    inside = [c[3] for c in TimedTracker.calls if first < c[2] + c[3] <= last]
    return ends, sum(inside) / (last - first), median([c[3] for c in train]) * 1e6


def hf_loop(work: Workload, out_dir: Path) -> list[float]:
    """``transformers.Trainer`` on the same model, batches and schedule, logging to MLflow."""
    import mlflow
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cfg = work.cfg()
    model, adapters, head, plan = _build(cfg)
    n, ends = work.total, []

    accum = cfg.trainer.grad_accum_steps

    class Batches(torch.utils.data.Dataset):
        """Item ``i`` is micro-batch ``i % accum`` of step ``i // accum``, collated on demand
        (as the others do)."""

        def __len__(self) -> int:
            return n * accum

        def __getitem__(self, i: int) -> dict:
            return plan.micro_batches(i // accum)[i % accum]

    class SO8TTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The same objective, averaged per micro-batch as the Trainer does.
            step = self.state.global_step
            so8t.set_alpha(adapters, so8t.alpha_at(step, cfg.model.so8t.alpha_gate, n))
            out = objective.forward(model, adapters, head, inputs, contextlib.nullcontext)
            pet_weight = so8t.pet_weight_at(step, cfg.model.so8t.pet, n)
            counts = objective.Counts.of([inputs])
            loss = out.loss(counts, pet_weight, cfg.model.safety_head.loss_weight)
            return (loss, out) if return_outputs else loss

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    t = cfg.trainer
    opt = t.optimizer
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=n,
        per_device_train_batch_size=1,  # one item = one collated micro-batch
        gradient_accumulation_steps=accum,
        learning_rate=opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.scheduler.min_lr_ratio},
        warmup_steps=t.scheduler.warmup_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=work.save_every,
        save_total_limit=cfg.checkpoint.keep,
        eval_strategy="no",
        report_to=["mlflow"],
        seed=cfg.seed,
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "hf_trainer"
    mlflow.set_tracking_uri(work.store)
    trainer = SO8TTrainer(
        model=model,
        args=args,
        train_dataset=Batches(),
        data_collator=lambda items: items[0],
        callbacks=[StepClock()],
    )
    for printer in (PrinterCallback, ProgressCallback):  # console output, not tracking
        trainer.remove_callback(printer)
    trainer.train()
    if mlflow.active_run() is not None:
        mlflow.end_run()
    if len(ends) != n:
        raise RuntimeError(f"HF Trainer ran {len(ends)} steps, expected {n}")
    return ends


# -- the interleaved benchmark -----------------------------------------------------------
def run(
    root: Path, store: str, steps: int, windows: int, rounds: int, budget_s: float, threads: int
) -> Results:
    """Up to ``rounds`` rounds of the three loops, order rotated each round (bare-ours-hf,
    ours-hf-bare, hf-bare-ours, ...) so drift and position effects hit all alike; a round is
    only started if the previous one's duration still fits in ``budget_s``.

    ``threads``: torch intra-op threads for all three (0: torch's default, one per core). One
    thread is the default of ``bench/run.py``: with every core in the intra-op pool, a
    neighbour's process on a shared machine stalls each parallel region (steps/s swing 10x
    from one window to the next on 2 cores), while one thread slows down by at most the
    share taken. It also leaves the framework's background threads a core, as a GPU run
    does; with ``--threads 0`` they compete with the compute threads instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    work = Workload(root, store, steps, windows)
    torch.use_deterministic_algorithms(True, warn_only=True)  # what run_training sets
    bare_loop(Workload(root, store, 2).cfg())  # warm-up: first-call costs, not timed
    res = Results()
    loops: dict[str, Callable[[int], list[float]]] = {
        "bare": lambda i: bare_loop(work.cfg()),
        "ours": lambda i: _ours(work, root / f"ours-{i}", res),
        "hf": lambda i: hf_loop(work, root / f"hf-{i}"),
    }
    for i, order in rotated_rounds(KINDS, rounds, budget_s):
        res.rounds.append({})
        for kind in order:
            gc.collect()
            res.add(kind, loops[kind](i), steps)
            rates = " ".join(f"{x:5.2f}" for x in res.sps[kind][-windows:])
            log(f"  overhead round {i + 1}/{rounds} {kind:4}: {rates} steps/s")
    return res


def _ours(work: Workload, session: Path, res: Results) -> list[float]:
    ends, fraction, call_us = ours_loop(work, session)
    res.log_fraction.append(fraction)
    res.log_call_us.append(call_us)
    return ends
