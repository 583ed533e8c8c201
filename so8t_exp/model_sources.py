"""Where a base model and its tokenizer come from (the swappable ``model.source``).

A source is a small object built from config by :mod:`so8t_exp.build`; building it checks
its keys, ``load()`` does the heavy work. ``describe()`` names the frozen base so a
checkpoint can reference it instead of storing it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class TinyPhi3:
    """A small Phi-3 architecture with seeded random weights and the bundled tokenizer."""

    tokenizer_path: str
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    init_seed: int = 0

    def load(self) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        from transformers import Phi3Config, Phi3ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        config = Phi3Config(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        # Seed a private generator state: building the model must not depend on, or
        # disturb, the global RNG that drives training.
        # (manual_seed also seeds every CUDA device, so fork those too.)
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(self.init_seed)
            model = Phi3ForCausalLM(config)
        return model, tokenizer

    def describe(self) -> dict:
        return {"kind": "tiny_phi3", **asdict(self)}


@dataclass
class Pretrained:
    """``from_pretrained`` on a Hugging Face id or a local folder (e.g. Borea-Phi-3.5-mini)."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device_map: str | None = None
    load_in_8bit: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(
                f"model.source.dtype={self.dtype!r}: one of auto, {', '.join(_DTYPES)}"
            )

    def load(self) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        kwargs: dict = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, **kwargs)
        if self.device_map:
            kwargs["device_map"] = self.device_map
        if self.load_in_8bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        dtype = "auto" if self.dtype == "auto" else _DTYPES[self.dtype]
        model = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=dtype, **kwargs)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    def describe(self) -> dict:
        return {"kind": "pretrained", **asdict(self)}
