"""Rebuild a trained SO8T model and turn it into a plain Hugging Face model.

The model is rebuilt exactly as training built it (same config, same base), the trained
weights loaded by name and the alpha gate set to the value it had at the exported step.
Everything is done in float32: LoRA is merged (``merge_and_unload``), then each SO(8)
adapter is folded into its ``o_proj`` (W ← W·M) and removed; the result is cast once, when
written. The safety head leaves the model and is written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from so8t_exp import build, so8t
from so8t_exp.export.locate import TrainedState
from so8t_exp.safety_head import ATTRIBUTE, SafetyHead


@dataclass
class Rebuilt:
    model: torch.nn.Module  # as in training: LoRA wrapper, adapters, head (eval mode)
    tokenizer: object
    adapters: list
    head: SafetyHead | None
    alpha: float | None


def rebuild(state: TrainedState) -> Rebuilt:
    """The trained model of ``state`` in float32, in eval mode, on the CPU."""
    cfg = OmegaConf.create(OmegaConf.to_container(state.cfg, resolve=True))
    if "dtype" in cfg.model.source:
        cfg.model.source.dtype = "float32"  # merge and fold in float32; cast once on write
    if "device_map" in cfg.model.source:
        cfg.model.source.device_map = None
    if "load_in_8bit" in cfg.model.source:  # int8 weights cannot take a merge or a fold
        cfg.model.source.load_in_8bit = False
    model, tokenizer, adapters, head = build.build_model(cfg, build.build_source(cfg))
    params = dict(model.named_parameters())
    unknown = sorted(set(state.weights) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state.weights)
    if unknown or missing:
        raise ValueError(
            f"{state.checkpoint} does not fit the model its config builds: "
            f"unknown {unknown[:5]}, missing {missing[:5]}"
        )
    with torch.no_grad():
        for name, tensor in state.weights.items():
            params[name].copy_(tensor)
    alpha = None
    if adapters:  # as Trainer.sync_schedules: the alpha of the last completed step
        # (a run trained longer keeps its schedules' original horizon: Progress.horizon)
        total = state.metrics.get("schedule_steps") or cfg.trainer.max_steps
        gate = cfg.model.so8t.alpha_gate
        alpha = so8t.alpha_at(max(state.step - 1, 0), gate, total)
        so8t.set_alpha(adapters, alpha)
    return Rebuilt(model.eval(), tokenizer, adapters, head, alpha)


def plain_model(rebuilt: Rebuilt) -> tuple[torch.nn.Module, SafetyHead | None]:
    """The rebuilt model with LoRA merged, adapters folded, head removed (and returned).
    Consumes ``rebuilt.model``."""
    model, head = rebuilt.model, rebuilt.head
    if head is not None:  # (on the peft wrapper, when there is one)
        delattr(model, ATTRIBUTE)
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    folded = so8t.fold_adapters(model)
    if folded != len(rebuilt.adapters):
        raise RuntimeError(f"folded {folded} of {len(rebuilt.adapters)} SO8T adapters")
    return model.eval(), head
