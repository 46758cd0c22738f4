"""
The `dasheng-pretrain` command (`python -m dasheng_hf.pretraining.pretrain`): masked-autoencoder pretraining of
Dasheng with `Trainer` (see `trainer.py`).

    dasheng-pretrain --train_data 'shards/train-{000000..000127}.tar' --config_name dasheng-base \\
        --max_steps 1500000 --per_device_train_batch_size 32 --output_dir runs/dasheng-base

`--help` lists Dasheng's flags and the Trainer flags most runs set, at once (torch and transformers are imported only
after parsing); `--help-all` lists every flag, Dasheng's first. Bad flags end with one line (exit status 2), as do
problems met later; SIGINT (Ctrl-C), SIGTERM and SIGHUP end with one line saying where the run stands (exit status
130), a checkpoint being saved is completed first.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from ..cli.preflight import quiet_optional_kernel_logs
from ..jobs.interrupts import DashengInterrupted, interrupts_raise
from .arguments import (
    DashengDataArguments,
    DashengModelArguments,
    DashengPretrainingError,
    parse_config_overrides,
    parse_gain,
    short_help,
)

if TYPE_CHECKING:  # imported on first use (module `__getattr__`), so that `--help` needs neither torch nor transformers
    from .trainer import DashengPretrainer, DashengPretrainingCollator, build_model, run
    from .training_arguments import DashengPretrainingArguments, DashengPretrainingParser

__all__ = [  # the command, and (imported on first use) the pieces it is built from
    "DashengDataArguments",
    "DashengModelArguments",
    "DashengPretrainer",
    "DashengPretrainingArguments",
    "DashengPretrainingCollator",
    "DashengPretrainingError",
    "DashengPretrainingParser",
    "build_model",
    "main",
    "parse_config_overrides",
    "parse_gain",
    "run",
]

PROG = "dasheng-pretrain"
_LAZY = {
    "DashengPretrainer": "trainer",
    "DashengPretrainingCollator": "trainer",
    "build_model": "trainer",
    "run": "trainer",
    "DashengPretrainingArguments": "training_arguments",
    "DashengPretrainingParser": "training_arguments",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(flag in ("-h", "--help") for flag in argv) and "--help-all" not in argv:
        print(short_help(PROG), end="")
        sys.exit(0)
    quiet_optional_kernel_logs()
    try:
        with interrupts_raise():
            _parse_and_run(argv)
    except DashengInterrupted as error:
        detail = getattr(error, "detail", "before training started")
        print(f"{PROG}: interrupted ({error.signal_name}) {detail}.", file=sys.stderr)
        sys.exit(130)


def _parse_and_run(argv: list[str]) -> None:
    from .trainer import StoppedInTraining, one_line, run
    from .training_arguments import DashengPretrainingArguments, DashengPretrainingParser

    parser = DashengPretrainingParser(
        (DashengModelArguments, DashengDataArguments, DashengPretrainingArguments), prog=PROG
    )
    if "--help-all" in argv:
        parser.print_help()
        sys.exit(0)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        else:
            model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, TypeError, KeyError) as error:  # raised by the arguments' own checks
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        unused = message.partition("not used by the HfArgumentParser: ")[2]
        parser.error(f"unrecognized arguments {unused} (see {PROG} --help)" if unused else message)
    from ..audio.datasets import DashengAudioError

    try:
        run(model_args, data_args, training_args)
    except (DashengPretrainingError, DashengAudioError) as error:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or isinstance(error, StoppedInTraining):  # input errors are the same on every process
            print(f"{PROG}: error: {'' if rank == 0 else f'[rank {rank}] '}{one_line(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
