"""The bundled offline tokenizer of the tiny default model.

A byte-level BPE trained on the bundled sample set, saved as a regular Hugging Face
tokenizer folder in ``so8t_exp/assets/tokenizer`` so that ``AutoTokenizer.from_pretrained``
loads it with no network. Rebuild it (after changing the sample set) with
``python -m so8t_exp.tokenizer``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from so8t_exp.paths import asset_path

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Phi-3.5's chat markers, so the tiny default formats conversations like Borea does.
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Phi-3.5-mini-instruct's template (plus a leading BOS, which Phi-3.5's tokenizer adds
# itself): <s><|user|>\n…<|end|>\n<|assistant|>\n…<|end|>\n</s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; every byte is in the vocabulary, so any text
    (Japanese included) encodes without unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL.values(), *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=CHAT_TOKENS, **SPECIAL
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def sample_texts(jsonl: Path) -> list[str]:
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    parts = ("instruction", "input", "output", "four_class_label")
    return ["\n\n".join(str(r.get(k) or "") for k in parts) for r in records]


def main(out_dir: str | None = None) -> None:
    out = Path(out_dir) if out_dir else asset_path("tokenizer")
    tokenizer = build_tokenizer(sample_texts(asset_path("data/so8t_sample.jsonl")))
    tokenizer.save_pretrained(out)
    print(f"saved tokenizer ({len(tokenizer)} tokens) to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
