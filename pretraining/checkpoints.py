"""
Checkpoints a run resumes from: `last` is the newest complete one (Trainer writes `trainer_state.json` last, so a
folder without a readable one was cut off while saving; it is skipped with a warning naming it), and every file a
resume reads is checked first, so that a damaged, foreign or incomplete checkpoint is one error naming the file.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

from .arguments import DashengPretrainingError

__all__ = ["check_checkpoint", "complete_checkpoints", "resume_checkpoint"]

logger = logging.getLogger("dasheng_hf.pretraining")

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHARDED = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "pytorch_model_fsdp*", "global_step*")


def _sharded(folder: Path) -> bool:
    """Whether the checkpoint was written by DeepSpeed or FSDP, or in shards (checked by what reads it)."""
    return any(any(folder.glob(pattern)) for pattern in _SHARDED)


def _state_problem(folder: Path) -> str | None:
    """Why `folder/trainer_state.json` cannot be resumed from, or None."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return "it has no trainer_state.json (the save was cut off)"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"its trainer_state.json is unreadable ({type(error).__name__}: {error})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "its trainer_state.json holds no global_step"
    if not any((folder / name).is_file() for name in _WEIGHTS) and not _sharded(folder):
        return f"it has no model weights ({' or '.join(_WEIGHTS)})"
    return None


def complete_checkpoints(output_dir: str | Path) -> tuple[list[Path], dict[Path, str]]:
    """`checkpoint-N` folders of `output_dir`: the complete ones by step, and the others with what is wrong."""
    folders = [path for path in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", path.name)]
    folders = sorted((path for path in folders if path.is_dir()), key=lambda path: int(path.name.split("-")[1]))
    problems = {folder: _state_problem(folder) for folder in folders}
    return [folder for folder in folders if problems[folder] is None], {
        folder: problem for folder, problem in problems.items() if problem is not None
    }


def resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint PATH`, or `last` (also `true`): the newest complete checkpoint in `output_dir`."""
    if value is None:
        complete, _ = complete_checkpoints(output_dir) if Path(output_dir).is_dir() else ([], {})
        if complete:
            logger.warning(
                f"{output_dir} holds checkpoints of an earlier run; this run starts afresh and replaces them. Pass "
                f"--resume_from_checkpoint last to continue that run instead."
            )
        return None
    if value.lower() in ("last", "latest", "true"):
        complete, broken = complete_checkpoints(output_dir) if Path(output_dir).is_dir() else ([], {})
        newest = complete[-1] if complete else None
        for folder, problem in broken.items():
            if newest is None or int(folder.name.split("-")[1]) > int(newest.name.split("-")[1]):
                logger.warning(f"Skipping {folder}: {problem}.")
        if newest is None:
            raise DashengPretrainingError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in {output_dir}"
                + (f" ({len(broken)} incomplete)." if broken else ".")
            )
        return str(newest)
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise DashengPretrainingError(f"--resume_from_checkpoint {value}: no such folder.")
    problem = _state_problem(folder)
    if problem:
        raise DashengPretrainingError(f"--resume_from_checkpoint {value}: {problem}.")
    return str(folder)


def _check_torch_file(path: Path, what: str) -> None:
    """A `torch.save` zip whose every member's checksum holds (catches truncated and garbled files)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise DashengPretrainingError(
            f"Cannot resume: {path} ({what}) is damaged or truncated ({error}); resume from an earlier checkpoint."
        ) from None
    if bad is not None:
        raise DashengPretrainingError(
            f"Cannot resume: {path} ({what}) is damaged (the checksum of {bad} does not match); resume from an "
            f"earlier checkpoint."
        )


def check_checkpoint(folder: str, model: Any, allow_missing_optimizer_state: bool, process_index: int = 0) -> None:
    """
    Check every file resuming from `folder` reads: weights that fit `model` (names and shapes), the optimizer and
    scheduler states (present unless `allow_missing_optimizer_state`), the random states; raise
    [`DashengPretrainingError`] naming the file and the problem.
    """
    root = Path(folder)
    if _sharded(root):  # DeepSpeed, FSDP or sharded weights: their own loaders check them
        return
    weights = next(root / name for name in _WEIGHTS if (root / name).is_file())
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        else:
            _check_torch_file(weights, "model weights")
            import torch

            state = torch.load(weights, weights_only=True, mmap=True)
            found = {key: tuple(value.shape) for key, value in state.items()}
    except DashengPretrainingError:
        raise
    except Exception as error:
        raise DashengPretrainingError(
            f"Cannot resume: {weights} is damaged or truncated ({type(error).__name__}: {error}); resume from an "
            f"earlier checkpoint."
        ) from None
    mismatched = sorted(key for key in expected.keys() & found.keys() if expected[key] != found[key])
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if mismatched or missing or unexpected:
        example = (
            f"{mismatched[0]} is {found[mismatched[0]]} there, {expected[mismatched[0]]} here" if mismatched
            else f"{len(missing)} tensors missing, {len(unexpected)} unknown, e.g. {(missing + unexpected)[0]}"
        )  # fmt: skip
        raise DashengPretrainingError(
            f"Cannot resume: {weights} holds another model ({example}); resume with the --config_name and "
            f"--config_overrides of that run, or start afresh in another --output_dir."
        )
    for name, what in (("optimizer.pt", "optimizer state"), ("scheduler.pt", "learning-rate schedule state")):
        path = root / name
        if path.is_file():
            _check_torch_file(path, what)
        elif not allow_missing_optimizer_state:
            raise DashengPretrainingError(
                f"Cannot resume: {root} has no {name} ({what}); pass --allow_missing_optimizer_state to continue with "
                f"a fresh one, or resume from another checkpoint."
            )
        else:
            logger.warning(f"{root} has no {name}: the {what} starts fresh (--allow_missing_optimizer_state).")
    for name in ("rng_state.pth", f"rng_state_{process_index}.pth", "scaler.pt"):
        if (root / name).is_file():
            _check_torch_file(root / name, "random number generator state" if "rng" in name else "scaler state")
