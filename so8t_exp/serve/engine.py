"""The model behind ``/think``: the safety head's label and a token-by-token generator.

``serve.engine._target_`` picks the class (this one; :class:`ScriptedEngine` forces the
tokens, for tests and client integration). The engine loads an exported folder through
the export's own runtime (``so8t_safety_head.SO8TChat``), so serving runs exactly what
any other user of the export runs. Generation is a plain loop with the KV cache — one
token per step — so the caller can stop it at ``</final>``, at its deadline or when the
client has gone, and sees text as soon as it is decoded.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from so8t_exp.export import so8t_safety_head as runtime
from so8t_exp.export.write import DTYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How one request generates (checked against ``serve.limits`` before it gets here)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None


class Engine:
    """An exported SO8T model on one device."""

    def __init__(self, folder: str | Path, device: str = "auto", dtype: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        chat = runtime.SO8TChat(folder, device=device, dtype=DTYPES.get(dtype))
        self.tokenizer, self.model, self.head = chat.tokenizer, chat.model, chat.head
        self.device = device
        self.labels = list(self.head.labels) if self.head is not None else []
        ends = self.model.generation_config.eos_token_id
        self.stop_ids = set(ends if isinstance(ends, list) else [ends]) - {None}
        self.stop_ids.add(self.tokenizer.eos_token_id)
        self._chat = chat
        # transformers 5.x names the KV cache `cache` (`past_key_values` is deprecated);
        # 4.x only knows `past_key_values`.
        params = inspect.signature(self.model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"

    def prompt_ids(self, user_text: str, answer_prefix: str = "") -> torch.Tensor:
        """(1, n) ids of the chat template's generation prompt for one user turn, then
        ``answer_prefix`` (the start of the assistant's turn)."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        enc = self.tokenizer(text + answer_prefix, add_special_tokens=False, return_tensors="pt")
        return enc["input_ids"].to(self.device)

    @torch.no_grad()
    def classify(self, query: str) -> tuple[str | None, float | None]:
        """The safety head's label and probability for ``query`` as training showed it
        to the head: the query alone as the user turn. (None, None) without a head."""
        if self.head is None:
            return None, None
        [(label, confidence)] = self._chat.classify([query])
        return label, confidence

    @torch.no_grad()
    def generate(
        self, ids: torch.Tensor, sampling: Sampling, query: str = ""
    ) -> Iterator[tuple[int, str]]:
        """(token id, newly decoded text) per generated token, up to a stop token or
        ``max_new_tokens``. Closing the iterator stops generation at once. ``query`` is
        the request's own text (the prompt around it is in ``ids``)."""
        rng = torch.Generator(device="cpu")
        rng.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        text = _Detokenizer(self.tokenizer)
        cache, step_ids = None, ids
        for step in range(sampling.max_new_tokens):
            out = self.model(input_ids=step_ids, use_cache=True, **{self._cache_key: cache})
            cache = out[self._cache_key]
            token = self.choose(out.logits[0, -1].float(), step, sampling, rng)
            if token in self.stop_ids:
                return
            yield token, text.push(token)
            step_ids = torch.tensor([[token]], device=self.device)

    def choose(
        self, logits: torch.Tensor, step: int, sampling: Sampling, rng: torch.Generator
    ) -> int:
        """The next token: greedy at temperature 0, else sampled (top-k, then top-p)."""
        if sampling.temperature <= 0:
            return int(logits.argmax())
        # In float64 and shifted first: the best token's logit is 0, so even a tiny
        # temperature (1e-300 is 0 in float32: 0/0) gives -inf for the others, not nan.
        logits = logits.double()
        logits = (logits - logits.max()) / sampling.temperature
        if sampling.top_k:
            cut = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < cut, float("-inf"))
        probs = torch.softmax(logits, -1)
        if sampling.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            outside = ordered.cumsum(-1) - ordered > sampling.top_p  # keeps the first one
            probs = probs.clone().index_fill_(0, order[outside], 0.0)
        return int(torch.multinomial(probs.cpu(), 1, generator=rng))


class ScriptedEngine(Engine):
    """The real model, with its token choice (and, optionally, its label) forced.

    ``script_file`` is JSON: ``{"<query>": {"output": "<text the model 'generates'>",
    "label": "REFUSE", "confidence": 0.9, "delay_s": 0.05}}`` (every key but ``output``
    optional; ``delay_s`` paces the tokens, like a slower model); a query not in it runs
    the model as is. The
    model still runs every step (the load and timing are real); only the chosen token is
    replaced, by the tokenized ``output`` then the end token. For tests and for trying a
    client against a known transcript — never for answering users.
    """

    def __init__(self, folder, device="auto", dtype="auto", script_file: str = "") -> None:
        super().__init__(folder, device, dtype)
        self.script = json.loads(Path(script_file).read_text(encoding="utf-8"))
        self._forced: list[int] | None = None
        self._delay = 0.0
        log.warning("ScriptedEngine: outputs are forced from %s", script_file)

    def classify(self, query: str):
        label, confidence = super().classify(query)
        entry = self.script.get(query, {})
        return entry.get("label", label), entry.get("confidence", confidence)

    def generate(self, ids, sampling, query: str = ""):
        entry = self.script.get(query, {})
        text, self._delay = entry.get("output"), float(entry.get("delay_s", 0))
        # One request at a time holds the model (ThinkService), so one field will do.
        self._forced = (
            None if text is None else self.tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        return super().generate(ids, sampling, query)

    def choose(self, logits, step, sampling, rng) -> int:
        forced = self._forced
        time.sleep(self._delay)
        if forced is None:
            return super().choose(logits, step, sampling, rng)
        return forced[step] if step < len(forced) else self.tokenizer.eos_token_id


class _Detokenizer:
    """Token ids in, text out as soon as it is whole: a character split across tokens is
    held until complete. Decodes a short window, not the whole output, per token.

    Special tokens are decoded like any text: if a tag such as ``<think-logic>`` were a
    special token, skipping it would let its section's text read as answer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: context for tokenizers that merge with the left
        self.read = 0  # ids before this were already returned as text

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        after = decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # not a whole character yet
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]
