"""
The ESC-50 preset of `dasheng-eval`: 5-fold cross-validation over the official folds, reporting mean accuracy.

    dasheng-linear-probe --model mispeech/dasheng-base --dataset ashraq/esc50 --output-dir runs/esc50

`--dataset` is a Hub dataset with `audio`, `fold` and `target` columns (and optionally `category`) or a local folder
in the ESC-50 release layout (`audio/*.wav`, `meta/esc50.csv`). In probe mode (the default) the frozen encoder embeds
every clip once, whole, the embeddings are cached on disk, and a linear head is trained per fold on them; `--knn`
replaces the head by k-nearest-neighbour voting, `--mode finetune` fine-tunes the whole model. Runs unchanged under
`torchrun` / `accelerate launch`. Writes what `dasheng-eval` writes (`OUT/metrics.json`, `OUT/predictions.csv`, the
confusion matrix and each fold's training log `OUT/fold{k}/log_history.json`), plus this preset's keys
(`accuracy_mean`, `fold_accuracies`, `method`).

The protocol is `protocol.py` (shared with `dasheng-eval`); the ESC-50 loader is in `labelled.py`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli.preflight import (
    DashengPreflightError,
    HubResource,
    check_resources,
    new_output_folder,
    quiet_optional_kernel_logs,
)
from .evaluate import parse_folds

__all__ = ["DEFAULT_DATASET", "ProbeOptions", "load_audio_clips", "main", "run_protocol"]

DEFAULT_DATASET = "ashraq/esc50"
DEFAULT_MODEL = "mispeech/dasheng-base"
MODES = ("finetune", "probe")
OFFLINE_ADVICE = (
    "--model: a folder written by save_pretrained (`dasheng-convert` writes one from the released checkpoints); "
    "--dataset: the unpacked ESC-50 release (https://github.com/karoldvl/ESC-50/archive/master.zip), "
    "e.g. --dataset /path/to/ESC-50-master"
)


def load_audio_clips(source: str = DEFAULT_DATASET) -> Any:
    """The ESC-50 clips of a Hub dataset or a local release folder (see `labelled.load_esc50_clips`)."""
    from .labelled import load_esc50_clips

    return load_esc50_clips(source)


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


def run_protocol(options: ProbeOptions) -> dict[str, Any]:
    """
    Run the ESC-50 protocol that `options` describe (see `protocol.run_evaluation`) and write its results to
    `options.output_dir`.

    Returns:
        The metrics: `accuracy_mean`, `accuracy_std`, `fold_accuracies` ({fold: accuracy}), `method` and the run's
        settings and timings (and `dasheng-eval`'s keys: `accuracy`, `folds`, ...).
    """
    from .embeddings import LinearProbeError
    from .protocol import EvalOptions, check_options, default_cache_dir, run_evaluation

    if options.mode not in MODES:
        raise LinearProbeError(f"--mode must be one of {list(MODES)}, got {options.mode!r}.")
    if options.knn and options.mode != "probe":
        raise LinearProbeError("--knn evaluates frozen embeddings without training: drop --mode finetune.")
    head = "knn" if options.knn else "linear" if options.mode == "probe" else "finetune"
    evaluation = EvalOptions(
        model=options.model,
        dataset=options.dataset,
        output_dir=options.output_dir,
        head=head,
        protocol="folds",
        folds=options.folds,
        k=options.k,
        epochs=options.epochs,
        learning_rate=options.learning_rate,
        batch_size=options.batch_size,
        embedding_batch_size=options.embedding_batch_size,
        freeze_encoder=options.freeze_encoder,
        seed=options.seed,
        cache_dir=options.cache_dir,
        trust_remote_code=options.trust_remote_code,
    )
    check_options(evaluation)
    _writable_folder(Path(options.output_dir).expanduser(), "--output-dir")
    if head != "finetune":
        _writable_folder(Path(options.cache_dir or default_cache_dir()).expanduser(), "--cache-dir")
    method = "knn" if options.knn else options.mode
    return run_evaluation(evaluation, lambda: load_audio_clips(options.dataset), extra={"method": method})


def _writable_folder(path: Path, flag: str) -> Path:
    """Create `path` (a folder for outputs) now, so that a bad path is reported before any work."""
    import os

    from .embeddings import LinearProbeError

    if path.exists() and not path.is_dir():
        raise LinearProbeError(f"{flag} {path} is a file; pass a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LinearProbeError(f"{flag} {path}: cannot create the folder ({error.strerror}).") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise LinearProbeError(f"{flag} {path}: the folder is not writable.")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasheng-linear-probe",
        description="The ESC-50 preset of dasheng-eval: cross-validated evaluation of an audio encoder on "
        "ESC-50-style data (linear probe on frozen embeddings, end-to-end fine-tuning, or k-NN).",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local folder (default %(default)s).")
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="Hub dataset id or local folder in the ESC-50 layout: audio/*.wav, meta/esc50.csv (default %(default)s).",
    )
    parser.add_argument("--output-dir", required=True, help="Where metrics.json and the training logs go.")
    parser.add_argument("--folds", type=parse_folds, help="Held-out folds to evaluate, e.g. 1,2,3,4,5 (default all).")
    parser.add_argument("--mode", choices=MODES, default="probe", help="Default %(default)s.")
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
    parser.add_argument("--cache-dir", help="Embedding cache (default ~/.cache/dasheng_hf/embeddings).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow models with code on the Hub.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (`dasheng-linear-probe`, `python -m dasheng_hf.evaluation.linear_probe`)."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.k < 1:
        parser.exit(2, f"{parser.prog}: error: --k must be at least 1.\n")
    quiet_optional_kernel_logs()
    resources = [HubResource("--model", arguments.model), HubResource("--dataset", arguments.dataset, "dataset")]
    try:
        from .protocol import check_output_folder

        check_output_folder(arguments.output_dir)
        from transformers.utils import logging

        logging.disable_progress_bar()  # one progress bar on the console: the embedding's
        check_resources(resources, advice=OFFLINE_ADVICE)
        with new_output_folder(Path(arguments.output_dir).expanduser()):
            run_protocol(ProbeOptions(**vars(arguments)))
    except (DashengPreflightError, ValueError) as error:  # LinearProbeError and DashengAudioError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
