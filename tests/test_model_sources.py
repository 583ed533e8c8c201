"""Model sources and the bundled tokenizer: offline loading, seeded init, from_pretrained."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from so8t_exp.model_sources import Pretrained, TinyPhi3
from so8t_exp.paths import asset_path
from so8t_exp.tokenizer import build_tokenizer

MIXED = "日本語と English の混在テキスト: こんにちは、world! 123"


def tiny(init_seed: int = 0) -> TinyPhi3:
    return TinyPhi3(
        tokenizer_path=str(asset_path("tokenizer")),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        init_seed=init_seed,
    )


def test_bundled_tokenizer_loads_offline_and_round_trips(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(asset_path("tokenizer")))
    ids = tok(MIXED, add_special_tokens=False)["input_ids"]
    assert len(ids) > 5
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == MIXED
    assert tok(MIXED)["input_ids"] == [tok.bos_token_id, *ids]


def test_bundled_tokenizer_special_ids_are_distinct():
    tok = AutoTokenizer.from_pretrained(str(asset_path("tokenizer")))
    special = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]
    assert None not in special
    assert len(set(special)) == 3
    assert tok.convert_ids_to_tokens(special) == ["<pad>", "<s>", "</s>"]


def test_tiny_phi3_load_is_seeded_and_leaves_global_rng_alone():
    with torch.random.fork_rng(devices=[]):  # keep this test's reseeding to itself
        torch.manual_seed(123)
        rng_before = torch.get_rng_state()
        model_a, tok = tiny(init_seed=5).load()
        assert torch.equal(torch.get_rng_state(), rng_before)
        torch.manual_seed(456)  # a different global state must not change the weights
        model_b, _ = tiny(init_seed=5).load()
        model_c, _ = tiny(init_seed=6).load()
    a, b, c = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert model_a.config.vocab_size == len(tok)
    assert model_a.config.num_hidden_layers == 2


def test_pretrained_loads_a_saved_model_with_equal_logits(tmp_path):
    model, tok = tiny(init_seed=3).load()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = Pretrained(name_or_path=str(tmp_path), dtype="float32").load()
    assert loaded.dtype == torch.float32
    assert loaded_tok(MIXED)["input_ids"] == tok(MIXED)["input_ids"]
    assert loaded_tok.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok(MIXED)["input_ids"]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        got = loaded.eval()(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_pretrained_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="model.source.dtype"):
        Pretrained(name_or_path="unused", dtype="int3")


def test_build_tokenizer_encodes_unseen_japanese_without_unk():
    tok = build_tokenizer(["hello world", "こんにちは世界", "the quick brown fox"], vocab_size=300)
    unseen = "未知の漢字：鬱蒼とした森と🙂"
    ids = tok(unseen, add_special_tokens=False)["input_ids"]
    assert ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == unseen
    assert tok(unseen)["input_ids"][0] == tok.bos_token_id
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
