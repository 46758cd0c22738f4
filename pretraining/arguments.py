"""
Dasheng's own flags of `dasheng-pretrain` (model, data) and the parsing of `--config_overrides` and
`--gain_augmentation_db`; light to import (no torch, no transformers), so `--help` answers at once. Trainer's flags,
with the released models' recipe as defaults, are in `training_arguments.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DashengDataArguments",
    "DashengModelArguments",
    "DashengPretrainingError",
    "check_flags",
    "parse_config_overrides",
    "parse_gain",
    "short_help",
]

MAX_CROP_SECONDS = 600.0  # ten minutes: 9.6e6 samples per crop; longer crops are a typo, not a recipe
MAX_GAIN_DB = 60.0

# The Trainer flags most runs set, for the short `--help` (`--help-all` lists every one).
COMMON_TRAINER_FLAGS = [
    ("--output_dir DIR", "Where checkpoints, logs, the final model and OUTPUT_DIR/encoder go (one run at a time)."),
    ("--max_steps N", "Optimizer steps to train (required: the data is streamed)."),
    ("--per_device_train_batch_size N", "Crops per process and step (default 8)."),
    ("--gradient_accumulation_steps N", "Steps whose gradients are summed before each update (default 1)."),
    ("--learning_rate LR", "Peak learning rate (default 3e-4, as the paper)."),
    ("--warmup_ratio R / --warmup_steps N", "Warm-up (default 3% of max_steps)."),
    ("--save_steps N", "Checkpoint every N steps; --save_total_limit K keeps the last K."),
    ("--resume_from_checkpoint last|DIR", "Continue a run from its newest complete checkpoint, or from DIR."),
    ("--logging_steps N", "Log the loss every N steps."),
    ("--eval_strategy steps --eval_steps N", "Evaluate on --eval_data every N steps."),
    ("--bf16 / --fp16", "Mixed precision (bf16 is on by default on GPUs that support it)."),
    ("--dataloader_num_workers N", "Processes decoding audio per training process."),
    ("--seed N", "Seed of the model's initialisation, the data order and the masking."),
    ("--report_to none|tensorboard|wandb", "Where metrics go besides the log."),
]


class DashengPretrainingError(ValueError):
    """A problem with the command's inputs (flags, model, data); the message says how to fix it."""


@dataclass
class DashengModelArguments:
    """Which encoder to start from: a checkpoint to continue, or a fresh one of a released size."""

    _argument_group_name = "Dasheng: model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue from this encoder: a Hub id (mispeech/dasheng-base) or a folder, first Hub "
            "layout included. The decoder starts fresh unless the folder holds one."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch with a released size: dasheng-base, dasheng-0.6B or dasheng-1.2B "
            "(or a folder / Hub id with a Dasheng config.json)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config fields to change, e.g. 'hidden_size=64,num_hidden_layers=2,decoder_hidden_size=32'."},
    )
    mask_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of each clip's tokens removed (default: the config's, 0.75)."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa (default), eager, flex_attention, flash_attention_2 (flash-attn)."},
    )


@dataclass
class DashengDataArguments:
    """What to train on and how it is cut, and how a run resumes."""

    _argument_group_name = "Dasheng: data and resuming"

    train_data: str | None = field(
        default=None,
        metadata={
            "help": "Webdataset shards ('shards/train-{000000..000127}.tar'), a folder of audio files, a "
            "file list (CSV/TSV with a filename column) or a datasets id/path with an audio column."
        },
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data, in any form --train_data takes."})
    audio_column: str = field(default="audio", metadata={"help": "Audio column of a datasets source."})
    crop_seconds: float = field(
        default=10.0, metadata={"help": "Sequential crops of this length; shorter files become one shorter crop."}
    )
    gain_augmentation_db: str | None = field(
        default=None,
        metadata={
            "help": "Random gain per crop, uniform in dB: '6' for -6..6, or 'LOW,HIGH' such as '-6,10'. Off by default."
        },
    )
    shuffle_buffer: int = field(default=256, metadata={"help": "Crops per shuffle buffer (per dataloader worker)."})
    export_every: int | None = field(
        default=None, metadata={"help": "Also export OUTPUT_DIR/encoder every N optimizer steps."}
    )
    allow_missing_optimizer_state: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint without optimizer.pt / scheduler.pt with a fresh optimizer and "
            "schedule (otherwise that is an error)."
        },
    )


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """
    Parse `'hidden_size=64,qkv_bias=false,...'` into config keyword arguments, typed like the defaults of
    [`DashengConfig`]. Unknown fields and unparsable values raise [`DashengPretrainingError`].
    """
    if not text:
        return {}
    from ..configuration_dasheng import DashengConfig

    defaults = DashengConfig().to_dict()
    overrides = {}
    for item in text.split(","):
        key, separator, value = (part.strip() for part in item.partition("="))
        if not separator or not key:
            raise DashengPretrainingError(f"--config_overrides takes 'name=value,...', got the item {item!r}.")
        if key not in defaults:
            raise DashengPretrainingError(
                f"--config_overrides: DashengConfig has no field {key!r}; fields are {sorted(defaults)}."
            )
        overrides[key] = _typed_value(key, value, defaults[key])
    return overrides


