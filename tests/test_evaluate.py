"""The safety head's metrics and the confusion-matrix artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from so8t_exp import build, data
from so8t_exp.confusion import write_confusion
from so8t_exp.evaluate import evaluate, expected_calibration_error, four_class_metrics

ALLOW, ESCALATION, DENY, REFUSE = range(4)


def one_hot_probs(pred: list[int], confidence: float = 0.7) -> torch.Tensor:
    rest = (1 - confidence) / 3
    probs = torch.full((len(pred), 4), rest)
    probs[torch.arange(len(pred)), torch.tensor(pred)] = confidence
    return probs


def test_four_class_metrics_by_hand():
    truth = [ALLOW, ALLOW, DENY, DENY, REFUSE, REFUSE, REFUSE, ESCALATION]
    pred = [ALLOW, DENY, DENY, DENY, REFUSE, ALLOW, REFUSE, ALLOW]
    metrics, confusion = four_class_metrics(one_hot_probs(pred), truth)
    assert metrics["eval/accuracy"] == pytest.approx(5 / 8)
    assert metrics["eval/refuse_recall"] == pytest.approx(2 / 3)
    assert metrics["eval/recall_allow"] == pytest.approx(1 / 2)
    assert metrics["eval/recall_deny"] == 1.0 and metrics["eval/recall_escalation"] == 0.0
    # F1: ALLOW 2·(1/3·1/2)/(1/3+1/2)=0.4, ESC 0, DENY 0.8, REFUSE 0.8
    assert metrics["eval/macro_f1"] == pytest.approx((0.4 + 0 + 0.8 + 0.8) / 4)
    assert confusion == [[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 2, 0], [1, 0, 0, 2]]
    # every prediction at confidence 0.7 in one bin; accuracy 5/8
    assert metrics["eval/ece"] == pytest.approx(abs(0.7 - 5 / 8))


def test_a_class_absent_from_the_split_gets_no_recall():
    metrics, _ = four_class_metrics(one_hot_probs([ALLOW, DENY]), [ALLOW, DENY])
    assert "eval/refuse_recall" not in metrics and "eval/recall_escalation" not in metrics
    assert metrics["eval/macro_f1"] == 1.0


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs = one_hot_probs([ALLOW, ALLOW, ALLOW, ALLOW], confidence=0.75)
    assert expected_calibration_error(probs, [ALLOW, ALLOW, ALLOW, DENY]) == pytest.approx(0.0)
    assert expected_calibration_error(probs, [DENY] * 4) == pytest.approx(0.75)


def test_evaluation_covers_every_labelled_validation_record(compose_cfg):
    cfg = compose_cfg("trainer.device=cpu", "trainer.micro_batch_size=5")
    build.seed_everything(cfg.seed, True)
    dataset = data.load_dataset(cfg.data)
    b = build.build_training(cfg, build.build_source(cfg), dataset, torch.device("cpu"), "fp32")
    t = b.trainer
    result = evaluate(t.model, t.adapters, t.head, b.val_batches, t.device, t.autocast)
    labelled = sum(r.four_class_label is not None for r in dataset.val)
    assert labelled == len(dataset.val) > 5  # several batches, the last one short
    assert sum(map(sum, result.confusion)) == labelled
    for key in ("eval/loss", "eval/perplexity", "eval/head_loss", "eval/macro_f1", "eval/ece"):
        assert key in result.metrics, key
    assert t.model.training  # put back in training mode


def test_confusion_artifacts(tmp_path):
    matrix = [[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 4, 1], [1, 0, 0, 2]]
    folder = write_confusion(tmp_path / "eval", matrix, 40)
    report = json.loads((folder / "confusion_matrix.json").read_text())
    assert report["matrix"] == matrix and report["step"] == 40
    refuse = report["per_class"]["REFUSE"]
    assert refuse["recall"] == pytest.approx(2 / 3) and refuse["support"] == 3
    assert refuse["precision"] == pytest.approx(2 / 3)
    assert (folder / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_without_a_head_training_and_evaluation_give_the_lm_figures_only(compose_cfg):
    cfg = compose_cfg("trainer.device=cpu", "model.safety_head.enabled=false")
    build.seed_everything(cfg.seed, True)
    dataset = data.load_dataset(cfg.data)
    b = build.build_training(cfg, build.build_source(cfg), dataset, torch.device("cpu"), "fp32")
    t = b.trainer
    assert t.head is None and not any("safety_head" in n for n in t.params)
    metrics = t.train_step()
    assert "train/loss" in metrics and "train/head_loss" not in metrics
    result = evaluate(t.model, t.adapters, t.head, b.val_batches, t.device, t.autocast)
    assert set(result.metrics) == {"eval/loss", "eval/perplexity"} and result.confusion is None
    assert t.so8t_state()["safety_head"] is None
