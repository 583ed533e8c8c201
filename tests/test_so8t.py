"""SO8T adapters: identity at init, SO(8) blocks, folding, layer choice, schedules, PET."""

from __future__ import annotations

import copy

import pytest
import torch

from so8t_exp import so8t
from so8t_exp.build import _add_lora
from so8t_exp.config import AlphaGateConfig, LoRAConfig, PETConfig, SO8TConfig
from so8t_exp.model_sources import TinyPhi3
from so8t_exp.paths import asset_path
from so8t_exp.so8t import SO8TAdapter


def tiny_model(num_layers: int = 3):
    source = TinyPhi3(
        tokenizer_path=str(asset_path("tokenizer")),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
    )
    model, tokenizer = source.load()
    return model.eval(), tokenizer


def input_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 12), generator=gen)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@torch.no_grad()
def randomize(adapters: list[SO8TAdapter], alpha: float = 0.7, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(1)
    for a in adapters:
        a.skew_params.copy_(torch.randn(a.skew_params.shape, generator=gen))
        a.proj.copy_(torch.randn(a.proj.shape, generator=gen) * 0.2)
        a.scale.fill_(scale)
    so8t.set_alpha(adapters, alpha)


def test_adapters_are_identity_at_init():
    model, tok = tiny_model()
    ids = input_ids(len(tok))
    before = logits(model, ids)
    adapters = so8t.attach_adapters(model, SO8TConfig(layers="all", blocks=2))
    assert len(adapters) == 3
    assert before.dtype == torch.float32
    assert torch.equal(logits(model, ids), before)
    so8t.set_alpha(adapters, 0.7)  # λ = 0 alone keeps the identity once α is on
    assert torch.equal(logits(model, ids), before)
    randomize(adapters)
    assert not torch.allclose(logits(model, ids), before)  # the hook is really in the path


def test_adapters_are_named_submodules_of_self_attn():
    model, _ = tiny_model()
    adapters = so8t.attach_adapters(model, SO8TConfig(layers=[0, 2], blocks=1))
    names = {n for n, _ in model.named_parameters() if "so8t_adapter" in n}
    assert names == {
        f"model.layers.{i}.self_attn.so8t_adapter.{p}"
        for i in (0, 2)
        for p in ("proj", "skew_params", "scale")
    }
    assert all(p.requires_grad for a in adapters for p in a.parameters())
    assert adapters[0].proj.shape == (8, 64)


def test_every_rotation_block_is_in_so8():
    adapters = [SO8TAdapter(hidden=64, blocks=4) for _ in range(3)]
    randomize(adapters, alpha=0.7)
    eye = torch.eye(8, dtype=torch.float64)
    for a in adapters:
        rots = a.rotation().double()
        assert rots.shape == (4, 8, 8)
        assert not torch.allclose(rots, eye.expand(4, 8, 8), atol=0.1)  # really rotated
        for r in rots:
            assert torch.linalg.matrix_norm(r.T @ r - eye) < 1e-5
            assert abs(torch.linalg.det(r) - 1) < 1e-5
    health = so8t.rotation_health(adapters)
    assert set(health) == {"so8t/ortho_error", "so8t/det_error"}
    assert 0 <= health["so8t/ortho_error"] < 1e-5
    assert 0 <= health["so8t/det_error"] < 1e-5


def test_rotation_is_identity_at_alpha_zero():
    adapter = SO8TAdapter(hidden=16, blocks=2)
    assert torch.equal(adapter.rotation(), torch.eye(8).expand(2, 8, 8))


def test_matrix_equals_the_map_applied_by_forward():
    adapter = SO8TAdapter(hidden=32, blocks=3)
    randomize([adapter], alpha=0.7, scale=0.8)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m = adapter.matrix()
        y = adapter(x)
    assert m.shape == (32, 32)
    assert not torch.allclose(y, x, atol=1e-3)
    torch.testing.assert_close(y, x @ m.T, atol=1e-5, rtol=1e-5)


def test_fold_adapters_leaves_a_plain_model_with_the_same_logits():
    model, tok = tiny_model()
    adapters = so8t.attach_adapters(model, SO8TConfig(layers="all", blocks=2))
    randomize(adapters)
    ids = input_ids(len(tok))
    adapted = logits(model, ids)
    assert so8t.fold_adapters(model) == len(adapters)
    assert not any("so8t" in n for n, _ in model.named_parameters())
    assert all(not layer.self_attn.o_proj._forward_pre_hooks for layer in model.model.layers)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    assert so8t.fold_adapters(model) == 0  # nothing left to fold


def test_fold_adapters_refuses_an_unmerged_lora():
    model, _ = tiny_model()
    lora_model = _add_lora(model, LoRAConfig(dropout=0.0))
    so8t.attach_adapters(lora_model, SO8TConfig(layers="all", blocks=2))
    with pytest.raises(ValueError, match="merge the LoRA"):
        so8t.fold_adapters(lora_model)


def test_fold_into_o_proj_reproduces_adapted_logits():
    cfg = SO8TConfig(layers="all", blocks=2)
    model, tok = tiny_model()
    adapters = so8t.attach_adapters(model, cfg)
    randomize(adapters)
    ids = input_ids(len(tok))
    adapted = logits(model, ids)
    # An independent copy (its own hooks and adapters) with M folded into o_proj and the
    # adapters switched off.
    folded_model, _ = tiny_model()
    folded_adapters = so8t.attach_adapters(folded_model, cfg)
    folded_model.load_state_dict(model.state_dict())
    so8t.set_alpha(folded_adapters, 0.7)
    base_logits = logits(folded_model, ids)
    for layer in so8t._decoder_layers(folded_model):
        so8t.fold_into_o_proj(layer.self_attn.o_proj, layer.self_attn.so8t_adapter)
    with torch.no_grad():
        for a in folded_adapters:
            a.scale.zero_()
    assert torch.equal(base_logits, adapted)
    folded = logits(folded_model, ids)
    assert (adapted - logits(tiny_model()[0], ids)).abs().max() > 1e-3  # adapters matter
    torch.testing.assert_close(folded, adapted, atol=1e-4, rtol=0)


def test_deepcopy_of_adapted_model_uses_its_own_adapters():
    model, tok = tiny_model()
    adapters = so8t.attach_adapters(model, SO8TConfig(layers="all", blocks=2))
    randomize(adapters)
    ids = input_ids(len(tok))
    base = logits(tiny_model()[0], ids)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for layer in so8t._decoder_layers(clone):
            layer.self_attn.so8t_adapter.scale.zero_()
    torch.testing.assert_close(logits(clone, ids), base, atol=1e-6, rtol=0)


def test_select_layers():
    assert so8t.select_layers("middle_third", 6) == [2, 3]
    assert so8t.select_layers("middle_third", 3) == [1]
    assert so8t.select_layers("middle_third", 1) == [0]
    assert so8t.select_layers("all", 4) == [0, 1, 2, 3]
    assert so8t.select_layers([0, 5], 6) == [0, 5]


@pytest.mark.parametrize("layers", [[0, 6], [-1]])
def test_select_layers_out_of_range_names_the_key(layers):
    with pytest.raises(ValueError, match="model.so8t.layers"):
        so8t.select_layers(layers, 6)


def test_attach_adapters_uses_selected_layers():
    model, _ = tiny_model(num_layers=6)
    so8t.attach_adapters(model, SO8TConfig(layers="middle_third", blocks=1))
    with_adapter = [
        i for i, layer in enumerate(model.model.layers) if hasattr(layer.self_attn, "so8t_adapter")
    ]
    assert with_adapter == [2, 3]


def test_alpha_gate_anneals_from_zero_to_exactly_target():
    cfg = AlphaGateConfig(target=0.38, start_step=10, anneal_steps=40, steepness=10.0)
    values = [so8t.alpha_at(s, cfg, max_steps=200) for s in range(0, 80)]
    assert values[0] == 0.0
    assert values[10] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < values[30] < 0.38
    assert values[30] == pytest.approx(0.19, abs=1e-9)  # the sigmoid's midpoint
    for s in (50, 51, 79):
        assert values[s] == pytest.approx(0.38, abs=1e-12)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_alpha_gate_defaults_to_half_of_max_steps():
    cfg = AlphaGateConfig(target=0.5, start_step=0, anneal_steps=None)
    assert so8t.alpha_at(49, cfg, max_steps=100) < 0.5
    assert so8t.alpha_at(50, cfg, max_steps=100) == pytest.approx(0.5, abs=1e-12)


def test_pet_weight_schedule():
    cfg = PETConfig(weight=0.01, warmup_fraction=0.2, anneal_fraction=0.8, final_weight=0.03)
    at = [so8t.pet_weight_at(s, cfg, max_steps=100) for s in range(101)]
    assert at[0] == 0.0
    assert at[10] == pytest.approx(0.005)
    assert all(w == pytest.approx(0.01) for w in at[20:81])
    assert at[90] == pytest.approx(0.02)
    assert at[100] == pytest.approx(0.03)


def with_delta(delta: torch.Tensor) -> SO8TAdapter:
    adapter = SO8TAdapter(hidden=delta.shape[-1], blocks=1)
    adapter.last_delta = delta
    return adapter


def test_pet_loss_is_zero_for_a_delta_linear_in_position():
    t = torch.arange(6.0).view(1, 6, 1)
    delta = 3.0 + 2.0 * t * torch.ones(2, 6, 4)
    assert so8t.pet_loss([with_delta(delta)]).item() == pytest.approx(0.0, abs=1e-12)


def test_pet_loss_is_positive_for_a_curved_delta():
    t = torch.arange(6.0).view(1, 6, 1)
    delta = t**2 * torch.ones(2, 6, 4)  # second difference 2 everywhere
    assert so8t.pet_loss([with_delta(delta)]).item() == pytest.approx(4.0)


def test_pet_loss_mask_ignores_padded_positions():
    t = torch.arange(6.0).view(1, 6, 1)
    delta = torch.where(t < 4, t, t**3) * torch.ones(1, 6, 4)  # linear on the first 4
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert so8t.pet_loss([with_delta(delta)], mask).item() == pytest.approx(0.0, abs=1e-12)
    assert so8t.pet_loss([with_delta(delta)]).item() > 1.0


def test_forward_records_last_delta_only_in_training():
    adapter = SO8TAdapter(hidden=16, blocks=1)
    randomize([adapter])
    x = torch.randn(1, 4, 16)
    adapter.train()
    y = adapter(x)
    torch.testing.assert_close(adapter.last_delta, y - x)
    adapter.eval()
    adapter(x)
    assert adapter.last_delta is None


def test_rotation_health_reads_the_rotation_the_last_forward_applied():
    adapter = SO8TAdapter(hidden=16, blocks=2)
    randomize([adapter], alpha=0.7)
    assert adapter.last_rotation is None
    fresh = so8t.rotation_health([adapter])  # before any forward: computed afresh
    adapter(torch.randn(1, 4, 16))
    torch.testing.assert_close(adapter.last_rotation, adapter.rotation(), rtol=0, atol=0)
    assert not adapter.last_rotation.requires_grad
    assert so8t.rotation_health([adapter]) == fresh
    # a broken rotation shows up in the metric (what the health check is for)
    adapter.last_rotation = adapter.last_rotation * 1.01
    assert so8t.rotation_health([adapter])["so8t/ortho_error"] > 1e-3


def test_lora_then_adapters_keeps_identity_and_trains_both():
    model, tok = tiny_model()
    ids = input_ids(len(tok))
    for p in model.parameters():
        p.requires_grad_(False)
    lora_model = _add_lora(model, LoRAConfig(dropout=0.0)).eval()
    lora_logits = logits(lora_model, ids)
    adapters = so8t.attach_adapters(lora_model, SO8TConfig(layers="all", blocks=2))
    assert len(adapters) == 3
    assert torch.equal(logits(lora_model, ids), lora_logits)
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert any("so8t_adapter.proj" in n for n in trainable)
    assert all(p.requires_grad for a in adapters for p in a.parameters())
    lora_names = {n for n, _ in lora_model.named_parameters() if "lora_" in n}
    assert lora_names and lora_names <= trainable
    assert any("o_proj.lora_A" in n for n in lora_names)
    randomize(adapters)
    assert not torch.allclose(logits(lora_model, ids), lora_logits)  # hook on the wrapper


def test_alpha_gate_with_zero_anneal_steps_jumps_to_target():
    cfg = AlphaGateConfig(target=0.5, start_step=3, anneal_steps=0)
    assert so8t.alpha_at(2, cfg, 100) == 0.0
    assert so8t.alpha_at(4, cfg, 100) == pytest.approx(0.5, abs=1e-12)


def test_select_layers_bad_spec_names_the_key():
    with pytest.raises(ValueError, match="model.so8t.layers"):
        so8t.select_layers("middle", 6)
