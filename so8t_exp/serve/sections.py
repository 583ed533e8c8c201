"""Split a model's streamed output into the final answer and the thinking, incrementally.

The SO8T model reasons in hidden sections (``<think-logic>``, ``<think-ethics>``,
``<think-practical>``, ``<think-creative>``) and answers in ``<final>``. Only the answer
may leave the server. Serving stacks that separate the two have leaked reasoning through
a closing tag split across chunks, a truncated answer returned as content, or a reasoning
block that was never tagged as such; this parser is built so that none of these can happen:

* A tag is ``<``, ``/`` for a closing tag, a *name* (ASCII letters, digits, ``-``, ``_``),
  optionally a blank or ``/`` and attributes without ``<`` or ``>``, then ``>``; at most
  ``max_tag`` characters, in any case (``<Think-Logic mode="deep">``, ``</FINAL >``).
  *name* ``final`` opens/closes the answer; a name starting with a thinking prefix
  (``think``: ``<think>``, ``<think-logic>``, ``<thinking>``, …) opens/closes a thinking
  section (``<think/>`` opens one too). Other text, ``<b>`` included, is content.
  **Fail closed:** outside thinking, ``<think…`` that does not end as a tag
  (``<think\u00a0…``, no ``>`` within ``max_tag``) opens a thinking section all the same.
* Sections nest (a stack). Text is **answer** only while at least one ``<final>`` and no
  thinking section is open, and only in the *first* top-level ``<final>`` section: once it
  closes, the parser is ``finished`` and everything after it is withheld. A ``<final>``
  inside a thinking section is still thinking. A closing tag closes the innermost open
  section of its kind and every section opened inside it; a stray one is ignored.
* What could still be the start of a tag is held back — never more than ``max_tag``
  characters, so each chunk costs time in proportion to its length plus that bound. Answer text is
  emitted as soon as it cannot be part of a tag; leading and trailing blanks of the answer
  are dropped, so the emitted chunks join to exactly :attr:`Sections.answer`.
* At the end, a ``<final>`` that never closed (e.g. cut off by ``max_new_tokens``) or none
  at all gives an empty answer and ``complete=False``; what was already streamed of an
  unclosed answer was answer text, never thinking.

The *thinking* is every character generated while a thinking section is open (its tags
excluded); the parser keeps only its sha256 and byte count. Text outside every section
and tags are counted in ``other_bytes`` and dropped.
"""

from __future__ import annotations

import codecs
import hashlib
import string
from dataclasses import dataclass, field

_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_")
_TAIL_START = frozenset(" \t\r\n/")  # what may follow a tag's name before its attributes
_PARTIAL = "partial"  # the text may still become a tag: hold it back
FINAL, THINK = "final", "think"


@dataclass(frozen=True)
class SectionTags:
    """Which tag names are the answer and which are thinking."""

    final: str = "final"
    thinking_prefixes: tuple[str, ...] = ("think",)
    max_tag: int = 64

    @property
    def longest(self) -> int:
        """The longest text a tag can be: the most the parser ever holds back."""
        return self.max_tag

    def kind(self, name: str) -> str | None:
        """``final``, ``think`` or None (not one of ours) for a lower-case tag name."""
        if name == self.final:
            return FINAL
        if any(name.startswith(p) for p in self.thinking_prefixes):
            return THINK
        return None

    def could_start(self, name: str) -> bool:
        """Whether a tag name that has only begun can still become one of ours."""
        if self.final.startswith(name):
            return True
        return any(p.startswith(name) or name.startswith(p) for p in self.thinking_prefixes)


@dataclass
class Sections:
    """What the whole output held: the answer and what stands for the thinking."""

    answer: str  # "" unless a <final> section closed
    complete: bool  # a top-level <final> section opened and closed
    final_seen: bool  # a top-level <final> section opened
    thinking_sha256: str
    thinking_bytes: int
    other_bytes: int  # tags and text outside every section


