"""The training loop: one optimizer step at a time, nothing else.

Everything a step depends on is a function of the step number (batch, learning rate,
alpha gate, PET weight) or lives in state that checkpoints capture (weights, optimizer,
scaler, RNGs), which is what makes a resumed run bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from so8t_exp import so8t
from so8t_exp.checkpoint import RNGState
from so8t_exp.data import BatchPlan


@dataclass
class Progress:
    """Counters that travel in checkpoints (``state.json``)."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    step_in_epoch: int = 0
    best_loss: float | None = None  # best validation loss so far
    last_eval_step: int = 0
    train_seconds: float = 0.0  # time spent in steps; checkpoint intervals count this
    tokens_seen: int = 0

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
        optimizer,
        scheduler,
        scaler,
        plan: BatchPlan,
        device: torch.device,
        precision: str,
    ) -> None:
        self.cfg, self.model, self.adapters = cfg, model, adapters
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.plan, self.device = plan, device
        self.autocast = amp_context(device, precision)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.progress = Progress()
        self.boundary_rng: RNGState | None = None  # RNGs at the start of the current step
        self.in_step = False  # True from the start of a step until it is complete
        self.applying = False  # True while an optimizer update is half-applied
        # Fault injection for tests and the fault suite: raise at this step.
        self._fail_at = int(os.environ.get("SO8T_FAULT_FAIL_AT_STEP", "0") or 0)

    def schedules(self, step: int) -> dict[str, float]:
        t = self.cfg.trainer
        return {
            "train/alpha": so8t.alpha_at(step, self.cfg.model.so8t.alpha_gate, t.max_steps),
            "train/pet_weight": so8t.pet_weight_at(step, self.cfg.model.so8t.pet, t.max_steps),
        }

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its metrics."""
        step = self.progress.step
        self.boundary_rng = RNGState.now()
        self.in_step = True
        started = time.perf_counter()
        sched = self.schedules(step)
        so8t.set_alpha(self.adapters, sched["train/alpha"])
        if self._fail_at and step + 1 == self._fail_at:
            raise RuntimeError(f"fault injection: SO8T_FAULT_FAIL_AT_STEP={self._fail_at}")
        micro = self.plan.micro_batches(step)
        lm_sum = pet_sum = 0.0
        tokens = 0
        for batch in micro:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.autocast():
                out = self.model(**batch)
            pet = so8t.pet_loss(self.adapters, batch["attention_mask"])
            loss = (out.loss.float() + sched["train/pet_weight"] * pet) / len(micro)
            self.scaler.scale(loss).backward()
            lm_sum += out.loss.item()
            pet_sum += pet.item()
            tokens += int(batch["attention_mask"].sum())
        lr = self.scheduler.get_last_lr()[0]
        self.applying = True
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            list(self.params.values()), self.cfg.trainer.max_grad_norm
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._advance(tokens, time.perf_counter() - started)
        self.applying = self.in_step = False
        seconds = time.perf_counter() - started
        return {
            "train/loss": lm_sum / len(micro),
            "train/pet_loss": pet_sum / len(micro),
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/tokens_per_sec": tokens / max(seconds, 1e-9),
            "train/epoch": self.progress.epoch,
            **sched,
        }

    def rng_at_boundary(self) -> RNGState:
        """RNG states as they were at the last completed step boundary."""
        return self.boundary_rng if self.in_step and self.boundary_rng else RNGState.now()

    def _advance(self, tokens: int, seconds: float) -> None:
        p = self.progress
        p.step += 1
        p.epoch, p.step_in_epoch = self.plan.position(p.step)
        p.tokens_seen += tokens
        p.train_seconds += seconds

    def so8t_metrics(self) -> dict[str, float]:
        out = so8t.rotation_health(self.adapters)
        if self.adapters:
            scales = torch.stack([a.scale for a in self.adapters]).detach()
            out["so8t/lambda_abs_mean"] = float(scales.abs().mean())
        return out
