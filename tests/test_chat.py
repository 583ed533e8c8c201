"""Chat-format SFT examples: template parts, which tokens carry loss, truncation, huge records."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from so8t_exp.chat import NO_CLASS, ChatFormat, TemplateError, encode, encode_all
from so8t_exp.config import DataConfig
from so8t_exp.data import (
    CHARS_PER_TOKEN_BOUND,
    FOUR_CLASS_LABELS,
    IGNORE_INDEX,
    Record,
    load_dataset,
)
from so8t_exp.paths import asset_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(asset_path("tokenizer")))


@pytest.fixture(scope="module")
def fmt(tokenizer) -> ChatFormat:
    return ChatFormat.from_tokenizer(tokenizer)


def test_bundled_template_has_phi35_shape(tokenizer, fmt):
    assert fmt.head == "<s><|user|>\n"
    assert fmt.middle == "<|end|>\n<|assistant|>\n"
    assert fmt.tail == "<|end|>\n</s>"
    msgs = [{"role": "user", "content": "Q"}]
    gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert fmt.prompt_text("Q") == gen


def test_loss_falls_on_the_assistant_turn_only(tokenizer, fmt):
    rec = Record(instruction="日本語の質問", input="Some context", output="The answer.")
    enc = encode(rec, fmt, tokenizer, max_length=512, mask_prompt=True)
    ids, labels, n = enc["input_ids"], enc["labels"], enc["prompt_len"]
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]
    # The masked part is exactly the generation prompt; the learned part the answer and its
    # end markers, down to the last token.
    assert tokenizer.decode(ids[:n]) == fmt.prompt_text(rec.prompt)
    assert tokenizer.decode(ids[n:]) == "The answer.<|end|>\n</s>"
    assert ids[n - 1] == tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    assert enc["class_label"] == NO_CLASS


def test_one_pass_equals_the_template_rendering(tokenizer, fmt):
    rec = Record(instruction="Q?", input="", output="A.", four_class_label="REFUSE")
    enc = encode(rec, fmt, tokenizer, max_length=512, mask_prompt=True)
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert enc["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert enc["class_label"] == FOUR_CLASS_LABELS.index("REFUSE")


def test_without_mask_prompt_every_token_carries_loss(tokenizer, fmt):
    rec = Record(instruction="Question", input="", output="Answer")
    enc = encode(rec, fmt, tokenizer, max_length=512, mask_prompt=False)
    assert enc["labels"] == enc["input_ids"]
    assert enc["prompt_len"] < len(enc["input_ids"])


def test_truncation_cuts_the_question_from_its_start_and_keeps_the_answer_end(tokenizer, fmt):
    rec = Record(instruction=" ".join(f"w{i}" for i in range(200)), input="", output="Final.")
    full = encode(rec, fmt, tokenizer, max_length=10_000, mask_prompt=True)
    short = encode(rec, fmt, tokenizer, max_length=40, mask_prompt=True)
    assert len(full["input_ids"]) > 40 and len(short["input_ids"]) == 40
    n_head = len(tokenizer(fmt.head, add_special_tokens=False)["input_ids"])
    cut = len(full["input_ids"]) - 40
    # head markers kept, the start of the question gone, its end and the answer kept
    assert short["input_ids"][:n_head] == full["input_ids"][:n_head]
    assert short["input_ids"][n_head:] == full["input_ids"][n_head + cut :]
    assert tokenizer.decode(short["input_ids"][short["prompt_len"] :]) == "Final.<|end|>\n</s>"
    assert short["prompt_len"] == full["prompt_len"] - cut
    assert "w199" in tokenizer.decode(short["input_ids"]) and "w0 " not in tokenizer.decode(
        short["input_ids"]
    )


def test_a_record_whose_answer_cannot_fit_is_skipped_and_counted(tokenizer, fmt, caplog):
    fits = Record(instruction="Q", input="", output="short")
    too_long = Record(instruction="Q", input="", output="word " * 100)
    examples, skipped = encode_all([fits, too_long], fmt, tokenizer, 30, True)
    assert skipped == 1 and len(examples) == 1
    assert "does not fit in data.max_length=30" in caplog.text


def test_a_huge_record_is_clipped_as_read_and_skipped(tmp_path, tokenizer, fmt):
    """A 50 MB answer is cut to data.max_length × CHARS_PER_TOKEN_BOUND characters when
    read (bench/long_record.py measures the memory) and then skipped, never trained on."""
    path = tmp_path / "big.jsonl"
    big = {"instruction": "Summarise.", "output": "あ" * 50_000_000, "four_class_label": "ALLOW"}
    small = {"instruction": "Hi", "output": "Hello."}
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in (big, small)) + "\n", "utf-8"
    )
    ds = load_dataset(DataConfig(files=[str(path)], val_fraction=0.0, max_length=64))
    clipped = next(r for r in ds.train if r.output_clipped)
    assert len(clipped.output) == 64 * CHARS_PER_TOKEN_BOUND
    examples, skipped = encode_all(ds.train, fmt, tokenizer, 64, True)
    assert skipped == 1 and len(examples) == 1


def test_a_huge_question_is_clipped_from_its_start(tmp_path):
    path = tmp_path / "q.jsonl"
    rec = {"instruction": "x" * 100_000 + "END", "output": "ok"}
    path.write_text(json.dumps(rec) + "\n", "utf-8")
    ds = load_dataset(DataConfig(files=[str(path)], val_fraction=0.0, max_length=8))
    (got,) = ds.train
    assert got.prompt.endswith("END") and len(got.prompt) == 8 * CHARS_PER_TOKEN_BOUND
    assert not got.output_clipped and got.output == "ok"


def test_clipping_does_not_move_the_validation_split(tmp_path):
    """The split hashes the full text, before clipping."""
    recs = [{"instruction": f"q{i}", "output": "a" * (1 + i * 50)} for i in range(60)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n", "utf-8")
    wide = load_dataset(DataConfig(files=[str(path)], val_fraction=0.3, max_length=512))
    narrow = load_dataset(DataConfig(files=[str(path)], val_fraction=0.3, max_length=1))
    assert [r.instruction for r in wide.val] == [r.instruction for r in narrow.val]


def test_a_tokenizer_without_template_gets_the_plain_format(tokenizer):
    plain = AutoTokenizer.from_pretrained(str(asset_path("tokenizer")))
    plain.chat_template = None
    fmt = ChatFormat.from_tokenizer(plain)
    assert (fmt.head, fmt.middle, fmt.tail) == ("<s>", "\n\n", "</s>")
    enc = encode(Record("Q", "", "A"), fmt, plain, 64, True)
    assert plain.decode(enc["input_ids"]) == "<s>Q\n\nA</s>"


def test_a_template_that_drops_the_answer_is_refused(tokenizer):
    odd = AutoTokenizer.from_pretrained(str(asset_path("tokenizer")))
    odd.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="each turn"):
        ChatFormat.from_tokenizer(odd)


def test_bundled_sample_set_encodes_without_loss(tokenizer, fmt):
    recs = load_dataset(
        DataConfig(files=[str(asset_path("data/so8t_sample.jsonl"))], max_length=192)
    )
    examples, skipped = encode_all(recs.train + recs.val, fmt, tokenizer, 192, True)
    assert skipped == 0 and len(examples) == 320
    assert all(e["class_label"] != NO_CLASS for e in examples)


# microsoft/Phi-3.5-mini-instruct's template (Borea-Phi-3.5-mini inherits it): no BOS, EOS
# only after a finished conversation.
PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_the_phi35_template_itself_gives_the_same_turn_shape():
    tok = AutoTokenizer.from_pretrained(str(asset_path("tokenizer")))
    tok.chat_template = PHI35_TEMPLATE
    fmt = ChatFormat.from_tokenizer(tok)
    assert (fmt.head, fmt.middle, fmt.tail) == (
        "<|user|>\n",
        "<|end|>\n<|assistant|>\n",
        "<|end|>\n</s>",
    )
    rec = Record(instruction="Q?", input="", output="A.", four_class_label="DENY")
    enc = encode(rec, fmt, tok, max_length=64, mask_prompt=True)
    n = enc["prompt_len"]
    assert tok.decode(enc["input_ids"][n:]) == "A.<|end|>\n</s>"
    assert enc["labels"][:n] == [IGNORE_INDEX] * n and enc["class_label"] == 2
