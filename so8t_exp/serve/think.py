"""One ``/think`` request, from query to answer: label, policy, generation, sections.

This is where the thinking is separated from the answer; nothing here knows about HTTP.
Generated text goes through :class:`~so8t_exp.serve.sections.SectionParser` token by
token; only what it emits reaches ``on_text`` (the stream) or :attr:`ThinkResult.answer`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from so8t_exp.serve.config import LabelPolicy, ServeConfig
from so8t_exp.serve.engine import Sampling
from so8t_exp.serve.sections import SectionParser, Sections, SectionTags

NO_TEXT = lambda text: None  # noqa: E731  (a stream nobody reads)


class Busy(Exception):
    """The model stayed busy with other requests until this one's deadline."""


@dataclass
class ThinkResult:
    """What a request produced; the thinking itself is not in it."""

    answer: str
    safety_label: str | None
    safety_confidence: float | None
    policy_action: str
    internal_reasoning_hash: str
    thinking_bytes: int
    answer_complete: bool
    finish_reason: str  # final | eos | length | timeout | cancelled | policy
    generated_tokens: int
    flags: list[str] = field(default_factory=list)


class ThinkService:
    """Runs requests on one engine: on one thread, one at a time, in the order they came.

    One thread, not a lock: with a lock each request's own thread would call torch, and
    OpenMP keeps a team of spinning threads per calling thread — on a CPU, eight waiting
    requests cost a fifth of the throughput. A queue is also fair: a lock lets a late
    request overtake waiting ones."""

    def __init__(self, engine, cfg: ServeConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        prompt = cfg.prompt
        self.tags = SectionTags(
            final=prompt.final_tag.lower(),
            thinking_prefixes=tuple(p.lower() for p in prompt.thinking_prefixes),
        )
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="so8t-model")

    def think(
        self,
        query: str,
        sampling: Sampling,
        deadline: float,
        on_label: Callable[[str | None, float | None, str], None] = lambda *a: None,
        on_text: Callable[[str], None] = NO_TEXT,
        cancelled: threading.Event | None = None,
    ) -> ThinkResult:
        """Answer ``query`` by ``deadline`` (``time.monotonic()``); ``on_text`` gets each
        piece of answer text as soon as it is known to be answer (on the model's thread).
        :class:`Busy` when the request's turn had not come by the deadline."""
        job = (query, sampling, deadline, on_label, on_text, cancelled)
        turn = self._model.submit(self._answer, *job)
        while True:
            try:  # (wakes to see a cancellation while waiting)
                return turn.result(timeout=min(0.25, max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                waited_out = time.monotonic() >= deadline
                if not (waited_out or (cancelled is not None and cancelled.is_set())):
                    continue
                if not turn.cancel():  # it is running: it stops by itself at its next token
                    return turn.result()
                if waited_out:
                    raise Busy("the model stayed busy until this request's deadline") from None
                return self._replaced("", None, None, "cancelled")

    def close(self) -> None:
        """Let the request on the model finish; drop those waiting."""
        self._model.shutdown(wait=True, cancel_futures=True)

    def _answer(self, query, sampling, deadline, on_label, on_text, cancelled) -> ThinkResult:
        if cancelled is not None and cancelled.is_set():
            return self._replaced("", None, None, "cancelled")
        if time.monotonic() >= deadline:  # its turn came too late: no work for nothing
            raise Busy("the model stayed busy until this request's deadline")
        label, confidence = self.engine.classify(query)
        rule = (self.cfg.policy.get(label) if label else None) or LabelPolicy()
        on_label(label, confidence, rule.action)
        if rule.action == "replace":
            on_text(rule.text)
            return self._replaced(rule.text, label, confidence)
        if rule.action == "prefix":  # sent with the first answer text, if any comes
            on_text = _after(rule.text + "\n\n", on_text)
        return self._generate(
            query, sampling, deadline, on_text, cancelled, rule, label, confidence
        )

    def _replaced(self, text: str, label, confidence, finish: str = "policy") -> ThinkResult:
        empty = SectionParser(self.tags).close()
        action = "replace" if finish == "policy" else "answer"
        return ThinkResult(
            text,
            label,
            confidence,
            action,
            empty.thinking_sha256,
            0,
            finish == "policy",
            finish,
            0,
            [] if finish == "policy" else [finish],
        )

    def _generate(self, query, sampling, deadline, on_text, cancelled, rule, label, confidence):
        prompt = self.cfg.prompt
        parser = SectionParser(self.tags)
        piece = parser.feed(prompt.answer_prefix)  # the turn starts with it: it may open a
        if piece:  # section, or even start the answer
            on_text(piece)
        ids = self.engine.prompt_ids(
            prompt.template.replace("{query}", query), prompt.answer_prefix
        )
        tokens, finish = 0, None
        steps = self.engine.generate(ids, sampling, query=query)
        try:
            for _token, text in steps:
                tokens += 1
                piece = parser.feed(text)
                if piece:
                    on_text(piece)
                finish = _stop_reason(parser, deadline, cancelled)
                if finish:
                    break
        finally:
            steps.close()
        if finish is None:
            finish = "length" if tokens >= sampling.max_new_tokens else "eos"
        sections = parser.close()
        answer = sections.answer
        if answer and rule.action == "prefix":
            answer = f"{rule.text}\n\n{answer}"
        return ThinkResult(
            answer=answer,
            safety_label=label,
            safety_confidence=confidence,
            policy_action=rule.action,
            internal_reasoning_hash=sections.thinking_sha256,
            thinking_bytes=sections.thinking_bytes,
            answer_complete=sections.complete,
            finish_reason=finish,
            generated_tokens=tokens,
            flags=_flags(sections, finish),
        )


def _after(first: str, on_text: Callable[[str], None]) -> Callable[[str], None]:
    """``on_text`` that sends ``first`` just before the first text it is given."""
    pending = [first]

    def send(text: str) -> None:
        if pending:
            on_text(pending.pop())
        on_text(text)

    return send


def _stop_reason(parser: SectionParser, deadline: float, cancelled) -> str | None:
    if parser.finished:
        return "final"  # the answer is complete: what follows would be withheld anyway
    if cancelled is not None and cancelled.is_set():
        return "cancelled"
    if time.monotonic() >= deadline:
        return "timeout"
    return None


def _flags(sections: Sections, finish: str) -> list[str]:
    flags = []
    if not sections.final_seen:
        flags.append("no_final")
    elif not sections.complete:
        flags.append("final_truncated")
    if finish in ("timeout", "cancelled"):
        flags.append(finish)
    return flags
