"""Builds the parts of a run from config. Every ``hydra.utils.instantiate`` lives here."""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from so8t_exp import so8t
from so8t_exp.notify import Notifiers

log = logging.getLogger(__name__)


def build_source(cfg: DictConfig):
    """The model source object (cheap: nothing is loaded yet)."""
    return instantiate(cfg.model.source, _convert_="all")


def build_model(cfg: DictConfig, source) -> tuple[torch.nn.Module, object, list]:
    """Load the base model, freeze it, add LoRA (optional) and the SO8T adapters."""
    model, tokenizer = source.load()
    for name, p in model.named_parameters():
        p.requires_grad_(any(m in name for m in cfg.model.train_base_modules))
    if cfg.model.lora.enabled:
        model = _add_lora(model, cfg.model.lora)
    adapters = so8t.attach_adapters(model, cfg.model.so8t)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters, %d trainable (%d SO8T adapters)", n_all, n_train, len(adapters))
    return model, tokenizer, adapters


def _add_lora(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(
            "model.lora.enabled=true needs peft: pip install 'so8t_exp[lora]'"
        ) from err
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_optimizer(cfg: DictConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return instantiate(cfg.trainer.optimizer, params=params, _convert_="all")


def build_notifiers(cfg: DictConfig) -> Notifiers:
    return Notifiers({name: instantiate(node) for name, node in cfg.notify.notifiers.items()})
