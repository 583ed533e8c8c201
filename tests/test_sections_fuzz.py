"""Fuzz the streaming section parser: no byte of thinking may reach a client.

Streams come from a seeded grammar (deterministic; no hypothesis): thinking sections
under random names and case, answers, nesting both ways, repeated and stray tags,
unclosed sections, missing answers, truncation. The generator places thinking and
"outside" text only in characters of alphabets that nothing else uses, so the leak check
needs no model of the parser: those characters must never be emitted nor be in the
answer. A small whole-string reference (regex tokens, then the stack rules of the
module's docstring) gives the expected :class:`Sections` for every chunking.

A failure names the stream's seed; ``_stream(seed)`` rebuilds it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import pytest

from so8t_exp.serve.sections import SectionParser, Sections, SectionTags

N_STREAMS = 10_000
BATCHES = 10
EVERY_SPLIT = 5  # every 5th stream: also two pieces split at each point inside each tag
LONGEST = SectionTags().longest

# Alphabets: thinking and outside text use characters that no tag and no answer uses.
THINK_CHARS = "あいうえおかきくけこアイウエオ§¶жщ🧠"
OUTSIDE_CHARS = "αβγδεζ"
WITHHELD = frozenset(THINK_CHARS + OUTSIDE_CHARS)

# Content that looks like a tag but is none of ours (or not a tag at all); each ends
# in a character that no tag continues with, so it cannot merge with what follows.
NOT_OUR_TAGS = [
    "<b>",
    "</b >",
    "a < b",
    "x<y.",
    "<",
    "<<",
    "<fin.",
    "</fin!",
    "<fin>",
    "<final_x>",
    "<finals>",
    "< final>",
    "</ final>",
    "<thin>",
    "<final" + " " * 60 + ">",  # longer than max_tag
    "</think" + "\t" * 58 + ">",
    "</think-" + "x" * 57 + ">",
    "<final\u3000>",  # not a blank of ours
    "</FINAL\u00a0>",
    "<thin\u212a>",  # Kelvin sign: lower-cases to k, but no ASCII letter
    "<final a<b>",
]
# Not tags either, but inside the answer they open a thinking section (fail closed), so
# the generator puts them only where they change nothing: in thinking text.
LOOK_LIKE_THINKING = ["<think\u00a0>", "<think.", "<thinking about it"]
ANSWER_WORDS = ["ok", "42", "回答", "漢字", "é", "\u212a", "Yes.", "a/b", "1>0"]
BLANKS = [" ", "  ", "\t", "\n", "\r\n", "\u3000"]
THINK_NAMES = ["think", "think-logic", "think-ethics", "think-practical", "think-creative"]
THINK_NAMES += ["thinking", "think_2", "think-" + "z" * 40]
TAILS = ["", "", "", " ", "\t", "\r\n", "    ", ' mode="deep"', " id=3 ", "\ttype='a b'"]


@dataclass
class Piece:
    text: str
    label: str  # "tag", or what the text is: "think", "answer", "other"
    state: str = ""  # for a tag, what text there would be: what a cut-off tag becomes


@dataclass
class Stream:
    seed: int
    pieces: list[Piece]
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    def tag_spans(self) -> list[tuple[int, int]]:
        spans, pos = [], 0
        for p in self.pieces:
            if p.label == "tag":
                spans.append((pos, pos + len(p.text)))
            pos += len(p.text)
        return spans


# -- the generator ------------------------------------------------------------------


def _case(rng: random.Random, name: str) -> str:
    mode = rng.random()
    if mode < 0.5:
        return name
    if mode < 0.65:
        return name.upper()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in name)


def _tag(rng: random.Random, kind: str, closing: bool) -> str:
    name = "final" if kind == "final" else rng.choice(THINK_NAMES)
    return "<" + "/" * closing + _case(rng, name) + rng.choice(TAILS) + ">"


def _think_text(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.5:
            out.append("".join(rng.choice(THINK_CHARS) for _ in range(rng.randint(1, 5))))
        elif r < 0.85:
            out.append(rng.choice(NOT_OUR_TAGS + LOOK_LIKE_THINKING))
            out.append(rng.choice(THINK_CHARS))  # a partial tag must not merge with more
        else:
            out.append(rng.choice(BLANKS))
    return "".join(out)


def _answer_text(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(ANSWER_WORDS))
        elif r < 0.75:
            out.append(rng.choice(NOT_OUR_TAGS))
        else:
            out.append(rng.choice(BLANKS))
    return "".join(out)


def _outside_text(rng: random.Random) -> str:
    return "".join(rng.choice(OUTSIDE_CHARS + " \n") for _ in range(rng.randint(1, 4)))


def _stream(seed: int) -> Stream:
    """One generated output; its pieces carry what each character is meant to be."""
    rng = random.Random(seed)
    pieces: list[Piece] = []
    stack: list[str] = []
    finished = final_seen = False

    def label() -> str:
        if "think" in stack:
            return "think"
        return "answer" if stack and not finished else "other"

    def close(kind: str) -> None:
        nonlocal finished
        pieces.append(Piece(_tag(rng, kind, True), "tag", label()))
        if kind not in stack:
            return  # stray
        while stack.pop() != kind:
            pass
        if kind == "final" and not stack and final_seen:
            finished = True

    for _ in range(rng.randint(0, 16)):
        r = rng.random()
        if r < 0.25:
            pieces.append(Piece(_tag(rng, "think", False), "tag", label()))
            stack.append("think")
        elif r < 0.42:
            if not stack and not finished:
                final_seen = True
            pieces.append(Piece(_tag(rng, "final", False), "tag", label()))
            stack.append("final")
        elif r < 0.62 and stack:  # mostly the innermost, sometimes an outer one
            close(stack[-1] if rng.random() < 0.7 else rng.choice(stack))
        elif r < 0.68:
            close(rng.choice(["think", "final"]))  # stray, or closing an outer one
        else:
            kind = label()
            make = {"think": _think_text, "answer": _answer_text, "other": _outside_text}
            pieces.append(Piece(make[kind](rng), kind))
    if rng.random() < 0.6:  # close what is open; otherwise leave it unclosed
        while stack:
            close(stack[-1])
    truncated = rng.random() < 0.25 and bool(pieces)
    if truncated:  # max_new_tokens cut it off
        pieces = _truncate(pieces, rng.randint(0, sum(len(p.text) for p in pieces) - 1))
    return Stream(seed, pieces, truncated)


def _truncate(pieces: list[Piece], at: int) -> list[Piece]:
    out, pos = [], 0
    for p in pieces:
        if pos + len(p.text) <= at:
            out.append(p)
            pos += len(p.text)
            continue
        if at > pos:  # a cut-off tag is text of whatever section it was in
            out.append(Piece(p.text[: at - pos], p.state or p.label))
        break
    return out


@lru_cache(maxsize=1)
def _streams() -> tuple[Stream, ...]:
    """N_STREAMS distinct streams, from seeds 0, 1, … (duplicates skipped)."""
    seen, out, seed = set(), [], 0
    while len(out) < N_STREAMS:
        s = _stream(seed)
        if s.text not in seen:
            seen.add(s.text)
            out.append(s)
        seed += 1
    return tuple(out)


# -- the reference: the whole string at once ----------------------------------------

MAX_TAG = SectionTags().max_tag
TAG_RE = re.compile(r"<(/?)([A-Za-z0-9_-]+)([ \t\r\n/][^<>]*)?>", re.A)
OPEN_RE = re.compile(r"<(/?)([A-Za-z0-9_-]+)", re.A)
PARTIAL_RE = re.compile(r"<(/?)([A-Za-z0-9_-]*)([ \t\r\n/][^<>]*)?\Z", re.A)


@dataclass
class Expected:
    sections: Sections
    raw_answer: str  # all answer text, before the blanks are trimmed


def _kind(name: str) -> str | None:
    name = name.lower()
    return "final" if name == "final" else "think" if name.startswith("think") else None


def _partial_tail(text: str) -> int:
    """Where a trailing text that could still become one of our tags begins, else len."""
    m = PARTIAL_RE.search(text)
    if not m or len(m[0]) >= MAX_TAG:
        return len(text)
    name = m[2].lower()
    if m[3] is not None:
        ours = _kind(name) is not None
    else:
        ours = "final".startswith(name) or "think".startswith(name) or name.startswith("think")
    return m.start() if ours else len(text)


def reference(text: str) -> Expected:
    """The whole text at once, scanned left to right with regular expressions."""
    stack: list[str] = []
    finished = final_seen = False
    answer, thinking, other = [], [], 0

    def answering() -> bool:
        return bool(stack) and not finished and "think" not in stack

    def content(s: str) -> None:
        nonlocal other
        if "think" in stack:
            thinking.append(s)
        elif answering():
            answer.append(s)
        else:
            other += len(s.encode())

    def apply(kind: str, closing: bool) -> None:
        nonlocal final_seen, finished
        if not closing:
            if kind == "final" and not stack and not finished:
                final_seen = True
            stack.append(kind)
        elif kind in stack:
            while stack.pop() != kind:
                pass
            if kind == "final" and not stack and final_seen:
                finished = True

    pos = scan = 0
    while (lt := text.find("<", scan)) >= 0:
        m = TAG_RE.match(text, lt)
        start = OPEN_RE.match(text, lt)
        if m and len(m[0]) <= MAX_TAG and _kind(m[2]):
            content(text[pos:lt])
            other += len(m[0].encode())
            apply(_kind(m[2]), bool(m[1]))
            pos = scan = m.end()
        elif (
            start
            and not start[1]
            and _kind(start[2]) == "think"
            and "think" not in stack
            and _partial_tail(text[lt:]) != 0  # (not still open at the very end)
        ):
            content(text[pos:lt])  # fail closed: a thinking tag that is not well formed
            other += len(start[0].encode())
            apply("think", False)
            pos = scan = start.end()
        else:
            scan = lt + 1
    tail = text[pos:]
    if answering():  # a possible tag at the very end is held back, then dropped
        cut = pos + _partial_tail(tail)
        content(text[pos:cut])
        other += len(text[cut:].encode())
    else:
        content(tail)
    think = "".join(thinking).encode()
    raw = "".join(answer)
    sections = Sections(
        answer=raw.strip() if finished else "",
        complete=finished,
        final_seen=final_seen,
        thinking_sha256=hashlib.sha256(think).hexdigest(),
        thinking_bytes=len(think),
        other_bytes=other,
    )
    return Expected(sections, raw)


# -- driving the parser -------------------------------------------------------------


def _feed(chunks, as_bytes: bool = False) -> tuple[list[str], Sections]:
    parser, out = SectionParser(), []
    for chunk in chunks:
        out.append(parser.feed_bytes(chunk) if as_bytes else parser.feed(chunk))
        assert len(parser._held) <= parser.tags.longest, (chunk, parser._held)
    return out, parser.close()


def _random_split(data, rng: random.Random, most: int) -> list:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, most)
        out.append(data[i : i + n])
        i += n
    return out


def _chunkings(stream: Stream, every_split: bool):
    """(name, chunks, as_bytes) for each way the stream is fed."""
    text, rng = stream.text, random.Random(~stream.seed)
    yield "whole", [text], False
    yield "by character", list(text), False
    yield "random", _random_split(text, rng, LONGEST + 4), False
    yield "random small", _random_split(text, rng, 5), False
    data = text.encode()
    yield "bytes", _random_split(data, rng, 7), True
    yield "bytes one by one", [data[i : i + 1] for i in range(len(data))], True
    if every_split:
        for start, end in stream.tag_spans():
            for k in range(start + 1, end):
                yield f"split at {k} in tag {text[start:end]!r}", [text[:k], text[k:]], False


def _check(stream: Stream, every_split: bool) -> None:
    text = stream.text
    ctx = f"seed {stream.seed}, stream {text!r}"
    # The generator's tags are exactly the stream's tags, so its labels hold; and the
    # reference agrees with them on what is thinking.
    ours = [m.span() for m in TAG_RE.finditer(text) if _kind(m[2]) and len(m[0]) <= MAX_TAG]
    assert ours == stream.tag_spans(), f"gen: {ctx}"
    exp = reference(text)
    thinking = "".join(p.text for p in stream.pieces if p.label == "think").encode()
    assert hashlib.sha256(thinking).hexdigest() == exp.sections.thinking_sha256, ctx
    streamed = None
    for name, chunks, as_bytes in _chunkings(stream, every_split):
        out, got = _feed(chunks, as_bytes)
        where = f"{ctx}, fed {name}: {chunks!r}"
        emitted = "".join(out)
        leaked = (set(emitted) | set(got.answer)) & WITHHELD
        assert not leaked, f"leaked {sorted(leaked)}: {where}, emitted {out!r}, {got}"
        assert got == exp.sections, where
        if got.complete:
            assert emitted == got.answer, where
        else:
            assert got.answer == "", where
        assert exp.raw_answer.lstrip().startswith(emitted), where
        if streamed is None:
            streamed = emitted
        assert emitted == streamed, f"differs from feeding it whole: {where}"


# -- the tests ----------------------------------------------------------------------


def test_streams_are_distinct_and_varied() -> None:
    streams = _streams()
    assert len({s.text for s in streams}) == N_STREAMS
    texts = [s.text for s in streams]
    assert sum(reference(t).sections.complete for t in texts) > N_STREAMS // 10
    assert sum(not reference(t).sections.final_seen for t in texts) > N_STREAMS // 10
    assert sum(s.truncated for s in streams) > N_STREAMS // 10
    assert sum(any(p.label == "think" for p in s.pieces) for s in streams) > N_STREAMS // 2


@pytest.mark.parametrize("batch", range(BATCHES))
def test_no_thinking_reaches_the_client(batch: int) -> None:
    streams = _streams()
    size = N_STREAMS // BATCHES
    for i in range(batch * size, (batch + 1) * size):
        _check(streams[i], every_split=i % EVERY_SPLIT == 0)


# -- named cases --------------------------------------------------------------------

SECRET = "§秘密の思考§"


def _whole(text: str) -> tuple[str, Sections]:
    out, got = _feed([text])
    return "".join(out), got


def test_a_tag_split_across_two_feeds_at_every_position() -> None:
    text = f"<think-logic>{SECRET}</think-logic>\n<final> 答え: 42 </final>"
    for k in range(len(text) + 1):
        out, got = _feed([text[:k], text[k:]])
        assert "".join(out) == got.answer == "答え: 42", k
        assert got.complete and got.thinking_bytes == len(SECRET.encode()), k
    data = text.encode()
    for k in range(len(data) + 1):
        out, got = _feed([data[:k], data[k:]], as_bytes=True)
        assert "".join(out) == got.answer == "答え: 42", k


def test_closing_tag_in_upper_case_with_a_blank() -> None:
    out, got = _whole(f"<THINK>{SECRET}</Think ><final>yes</FINAL >")
    assert out == got.answer == "yes" and got.complete


def test_truncated_final_gives_an_empty_answer_and_a_flag() -> None:
    for text in ["<think>§</think><final>the start", "<think>§</think><final>ok</fin"]:
        out, got = _whole(text)
        assert got.answer == "" and not got.complete and got.final_seen, text
        assert "§" not in out


def test_no_final_gives_an_empty_answer_and_never_the_thinking() -> None:
    for text in [f"<think>{SECRET}</think>", f"<think>{SECRET}", SECRET, ""]:
        out, got = _whole(text)
        assert (out, got.answer, got.complete, got.final_seen) == ("", "", False, False)


def test_a_final_inside_thinking_is_thinking() -> None:
    out, got = _whole(f"<think>{SECRET}<final>{SECRET}</final>{SECRET}</think>")
    assert (out, got.answer, got.final_seen) == ("", "", False)
    assert got.thinking_bytes == 3 * len(SECRET.encode())
    out, got = _whole(f"<think><final>{SECRET}</final></think><final>real</final>")
    assert out == got.answer == "real"


def test_thinking_left_open_inside_the_answer_hides_the_rest() -> None:
    out, got = _whole(f"<final>a <think>{SECRET}</final>{SECRET}")
    assert out == got.answer == "a" and got.complete
    out, got = _whole(f"<final>a <think>{SECRET}")
    assert out == "a" and got.answer == "" and not got.complete


def test_only_a_possible_tag_start_is_held_back() -> None:
    parser = SectionParser()
    assert parser.feed("<final>a <b") == "a <b"
    assert parser.feed(" c <fin") == " c" and parser._held == "<fin"
    assert parser.feed("ally") == " <finally"
    assert parser.feed("</final   ") == "" and parser._held == "</final   "
    assert parser.feed(">") == "" and parser._held == ""
    assert parser.close().answer == "a <b c <finally"


def test_thinking_tags_with_attributes_and_self_closing_ones_open() -> None:
    out, got = _whole(f'<final>A <think mode="x">{SECRET}</think> B</final>')
    assert out == "A  B" == got.answer and got.thinking_bytes == len(SECRET.encode())
    out, got = _whole(f"<final>A<think/> {SECRET}</final>")  # <think/> opens a section
    assert out == "A" == got.answer
    out, got = _whole(f'<final>a <think-logic x="/>">{SECRET}</think-logic> b</final>')
    assert SECRET not in out and got.answer == "a  b"
    out, got = _whole(f"<final lang='en'>A</final ><think-logic\ttype=a>{SECRET}")
    assert got.answer == "A" and SECRET not in out


@pytest.mark.parametrize(
    "odd", ["<think\u00a0>", "<think.", "<thinking about " + "it " * 30, "<think-" + "x" * 70]
)
def test_a_malformed_thinking_tag_in_the_answer_hides_the_rest(odd: str) -> None:
    out, got = _whole(f"<final>A {odd}{SECRET}</think></final>")
    assert SECRET not in "".join(out) and SECRET not in got.answer
    assert "".join(out).startswith("A") and got.answer in ("", "A")


@pytest.mark.parametrize("odd", ["<think-logic\u00a0>", '<think a="<">', "<think" + "x" * 70])
def test_a_malformed_thinking_tag_before_the_answer_hides_a_final_inside(odd: str) -> None:
    out, got = _whole(f"{odd}{SECRET} <final>{SECRET}</final></think-logic><final>ok</final>")
    assert SECRET not in out and got.answer == "ok"


def test_a_tag_that_arrives_split_at_max_tag_parses_as_when_whole() -> None:
    tag = "<think " + "a" * 57 + ">"  # 65 characters: one more than max_tag
    text = tag + f"{SECRET}<final>{SECRET}</final></think><final>ok</final>"
    whole = _whole(text)
    split = _feed([text[:64], text[64:]])
    assert whole[1] == split[1] and SECRET not in whole[0] + "".join(split[0])
