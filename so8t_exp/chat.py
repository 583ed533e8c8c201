"""Chat-formatted SFT examples: the tokenizer's chat template, one tokenization, the loss mask.

A record becomes one user turn (instruction and input) and one assistant turn (output),
rendered by the tokenizer's chat template — for Borea/Phi-3.5
``<|user|>\\n…<|end|>\\n<|assistant|>\\n…<|end|>\\n`` — or, for a tokenizer without one, by
the plain ``BOS prompt \\n\\n answer EOS``. The template is rendered once with placeholders
to learn its fixed parts (head, middle, tail); each record is then ``head + prompt + middle +
answer + tail``, tokenized in one pass, and the character offsets say which tokens are the
prompt. The safety head reads the last prompt token: the end of the generation prompt that
serving will feed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from so8t_exp.data import FOUR_CLASS_LABELS, IGNORE_INDEX, Record

log = logging.getLogger(__name__)

_USER, _ANSWER = "\x00SO8T-USER\x00", "\x00SO8T-ANSWER\x00"
NO_CLASS = IGNORE_INDEX  # class target of a record without a four-class label


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be split around one user and one answer turn."""


@dataclass(frozen=True)
class ChatFormat:
    """The fixed text around a record's prompt and answer."""

    head: str  # up to the user's text: BOS, "<|user|>\n"
    middle: str  # between user text and answer: "<|end|>\n<|assistant|>\n"
    tail: str  # after the answer: "<|end|>\n</s>"
    max_token_chars: int  # the longest token, in characters: bounds chars per token

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFormat:
        """The tokenizer's chat template split into its parts, or the plain format."""
        longest = max(len(t) for t in tokenizer.get_vocab())
        if not getattr(tokenizer, "chat_template", None):
            bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
            return cls(bos, "\n\n", eos, longest)
        full = _render(tokenizer, [("user", _USER), ("assistant", _ANSWER)], False)
        gen = _render(tokenizer, [("user", _USER)], True)
        if full.count(_USER) != 1 or full.count(_ANSWER) != 1:
            raise TemplateError("the chat template does not show each turn's text once")
        head, rest = full.split(_USER)
        middle, tail = rest.split(_ANSWER)
        if gen != head + _USER + middle:
            raise TemplateError(
                "the chat template's generation prompt is not the conversation's prompt "
                f"part ({gen!r} vs {head + _USER + middle!r})"
            )
        return cls(head, middle, tail, longest)

    def prompt_text(self, prompt: str) -> str:
        """The generation prompt for ``prompt`` (what serving feeds the model)."""
        return self.head + prompt + self.middle


def _render(tokenizer, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
    messages = [{"role": role, "content": text} for role, text in turns]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def encode(
    record: Record, fmt: ChatFormat, tokenizer, max_length: int, mask_prompt: bool
) -> dict | None:
    """Token ids, loss labels, prompt length and class target of one record; None when
    even the whole budget of ``max_length`` cannot hold the answer (the caller counts it).

    Too long: the user's text is cut from its start; the template's markers, the answer
    and its end tokens are kept. Characters are cut before tokenizing, so a huge record
    costs memory in proportion to ``max_length``, not to its size.
    """
    budget_chars = max_length * fmt.max_token_chars  # more than max_length tokens' worth
    if record.output_clipped or len(record.output) > budget_chars:
        return None  # at least max_length tokens of answer alone
    prompt = record.prompt[-budget_chars:]
    text = fmt.head + prompt + fmt.middle + record.output + fmt.tail
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    user_start, answer_start = len(fmt.head), len(fmt.head) + len(prompt) + len(fmt.middle)
    # Token ranges by character offsets: [0, a) head, [a, b) user text, [b, c) middle,
    # [c, n) answer and tail. A token that straddles a boundary belongs to the earlier part.
    a = _first_token_from(offsets, user_start)
    b = _first_token_from(offsets, user_start + len(prompt))
    c = _first_token_from(offsets, answer_start)
    excess = len(ids) - max_length
    if excess > 0:
        if excess >= b - a:
            return None  # markers + answer leave no room for any of the question
        ids = ids[:a] + ids[a + excess :]
        c -= excess
    labels = list(ids)
    if mask_prompt:
        labels[:c] = [IGNORE_INDEX] * c
    label = record.four_class_label
    return {
        "input_ids": ids,
        "labels": labels,
        "prompt_len": c,
        "class_label": FOUR_CLASS_LABELS.index(label) if label else NO_CLASS,
    }


def _first_token_from(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the first token that starts at or after character ``char``."""
    for i, (start, end) in enumerate(offsets):
        if start >= char and end > start:
            return i
    return len(offsets)


def encode_all(
    records: list[Record], fmt: ChatFormat, tokenizer, max_length: int, mask_prompt: bool
) -> tuple[list[dict], int]:
    """Encoded examples and how many records were too long to keep (warned once)."""
    out, too_long = [], 0
    for rec in records:
        enc = encode(rec, fmt, tokenizer, max_length, mask_prompt)
        if enc is None:
            too_long += 1
        else:
            out.append(enc)
    if too_long:
        log.warning(
            "skipped %d record(s) whose answer does not fit in data.max_length=%d tokens",
            too_long,
            max_length,
        )
    return out, too_long
