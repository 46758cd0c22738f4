"""
The evaluation protocol shared by `dasheng-eval` and its ESC-50 preset `dasheng-linear-probe`: which clips train and
which test (official folds as k-fold cross-validation, given train/validation/test splits, or a seeded stratified
split), the head on each split, and the metrics. Runs unchanged under `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from ..audio.datasets import DashengAudioError
from .embeddings import DEFAULT_MODEL, AudioClips, LinearProbeError, cached_embeddings, load_encoder, read_model_config
from .heads import finetune_classifier, knn_scores, multi_process_cpu, train_linear_probe
from .labelled import DatasetColumns, load_labelled_clips
from .reports import accuracy, multi_label_metrics, write_results

__all__ = [
    "HEAD_DEFAULTS",
    "HEADS",
    "PROTOCOLS",
    "EvalOptions",
    "check_options",
    "check_output_folder",
    "default_cache_dir",
    "evaluation_splits",
    "resolve_protocol",
    "run_evaluation",
    "warn_if_other_model",
]

logger = logging.get_logger(__name__)

HEADS = ("knn", "linear", "mlp", "finetune")
PROTOCOLS = ("auto", "folds", "splits", "stratified")
# Default (epochs, learning rate, batch size) per trained head.
HEAD_DEFAULTS = {"linear": (30, 1e-2, 256), "mlp": (30, 1e-3, 256), "finetune": (10, 5e-5, 16)}


@dataclass
class EvalOptions:
    """Options of [`run_evaluation`], one per command-line flag."""

    model: str = DEFAULT_MODEL
    dataset: str = ""
    output_dir: str = "eval_output"
    head: str = "linear"
    protocol: str = "auto"
    folds: tuple[int, ...] | None = None
    test_fraction: float = 0.2
    k: int = 10
    hidden_size: int = 1024
    epochs: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    embedding_batch_size: int = 16
    freeze_encoder: bool = False
    seed: int = 0
    cache_dir: str | None = None
    trust_remote_code: bool = False
    columns: DatasetColumns = field(default_factory=DatasetColumns)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dasheng_hf" / "embeddings"


def check_output_folder(path: str | os.PathLike, flag: str = "--output-dir") -> None:
    """An output folder that can be created (or is one) and written, checked without creating it."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LinearProbeError(f"{flag} {folder} is a file; pass a folder.")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LinearProbeError(f"{flag} {folder}: cannot create the folder ({existing} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LinearProbeError(f"{flag} {folder}: {existing} is not writable.")


def check_options(options: EvalOptions) -> None:
    """Option values, checked before anything is loaded."""
    if options.head not in HEADS:
        raise LinearProbeError(f"--head must be one of {', '.join(HEADS)}, got {options.head!r}.")
    if options.protocol not in PROTOCOLS:
        raise LinearProbeError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {options.protocol!r}.")
    trained = options.head != "knn"
    positive = {
        "--embedding-batch-size": options.embedding_batch_size,
        "--batch-size": options.batch_size,
        "--k": options.k,
        "--hidden-size": options.hidden_size,
        "--epochs": options.epochs if trained else None,
        "--learning-rate": options.learning_rate if trained else None,
    }
    for flag, value in positive.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise LinearProbeError(f"{flag} must be a positive number, got {value}.")
    if not 0 < options.test_fraction < 1:
        raise LinearProbeError(f"--test-fraction must lie between 0 and 1, got {options.test_fraction}.")
    if options.columns.layer is not None and options.head == "finetune":
        raise LinearProbeError("--layer picks frozen embeddings, but --head finetune trains the whole model: drop one.")


def _stratified_test(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask: `fraction` of each class (at least one clip of classes with two), seeded."""
    if labels.ndim == 2:
        return _iterative_stratification(labels > 0.5, fraction, seed)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = round(fraction * len(members)) if len(members) > 2 else len(members) - 1
        test[members[: max(count, 1 if len(members) > 1 else 0)]] = True
    return test


def _iterative_stratification(positive: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """
    A boolean test mask for multi-hot `positive` `(clips, classes)` by iterative stratification (Sechidis et al.,
    2011): the class with the fewest clips left (then the rarest) goes first, each of its clips to the side that lacks
    the class most (then the side that lacks the most clips, then at random); clips without a class fill the room
    left. A class of two or more clips asks for at least one on each side. Seeded.
    """
    rng = np.random.default_rng(seed)
    count = positive.sum(axis=0).astype(np.float64)
    test_share = np.where(count >= 2, np.clip(fraction * count, 1, np.maximum(count - 1, 1)), fraction * count)
    wanted = np.stack([count - test_share, test_share])  # (train, test) positives still wanted, per class
    room = np.array([1 - fraction, fraction]) * len(positive)  # (train, test) clips still wanted
    side = np.full(len(positive), -1)
    left = count.copy()  # positives not yet assigned, per class

    def pick(candidates: np.ndarray) -> int:
        candidates = candidates[room[candidates] == room[candidates].max()]
        return int(candidates[rng.integers(len(candidates))])

    while left.any():
        fewest = np.flatnonzero(left == left[left > 0].min())
        fewest = fewest[count[fewest] == count[fewest].min()]  # then the rarest class
        label = fewest[rng.integers(len(fewest))]
        for clip in rng.permutation(np.flatnonzero(positive[:, label] & (side < 0))):
            need = wanted[:, label]
            chosen = pick(np.flatnonzero(need == need.max()))
            side[clip] = chosen
            wanted[chosen, positive[clip]] -= 1
            room[chosen] -= 1
            left[positive[clip]] -= 1
    for clip in rng.permutation(np.flatnonzero(side < 0)):
        side[clip] = chosen = pick(np.arange(2))
        room[chosen] -= 1
    for empty in (1, 0):  # classes of one clip each can leave a side empty: one clip moves there
        if len(side) > 1 and not (side == empty).any():
            side[rng.integers(len(side))] = empty
    return side == 1


def resolve_protocol(clips: AudioClips, options: EvalOptions) -> str:
    """`options.protocol`, or with `auto` the one the data has: splits, else folds, else a stratified split."""
    if options.protocol != "auto":
        return options.protocol
    return "splits" if clips.splits is not None else "folds" if clips.folds is not None else "stratified"


def evaluation_splits(clips: AudioClips, options: EvalOptions) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`(name, train mask, test mask)` per evaluation: one per held-out fold, or one for a train/test split (the
    validation clips of given splits are left out)."""
    protocol = resolve_protocol(clips, options)
    if protocol == "splits":
        if clips.splits is None:
            raise LinearProbeError(f"{clips.source} has no splits: pass --split-column, or --protocol stratified.")
        return [("test", clips.splits == "train", clips.splits == "test")]
    if protocol == "stratified":
        test = _stratified_test(clips.labels, options.test_fraction, options.seed)
        return [("test", ~test, test)]
    if clips.folds is None:
        raise LinearProbeError(f"{clips.source} has no folds: pass --fold-column, or --protocol stratified.")
    available = sorted({int(fold) for fold in clips.folds})
    folds = tuple(options.folds) if options.folds else tuple(available)
    unknown = sorted(set(folds) - set(available))
    if unknown:
        raise LinearProbeError(f"Folds {unknown} are not in {clips.source}, which has folds {available}.")
    if len(available) < 2:
        raise LinearProbeError(f"{clips.source} has a single fold {available}; cross-validation needs two or more.")
    return [(str(fold), clips.folds != fold, clips.folds == fold) for fold in folds]


def _embedding_model(folder: str) -> str:
    """The model a `dasheng-embed` output folder was made with."""
    import json

    info = json.loads((Path(folder) / "info.json").read_text())
    return f"{info.get('model')} (embeddings in {folder}, weights sha256 {str(info.get('weights_sha256'))[:12]})"


def warn_if_other_model(folder: str, model: str) -> None:
    """Warn when `--model`, given with a `dasheng-embed` output as `--dataset`, is not the model it was made with."""
    import json

    recorded = str(json.loads((Path(folder).expanduser() / "info.json").read_text()).get("model"))
    path = Path(model).expanduser()
    if (os.path.realpath(path) if path.exists() else model) != recorded:
        logger.warning(
            f"--model {model} is not used: {folder} holds embeddings of {recorded}, and no model runs on them; drop "
            f"--model, or pass the audio source as --dataset to embed it with {model}."
        )


def _usable_clips(clips: AudioClips, progress: bool) -> dict[int, str]:
    """Decode every clip once (before fine-tuning) and return those that cannot be used, with the reason."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    skipped = {}
    with logging_redirect_tqdm():  # warnings print above the bar, not into it
        for index in tqdm(range(len(clips)), desc="Checking clips", unit="clip", disable=not progress):
            try:
                clips.waveform(index)
            except DashengAudioError as error:
                skipped[index] = str(error)
                logger.warning(f"Skipped {error}")
    return skipped


def _embeddings(options: EvalOptions, clips: AudioClips, state: Any) -> tuple[np.ndarray, dict[int, str], Any]:
    if clips.embeddings is not None:
        return clips.embeddings, {}, None
    cache_dir = Path(options.cache_dir or default_cache_dir()).expanduser()
    model, feature_extractor = load_encoder(options.model, options.trust_remote_code)
    layer, blocks = options.columns.layer, getattr(model.config, "num_hidden_layers", None)
    if layer is not None and blocks is not None and not -blocks - 1 <= layer <= blocks:
        raise LinearProbeError(
            f"--layer {layer} is out of range: {options.model} has {blocks} blocks, so --layer takes 0 (the patch "
            f"embeddings) to {blocks} (the last block's output), or -1 for the last."
        )
    if layer is not None and layer < 0 and blocks is not None:  # one cache entry and one name per layer
        layer = options.columns.layer = layer + blocks + 1
    with state.main_process_first():  # one rank embeds and writes the cache; the others then read it
        embeddings, skipped, from_cache = cached_embeddings(
            options.model,
            model,
            feature_extractor,
            clips,
            cache_dir,
            batch_size=options.embedding_batch_size,
            device=state.device,
            progress=state.is_local_main_process,
            layer=layer,
        )
    return embeddings, skipped, from_cache


def _names(clips: AudioClips, indices: np.ndarray) -> str:
    """The first five class names of `indices`, for a warning."""
    return ", ".join(str(clips.label_names[i]) for i in indices[:5]) + (", ..." if len(indices) > 5 else "")


def _fold_warnings(
    name: str, clips: AudioClips, train: np.ndarray, test: np.ndarray, options: EvalOptions
) -> list[str]:
    """What makes a fold's result mean less than it seems: classes it never trains on, classes without a test positive
    (multi-label: their AP is undefined and the mAP leaves them out), a k above its training set."""
    warnings = []
    if clips.multi_label:
        unseen = np.flatnonzero(clips.labels[test].any(0) & ~clips.labels[train].any(0))
        untested = np.flatnonzero(~clips.labels[test].any(0))
        if len(untested):
            warnings.append(
                f"Fold {name}: {len(untested)} class(es) have no positive among its test clips "
                f"({_names(clips, untested)}); their AP is undefined, so its mAP averages over the other "
                f"{clips.labels.shape[1] - len(untested)}."
            )
    else:
        unseen = np.setdiff1d(np.unique(clips.labels[test]), np.unique(clips.labels[train]))
    if len(unseen):
        warnings.insert(
            0,
            f"Fold {name}: {len(unseen)} class(es) of its test clips never occur in its training clips "
            f"({_names(clips, unseen)}); no head can predict them, and the metrics count them as missed.",
        )
    if options.head == "knn" and options.k > len(train):
        warnings.append(
            f"Fold {name}: --k {options.k} is more than its {len(train)} training clips; each query votes over all."
        )
    return warnings


def run_evaluation(
    options: EvalOptions, load_clips: Callable[[], AudioClips] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """
    Evaluate `options.model` with `options.head` on `options.dataset` under the protocol the data has (or
    `options.protocol`) and write `metrics.json`, `predictions.csv`, `confusion_matrix.png` (single-label) or
    `per_class_ap.csv` (multi-label), and each split's training log `OUT/fold<name>/log_history.json`.

    Clips that cannot be used are skipped, named in a warning and in `metrics.json` (`skipped_clips`).

    Returns:
        The metrics: `accuracy` (mean over folds; single-label) or `mAP`, `auc`, `d_prime` (multi-label; each fold's
        mAP averages over the classes with a test positive, `mAP_classes`: the fewest of any fold), per-fold values
        under `folds`, and the run's settings and timings; `extra` is added (the preset's own keys).
    """
    from accelerate import PartialState

    started = time.perf_counter()
    check_options(options)
    output_dir = Path(options.output_dir).expanduser()
    state = PartialState(cpu=multi_process_cpu())
    clips = load_clips() if load_clips else load_labelled_clips(options.dataset, options.columns)
    if clips.embeddings is not None and options.head == "finetune":
        raise LinearProbeError(f"{clips.source} holds embeddings: --head finetune needs the audio (pass its source).")
    splits = evaluation_splits(clips, options)
    epochs, learning_rate, batch_size = HEAD_DEFAULTS.get(options.head, (None, None, None))
    epochs = options.epochs if options.epochs is not None else epochs
    learning_rate = options.learning_rate if options.learning_rate is not None else learning_rate
    batch_size = options.batch_size or batch_size

    embedding_seconds, from_cache = 0.0, None
    if options.head == "finetune":
        read_model_config(options.model)  # a bad --model is reported before the clips are read
        skipped = _usable_clips(clips, progress=state.is_local_main_process)
    else:
        embed_started = time.perf_counter()
        embeddings, skipped, from_cache = _embeddings(options, clips, state)
        embedding_seconds = time.perf_counter() - embed_started
    usable = np.ones(len(clips), dtype=bool)
    usable[list(skipped)] = False
    if skipped and state.is_main_process:
        print(f"Skipped {len(skipped)} of {len(clips)} clips that cannot be used (see metrics.json).", flush=True)

    training_started = time.perf_counter()
    num_labels = len(clips.label_names)
    scores = np.zeros((len(clips), num_labels), dtype=np.float32)
    tested = np.zeros(len(clips), dtype=bool)
    fold_of = np.full(len(clips), "", dtype=object)
    folds: dict[str, dict[str, float]] = {}
    for name, train_mask, test_mask in splits:
        train, test = np.flatnonzero(train_mask & usable), np.flatnonzero(test_mask & usable)
        if not len(test) or not len(train):
            raise LinearProbeError(f"Fold {name} leaves no usable clips to {'test' if train.size else 'train'} on.")
        fold_dir = output_dir / f"fold{name}"
        if state.is_main_process:
            for warning in _fold_warnings(name, clips, train, test, options):
                logger.warning(warning)
        if options.head == "knn":
            fold_scores = knn_scores(embeddings[train], clips.labels[train], embeddings[test], k=options.k)
        elif options.head in ("linear", "mlp"):
            fold_scores = train_linear_probe(
                embeddings[train],
                clips.labels[train],
                embeddings[test],
                clips.labels[test],
                num_labels,
                fold_dir,
                epochs=epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                seed=options.seed,
                hidden_size=options.hidden_size if options.head == "mlp" else None,
            )
        else:
            fold_scores = finetune_classifier(
                options.model,
                clips,
                train,
                test,
                fold_dir,
                epochs=epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                seed=options.seed,
                freeze_encoder=options.freeze_encoder,
                trust_remote_code=options.trust_remote_code,
            )
        if fold_scores.shape[1] < num_labels:  # k-NN scores only the classes up to the largest it trained on
            fold_scores = np.pad(fold_scores, ((0, 0), (0, num_labels - fold_scores.shape[1])))
        scores[test], tested[test], fold_of[test] = fold_scores, True, name
        if clips.multi_label:
            result = multi_label_metrics(clips.labels[test], fold_scores)
            folds[name] = {key: result[key] for key in ("mAP", "auc", "d_prime")}
            folds[name]["mAP_classes"] = sum(value is not None for value in result["class_ap"])
            line = f"fold {name}: mAP {folds[name]['mAP']:.4f}, d-prime {folds[name]['d_prime']:.3f}"
        else:
            folds[name] = {"accuracy": accuracy(clips.labels[test], fold_scores)}
            line = f"fold {name}: accuracy {folds[name]['accuracy']:.4f}"
        if state.is_main_process and len(splits) > 1:  # progress; one split's result is the summary's
            print(line, flush=True)
    training_seconds = time.perf_counter() - training_started

    metrics: dict[str, Any] = {}
    for key in ("mAP", "auc", "d_prime") if clips.multi_label else ("accuracy",):
        values = np.array([fold[key] for fold in folds.values()])
        metrics[key], metrics[f"{key}_std"] = float(values.mean()), float(values.std())
    if clips.multi_label:  # the classes with a test positive: the fold with the fewest
        metrics["mAP_classes"] = min(fold["mAP_classes"] for fold in folds.values())
    else:  # the ESC-50 preset's names
        metrics["accuracy_mean"] = metrics["accuracy"]
        metrics["fold_accuracies"] = {name: fold["accuracy"] for name, fold in folds.items()}
    trained = options.head != "knn"
    metrics |= {
        "task": "multi-label" if clips.multi_label else "single-label",
        "head": options.head,
        "protocol": resolve_protocol(clips, options),
        "folds": folds,
        "model": options.model if clips.embeddings is None else _embedding_model(clips.source),
        "dataset": options.dataset or clips.source,
        "num_clips": len(clips),
        "num_skipped": len(skipped),
        "skipped_clips": [{"index": index, "reason": reason} for index, reason in sorted(skipped.items())],
        "num_labels": num_labels,
        "label_names": clips.label_names,
        "layer": options.columns.layer,
        "epochs": epochs if trained else None,
        "learning_rate": learning_rate if trained else None,
        "batch_size": batch_size if trained else None,
        "k": options.k if not trained else None,
        "seed": options.seed,
        "num_processes": state.num_processes,
        "embeddings_from_cache": from_cache,
        "embedding_seconds": embedding_seconds,
        "training_seconds": training_seconds,
        "total_seconds": time.perf_counter() - started,
        **(extra or {}),
        "options": {**asdict(options), "columns": asdict(options.columns)},
    }
    if state.is_main_process:
        lines = write_results(output_dir, metrics, clips, scores, tested, fold_of)
        print("\n".join(lines), flush=True)
    state.wait_for_everyone()
    return metrics
