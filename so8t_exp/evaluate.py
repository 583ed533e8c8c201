"""Evaluation: validation loss and perplexity; four-class decision metrics.

The four-class decision is read from label likelihoods: for each labelled record the model
scores every label as the continuation of the prompt (``prompt + "\\n\\n" + LABEL``); the
softmax over the four summed log-probabilities is the prediction and its confidence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from so8t_exp.data import FOUR_CLASS_LABELS, IGNORE_INDEX, Record, collate


@torch.no_grad()
def validation_loss(model, batches: list[dict], device, autocast) -> dict[str, float]:
    """Token-weighted mean loss over ``batches`` and its perplexity."""
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        shift_labels = batch["labels"][:, 1:]
        n = int((shift_labels != IGNORE_INDEX).sum())
        loss = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1),
            shift_labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total, count = total + float(loss), count + n
    if not count:
        return {}
    mean = total / count
    return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}


@torch.no_grad()
def label_probabilities(
    model, tokenizer, records: list[Record], device, autocast, chunk: int = 16
) -> torch.Tensor:
    """(n_records, 4) probabilities over FOUR_CLASS_LABELS."""
    examples = []
    for rec in records:
        prompt = [
            tokenizer.bos_token_id,
            *tokenizer(rec.prompt, add_special_tokens=False)["input_ids"],
        ]
        for label in FOUR_CLASS_LABELS:
            cont = tokenizer("\n\n" + label, add_special_tokens=False)["input_ids"]
            examples.append(
                {"input_ids": prompt + cont, "labels": [IGNORE_INDEX] * len(prompt) + cont}
            )
    scores = torch.cat(
        [
            _continuation_logprob(
                model, examples[i : i + chunk], tokenizer.pad_token_id, device, autocast
            )
            for i in range(0, len(examples), chunk)
        ]
    )
    scores = scores.view(len(records), len(FOUR_CLASS_LABELS))
    return torch.softmax(scores, -1).cpu()


def _continuation_logprob(model, examples, pad_id, device, autocast) -> torch.Tensor:
    """Summed log-probability of the labelled (non-ignored) tokens of each example."""
    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    with autocast():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1)
    token_lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_lp * (labels != IGNORE_INDEX)).sum(-1).cpu()


def four_class_metrics(probs: torch.Tensor, truth: list[int]) -> dict[str, float]:
    """REFUSE recall, macro F1 (over classes seen in truth or predictions) and ECE."""
    pred = probs.argmax(-1).tolist()
    refuse = FOUR_CLASS_LABELS.index("REFUSE")
    f1s = []
    for c in sorted(set(truth) | set(pred)):
        tp = sum(p == c and t == c for p, t in zip(pred, truth, strict=True))
        fp = sum(p == c and t != c for p, t in zip(pred, truth, strict=True))
        fn = sum(p != c and t == c for p, t in zip(pred, truth, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    n_refuse = sum(t == refuse for t in truth)
    out = {
        "eval/macro_f1": sum(f1s) / len(f1s),
        "eval/accuracy": sum(p == t for p, t in zip(pred, truth, strict=True)) / len(truth),
        "eval/ece": expected_calibration_error(probs, truth),
    }
    if n_refuse:
        out["eval/refuse_recall"] = (
            sum(p == t == refuse for p, t in zip(pred, truth, strict=True)) / n_refuse
        )
    return out


def expected_calibration_error(probs: torch.Tensor, truth: list[int], bins: int = 10) -> float:
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


def evaluate(model, tokenizer, val_batches, label_records, device, autocast) -> dict[str, float]:
    """All eval metrics; the model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    try:
        out = validation_loss(model, val_batches, device, autocast)
        if label_records:
            probs = label_probabilities(model, tokenizer, label_records, device, autocast)
            truth = [FOUR_CLASS_LABELS.index(r.four_class_label) for r in label_records]
            out.update(four_class_metrics(probs, truth))
    finally:
        model.train(was_training)
    return out
