"""The training objective and the trainer's step: token-exact accumulation, non-finite
guard, bf16 rotations. Real tiny models built from composed configs."""

from __future__ import annotations

import pytest
import torch

from so8t_exp import build, data, objective, so8t
from so8t_exp.config import validate
from so8t_exp.so8t import SO8TAdapter
from so8t_exp.trainer import TrainingDiverged


def built(compose_cfg, *overrides: str) -> build.Built:
    cfg = compose_cfg("trainer.device=cpu", "trainer.precision=fp32", *overrides)
    validate(cfg)
    build.seed_everything(cfg.seed, True)
    source = build.build_source(cfg)
    return build.build_training(
        cfg, source, data.load_dataset(cfg.data), torch.device("cpu"), "fp32"
    )


def trainable(b: build.Built) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in b.trainer.params.items()}


def test_counts_divide_by_the_whole_step_not_each_micro_batch(compose_cfg):
    b = built(compose_cfg, "trainer.micro_batch_size=2", "trainer.grad_accum_steps=4")
    micro = b.trainer.plan.micro_batches(0)
    counts = objective.Counts.of(micro)
    per_batch = [objective.Counts.of([m]).tokens for m in micro]
    assert counts.tokens == sum(per_batch) and len(set(per_batch)) > 1  # uneven batches
    assert counts.labelled == sum(int((m["class_label"] >= 0).sum()) for m in micro)


def test_accumulation_trains_the_same_model_as_one_big_batch(compose_cfg):
    """micro_batch_size=2 × grad_accum_steps=4 == micro_batch_size=8 × 1, within float
    tolerance: every loss term is summed over the step and divided by its step count."""
    common = ("trainer.scheduler.warmup_steps=1", "model.safety_head.loss_weight=1.0")
    small = built(compose_cfg, "trainer.micro_batch_size=2", "trainer.grad_accum_steps=4", *common)
    big = built(compose_cfg, "trainer.micro_batch_size=8", "trainer.grad_accum_steps=1", *common)
    assert trainable(small).keys() == trainable(big).keys()
    for name, p in trainable(small).items():  # same seed: same initial weights
        torch.testing.assert_close(p, trainable(big)[name], rtol=0, atol=0)
    for step in range(3):
        rows_small = sorted(
            r for m in small.trainer.plan.micro_batches(step) for r in m["input_ids"][:, 1].tolist()
        )
        rows_big = sorted(big.trainer.plan.micro_batches(step)[0]["input_ids"][:, 1].tolist())
        assert rows_small == rows_big  # the same examples in each step
        m_small, m_big = small.trainer.train_step(), big.trainer.train_step()
        for key in ("train/loss", "train/pet_loss", "train/head_loss", "train/grad_norm"):
            assert m_small[key] == pytest.approx(m_big[key], rel=1e-5, abs=1e-7), key
    # AdamW divides by √v, so float noise in a near-zero gradient moves a weight by a
    # visible fraction of lr; 5e-5 is under 2 % of one step's update (lr 3e-3).
    after_big = trainable(big)
    for name, p in trainable(small).items():
        torch.testing.assert_close(p, after_big[name], rtol=0, atol=5e-5, msg=name)
        assert (p - after_big[name]).norm() <= 1e-5 * p.norm() + 1e-9, name


def test_a_non_finite_step_is_skipped_and_never_reaches_the_weights(compose_cfg, monkeypatch):
    monkeypatch.setenv("SO8T_FAULT_NAN_AT_STEPS", "2")
    b = built(compose_cfg, "trainer.max_bad_steps=3")
    t = b.trainer
    t.train_step()
    before = trainable(b)
    adam_before = {k: v["exp_avg"].clone() for k, v in enumerate(t.optimizer.state.values())}
    metrics = t.train_step()
    assert "train/loss" not in metrics and "train/grad_norm" not in metrics
    assert metrics["train/skipped_steps"] == 1
    assert t.progress.step == 2 and t.progress.skipped_steps == 1
    for name, p in trainable(b).items():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
        assert torch.isfinite(p).all()
    for k, v in enumerate(t.optimizer.state.values()):
        torch.testing.assert_close(v["exp_avg"], adam_before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in t.params.values())
    good = t.train_step()  # training goes on; the streak resets
    assert good["train/loss"] == good["train/loss"] and t.progress.bad_streak == 0


