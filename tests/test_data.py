"""Data: JSONL parsing and its errors, the split, tokenisation and the batch order."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from so8t_exp.config import ConfigError, DataConfig
from so8t_exp.data import (
    FOUR_CLASS_LABELS,
    BatchPlan,
    DataError,
    Record,
    epoch_order,
    load_dataset,
    parse_record,
    read_jsonl,
)
from so8t_exp.paths import asset_path

GOOD = {
    "instruction": "Is this safe?",
    "input": "Some context.",
    "output": "Yes.",
    "four_class_label": "ALLOW",
    "domain_label": "general",
    "safety_label": "safe",
}
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def write_jsonl(path: Path, lines: list) -> Path:
    """Write ``lines`` (dicts as JSON, strings verbatim) one per line."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def records(n: int, prefix: str = "q") -> list[dict]:
    return [{"instruction": f"{prefix} {i}", "output": f"answer {i}"} for i in range(n)]


# --- parsing -------------------------------------------------------------------------------


def test_parse_record_reads_all_fields():
    rec = parse_record(json.dumps(GOOD), "f.jsonl:1")
    assert rec == Record(
        instruction="Is this safe?",
        input="Some context.",
        output="Yes.",
        four_class_label="ALLOW",
        domain_label="general",
        safety_label="safe",
    )


def test_text_joins_parts_with_blank_lines():
    rec = Record(instruction="Q", input="ctx", output="A")
    assert rec.text == "Q\n\nctx\n\nA"
    assert rec.prompt == "Q\n\nctx"


def test_text_drops_empty_input():
    rec = parse_record(json.dumps({"instruction": " Q ", "input": "", "output": "A"}), "f:1")
    assert rec.text == "Q\n\nA"
    assert rec.prompt == "Q"
    assert rec.four_class_label is None


BAD_LINES = {
    "invalid_json": ('{"instruction": "q", "output": ', "invalid JSON"),
    "array": ('["q", "a"]', "expected a JSON object"),
    "missing_instruction": ('{"output": "a"}', "'instruction'"),
    "empty_instruction": ('{"instruction": "   ", "output": "a"}', "'instruction'"),
    "missing_output": ('{"instruction": "q"}', "'output'"),
    "non_string_input": ('{"instruction": "q", "input": 3, "output": "a"}', "'input'"),
    "unknown_label": (
        '{"instruction": "q", "output": "a", "four_class_label": "allow"}',
        "four_class_label",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_record_error_names_file_and_line(tmp_path, kind):
    bad, what = BAD_LINES[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        read_jsonl(path, on_bad_record="error")
    assert f"{path}:3" in str(info.value)
    assert what in str(info.value)


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", "[]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:3")):
        read_jsonl(path, on_bad_record="error")


def test_load_dataset_raises_data_error_in_error_mode(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, "not json"])
    with pytest.raises(DataError, match=re.escape(f"{path}:3")):
        load_dataset(DataConfig(files=[str(path)], val_fraction=0.0))


def test_skip_mode_skips_and_counts_bad_lines(tmp_path):
    lines = [GOOD, "not json", "[1]", {"instruction": "q"}, *records(3)]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    recs, skipped = read_jsonl(path, on_bad_record="skip")
    assert skipped == 3
    assert [r.instruction for r in recs] == ["Is this safe?", "q 0", "q 1", "q 2"]
    ds = load_dataset(DataConfig(files=[str(path)], val_fraction=0.0, on_bad_record="skip"))
    assert ds.skipped == 3
    assert len(ds.train) == 4


def test_missing_second_file_is_config_error_naming_its_index(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", records(2))
    with pytest.raises(ConfigError, match=re.escape("data.files[1]")):
        load_dataset(DataConfig(files=[str(good), str(tmp_path / "missing.jsonl")]))


def test_only_bad_lines_in_skip_mode_is_config_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["nope", "[]"])
    with pytest.raises(ConfigError, match=re.escape("data.files")):
        load_dataset(DataConfig(files=[str(path)], on_bad_record="skip"))


def test_empty_file_is_config_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape("data.files")):
        load_dataset(DataConfig(files=[str(path)]))


def test_several_files_combine(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", records(3, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", records(4, "b"))
    ds = load_dataset(DataConfig(files=[str(a), str(b)], val_fraction=0.0))
    assert sorted(r.instruction for r in ds.train) == sorted(
        [f"a {i}" for i in range(3)] + [f"b {i}" for i in range(4)]
    )
    assert ds.val == []
    assert ds.skipped == 0


# --- split ---------------------------------------------------------------------------------


def test_split_is_deterministic_and_independent_of_file_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", records(60, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", records(60, "b"))
    ab = load_dataset(DataConfig(files=[str(a), str(b)], val_fraction=0.3))
    ba = load_dataset(DataConfig(files=[str(b), str(a)], val_fraction=0.3))
    again = load_dataset(DataConfig(files=[str(a), str(b)], val_fraction=0.3))
    assert 0 < len(ab.val) < 120
    assert len(ab.train) + len(ab.val) == 120
    assert ab.val == again.val and ab.train == again.train
    assert sorted(r.text for r in ab.val) == sorted(r.text for r in ba.val)
    assert sorted(r.text for r in ab.train) == sorted(r.text for r in ba.train)