def _typed_value(key: str, value: str, default: Any) -> Any:
    if value.lower() in ("none", "null"):
        return None
    if isinstance(default, bool) or value.lower() in ("true", "false"):
        if value.lower() not in ("true", "false"):
            raise DashengPretrainingError(f"--config_overrides: {key} takes true or false, got {value!r}.")
        return value.lower() == "true"
    kinds = [type(default)] if isinstance(default, (int, float)) else [int, float, str]
    for kind in kinds:
        try:
            return kind(value)
        except ValueError:
            continue
    raise DashengPretrainingError(f"--config_overrides: {key} takes a {kinds[0].__name__}, got {value!r}.")


def parse_gain(text: str | None) -> tuple[float, float] | None:
    """`'6'` -> (-6, 6); `'-6,10'` -> (-6, 10); None -> None (no augmentation)."""
    if text is None or not text.strip():
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1 and values[0] >= 0:
        return -values[0], values[0]
    if len(values) == 2 and values[0] <= values[1]:
        return values[0], values[1]
    raise DashengPretrainingError(
        f"--gain_augmentation_db takes a range in dB: '6' (-6 to 6 dB) or 'LOW,HIGH' such as '-6,10'; got {text!r}."
    )


def check_flags(model_args: DashengModelArguments, data_args: DashengDataArguments) -> None:
    """Refuse Dasheng flags out of range (not finite, negative, absurdly long crops) before any work starts."""
    crop = data_args.crop_seconds
    if not math.isfinite(crop) or not 0.03 <= crop <= MAX_CROP_SECONDS:
        raise DashengPretrainingError(
            f"--crop_seconds must be a number of seconds from 0.03 to {MAX_CROP_SECONDS:g}, got {crop}."
        )
    gain = parse_gain(data_args.gain_augmentation_db)
    if gain is not None and not all(math.isfinite(value) and abs(value) <= MAX_GAIN_DB for value in gain):
        raise DashengPretrainingError(
            f"--gain_augmentation_db must lie within -{MAX_GAIN_DB:g}..{MAX_GAIN_DB:g} dB, got "
            f"{data_args.gain_augmentation_db!r}."
        )
    if data_args.shuffle_buffer < 1:
        raise DashengPretrainingError(f"--shuffle_buffer must be at least 1, got {data_args.shuffle_buffer}.")
    if data_args.export_every is not None and data_args.export_every <= 0:
        raise DashengPretrainingError(f"--export_every takes a positive number of steps, got {data_args.export_every}.")
    if model_args.mask_ratio is not None and not 0.0 < model_args.mask_ratio < 1.0:  # also NaN
        raise DashengPretrainingError(f"--mask_ratio must lie strictly between 0 and 1, got {model_args.mask_ratio}.")


def short_help(prog: str) -> str:
    """`dasheng-pretrain --help`: Dasheng's flags, then the Trainer flags most runs set (without importing torch)."""
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser(
        prog=prog,
        add_help=False,
        usage=f"{prog} --train_data DATA (--config_name SIZE | --model_name_or_path ENCODER) --max_steps N "
        f"--output_dir DIR [flags]",
        description="Masked-autoencoder pretraining of Dasheng with Transformers' Trainer. Flags take "
        "--under_score or --dash-ed spellings; a single .json argument is read as the flags.",
        epilog="Every other Trainer flag (TrainingArguments) works too; --help-all lists all of them.",
    )
    for kind in (DashengModelArguments, DashengDataArguments):
        group = parser.add_argument_group(kind._argument_group_name)
        for item in dataclasses.fields(kind):
            default = "" if item.default in (None, False) else f" (default {item.default})"
            text = (item.metadata.get("help", "") + default).replace("%", "%%")
            if item.type in ("bool", bool):
                group.add_argument(f"--{item.name}", action="store_true", help=text)
            else:
                group.add_argument(f"--{item.name}", metavar=item.name.split("_")[-1].upper(), help=text)
    group = parser.add_argument_group("Trainer: the common flags (--help-all for every one)")
    for flags, text in [*COMMON_TRAINER_FLAGS, ("-h, --help / --help-all", "This help / every flag, Trainer's too.")]:
        group.add_argument(flags, help=text.replace("%", "%%"), action="store_true")
    return parser.format_help()
