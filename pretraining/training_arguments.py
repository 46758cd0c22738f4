"""
`TrainingArguments` with the released models' recipe as defaults (`DashengPretrainingArguments`), and the parser of
`dasheng-pretrain` that lists Dasheng's flags first and ends a bad command with one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

__all__ = ["DashengPretrainingArguments", "DashengPretrainingParser"]

_HAS_WARMUP_RATIO = "warmup_ratio" in TrainingArguments.__dataclass_fields__  # Transformers 4.x


@dataclass
class DashengPretrainingArguments(TrainingArguments):
    """`TrainingArguments` with the released models' recipe as defaults (AdamW 8-bit, 3e-4, cosine to 0.1 x lr)."""

    _argument_group_name = "Trainer (TrainingArguments, with the paper's recipe as defaults)"

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
    """Bad flags end the command with one line on stderr and exit status 2; `--help` lists Dasheng's flags first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
