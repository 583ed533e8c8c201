"""Evaluation over the validation split: LM loss and perplexity; the safety head's metrics.

Every validation batch goes through the model once (:func:`so8t_exp.objective.forward`):
its target tokens give the loss, its last prompt tokens the head's four-class prediction.
The head metrics (REFUSE recall, macro F1, accuracy, per-class recall, ECE) are computed
over every labelled record of the split, with scikit-learn where it has the metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from so8t_exp import objective
from so8t_exp.chat import NO_CLASS
from so8t_exp.data import FOUR_CLASS_LABELS

CLASSES = list(range(len(FOUR_CLASS_LABELS)))


@dataclass
class Evaluation:
    metrics: dict[str, float]
    confusion: list[list[int]] | None  # rows: true class, columns: predicted


@torch.no_grad()
def evaluate(model, adapters, head, batches: list[dict], device, autocast) -> Evaluation:
    """All eval metrics over ``batches``; the model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device)
    logits, truth = [], []
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = objective.forward(model, adapters, head, batch, autocast)
            sums += out.sums()
            if out.class_logits is not None:
                keep = batch["class_label"] != NO_CLASS
                logits.append(out.class_logits[keep].cpu())
                truth.append(batch["class_label"][keep].cpu())
    finally:
        model.train(was_training)
    counts = objective.Counts.of(batches)
    lm, _pet, head_loss = (sums.cpu() / counts.divisors()).tolist()
    metrics = {}
    if counts.tokens:
        metrics = {"eval/loss": lm, "eval/perplexity": math.exp(min(lm, 50.0))}
    if not counts.labelled or not logits:
        return Evaluation(metrics, None)
    probs = torch.softmax(torch.cat(logits), -1)
    head_metrics, confusion = four_class_metrics(probs, torch.cat(truth).tolist())
    return Evaluation({**metrics, "eval/head_loss": head_loss, **head_metrics}, confusion)


def four_class_metrics(
    probs: torch.Tensor, truth: list[int]
) -> tuple[dict[str, float], list[list[int]]]:
    """REFUSE recall, macro F1 (over the classes present in truth or predictions),
    accuracy, ECE and the recall of each class present; and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    pred = probs.argmax(-1).tolist()
    out = {
        "eval/accuracy": float(accuracy_score(truth, pred)),
        "eval/macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "eval/ece": expected_calibration_error(probs, truth),
    }
    recalls = recall_score(truth, pred, labels=CLASSES, average=None, zero_division=0)
    for c, name in enumerate(FOUR_CLASS_LABELS):
        if c in truth:
            out[recall_key(name)] = float(recalls[c])
    return out, confusion_matrix(truth, pred, labels=CLASSES).tolist()


def recall_key(label: str) -> str:
    """``eval/refuse_recall`` (the SO8T objective's name) or ``eval/recall_<label>``."""
    return "eval/refuse_recall" if label == "REFUSE" else f"eval/recall_{label.lower()}"


def expected_calibration_error(probs: torch.Tensor, truth: list[int], bins: int = 10) -> float:
    """Top-label ECE: Σ over equal-width confidence bins of |accuracy − confidence| weighted
    by the bin's share of examples (scikit-learn has no multi-class ECE)."""
    conf, pred = probs.max(-1)
    correct = (pred == torch.tensor(truth)).float()
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        in_bin = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(
                conf[in_bin].mean().item() - correct[in_bin].mean().item()
            )
    return ece
