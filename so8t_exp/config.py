"""Typed schemas for every config group, registered in Hydra's ConfigStore.

``conf/train.yaml`` lists ``train_schema`` first in its defaults, so every group file is
merged onto these dataclasses: a misspelled key or a value of the wrong type fails while
Hydra composes, naming the key and the file, before anything heavy is imported.
Nodes with ``_target_`` (model source, optimizer, notifiers) are the swappable parts;
:func:`validate` checks their keys against the target's signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from so8t_exp import paths  # noqa: F401  (registers the ${so8t_*:} resolvers)
from so8t_exp.config_checks import (
    ABOVE_ZERO,
    NOT_NEGATIVE,
    ConfigError,
    check_above_zero,
    check_data_file,
    check_not_negative,
    check_positive,
    check_schema_keys,
    check_target,
    validate_resume,
)

__all__ = [
    "ConfigError",
    "check_data_file",
    "check_target",
    "is_eval_metric",
    "validate",
    "validate_resume",
]


@dataclass
class AlphaGateConfig:
    target: float = 0.3819660112501051  # Φ⁻² = 1/φ²
    start_step: int = 0
    anneal_steps: int | None = None  # None: half of trainer.max_steps
    steepness: float = 10.0


@dataclass
class PETConfig:
    weight: float = 0.01  # weight in the main phase
    warmup_fraction: float = 0.2
    anneal_fraction: float = 0.8  # anneal starts here (fraction of max_steps)
    final_weight: float = 0.03


@dataclass
class SO8TConfig:
    layers: Any = "middle_third"  # "middle_third" | "all" | list of layer indices
    blocks: int = 4  # k: the adapter works in 8·k dimensions
    init_std: float = 0.02
    alpha_gate: AlphaGateConfig = field(default_factory=AlphaGateConfig)
    pet: PETConfig = field(default_factory=PETConfig)


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    )


@dataclass
class SafetyHeadConfig:
    enabled: bool = True
    loss_weight: float = 1.0  # weight of the head's cross-entropy beside the LM loss
    hidden_dim: int = 0  # 0: linear; else one hidden layer of this width
    dropout: float = 0.0


@dataclass
class ModelConfig:
    source: Any = None  # _target_ node: so8t_exp.model_sources.TinyPhi3 | Pretrained
    so8t: SO8TConfig = field(default_factory=SO8TConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    safety_head: SafetyHeadConfig = field(default_factory=SafetyHeadConfig)
    # Base parameters trained too, by name substring (like peft's modules_to_save); the
    # tiny default trains lm_head and embed_tokens: its random base has nothing to adapt.
    train_base_modules: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    max_length: int = 256
    mask_prompt: bool = True
    on_bad_record: str = "error"  # error | skip


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    max_steps: int = 200
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    optimizer: Any = None  # _target_ node, e.g. torch.optim.AdamW
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every_n_steps: int = 50
    eval_max_batches: int | None = None  # None: the whole validation split
    log_every_n_steps: int = 1
    progress_bar: bool = True
    deterministic: bool = True
    max_bad_steps: int = 20  # consecutive non-finite steps (skipped) before the run fails
    # torchrun: how long a rank waits in any exchange (a step, an evaluation on rank 0, a
    # checkpoint) before it gives up on the others and ends the run's processes
    distributed_timeout_seconds: float = 1800.0


@dataclass
class CheckpointConfig:
    interval_seconds: float = 180.0
    every_n_steps: int = 0  # 0: off
    keep: int = 5
    save_full_model: bool = False
    allow_config_change: bool = False
    mirror_to_mlflow: bool = True
    mirror_timeout_seconds: float = 300.0  # at the end, wait this long for the upload
    best_metric: str | None = "eval/loss"  # kept as best-stepN; None: no best checkpoint
    best_mode: str = "min"  # min | max
    # process: a writer process fed through shared memory (off the training thread's GIL);
    # thread: a thread of the training process
    writer: str = "process"


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite under <project>/mlruns; MLFLOW_TRACKING_URI wins
    experiment: str = "so8t"
    run_name: str | None = None
    flush_interval_seconds: float = 2.0
    # Metric batches sent by a helper process (off the training thread's GIL); false: by a
    # thread of the trainer.
    metrics_process: bool = True
    system_stats_interval_seconds: float = 10.0
    # An unreachable store is retried this long at start (a server still booting); 0: once.
    startup_timeout_seconds: float = 120.0
    tags: dict[str, str] = field(default_factory=dict)
    # At the end of a run, export these checkpoints (final, best) as the run's MLflow model.
    log_models: list[str] = field(default_factory=lambda: ["final"])


@dataclass
class ProgressConfig:
    interval_seconds: float = 180.0


@dataclass
class SessionConfig:
    heartbeat_seconds: float = 30.0  # MLflow tag so8t.heartbeat, read by the resume launcher
    lock_wait_seconds: float = 0.0  # wait this long for the session lock (launcher sets 30)


@dataclass
class NotifyConfig:
    notifiers: dict[str, Any] = field(default_factory=dict)  # name -> _target_ node


@dataclass
class TrainConfig:
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    session: SessionConfig = field(default_factory=SessionConfig)


@dataclass
class ResumeConfig:
    dry_run: bool = False  # print the decision for every candidate, launch nothing
    run_id: str | None = None  # resume this run only
    all: bool = False  # resume every resumable run, one after another
    start_new_if_none: bool = False  # nothing resumable: start a fresh default run
    experiments: list[str] = field(default_factory=list)  # default: [tracking.experiment]
    max_attempts: int = 3  # resumes without progress in step before a run is given up
    stale_after_seconds: float = 300.0  # heartbeat age that means dead (other hosts)
    max_age_hours: float = 168.0  # older sessions are expired, not resumed
    claim_grace_seconds: float = 120.0  # a fresh claim by another launcher is respected
    log_dir: str | None = None  # trainer output; default <session>/resume_logs
    in_process: bool = True  # run the trainer in the launcher's process (faster start)


@dataclass
class ResumeAppConfig:
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)


@dataclass
class ExportConfig:
    source: str = "???"  # a session folder or an MLflow run id
    checkpoint: str = "final"  # final | best
    out: str | None = None  # default: <session>/export/<checkpoint name>
    dtype: str = "auto"  # auto (the base model's) | float32 | bfloat16 | float16
    log_model: bool = True  # log the export as the run's MLflow model (pyfunc)
    register: str | None = None  # registered model name: add a version
    alias: str | None = "champion"  # moved to the new version when `metric` improves
    metric: str | None = None  # default: the run's checkpoint.best_metric
    mode: str | None = None  # min | max; default: the run's checkpoint.best_mode


@dataclass
class ExportAppConfig:
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register_schemas() -> None:
    """Store the schemas; ``conf/train.yaml`` merges its groups onto ``train_schema``,
    ``conf/resume.yaml`` onto ``resume_schema``."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(name="resume_schema", node=ResumeAppConfig)
    ConfigStore.instance().store(name="export_schema", node=ExportAppConfig)


