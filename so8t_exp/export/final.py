"""The finished model: trainable weights, tokenizer and config in ``<session>/final_model``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file


def export_final(
    folder: Path,
    params: dict[str, torch.Tensor],
    tokenizer,
    cfg: DictConfig,
    base: dict,
    so8t_state: dict,
) -> Path:
    """Write adapter (+LoRA, safety head) weights as safetensors, the tokenizer, the
    resolved config, a reference to the frozen base model and ``so8t.json`` (the alpha
    gate's value, the safety head's labels and input)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: p.detach().cpu().contiguous() for n, p in params.items()},
        str(folder / "adapter_model.safetensors"),
    )
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    (folder / "base_model.json").write_text(json.dumps(base, indent=2), encoding="utf-8")
    (folder / "so8t.json").write_text(json.dumps(so8t_state, indent=2), encoding="utf-8")
    return folder
