"""
Metrics and result files of the evaluations: accuracy (single-label); average precision per class, mAP, ROC AUC and
d-prime (multi-label, as AudioSet and FSD50K report them); `predictions.csv`, a confusion-matrix PNG or a per-class AP
table, `metrics.json`, and the short table printed on the console.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "average_precision",
    "d_prime",
    "multi_label_metrics",
    "roc_auc",
    "write_results",
]


def accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of clips whose highest-scoring class is their label: `labels` `(n,)`, `scores` `(n, classes)`."""
    return float((np.argmax(scores, axis=1) == labels).mean())


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """
    Area under the precision-recall curve of one class, stepwise (scikit-learn's `average_precision_score`): the
    precision at each distinct score threshold, weighted by the recall it adds. `targets` `(n,)` 0/1 with a positive.
    """
    order = np.argsort(-scores, kind="mergesort")
    ranked_scores, ranked = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked) - 1]
    true_positives = np.cumsum(ranked)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of one class (ties count half): the Mann-Whitney statistic."""
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2
    ranks = np.empty(len(scores))
    ranks[order] = average_rank[inverse]
    positives = float(targets.sum())
    negatives = len(targets) - positives
    return float((ranks[targets > 0.5].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def d_prime(auc: float) -> float:
    """Sensitivity index of an AUC: `sqrt(2) * Phi^-1(auc)` (AudioSet's d')."""
    return math.sqrt(2.0) * NormalDist().inv_cdf(min(max(auc, 1e-6), 1 - 1e-6))


def multi_label_metrics(targets: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """
    `mAP` (mean AP over the classes with a positive clip), `auc` (mean ROC AUC over the classes with positives and
    negatives), `d_prime` (of that AUC) and `class_ap` (per class, None where it has no positive).
    """
    class_ap, aucs = [], []
    for column in range(targets.shape[1]):
        positives = targets[:, column].sum()
        class_ap.append(average_precision(targets[:, column], scores[:, column]) if positives else None)
        if 0 < positives < len(targets):
            aucs.append(roc_auc(targets[:, column], scores[:, column]))
    present = [value for value in class_ap if value is not None]
    auc = float(np.mean(aucs)) if aucs else float("nan")
    return {
        "mAP": float(np.mean(present)) if present else float("nan"),
        "auc": auc,
        "d_prime": d_prime(auc) if aucs else float("nan"),
        "class_ap": class_ap,
    }


def _confusion_png(path: Path, labels: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    size = min(4 + 0.25 * len(names), 20)
    figure = Figure(figsize=(size, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    ticks = range(len(names)) if len(names) <= 60 else []
    axes.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)
    axes.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"Confusion matrix ({int(matrix.trace())} of {int(matrix.sum())} correct)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_results(
    output_dir: Path,
    metrics: dict[str, Any],
    clips: Any,
    scores: np.ndarray,
    tested: np.ndarray,
    fold_of: np.ndarray,
) -> list[str]:
    """
    Write `metrics.json`, `predictions.csv` (every tested clip: file, fold, label(s), prediction or the per-class
    scores the metrics rank) and `confusion_matrix.png` (single-label) or `per_class_ap.csv` (multi-label); return
    the console summary's lines (each fold's result was printed as it came, so only the mean over folds).
    """
    names = clips.label_names
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        if clips.multi_label:
            writer.writerow(["index", "file", "fold", "labels", *(f"score:{name}" for name in names)])
            for index in np.flatnonzero(tested):
                labels = ";".join(names[c] for c in np.flatnonzero(clips.labels[index]))
                row_scores = [f"{value:.9g}" for value in scores[index]]  # float32, exactly
                writer.writerow([index, clips.file(index), fold_of[index], labels, *row_scores])
        else:
            writer.writerow(["index", "file", "fold", "label", "prediction", "label_name", "prediction_name"])
            for index in np.flatnonzero(tested):
                label, predicted = int(clips.labels[index]), int(np.argmax(scores[index]))
                writer.writerow(
                    [index, clips.file(index), fold_of[index], label, predicted, names[label], names[predicted]]
                )
    folds = metrics["folds"]
    lines = ["", f"{metrics['head']} on {clips.source} with {metrics['model']}"]
    if len(folds) > 1:
        where = f"(mean of {len(folds)} folds)"
    else:
        where = "on the test split" if next(iter(folds)) == "test" else f"on fold {next(iter(folds))}"

    def spread(key: str) -> str:
        return f" +- {metrics[f'{key}_std']:.4f}" if len(folds) > 1 else ""

    if clips.multi_label:
        pooled = multi_label_metrics(clips.labels[tested], scores[tested])
        metrics["class_ap"] = dict(zip(names, pooled["class_ap"]))
        with (output_dir / "per_class_ap.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "average_precision", "positives"])
            for column, name in enumerate(names):
                value = pooled["class_ap"][column]
                positives = int(clips.labels[tested, column].sum())
                writer.writerow([name, "" if value is None else f"{value:.6f}", positives])
        classes = metrics["mAP_classes"]
        over = f" over {classes} of {len(names)} classes" if classes < len(names) else ""
        result = f"mAP {metrics['mAP']:.4f}{spread('mAP')}{over}, d-prime {metrics['d_prime']:.3f}"
        lines.append(f"{result} {where}; per-class AP in per_class_ap.csv")
    else:
        _confusion_png(
            output_dir / "confusion_matrix.png", clips.labels[tested], np.argmax(scores[tested], axis=1), names
        )
        lines.append(f"accuracy {metrics['accuracy']:.4f}{spread('accuracy')} {where}")
    if metrics["head"] != "finetune":
        cache = " (from cache)" if metrics.get("embeddings_from_cache") else ""
        lines.append(
            f"embedding {metrics['embedding_seconds']:.1f} s{cache}, evaluation {metrics['training_seconds']:.1f} s"
        )
    if metrics["num_skipped"]:
        lines.append(f"skipped {metrics['num_skipped']} of {metrics['num_clips']} clips (named in metrics.json)")
    lines.append(f"written to {output_dir / 'metrics.json'}")
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return lines