def test_val_fraction_zero_gives_empty_val(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(50))
    ds = load_dataset(DataConfig(files=[str(path)], val_fraction=0.0))
    assert ds.val == []
    assert len(ds.train) == 50


# --- batch order ---------------------------------------------------------------------------


def test_epoch_order_is_a_pure_permutation():
    first = epoch_order(seed=3, epoch=1, n=50)
    assert first == epoch_order(seed=3, epoch=1, n=50)
    assert sorted(first) == list(range(50))
    assert first != epoch_order(seed=3, epoch=2, n=50)
    assert first != epoch_order(seed=4, epoch=1, n=50)


def make_plan(n: int = 24, micro_batch: int = 3, accum: int = 2, seed: int = 7) -> BatchPlan:
    # Example i is the single token i, so a batch says which examples it holds.
    examples = [
        {"input_ids": [i], "labels": [i], "prompt_len": 1, "class_label": -100} for i in range(n)
    ]
    return BatchPlan(examples, micro_batch=micro_batch, accum=accum, seed=seed, pad_id=0)


def rows(batches: list) -> list[int]:
    return [i for b in batches for i in b["input_ids"][:, 0].tolist()]


def test_batch_plan_position_arithmetic():
    plan = make_plan(n=25, micro_batch=3, accum=2)  # 4 steps per epoch, one example dropped
    assert plan.steps_per_epoch == 4
    assert [plan.position(s) for s in (0, 3, 4, 9)] == [(0, 0), (0, 3), (1, 0), (2, 1)]


def test_micro_batches_have_accum_batches_of_micro_batch_rows():
    batches = make_plan(micro_batch=3, accum=2).micro_batches(5)
    assert len(batches) == 2
    for b in batches:
        assert b["input_ids"].shape == (3, 1)
        assert b["labels"].shape == (3, 1)
        assert b["attention_mask"].tolist() == [[1], [1], [1]]


def test_micro_batches_are_the_same_for_fresh_plans_in_any_order():
    a, b = make_plan(), make_plan()
    a7, a2 = rows(a.micro_batches(7)), rows(a.micro_batches(2))
    assert rows(b.micro_batches(2)) == a2
    assert rows(b.micro_batches(7)) == a7
    assert a2 != a7


def test_each_epoch_covers_every_example_once():
    plan = make_plan(n=24, micro_batch=3, accum=2)
    for epoch in range(2):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        seen = [i for s in steps for i in rows(plan.micro_batches(s))]
        assert sorted(seen) == list(range(24))
    assert rows(plan.micro_batches(0)) != rows(plan.micro_batches(plan.steps_per_epoch))


def test_too_few_examples_is_config_error():
    with pytest.raises(ConfigError, match=re.escape("trainer.micro_batch_size")):
        make_plan(n=5, micro_batch=3, accum=2)


# --- bundled sample ------------------------------------------------------------------------


def test_bundled_sample_parses_and_is_bilingual_with_all_labels():
    recs, skipped = read_jsonl(asset_path("data/so8t_sample.jsonl"), on_bad_record="error")
    assert skipped == 0
    assert len(recs) >= 300
    labels = Counter(r.four_class_label for r in recs)
    assert set(labels) == set(FOUR_CLASS_LABELS)
    japanese = [r for r in recs if JAPANESE.search(r.text)]
    english = [r for r in recs if not JAPANESE.search(r.text)]
    assert japanese and english
    assert all(re.search(r"[A-Za-z]{3,}", r.text) for r in english)


def test_utf8_bom_file_parses(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "a", "output": "b"}\n')
    records, skipped = read_jsonl(path, "error")
    assert skipped == 0 and records[0].instruction == "a"


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "sjis.jsonl"
    good = b'{"instruction": "a", "output": "b"}\n'
    bad = '{"instruction": "日本語", "output": "b"}\n'.encode("cp932")
    path.write_bytes(good + bad + good)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: not UTF-8"):
        read_jsonl(path, "error")
    records, skipped = read_jsonl(path, "skip")
    assert len(records) == 2 and skipped == 1
