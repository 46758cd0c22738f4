"""
`dasheng-eval`: the paper's evaluations of an audio encoder on any labelled dataset.

    dasheng-eval --model mispeech/dasheng-base --dataset /data/my-classes --head knn --output-dir runs/knn
    dasheng-eval --model mispeech/dasheng-base --dataset labels.csv --label-column tags --label-separator ";" \\
        --head linear --output-dir runs/tags

Datasets: a folder of class subfolders, a CSV/TSV file list, a `datasets` id or path, or a `dasheng-embed` output
folder (see `labelled.py`); single-label (accuracy) or multi-label (mAP, d-prime). The protocol follows the data:
official folds (`--fold-column`) as k-fold cross-validation, given splits (`--split-column`, split folders or a
`DatasetDict`), else a seeded stratified split (iterative stratification for multi-label). Heads: `knn` (cosine,
k = 10), `linear`, `mlp`, `finetune`. `--layer i` evaluates the mean of each clip's `hidden_states[i]` instead of the
model's pooled output (of `dasheng-embed` output: its `layer_<i>` column).
Writes `OUT/metrics.json`, `OUT/predictions.csv`, `OUT/confusion_matrix.png` or `OUT/per_class_ap.csv`, and each
split's Trainer log `OUT/fold<name>/log_history.json`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli.preflight import (
    DashengPreflightError,
    HubResource,
    check_resources,
    new_output_folder,
    quiet_optional_kernel_logs,
)

__all__ = ["main", "parse_folds"]

DEFAULT_MODEL = "mispeech/dasheng-base"
OFFLINE_ADVICE = (
    "a model folder written by save_pretrained (`dasheng-convert` writes one from the released checkpoints) and a "
    "local dataset: a folder of class subfolders, a CSV/TSV list, or a datasets folder (save_to_disk)"
)


def parse_folds(text: str) -> tuple[int, ...]:
    """`--folds 1,2,3` as a tuple of fold numbers (also for `dasheng-linear-probe`)."""
    try:
        folds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--folds takes comma-separated integers such as 1,2,3, got {text!r}."
        ) from None
    if not folds:
        raise argparse.ArgumentTypeError("--folds needs at least one fold.")
    return folds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasheng-eval",
        description="Evaluate an audio encoder on a labelled dataset: k-NN, linear or MLP heads on frozen "
        "embeddings, or fine-tuning; accuracy (single-label) or mAP and d-prime (multi-label).",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="Class folders, CSV/TSV, datasets id/path, or embeddings.")
    data.add_argument("--file-column", default="filename", help="File column of a CSV/TSV (default filename).")
    data.add_argument("--label-column", default="label", help="Label column (default label).")
    data.add_argument("--label-separator", help="Labels joined in one string (e.g. ';'): a multi-label task.")
    data.add_argument("--fold-column", help="Fold of each clip: k-fold cross-validation over the folds.")
    data.add_argument("--split-column", help="train/validation/test of each clip: given splits.")
    data.add_argument("--audio-column", default="audio", help="Audio column of a datasets dataset (default audio).")
    data.add_argument("--layer", type=int, help="Mean of hidden_states[i] (dasheng-embed output: layer_<i>).")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--protocol", default="auto", choices=("auto", "folds", "splits", "stratified"))
    protocol.add_argument("--folds", type=parse_folds, help="Held-out folds to evaluate (default all).")
    protocol.add_argument("--test-fraction", type=float, default=0.2, help="Stratified split: test share (0.2).")
    protocol.add_argument("--seed", type=int, default=0, help="Split and training seed (default 0).")
    head = parser.add_argument_group("model and head")
    head.add_argument("--model", help=f"Hub id or folder, any audio encoder ({DEFAULT_MODEL}).")
    head.add_argument("--head", required=True, choices=("knn", "linear", "mlp", "finetune"))
    head.add_argument("--k", type=int, default=10, help="Neighbours of --head knn (default 10).")
    head.add_argument("--hidden-size", type=int, default=1024, help="Hidden units of --head mlp (default 1024).")
    head.add_argument("--epochs", type=float, help="Default: linear and mlp 30, finetune 10.")
    head.add_argument("--learning-rate", type=float, help="Default: linear 1e-2, mlp 1e-3, finetune 5e-5.")
    head.add_argument("--batch-size", type=int, help="Default: linear and mlp 256, finetune 16.")
    head.add_argument("--embedding-batch-size", type=int, default=16, help="Clips per embedding batch (16).")
    head.add_argument("--freeze-encoder", action="store_true", help="Finetune: train only the classifier.")
    head.add_argument("--trust-remote-code", action="store_true", help="Allow models with code on the Hub.")
    parser.add_argument("--output-dir", required=True, help="Where metrics.json and the other results go.")
    parser.add_argument("--cache-dir", help="Embedding cache (default ~/.cache/dasheng_hf/embeddings).")
    return parser


def _resources(arguments: argparse.Namespace) -> list[HubResource]:
    resources = [HubResource("--dataset", arguments.dataset, "dataset")]
    if not _embedded(arguments.dataset):
        resources.insert(0, HubResource("--model", arguments.model))
    return resources


def _embedded(dataset: str) -> bool:
    """Whether `--dataset` is a finished `dasheng-embed` output (no model runs)."""
    return Path(dataset).expanduser().joinpath("info.json").is_file()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (`dasheng-eval`, `python -m dasheng_hf.evaluation.evaluate`)."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    given_model, arguments.model = arguments.model, arguments.model or DEFAULT_MODEL
    if arguments.k < 1:
        parser.exit(2, f"{parser.prog}: error: --k must be at least 1.\n")
    quiet_optional_kernel_logs()
    try:
        from .labelled import DatasetColumns, check_dataset_path
        from .protocol import EvalOptions, check_options, check_output_folder, run_evaluation, warn_if_other_model

        columns = DatasetColumns(
            file=arguments.file_column,
            label=arguments.label_column,
            fold=arguments.fold_column,
            split=arguments.split_column,
            label_separator=arguments.label_separator,
            audio=arguments.audio_column,
            layer=arguments.layer,
        )
        fields = {name: value for name, value in vars(arguments).items() if name in EvalOptions.__dataclass_fields__}
        options = EvalOptions(**fields, columns=columns)
        check_options(options)
        check_output_folder(options.output_dir)
        from transformers.utils import logging

        logging.disable_progress_bar()  # one progress bar on the console: the embedding's
        check_dataset_path(arguments.dataset)
        check_resources(_resources(arguments), advice=OFFLINE_ADVICE)
        if given_model and _embedded(arguments.dataset):
            warn_if_other_model(arguments.dataset, given_model)
        with new_output_folder(Path(options.output_dir).expanduser()):
            run_evaluation(options)
    except (DashengPreflightError, ValueError) as error:  # LinearProbeError and DashengAudioError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
