"""The ``serve.*`` schema (``conf/serve.yaml`` merges onto it) and the checks types cannot
make. Plain dataclasses: the entry point registers them with Hydra."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from so8t_exp.config import ConfigError, TrackingConfig

LABELS = ("ALLOW", "ESCALATION", "DENY", "REFUSE")
ACTIONS = ("answer", "replace", "prefix")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # so8t_exp.export.write.DTYPES


@dataclass
class PromptConfig:
    # The user turn sent to the model; {query} is the request's query.
    template: str = "{query}"
    # Text the assistant's turn starts with (e.g. "<think-logic>"): fed to the model and
    # to the section parser, never sent.
    answer_prefix: str = ""
    final_tag: str = "final"
    thinking_prefixes: list[str] = field(default_factory=lambda: ["think"])


@dataclass
class LabelPolicy:
    action: str = "answer"  # answer | replace (text only, nothing generated) | prefix
    text: str = ""


@dataclass
class LimitsConfig:
    max_body_bytes: int = 65536
    max_query_chars: int = 8000
    max_new_tokens: int = 512  # the most a request may ask for
    default_max_new_tokens: int = 256
    max_temperature: float = 2.0
    max_concurrent: int = 8  # requests admitted at once; more get 503
    timeout_s: float = 120.0  # per request, waiting for the model included


@dataclass
class AuditConfig:
    path: str = "???"  # sqlite file; rotated files sit beside it
    log_prompt: bool = False  # store the query text (never the thinking)
    rotate_mb: float = 100.0  # start a new file past this size (0: never)
    rotate_days: float = 0.0  # ... or past this age (0: never)
    retention_days: float = 0.0  # delete rotated files older than this (0: keep)
    keep_files: int = 0  # keep at most this many rotated files (0: all)
    client_header: str = "X-Client-Id"  # hashed (salted sha256); else the client's address


@dataclass
class ServeConfig:
    model: str = "???"  # models:/name@alias | models:/name/version | run id | folder
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed at start)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (the export's) | float32 | bfloat16 | float16
    cache_dir: str = "???"  # downloaded registry models, by name and version
    # The name of an environment variable holding a token; /think then asks for
    # "Authorization: Bearer <token>" (the token itself stays out of configs and logs).
    auth_token_env: str | None = None
    engine: Any = field(default_factory=lambda: {"_target_": "so8t_exp.serve.engine.Engine"})
    prompt: PromptConfig = field(default_factory=PromptConfig)
    policy: dict[str, LabelPolicy] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


@dataclass
class ServeAppConfig:
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def check(cfg: ServeConfig) -> None:
    """What the schema's types cannot say; raises :class:`ConfigError` naming the key."""
    if "{query}" not in cfg.prompt.template:
        raise ConfigError("serve.prompt.template must contain {query}")
    _check_tags(cfg.prompt)
    unknown = sorted(set(cfg.policy) - set(LABELS))
    if unknown:
        raise ConfigError(f"serve.policy: {unknown} are not labels ({', '.join(LABELS)})")
    for label, rule in cfg.policy.items():
        if rule.action not in ACTIONS:
            raise ConfigError(f"serve.policy.{label}.action={rule.action!r}: one of {ACTIONS}")
        if rule.action != "answer" and not rule.text.strip():
            raise ConfigError(f"serve.policy.{label}.text is empty; {rule.action} needs a text")
    lim = cfg.limits
    for key in ("max_body_bytes", "max_query_chars", "max_new_tokens", "max_concurrent"):
        if getattr(lim, key) < 1:
            raise ConfigError(f"serve.limits.{key}={getattr(lim, key)}: must be at least 1")
    if not 1 <= lim.default_max_new_tokens <= lim.max_new_tokens:
        raise ConfigError(
            f"serve.limits.default_max_new_tokens={lim.default_max_new_tokens}: "
            f"between 1 and serve.limits.max_new_tokens={lim.max_new_tokens}"
        )
    if lim.timeout_s <= 0 or lim.max_temperature < 0:
        raise ConfigError("serve.limits: timeout_s must be > 0 and max_temperature >= 0")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"serve.port={cfg.port}: 0..65535")
    if cfg.dtype not in ("auto", *DTYPE_NAMES):
        raise ConfigError(f"serve.dtype={cfg.dtype!r}: auto, float32, bfloat16 or float16")
    device = cfg.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"serve.device={device!r}: auto, cpu, cuda or cuda:N")
    a = cfg.audit
    if min(a.rotate_mb, a.rotate_days, a.retention_days, a.keep_files) < 0:
        raise ConfigError("serve.audit: rotate_mb, rotate_days, retention_days, keep_files >= 0")


_TAG_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _check_tags(prompt: PromptConfig) -> None:
    """Tag names the section parser can match: a wrong one would switch the hiding off."""
    prefixes = list(prompt.thinking_prefixes)
    if not prefixes:
        raise ConfigError("serve.prompt.thinking_prefixes is empty: nothing would be hidden")
    for key, name in [("final_tag", prompt.final_tag)] + [
        (f"thinking_prefixes[{i}]", p) for i, p in enumerate(prefixes)
    ]:
        if not _TAG_NAME.fullmatch(str(name)):
            raise ConfigError(
                f"serve.prompt.{key}={name!r}: a tag name without '<' and '>' — letters, "
                "digits, '-' or '_', at most 32 (e.g. final, think)"
            )
    if any(prompt.final_tag.lower().startswith(p.lower()) for p in prefixes):
        raise ConfigError(
            f"serve.prompt.final_tag={prompt.final_tag!r} starts with a thinking prefix"
        )
