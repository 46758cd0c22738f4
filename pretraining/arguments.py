"""
The flags of `dasheng-pretrain`: its own (model, data) and `TrainingArguments` with the released models' recipe as
defaults, the parser that ends a bad command with one line, and the parsing of `--config_overrides` and
`--gain_augmentation_db`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..configuration_dasheng import DashengConfig

__all__ = [
    "DashengDataArguments",
    "DashengModelArguments",
    "DashengPretrainingArguments",
    "DashengPretrainingError",
    "DashengPretrainingParser",
    "parse_config_overrides",
    "parse_gain",
]

_HAS_WARMUP_RATIO = "warmup_ratio" in TrainingArguments.__dataclass_fields__  # Transformers 4.x


class DashengPretrainingError(ValueError):
    """A problem with the command's inputs (flags, model, data); the message says how to fix it."""


@dataclass
class DashengModelArguments:
    """Which encoder to start from: a checkpoint to continue, or a fresh one of a released size."""

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
    """What to train on and how it is cut."""

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


@dataclass
class DashengPretrainingArguments(TrainingArguments):
    """`TrainingArguments` with the released models' recipe as defaults (AdamW 8-bit, 3e-4, cosine to 0.1 x lr)."""

    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (paper: 3e-4)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (paper: 0.01)."})
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr", metadata={"help": "Schedule after warm-up (paper: cosine to 0.1 x lr)."}
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr_rate": 0.1},
        metadata={"help": "Arguments of the schedule (default '{\"min_lr_rate\": 0.1}')."},
    )
    if _HAS_WARMUP_RATIO:
        warmup_ratio: float = field(default=0.03, metadata={"help": "Warm-up fraction (paper: 3 of 100 epochs)."})
    else:
        warmup_steps: float = field(
            default=0.03, metadata={"help": "Warm-up steps, or a fraction of max_steps below 1 (paper: 0.03)."}
        )
    optim: str = field(
        default="auto",
        metadata={
            "help": "Optimizer; 'auto' is adamw_bnb_8bit (as the paper) with bitsandbytes and a GPU, else adamw_torch."
        },
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on when the GPU supports it."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the audio."})
    dataloader_pin_memory: bool | None = field(default=None, metadata={"help": "Default: on with a GPU."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Every parameter takes part in every step (default False: faster DDP)."}
    )
    log_level_replica: str = field(
        default="error", metadata={"help": "Log level of processes other than the first (default error: no repeats)."}
    )

    def __post_init__(self):
        gpu = torch.cuda.is_available()
        self._notes = []  # logged once logging is set up (see `run`)
        if self.optim == "auto":
            self.optim = "adamw_bnb_8bit" if gpu and _importable("bitsandbytes") else "adamw_torch"
            if self.optim != "adamw_bnb_8bit":
                self._notes.append(
                    f"Using AdamW (adamw_torch) instead of the paper's 8-bit AdamW, which needs "
                    f"{'bitsandbytes (pip install bitsandbytes)' if gpu else 'a GPU'}."
                )
        accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else gpu
        if self.fsdp and (self.use_cpu or not accelerator):
            raise ValueError(
                "--fsdp needs GPUs (accelerate shards models only on accelerators); on CPUs leave it out: "
                "torchrun then trains with plain data parallelism."
            )
        if self.bf16 is None:
            self.bf16 = gpu and torch.cuda.is_bf16_supported() and not self.fp16
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = gpu
        if not gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.use_cpu = True  # several CPU processes: Trainer and accelerate go distributed (gloo) only so
        super().__post_init__()


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # a broken install (e.g. bitsandbytes without its CUDA library) counts as absent
        return False
    return True


class DashengPretrainingParser(HfArgumentParser):
    """Bad flags end the command with one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """
    Parse `'hidden_size=64,qkv_bias=false,...'` into config keyword arguments, typed like the defaults of
    [`DashengConfig`]. Unknown fields and unparsable values raise [`DashengPretrainingError`].
    """
    if not text:
        return {}
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
