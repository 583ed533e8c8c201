"""The safety head's confusion matrix as run artifacts: JSON and a PNG image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from so8t_exp.data import FOUR_CLASS_LABELS


def confusion_report(matrix: list[list[int]], step: int) -> dict:
    """The matrix (rows: true class, columns: predicted) with per-class precision, recall,
    F1 and support derived from it."""
    n = len(FOUR_CLASS_LABELS)
    per_class = {}
    for c, label in enumerate(FOUR_CLASS_LABELS):
        tp = matrix[c][c]
        predicted = sum(matrix[r][c] for r in range(n))
        support = sum(matrix[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    return {
        "step": step,
        "labels": list(FOUR_CLASS_LABELS),
        "matrix": matrix,
        "per_class": per_class,
    }


def write_confusion(folder: Path, matrix: list[list[int]], step: int) -> Path:
    """``confusion_matrix.json`` and ``confusion_matrix.png`` in ``folder``; returns it."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe outside the main thread
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    folder.mkdir(parents=True, exist_ok=True)
    report = confusion_report(matrix, step)
    text = json.dumps(report, indent=2)
    (folder / "confusion_matrix.json").write_text(text, encoding="utf-8")
    fig = Figure(figsize=(5.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(FOUR_CLASS_LABELS)).plot(
        ax=ax, cmap="Blues", colorbar=False
    )
    ax.set_title(f"Safety head, validation split, step {step}")
    fig.tight_layout()
    fig.savefig(folder / "confusion_matrix.png")
    return folder
