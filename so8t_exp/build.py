"""Builds the parts of a run from config. Every ``hydra.utils.instantiate`` lives here."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from so8t_exp import chat, data, so8t
from so8t_exp.distributed.data_parallel import DataParallel
from so8t_exp.distributed.world import SOLO, World
from so8t_exp.notify import Notifiers
from so8t_exp.safety_head import SafetyHead, attach_safety_head
from so8t_exp.trainer import Progress, Trainer, lr_factor

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; read when its first handle is
        # made (the first CUDA matmul, after this), so a user's own setting is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(trainer_cfg) -> tuple[torch.device, str]:
    """(device, precision) from ``trainer.device`` and ``trainer.precision``."""
    name = trainer_cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    precision = trainer_cfg.precision
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "fp32" if device.type == "cpu" else ("bf16" if bf16 else "fp16")
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("trainer.precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
    return device, precision


def build_source(cfg: DictConfig):
    """The model source object (cheap: nothing is loaded yet)."""
    return instantiate(cfg.model.source, _convert_="all")


def build_model(cfg: DictConfig, source) -> tuple[torch.nn.Module, object, list, SafetyHead | None]:
    """Load the base model, freeze it, add LoRA (optional), the SO8T adapters and the
    safety head."""
    model, tokenizer = source.load()
    for name, p in model.named_parameters():
        p.requires_grad_(any(m in name for m in cfg.model.train_base_modules))
    if cfg.model.lora.enabled:
        model = _add_lora(model, cfg.model.lora)
    adapters = so8t.attach_adapters(model, cfg.model.so8t)
    head = attach_safety_head(model, cfg.model.safety_head)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters, %d trainable (%d SO8T adapters)", n_all, n_train, len(adapters))
    return model, tokenizer, adapters, head


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


@dataclass
class Built:
    """What a run trains with, besides the model inside ``trainer``."""

    trainer: Trainer
    tokenizer: object
    val_batches: list[dict[str, torch.Tensor]]
    too_long: int  # records skipped: their answer does not fit data.max_length


def encode_records(cfg: DictConfig, tokenizer, records: list[data.Record]) -> tuple[list, int]:
    """Chat-formatted examples of ``records`` and how many were too long to keep."""
    fmt = chat.ChatFormat.from_tokenizer(tokenizer)
    d = cfg.data
    return chat.encode_all(records, fmt, tokenizer, d.max_length, d.mask_prompt)


def build_training(
    cfg: DictConfig,
    source,
    dataset: data.Dataset,
    device: torch.device,
    precision: str,
    world: World = SOLO,
    group=None,
) -> Built:
    """Model, optimizer, schedule, scaler and batch plan as a :class:`Trainer`, plus the
    tokenizer and the validation batches (the whole split, unless trainer.eval_max_batches).
    With several ranks (``world``, their process ``group``), this rank's share of each
    batch and the gradient exchange; every rank but 0 then draws from RNGs of its own."""
    model, tokenizer, adapters, head = build_model(cfg, source)
    model.to(device).train()
    train, too_long = encode_records(cfg, tokenizer, dataset.train)
    val, val_too_long = encode_records(cfg, tokenizer, dataset.val)
    t = cfg.trainer
    plan = data.BatchPlan(
        train,
        t.micro_batch_size,
        t.grad_accum_steps,
        cfg.seed,
        tokenizer.pad_token_id,
        world.rank,
        world.size,
    )
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    s, progress = t.scheduler, Progress()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, s.warmup_steps, progress.horizon(t.max_steps), s.name, s.min_lr_ratio
        ),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    trainer = Trainer(
        cfg, model, adapters, head, optimizer, scheduler, scaler, plan, device, precision, progress
    )
    if world.distributed:
        trainer.parallel = DataParallel(model, adapters, head, trainer.autocast, device, group)
        if not world.leader:  # (dropout masks of their own; a resume restores them)
            seed_everything(cfg.seed + 1_000_003 * world.rank, t.deterministic)
    mb = t.micro_batch_size
    val_batches = [
        data.collate(val[i : i + mb], tokenizer.pad_token_id) for i in range(0, len(val), mb)
    ][: t.eval_max_batches]
    return Built(trainer, tokenizer, val_batches, too_long + val_too_long)


def build_notifiers(cfg: DictConfig) -> Notifiers:
    return Notifiers({name: instantiate(node) for name, node in cfg.notify.notifiers.items()})


def build_engine(node, **kwargs):
    """The serving engine ``serve.engine`` names (``_target_``), on an exported folder."""
    return instantiate(node, **kwargs, _convert_="all")
