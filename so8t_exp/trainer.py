"""The training loop: one optimizer step at a time, nothing else.

Everything a step depends on is a function of the step number (batch, learning rate,
alpha gate, PET weight) or lives in state that checkpoints capture (weights, optimizer,
scaler, RNGs), which is what makes a resumed run bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from so8t_exp import objective, so8t
from so8t_exp.checkpoint import RNGState, restore
from so8t_exp.data import FOUR_CLASS_LABELS, BatchPlan
from so8t_exp.safety_head import ATTRIBUTE

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """``trainer.max_bad_steps`` consecutive steps had a non-finite loss or gradient.

    ``metrics`` are the last step's (it is complete: they are still worth logging)."""

    def __init__(self, message: str, metrics: dict[str, float]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass
class Progress:
    """Counters that travel in checkpoints (``state.json``)."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    step_in_epoch: int = 0
    best_value: float | None = None  # best checkpoint.best_metric so far
    best_step: int | None = None
    last_eval_step: int = 0
    train_seconds: float = 0.0  # time spent in steps; checkpoint intervals count this
    tokens_seen: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient: not applied
    bad_streak: int = 0  # consecutive skipped steps
    confusion: list[list[int]] | None = None  # safety head, at the last evaluation
    # Horizon of the LR, alpha and PET schedules when it is not trainer.max_steps: a
    # completed run trained longer keeps the horizon it was planned with.
    schedule_steps: int | None = None

    def horizon(self, max_steps: int) -> int:
        return self.schedule_steps or max_steps

    def as_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, warmup: int, total: int, name: str, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * t)) if name == "cosine" else 1.0 - t
    return min_ratio + (1.0 - min_ratio) * shape


def amp_context(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager]:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext


class Trainer:
    def __init__(
        self,
        cfg,
        model,
        adapters,
        head,
        optimizer,
        scheduler,
        scaler,
        plan: BatchPlan,
        device: torch.device,
        precision: str,
        progress: Progress | None = None,
    ) -> None:
        self.cfg, self.model, self.adapters, self.head = cfg, model, adapters, head
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.plan, self.device = plan, device
        self.autocast = amp_context(device, precision)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.progress = progress or Progress()
        # Several ranks (torchrun): the gradient exchange, set by the builder; and whether
        # this rank has been asked to stop (told to the others with the step's sums).
        self.parallel = None
        self.stopping: Callable[[], bool] = lambda: False
        self.boundary_rng: RNGState | None = None  # RNGs at the start of the current step
        self.in_step = False  # True from the start of a step until it is complete
        self.applying = False  # True while an optimizer update is half-applied
        # Fault injection for tests and the fault suite: raise at this step; NaN loss at
        # these steps (comma-separated).
        self._fail_at = int(os.environ.get("SO8T_FAULT_FAIL_AT_STEP", "0") or 0)
        nan_at = os.environ.get("SO8T_FAULT_NAN_AT_STEPS", "")
        self._nan_at = {int(s) for s in nan_at.split(",") if s.strip()}
        self._step_pause = float(os.environ.get("SO8T_FAULT_STEP_SECONDS", "0") or 0)

    def schedules(self, step: int) -> dict[str, float]:
        total, so8t_cfg = self.progress.horizon(self.cfg.trainer.max_steps), self.cfg.model.so8t
        return {
            "train/alpha": so8t.alpha_at(step, so8t_cfg.alpha_gate, total),
            "train/pet_weight": so8t.pet_weight_at(step, so8t_cfg.pet, total),
        }

    def sync_schedules(self) -> None:
        """Put the step-dependent model state (the alpha gate) where the last completed
        step left it: after a restore, evaluation sees the model an uninterrupted run had."""
        last = max(self.progress.step - 1, 0)
        so8t.set_alpha(self.adapters, self.schedules(last)["train/alpha"])

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its metrics.

        A non-finite loss or gradient skips the update (the step still counts: data order
        and schedules stay functions of the step); ``trainer.max_bad_steps`` in a row raise
        :class:`TrainingDiverged` once the step is complete, so the state saved then is the
        last good one."""
        step = self.progress.step
        self.boundary_rng = RNGState.now()
        self.in_step = True
        started = time.perf_counter()
        sched = self.schedules(step)
        so8t.set_alpha(self.adapters, sched["train/alpha"])
        if self._step_pause:  # (a slow model, for tests that need time mid-run)
            time.sleep(self._step_pause)
        if self._fail_at and step + 1 == self._fail_at:
            raise RuntimeError(f"fault injection: SO8T_FAULT_FAIL_AT_STEP={self._fail_at}")
        micro = self.plan.micro_batches(step)
        counts = objective.Counts.of(micro)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        par = self.parallel
        if par is not None:  # (each rank divides by the whole batch's counts)
            counts, tokens = par.global_counts(counts, tokens)
        sums = self._forward_backward(step, micro, counts, sched["train/pet_weight"])
        if par is not None:
            sums = par.reduce(sums, self.stopping())
        lr = self.scheduler.get_last_lr()[0]
        self.applying = True
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            list(self.params.values()), self.cfg.trainer.max_grad_norm
        )
        lm, pet, head = (sums / counts.divisors(sums.device)).tolist()  # one device sync
        grad_norm = float(grad_norm)
        good = all(map(math.isfinite, (lm, pet, head, grad_norm)))
        if good:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._advance(tokens, time.perf_counter() - started, good)
        self.applying = self.in_step = False
        seconds = time.perf_counter() - started
        metrics = {"train/lr": lr, "train/epoch": self.progress.epoch, **sched}
        if not good:
            metrics["train/skipped_steps"] = self.progress.skipped_steps
            self._check_streak(step + 1, lm, grad_norm, metrics)
            return metrics
        metrics.update(
            {
                "train/loss": lm,
                "train/pet_loss": pet,
                "train/grad_norm": grad_norm,
                "train/tokens_per_sec": tokens / max(seconds, 1e-9),
            }
        )
        if counts.labelled and self.head is not None:
            metrics["train/head_loss"] = head
        if self.progress.step == self.cfg.trainer.max_steps:
            metrics["train/skipped_steps"] = self.progress.skipped_steps
        return metrics

    def _forward_backward(
        self, step: int, micro: list[dict], counts: objective.Counts, pet_weight: float
    ) -> torch.Tensor:
        """Forward and backward every micro-batch of the step; their summed losses."""
        head_weight, par = self.cfg.model.safety_head.loss_weight, self.parallel
        # (DDP averages the ranks' gradients: times their number, the sum is the batch's)
        scale = par.size if par is not None else 1
        sums = torch.zeros(3, device=self.device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with par.sync(last=i == len(micro) - 1) if par else contextlib.nullcontext():
                if par is not None:
                    out = par.forward(batch)
                else:
                    out = objective.forward(
                        self.model, self.adapters, self.head, batch, self.autocast
                    )
                if step + 1 in self._nan_at:
                    out.lm_sum = out.lm_sum * float("nan")
                loss = out.loss(counts, pet_weight, head_weight)
                self.scaler.scale(loss * scale if scale != 1 else loss).backward()
            sums += out.sums()
        return sums

    def _check_streak(self, step: int, loss: float, grad_norm: float, metrics: dict) -> None:
        p, limit = self.progress, self.cfg.trainer.max_bad_steps
        log.warning(
            "step %d skipped: loss %s, gradient norm %s (%d in a row, limit %d)",
            step,
            loss,
            grad_norm,
            p.bad_streak,
            limit,
        )
        if p.bad_streak >= limit:
            raise TrainingDiverged(
                f"training diverged: {p.bad_streak} consecutive steps (up to step {step}) had "
                f"a non-finite loss or gradient (trainer.max_bad_steps={limit}); the weights "
                "are those of the last good step. Lower trainer.optimizer.lr, check the data, "
                "or use precision=fp32/bf16 instead of fp16",
                metrics,
            )

    def restore(self, payload, rank: int = 0) -> dict:
        """Put a checkpoint into this trainer (with the RNG states of ``rank``); returns
        its state doc."""
        state = restore(
            payload,
            params=dict(self.model.named_parameters()),
            required=set(self.params),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            rank=rank,
        )
        for key, value in state["progress"].items():
            setattr(self.progress, key, value)
        return state

    def rng_at_boundary(self) -> RNGState:
        """RNG states as they were at the last completed step boundary."""
        return self.boundary_rng if self.in_step and self.boundary_rng else RNGState.now()

    def _advance(self, tokens: int, seconds: float, good: bool) -> None:
        p = self.progress
        p.step += 1
        p.epoch, p.step_in_epoch = self.plan.position(p.step)
        p.tokens_seen += tokens
        p.train_seconds += seconds
        p.skipped_steps += not good
        p.bad_streak = 0 if good else p.bad_streak + 1

    def so8t_state(self) -> dict:
        """What the final model needs besides its weights: the alpha gate's value, and
        where the safety head reads."""
        alpha = float(self.adapters[0].alpha) if self.adapters else None
        head = None
        if self.head is not None:
            head = {
                "labels": list(FOUR_CLASS_LABELS),
                "input": "final hidden state (after the last norm) of the last prompt token",
                "module": ATTRIBUTE,
            }
        return {"alpha": alpha, "safety_head": head}

    def so8t_metrics(self) -> dict[str, float]:
        out = so8t.rotation_health(self.adapters)
        if self.adapters:
            scales = torch.stack([a.scale for a in self.adapters]).detach()
            out["so8t/lambda_abs_mean"] = float(scales.abs().mean())
        return out
