"""The gradient exchange of a data-parallel step: DistributedDataParallel over the whole
objective, step-wide counts and sums over every rank.

Each rank divides its sums by the counts of the step's *global* batch and DDP averages the
gradients, so (times the world size) the update is that of the whole batch in one process.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from so8t_exp import objective
from so8t_exp.distributed import world as w


class _Objective(nn.Module):
    """One micro-batch's loss sums as one module, so that DDP sees every trainable
    parameter (LoRA, SO8T adapters, safety head: all submodules of ``model``) used inside
    its forward."""

    def __init__(self, model: nn.Module, adapters: list, head, autocast: Callable) -> None:
        super().__init__()
        self.model = model
        # (not registered again: they are submodules of ``model`` already)
        self._parts = (adapters, head, autocast)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        adapters, head, autocast = self._parts
        out = objective.forward(self.model, adapters, head, batch, autocast)
        return out.lm_sum, out.pet_sum, out.head_sum


# (torch >= 2.12 renamed the switch; the old name warns there)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


class DataParallel:
    """What :class:`so8t_exp.trainer.Trainer` calls instead of the plain forward when the
    run has several ranks."""

    def __init__(self, model, adapters, head, autocast, device: torch.device, group) -> None:
        self.group, self.size = group, dist.get_world_size(group)
        ids = [device.index or 0] if device.type == "cuda" else None
        # Every trainable parameter is used by every step (the head on unlabelled batches
        # too, with a zero loss): no unused-parameter search. Buffers (rotary tables) are
        # the same everywhere: not broadcast each forward.
        self.ddp = w.collective(
            "setting up DistributedDataParallel",
            DistributedDataParallel,
            _Objective(model, adapters, head, autocast),
            device_ids=ids,
            process_group=group,
            **_NO_BUFFER_SYNC,
        )
        self.peers_stopping = False

    def sync(self, last: bool):
        """Gradients are exchanged with the last micro-batch of a step only."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def forward(self, batch: dict) -> objective.Forward:
        lm, pet, head = self.ddp(batch)
        return objective.Forward(lm, pet, head, None)

    def global_counts(self, counts: objective.Counts, tokens: int) -> tuple:
        """The step's counts and tokens over every rank's share of the batch."""
        t = torch.tensor([counts.tokens, counts.pet_positions, counts.labelled, tokens])
        w.collective("summing the step's counts", dist.all_reduce, t, group=self.group)
        total = objective.Counts(int(t[0]), int(t[1]), int(t[2]))
        return total, int(t[3])

    def reduce(self, sums: torch.Tensor, stopping: bool) -> torch.Tensor:
        """The step's loss sums over every rank; also tells whether any rank was asked to
        stop (``peers_stopping``), so that all stop at the same step."""
        flag = torch.tensor([float(stopping)], device=sums.device)
        t = torch.cat([sums.to(torch.float64), flag.to(torch.float64)])
        w.collective("summing the step's losses", dist.all_reduce, t, group=self.group)
        self.peers_stopping = bool(t[-1] > 0)
        return t[:-1].to(sums.dtype)