def test_max_bad_steps_in_a_row_raise_once_the_step_is_complete(compose_cfg, monkeypatch):
    monkeypatch.setenv("SO8T_FAULT_NAN_AT_STEPS", "2,3,4")
    b = built(compose_cfg, "trainer.max_bad_steps=3")
    t = b.trainer
    t.train_step()
    good = trainable(b)
    t.train_step()
    t.train_step()
    with pytest.raises(TrainingDiverged, match="3 consecutive steps.*max_bad_steps=3"):
        t.train_step()
    assert t.progress.step == 4 and not t.in_step and not t.applying  # a clean boundary
    for name, p in trainable(b).items():
        torch.testing.assert_close(p, good[name], rtol=0, atol=0, msg=name)


def test_sync_schedules_sets_the_alpha_of_the_last_completed_step(compose_cfg):
    b = built(compose_cfg)
    t = b.trainer
    for _ in range(3):
        t.train_step()
    applied = float(t.adapters[0].alpha)
    so8t.set_alpha(t.adapters, 0.0)  # as a freshly built model has it
    t.sync_schedules()
    assert float(t.adapters[0].alpha) == applied != 0.0
    assert t.so8t_state()["alpha"] == applied


def test_bf16_rotation_is_formed_as_r_minus_i_in_float32():
    """In bf16 the applied rotation's error stays at bf16 rounding of R − I (small
    entries, fine steps), not of R (whose ≈1 diagonal rounds in steps of 2⁻⁸)."""
    torch.manual_seed(0)
    adapter = SO8TAdapter(hidden=64, blocks=4)
    with torch.no_grad():
        adapter.skew_params.normal_(0, 0.02)  # early training: R close to I
        adapter.scale.fill_(1.0)
    so8t.set_alpha([adapter], 0.3)
    x = torch.randn(2, 5, 64)
    adapter.train()  # keeps last_delta: the adapter's contribution before it is added to x
    adapter(x)
    exact = adapter.last_delta.detach()  # float32 reference
    rot = adapter.rotation().detach()
    eye = torch.eye(8)
    adapter(x.bfloat16())
    applied = adapter.last_rotation
    err_applied = (applied - rot).abs().max().item()
    err_naive = (rot.bfloat16().float() - rot).abs().max().item()
    assert err_applied < 2e-4 < err_naive  # R − I rounds far finer than R
    health = so8t.rotation_health([adapter])
    ortho = torch.linalg.matrix_norm(applied.transpose(-1, -2) @ applied - eye).max().item()
    assert health["so8t/ortho_error"] == pytest.approx(ortho, rel=1e-5)
    assert 1e-7 < health["so8t/ortho_error"] < 1e-3
    rel = ((adapter.last_delta.float() - exact).norm() / exact.norm()).item()
    assert rel < 5e-2  # the adapter's contribution is bf16-accurate, not lost in rounding


def test_records_without_a_label_add_no_head_loss(compose_cfg):
    b = built(compose_cfg, "trainer.micro_batch_size=4")
    t = b.trainer
    batch = dict(t.plan.micro_batches(0)[0])
    labelled = objective.forward(t.model, t.adapters, t.head, batch, t.autocast)
    assert labelled.head_sum > 0
    batch["class_label"] = torch.full_like(batch["class_label"], objective.NO_CLASS)
    out = objective.forward(t.model, t.adapters, t.head, batch, t.autocast)
    counts = objective.Counts.of([batch])
    assert counts.labelled == 0 and out.head_sum == 0
    out.loss(counts, 0.0, 1.0).backward()
    assert all(p.grad is None or not p.grad.any() for p in t.head.parameters())
    # the LM part is untouched by labels
    assert out.lm_sum == labelled.lm_sum
