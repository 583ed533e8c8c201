"""Training state <-> checkpoint payload: everything an exact continuation needs.

:func:`capture` runs in the training thread and only copies into host memory;
:func:`restore` puts a loaded payload back into the live objects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from so8t_exp.checkpoint.format import Payload


@dataclass
class RNGState:
    """Every RNG the run draws from, captured together."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]

    @classmethod
    def now(cls) -> RNGState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def apply(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.torch_cuda)

    def to_payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        # (not cloned: capture copies every tensor into its host buffers)
        tensors = {"torch_cpu": self.torch_cpu}
        tensors.update({f"torch_cuda/{i}": s for i, s in enumerate(self.torch_cuda)})
        kind, keys, pos, has_gauss, gauss = self.numpy
        doc = {
            "python": [self.python[0], list(self.python[1]), self.python[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        }
        return tensors, doc

    @classmethod
    def from_payload(cls, tensors: dict[str, torch.Tensor], doc: dict) -> RNGState:
        py = doc["python"]
        kind, keys, pos, has_gauss, gauss = doc["numpy"]
        n_cuda = sum(k.startswith("torch_cuda/") for k in tensors)
        return cls(
            python=(py[0], tuple(py[1]), py[2]),
            numpy=(kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss),
            torch_cpu=tensors["torch_cpu"],
            torch_cuda=[tensors[f"torch_cuda/{i}"] for i in range(n_cuda)],
        )


class HostBuffers:
    """Host-memory copies of the state, reused from one save to the next.

    Allocating ~GBs afresh for every snapshot costs far more than the copy itself (page
    faults); saves never overlap, so one set of buffers serves them all. The caller must
    not capture again before the previous payload has been written (the checkpointer
    drains first)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        # A copy the training thread may keep mutating the original of.
        t = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._buffers[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        return buf.copy_(t)

    def fill(self, groups: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, dict | None]:
        """Copies of every group's tensors, and where they lie in shared memory (None:
        ordinary host memory; see :class:`so8t_exp.checkpoint.arena.Arena`)."""
        out = {g: {n: self.copy(f"{g}/{n}", t) for n, t in ts.items()} for g, ts in groups.items()}
        return out, None

    def close(self) -> None:
        """Nothing to free (the arena's subclass frees its shared memory)."""


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer's state tensors (live, not copied) and the rest of it as a JSON doc."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{key}"] = value
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, doc: dict) -> None:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *doc["scalars"].items()]:
        idx, key = flat.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})


def capture(
    *,
    params: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    scaler,
    rng: RNGState,
    state: dict,
    buffers: HostBuffers | None = None,
    peer_rngs: dict[int, RNGState] | None = None,
) -> Payload:
    """Snapshot into host memory (the training thread's only share of a save); with
    ``buffers``, into the same memory as the previous snapshot. ``peer_rngs``: the RNG
    states of the other ranks of a multi-process run (rank 0's is ``rng``)."""
    buffers = buffers or HostBuffers()
    opt_tensors, opt_doc = optimizer_tensors(optimizer)
    rng_tensors, rng_doc = rng.to_payload()
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    groups = {"weights": params, "optimizer": opt_tensors, "rng": rng_tensors}
    docs = {
        "state": state,
        "optimizer": opt_doc,
        "rng": rng_doc,
        "scheduler": sched,
        "scaler": scaler.state_dict(),
    }
    for rank, peer in (peer_rngs or {}).items():
        group = rng_group(rank)
        groups[group], docs[group] = peer.to_payload()
    tensors, shared = buffers.fill(groups)
    return Payload(tensors=tensors, docs=docs, shared=shared)


def rng_group(rank: int) -> str:
    """The payload group (tensors and doc) of one rank's RNG states."""
    return "rng" if rank == 0 else f"rng-rank{rank}"


def restore(
    payload: Payload,
    *,
    params: dict[str, torch.nn.Parameter],
    required: set[str],
    optimizer,
    scheduler,
    scaler,
    rank: int = 0,
) -> dict:
    """Load weights, optimizer, schedule, scaler and RNGs (those of ``rank``); returns
    the ``state`` doc.

    ``params`` are all the model's parameters; ``required`` (the trainable ones) must be in
    the checkpoint; frozen ones are loaded too when it has them (``save_full_model``).
    """
    weights = payload.tensors["weights"]
    missing, unexpected = required - set(weights), set(weights) - set(params)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint weights do not match the model: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    load_optimizer(optimizer, payload.tensors["optimizer"], payload.docs["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **payload.docs["scheduler"]})
    if payload.docs["scaler"]:
        scaler.load_state_dict(payload.docs["scaler"])
    group = rng_group(rank)
    RNGState.from_payload(payload.tensors[group], payload.docs[group]).apply()
    return payload.docs["state"]