register_schemas()

_CHOICES = {
    "data.on_bad_record": {"error", "skip"},
    "trainer.scheduler.name": {"cosine", "linear", "constant"},
    "trainer.precision": {"auto", "fp32", "bf16", "fp16"},
    "checkpoint.best_mode": {"min", "max"},
    "checkpoint.writer": {"process", "thread"},
}


def validate(cfg: DictConfig) -> None:
    """Check what the schema's types cannot: choices, ranges, files, ``_target_`` keys.

    Raises :class:`ConfigError` naming the key. Cheap: imports targets, loads nothing.
    """
    check_schema_keys(cfg)
    check_not_negative(cfg, NOT_NEGATIVE)
    check_above_zero(cfg, ABOVE_ZERO)
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: must be one of {sorted(allowed)}")
    device = cfg.trainer.device
    if not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
        raise ConfigError(f"trainer.device={device!r}: must be auto, cpu, cuda or cuda:N")
    check_positive(
        cfg,
        [
            "trainer.max_steps",
            "trainer.micro_batch_size",
            "trainer.grad_accum_steps",
            "trainer.eval_every_n_steps",
            "trainer.log_every_n_steps",
            "data.max_length",
            "model.so8t.blocks",
            "trainer.max_bad_steps",
        ],
    )
    best = cfg.checkpoint.best_metric
    if best is not None and not is_eval_metric(best):
        raise ConfigError(
            f"checkpoint.best_metric={best!r}: not an eval metric (one of "
            f"{[*EVAL_METRICS, *PER_CLASS_RECALL]})"
        )
    head = cfg.model.safety_head
    if best is not None and not head.enabled and best not in ("eval/loss", "eval/perplexity"):
        raise ConfigError(
            f"checkpoint.best_metric={best!r} comes from the safety head, which "
            "model.safety_head.enabled=false turns off"
        )
    if head.loss_weight < 0 or head.hidden_dim < 0 or not 0 <= head.dropout < 1:
        raise ConfigError(
            "model.safety_head: loss_weight and hidden_dim must be >= 0, dropout in [0, 1)"
        )
    bad = [k for k in cfg.tracking.log_models if k not in ("final", "best")]
    if bad:
        raise ConfigError(f"tracking.log_models: {bad} not in [final, best]")
    if cfg.checkpoint.keep < 2:
        raise ConfigError(f"checkpoint.keep={cfg.checkpoint.keep}: keep at least 2")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be in [0, 1)")
    layers = cfg.model.so8t.layers
    if not (layers in ("middle_third", "all") or isinstance(layers, ListConfig | list)):
        raise ConfigError(f"model.so8t.layers={layers!r}: 'middle_third', 'all' or a list")
    if not cfg.data.files:
        raise ConfigError("data.files is empty: name at least one JSONL file")
    for i, name in enumerate(cfg.data.files):
        check_data_file(i, name)
    check_target(cfg.model.source, "model.source")
    check_target(cfg.trainer.optimizer, "trainer.optimizer", skip=("params",))
    for name, node in cfg.notify.notifiers.items():
        check_target(node, f"notify.notifiers.{name}")


EVAL_METRICS = (
    "eval/loss",
    "eval/perplexity",
    "eval/head_loss",
    "eval/accuracy",
    "eval/macro_f1",
    "eval/refuse_recall",
    "eval/ece",
)
PER_CLASS_RECALL = ("eval/recall_allow", "eval/recall_escalation", "eval/recall_deny")


def is_eval_metric(name: str) -> bool:
    """Whether evaluation logs ``name`` (``so8t_exp.evaluate``)."""
    return name in EVAL_METRICS or name in PER_CLASS_RECALL