@dataclass
class SectionParser:
    """Feed generated text (:meth:`feed`, or :meth:`feed_bytes`); get answer text to emit."""

    tags: SectionTags = field(default_factory=SectionTags)

    def __post_init__(self) -> None:
        self._held = ""  # unconsumed text: a possible tag start, at most tags.longest
        self._stack: list[str] = []
        self._blank: list[str] = []  # answer blanks not emitted yet (they may be trailing)
        self._answer: list[str] = []
        self._thinking = hashlib.sha256()
        self.thinking_bytes = 0
        self.other_bytes = 0
        self.final_seen = False
        self.finished = False  # the first top-level <final> closed: nothing more to emit
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, text: str) -> str:
        """Consume ``text``; returns the answer text that may be sent now (often "")."""
        buf, out, i = self._held + text, [], 0
        while i < len(buf):
            j = buf.find("<", i)
            if j < 0:
                j = len(buf)
            self._content(buf[i:j], out)
            if j == len(buf):
                i = j
                break
            tag = self._tag_at(buf, j)
            if tag == _PARTIAL:
                i = j
                break
            if tag is None:
                self._content("<", out)
                i = j + 1
                continue
            kind, closing, end = tag
            self.other_bytes += len(buf[j:end].encode("utf-8"))
            self._apply(kind, closing)
            i = end
        self._held = buf[i:]
        return "".join(out)

    def feed_bytes(self, data: bytes) -> str:
        """:meth:`feed` for raw UTF-8 bytes, split anywhere (even inside a character)."""
        return self.feed(self._utf8.decode(data))

    def close(self) -> Sections:
        """End of output: what it held. Held-back text was no tag; it is not answer."""
        held = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        if self._answering():
            self.other_bytes += len(held.encode("utf-8"))  # an unclosed answer's tail
        elif held:
            self._count(held)
        complete = self.finished
        return Sections(
            answer="".join(self._answer) if complete else "",
            complete=complete,
            final_seen=self.final_seen,
            thinking_sha256=self._thinking.hexdigest(),
            thinking_bytes=self.thinking_bytes,
            other_bytes=self.other_bytes,
        )

    # -- inside ---------------------------------------------------------------------

    def _answering(self) -> bool:
        return not self.finished and bool(self._stack) and THINK not in self._stack

    def _content(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if not self._answering():
            self._count(text)
            return
        # Blanks are held until non-blank answer text follows: leading ones are dropped,
        # trailing ones never sent, so the stream joins to exactly the answer.
        body = text.rstrip()
        if not body:
            if self._answer:
                self._blank.append(text)
            return
        chunk = "".join(self._blank) + body if self._answer else body.lstrip()
        out.append(chunk)
        self._answer.append(chunk)
        self._blank = [text[len(body) :]]

    def _count(self, text: str) -> None:
        data = text.encode("utf-8")
        if THINK in self._stack:
            self._thinking.update(data)
            self.thinking_bytes += len(data)
        else:
            self.other_bytes += len(data)

    def _apply(self, kind: str, closing: bool) -> None:
        # The stack is kept after the answer too: thinking after it is still thinking.
        if not closing:
            if kind == FINAL and not self._stack and not self.finished:
                self.final_seen = True
            self._stack.append(kind)
            return
        if kind not in self._stack:
            return  # a stray closing tag
        while self._stack.pop() != kind:
            pass  # closes the sections opened inside it too
        if kind == FINAL and not self._stack and self.final_seen:
            self.finished = True

    def _tag_at(self, buf: str, j: int):
        """(kind, closing, end) for one of our tags at ``buf[j]``, :data:`_PARTIAL` when
        the text ends before that is decided, None when it is no tag of ours."""
        n, limit = len(buf), j + self.tags.max_tag
        k = j + 1
        closing = k < n and buf[k] == "/"
        k += closing
        start = k
        while k < n and k < limit and buf[k] in _NAME_CHARS:
            k += 1
        name = buf[start:k].lower()
        if k == n and k < limit:
            return _PARTIAL if self.tags.could_start(name) else None
        kind = self.tags.kind(name) if name else None
        if kind is None:
            return None
        if k < n and k < limit and buf[k] == ">":
            return kind, closing, k + 1
        if k < limit and buf[k] in _TAIL_START:
            end = k
            while end < n and end < limit and buf[end] not in "<>":
                end += 1
            if end == n and end < limit:
                return _PARTIAL
            if end < n and end < limit and buf[end] == ">":
                # (No self-closing tags: "<think/>" opens a section like "<think>" — a
                # model that writes it may well go on thinking.)
                return kind, closing, end + 1
        # Not a well-formed tag. Outside thinking, something that starts like a thinking
        # tag is taken for one: hiding the rest of an answer is safe, showing thinking
        # (or a <final> written inside it) is not.
        if kind == THINK and not closing and THINK not in self._stack:
            return kind, False, k
        return None
