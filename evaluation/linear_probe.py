"""
ESC-50-style evaluation of audio encoders: 5-fold linear probe, end-to-end fine-tuning and k-NN, with `Trainer`.

    dasheng-linear-probe --model mispeech/dasheng-base --dataset ashraq/esc50 --output-dir runs/esc50

`--dataset` is a Hub dataset with `audio`, `fold` and `target` columns (and optionally `category`) or a local folder
in the ESC-50 release layout (`audio/*.wav`, `meta/esc50.csv`). Whole clips are used at 16 kHz, batched with the
attention mask. In probe mode (the default) the frozen encoder embeds every clip once, the embeddings are cached on
disk, and a linear head is trained per fold on them; `--knn` replaces the head by k-nearest-neighbour voting. Runs
unchanged under `torchrun` / `accelerate launch`. Writes `OUT/metrics.json`, `OUT/predictions.csv` and each fold's
training log `OUT/fold{k}/log_history.json`.

This module holds the dataset, the protocol and the command line; embedding and the cache are in
`evaluation/embeddings.py`, the classifiers (linear head, k-NN, fine-tuning) in `evaluation/heads.py`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from ..audio.datasets import DashengAudioClips, DashengAudioError, read_file_list
from .embeddings import (
    DEFAULT_MODEL,
    AudioClips,
    LinearProbeError,
    cached_embeddings,
    hub_hint,
    is_local_path,
    load_encoder,
    read_model_config,
)
from .heads import MODE_DEFAULTS, finetune_classifier, knn_predict, multi_process_cpu, train_linear_probe

__all__ = ["DEFAULT_DATASET", "ProbeOptions", "load_audio_clips", "main", "run_protocol"]

logger = logging.get_logger(__name__)

DEFAULT_DATASET = "ashraq/esc50"

# ----------------------------------------------------------------------------------------------------------- data


def _integers(values: Sequence[Any], column: str, name: Any) -> list[int]:
    """`values` as integers; a cell that is not one is an error naming its row (`name(index)`)."""
    integers = []
    for index, value in enumerate(values):
        try:
            integers.append(int(str(value).strip()))
        except ValueError:
            raise LinearProbeError(f"{name(index)}: {column} {value!r} is not an integer.") from None
    return integers


def load_audio_clips(source: str = DEFAULT_DATASET) -> AudioClips:
    """
    Load a dataset with ESC-50 columns: a local folder in the release layout or a Hub dataset id.

    The local folder holds `meta/esc50.csv` (columns `filename`, `fold`, `target`, optionally `category`) and the
    files under `audio/` (names relative to it, staying inside it); a Hub dataset has one `train` split with `audio`,
    `fold`, `target` (and `category`). Audio at any sampling rate is resampled to 16 kHz when decoded.
    """
    if is_local_path(source):
        root = Path(source).expanduser()
        meta = root / "meta" / "esc50.csv"
        if not meta.is_file():
            raise LinearProbeError(
                f"{root} is not a folder in the ESC-50 release layout: {meta} is missing. Pass the unpacked "
                f"ESC-50-master folder (audio/*.wav and meta/esc50.csv), or a Hub dataset id such as {DEFAULT_DATASET}."
            )
        try:
            records = read_file_list(meta, audio_root=root / "audio", allow_absolute=False)
        except DashengAudioError as error:
            raise LinearProbeError(str(error)) from error
        missing_columns = {"fold", "target"} - set(records[0].labels or {})
        if missing_columns:
            raise LinearProbeError(f"{meta} lacks the columns {sorted(missing_columns)}.")
        missing = [record.origin for record in records if not Path(record.path).is_file()]
        if missing:
            raise LinearProbeError(f"{len(missing)} files listed in {meta} are missing, e.g. {missing[:3]}.")
        digest = hashlib.sha256(meta.read_bytes())
        for record in records:
            stat = Path(record.path).stat()
            digest.update(f"{record.key}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        audio = DashengAudioClips.from_records(records)
        columns = {name: [record.labels[name] for record in records] for name in ("fold", "target")}
        columns["category"] = [record.labels.get("category") or record.labels["target"] for record in records]
        fingerprint = f"local:{digest.hexdigest()}"
    else:
        from datasets import load_dataset

        try:
            dataset = load_dataset(source, split="train")
        except Exception as error:
            raise LinearProbeError(
                f"Could not load the dataset {source!r} from the Hugging Face Hub ({type(error).__name__}: {error})."
                f"{hub_hint('copy of ESC-50')}: download https://github.com/karoldvl/ESC-50/archive/master.zip, "
                f"unzip it and pass --dataset /path/to/ESC-50-master."
            ) from error
        missing_columns = {"audio", "fold", "target"} - set(dataset.column_names)
        if missing_columns:
            raise LinearProbeError(
                f"The dataset {source!r} lacks the columns {sorted(missing_columns)}; it needs audio, fold and target."
            )
        fingerprint = f"hub:{source}:{dataset._fingerprint}"
        columns = {"target": list(dataset["target"]), "fold": list(dataset["fold"])}
        columns["category"] = list(dataset["category"]) if "category" in dataset.column_names else columns["target"]
        audio = DashengAudioClips(dataset.select_columns(["audio"]))
    folds = _integers(columns["fold"], "fold", lambda index: audio.record(index).origin)
    targets = _integers(columns["target"], "target", lambda index: audio.record(index).origin)
    classes = sorted(set(targets))
    index_of = {target: index for index, target in enumerate(classes)}
    names = {target: str(category) for target, category in zip(targets, columns["category"])}
    return AudioClips(
        audio=audio,
        labels=np.array([index_of[target] for target in targets], dtype=np.int64),
        folds=np.array(folds, dtype=np.int64),
        label_names=[names[target] for target in classes],
        fingerprint=fingerprint,
        source=source,
    )


# ------------------------------------------------------------------------------------------------------ protocol


@dataclass
class ProbeOptions:
    """Options of [`run_protocol`], one per command-line flag."""

    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    output_dir: str = "linear_probe_output"
    folds: tuple[int, ...] | None = None
    mode: str = "probe"
    knn: bool = False
    k: int = 10
    epochs: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    embedding_batch_size: int = 16
    freeze_encoder: bool = False
    seed: int = 0
    cache_dir: str | None = None
    trust_remote_code: bool = False


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dasheng_hf" / "embeddings"


def _check_options(options: ProbeOptions) -> None:
    """Option values, checked before anything is loaded."""
    if options.mode not in MODE_DEFAULTS:
        raise LinearProbeError(f"--mode must be one of {sorted(MODE_DEFAULTS)}, got {options.mode!r}.")
    if options.knn and options.mode != "probe":
        raise LinearProbeError("--knn evaluates frozen embeddings without training: drop --mode finetune.")
    positive = {
        "--embedding-batch-size": options.embedding_batch_size,
        "--batch-size": options.batch_size,
        "--k": options.k,
        "--epochs": None if options.knn else options.epochs,
        "--learning-rate": None if options.knn else options.learning_rate,
    }
    for flag, value in positive.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise LinearProbeError(f"{flag} must be a positive number, got {value}.")


def _check_folds(options: ProbeOptions, clips: AudioClips) -> tuple[int, ...]:
    available = sorted({int(fold) for fold in clips.folds})
    folds = tuple(options.folds) if options.folds else tuple(available)
    unknown = sorted(set(folds) - set(available))
    if unknown:
        raise LinearProbeError(f"Folds {unknown} are not in {clips.source}, which has folds {available}.")
    if len(available) < 2:
        raise LinearProbeError(f"{clips.source} has a single fold {available}; cross-validation needs two or more.")
    return folds


def _writable_folder(path: Path, flag: str) -> Path:
    """Create `path` (a folder for outputs) now, so that a bad path is reported before any work."""
    if path.exists() and not path.is_dir():
        raise LinearProbeError(f"{flag} {path} is a file; pass a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LinearProbeError(f"{flag} {path}: cannot create the folder ({error.strerror}).") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise LinearProbeError(f"{flag} {path}: the folder is not writable.")
    return path


def _usable_clips(clips: AudioClips, progress: bool) -> dict[int, str]:
    """Decode every clip once (before fine-tuning) and return those that cannot be used, with the reason."""
    from tqdm.auto import tqdm

    skipped = {}
    for index in tqdm(range(len(clips)), desc="Checking clips", unit="clip", disable=not progress):
        try:
            clips.waveform(index)
        except DashengAudioError as error:
            skipped[index] = str(error)
            logger.warning(f"Skipped {error}")
    return skipped


def run_protocol(options: ProbeOptions) -> dict[str, Any]:
    """
    Run the cross-validation protocol that `options` describe and write `metrics.json`, `predictions.csv` and the
    per-fold training logs to `options.output_dir`.

    Clips that cannot be used (unreadable, empty, non-finite, too short) are skipped, named in a warning and in
    `metrics.json` (`skipped_clips`), and left out of every fold.

    Returns:
        The metrics: `accuracy_mean`, `accuracy_std`, `fold_accuracies` ({fold: accuracy}) and the run's settings
        and timings.
    """
    from accelerate import PartialState

    started = time.perf_counter()
    _check_options(options)
    output_dir = _writable_folder(Path(options.output_dir).expanduser(), "--output-dir")
    cache_dir = None
    if options.mode == "probe":
        cache_dir = _writable_folder(Path(options.cache_dir or _default_cache_dir()).expanduser(), "--cache-dir")
    state = PartialState(cpu=multi_process_cpu())
    clips = load_audio_clips(options.dataset)
    folds = _check_folds(options, clips)
    default_epochs, default_learning_rate, default_batch_size = MODE_DEFAULTS[options.mode]
    epochs = options.epochs if options.epochs is not None else default_epochs
    learning_rate = options.learning_rate if options.learning_rate is not None else default_learning_rate
    batch_size = options.batch_size or default_batch_size
    num_labels = len(clips.label_names)

    embedding_seconds, from_cache = 0.0, None
    if options.mode == "probe":
        model, feature_extractor = load_encoder(options.model, options.trust_remote_code)
        embed_started = time.perf_counter()
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
            )
        embedding_seconds = time.perf_counter() - embed_started
        del model
    else:
        read_model_config(options.model)  # a bad --model is reported before the clips are read
        skipped = _usable_clips(clips, progress=state.is_local_main_process)
    usable = np.ones(len(clips), dtype=bool)
    usable[list(skipped)] = False
    if skipped and state.is_main_process:
        print(f"Skipped {len(skipped)} of {len(clips)} clips that cannot be used (see metrics.json).", flush=True)

    training_started = time.perf_counter()
    accuracies: dict[int, float] = {}
    predictions = np.full(len(clips), -1, dtype=np.int64)
    for fold in folds:
        test = np.flatnonzero((clips.folds == fold) & usable)
        train = np.flatnonzero((clips.folds != fold) & usable)
        if not len(test) or not len(train):
            raise LinearProbeError(f"Fold {fold} leaves no usable clips to {'test' if train.size else 'train'} on.")
        fold_dir = output_dir / f"fold{fold}"
        if options.mode == "probe" and options.knn:
            predicted = knn_predict(embeddings[train], clips.labels[train], embeddings[test], k=options.k)
        elif options.mode == "probe":
            predicted = train_linear_probe(
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
            )
        else:
            predicted = finetune_classifier(
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
        predictions[test] = predicted
        accuracies[fold] = float((predicted == clips.labels[test]).mean())
        if state.is_main_process:
            print(f"fold {fold}: accuracy {accuracies[fold]:.4f}", flush=True)
    training_seconds = time.perf_counter() - training_started

    values = np.array(list(accuracies.values()))
    metrics = {
        "accuracy_mean": float(values.mean()),
        "accuracy_std": float(values.std()),
        "fold_accuracies": {str(fold): accuracy for fold, accuracy in accuracies.items()},
        "method": "knn" if options.knn else options.mode,
        "model": options.model,
        "dataset": options.dataset,
        "num_clips": len(clips),
        "num_skipped": len(skipped),
        "skipped_clips": [{"index": index, "reason": reason} for index, reason in sorted(skipped.items())],
        "num_labels": num_labels,
        "label_names": clips.label_names,
        "epochs": None if options.knn else epochs,
        "learning_rate": None if options.knn else learning_rate,
        "batch_size": None if options.knn else batch_size,
        "k": options.k if options.knn else None,
        "seed": options.seed,
        "num_processes": state.num_processes,
        "embeddings_from_cache": from_cache,
        "embedding_seconds": embedding_seconds,
        "training_seconds": training_seconds,
        "total_seconds": time.perf_counter() - started,
        "options": asdict(options),
    }
    if state.is_main_process:
        _write_results(output_dir, metrics, clips, predictions, folds)
    state.wait_for_everyone()
    return metrics


def _write_results(
    output_dir: Path, metrics: dict[str, Any], clips: AudioClips, predictions: np.ndarray, folds: tuple[int, ...]
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (output_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "fold", "label", "prediction"])
        for index in np.flatnonzero(np.isin(clips.folds, folds) & (predictions >= 0)):
            writer.writerow([index, clips.folds[index], clips.labels[index], predictions[index]])
    lines = ["", f"{metrics['method']} on {clips.source} with {metrics['model']}", "fold  accuracy"]
    lines += [f"{fold:>4}  {accuracy:.4f}" for fold, accuracy in metrics["fold_accuracies"].items()]
    lines.append(f"mean  {metrics['accuracy_mean']:.4f} +- {metrics['accuracy_std']:.4f}")
    if metrics["method"] != "finetune":
        cache = " (from cache)" if metrics["embeddings_from_cache"] else ""
        lines.append(
            f"embedding {metrics['embedding_seconds']:.1f} s{cache}, evaluation {metrics['training_seconds']:.1f} s"
        )
    lines.append(f"written to {output_dir / 'metrics.json'}")
    print("\n".join(lines), flush=True)


def _parse_folds(text: str) -> tuple[int, ...]:
    try:
        folds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--folds takes comma-separated integers such as 1,2,3,4,5, got {text!r}."
        ) from error
    if not folds:
        raise argparse.ArgumentTypeError("--folds needs at least one fold.")
    return folds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasheng-linear-probe",
        description="Cross-validated evaluation of an audio encoder on ESC-50-style data: linear probe on frozen "
        "embeddings, end-to-end fine-tuning, or k-NN.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local folder (default %(default)s).")
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="Hub dataset id or local folder in the ESC-50 layout: audio/*.wav, meta/esc50.csv (default %(default)s).",
    )
    parser.add_argument("--output-dir", required=True, help="Where metrics.json and the training logs go.")
    parser.add_argument("--folds", type=_parse_folds, help="Held-out folds to evaluate, e.g. 1,2,3,4,5 (default all).")
    parser.add_argument("--mode", choices=sorted(MODE_DEFAULTS), default="probe", help="Default %(default)s.")
    parser.add_argument("--knn", action="store_true", help="k-NN on the frozen embeddings instead of a linear head.")
    parser.add_argument("--k", type=int, default=10, help="Neighbours for --knn (default %(default)s).")
    parser.add_argument("--epochs", type=float, help="Default: probe 30, finetune 10.")
    parser.add_argument("--learning-rate", type=float, help="Default: probe 1e-2, finetune 5e-5.")
    parser.add_argument(
        "--batch-size", type=int, help="Training batch size per process; default probe 256, finetune 16."
    )
    parser.add_argument("--embedding-batch-size", type=int, default=16, help="Clips per embedding batch.")
    parser.add_argument("--freeze-encoder", action="store_true", help="Finetune mode: train only the head.")
    parser.add_argument("--seed", type=int, default=0, help="Default %(default)s.")
    parser.add_argument("--cache-dir", help=f"Embedding cache (default {_default_cache_dir()}).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow models with code on the Hub.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (`dasheng-linear-probe`, `python -m dasheng_hf.evaluation.linear_probe`)."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.k < 1:
        parser.error("--k must be at least 1.")
    try:
        run_protocol(ProbeOptions(**vars(arguments)))
    except (LinearProbeError, DashengAudioError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
