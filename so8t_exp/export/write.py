"""Write an exported model folder: Hugging Face model, tokenizer, generation config, the
safety head and its runtime, provenance. Written under a temporary name, then renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from so8t_exp import fsutil
from so8t_exp.data import FOUR_CLASS_LABELS
from so8t_exp.export import so8t_safety_head as runtime
from so8t_exp.fsutil import temp_sibling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUNTIME_FILE = Path(runtime.__file__).name  # so8t_safety_head.py


def write_export(out: Path, model, tokenizer, head, dtype: str, provenance: dict) -> Path:
    """``out`` as a folder ``AutoModelForCausalLM.from_pretrained`` loads; replaces an
    existing export only once the new one is complete."""
    fsutil.recover_aside(out)  # (a crash in the last export's replacement)
    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        target = _dtype(model, dtype)
        model.to(target)
        _generation_config(model, tokenizer)
        model.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        if head is not None:
            _write_head(tmp, head, model.config.hidden_size)
        shutil.copyfile(runtime.__file__, tmp / RUNTIME_FILE)
        info = {**provenance, "dtype": str(target).removeprefix("torch.")}
        (tmp / "so8t_export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        fsutil.replace_dir(tmp, out)  # a crash at any point leaves one complete export
    finally:
        fsutil.rmtree(tmp, ignore_errors=True)
    return out


def _dtype(model, name: str) -> torch.dtype:
    if name == "auto":  # the base model's own dtype (float32 for the tiny default)
        name = str(getattr(model.config, "dtype", None) or "float32").removeprefix("torch.")
    return DTYPES.get(name, torch.float32)


def _generation_config(model, tokenizer) -> None:
    """Stop at the end of the assistant's turn, not only at EOS."""
    gen = model.generation_config
    ends = [tokenizer.eos_token_id]
    end_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end_turn, int) and end_turn != tokenizer.unk_token_id:
        ends.append(end_turn)
    gen.eos_token_id = [e for e in dict.fromkeys(ends) if e is not None]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = False


def _write_head(folder: Path, head, hidden_size: int) -> None:
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    dropout = next((m.p for m in head.net if isinstance(m, torch.nn.Dropout)), 0.0)
    spec = {
        "labels": list(FOUR_CLASS_LABELS),
        "hidden_size": hidden_size,
        "hidden_dim": linears[0].out_features if len(linears) > 1 else 0,
        "dropout": dropout,
        "input": "output_hidden_states[-1] at the last token of the chat template's "
        "generation prompt (add_generation_prompt=True)",
        "loader": f"{RUNTIME_FILE}: load_safety_head(folder) or SO8TChat(folder)",
    }
    weights = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(weights, str(folder / runtime.HEAD_WEIGHTS))
    (folder / runtime.HEAD_CONFIG).write_text(json.dumps(spec, indent=2), encoding="utf-8")
