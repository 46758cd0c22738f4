"""
Masked-autoencoder pretraining of Dasheng with `Trainer`: the paper's objective and recipe, from one CPU to many GPUs
(the command line is `pretrain.py`).

    dasheng-pretrain --train_data 'shards/train-{000000..000127}.tar' --config_name dasheng-base \
        --max_steps 1500000 --per_device_train_batch_size 32 --output_dir runs/dasheng-base

Every `TrainingArguments` flag works (`--under_score` or `--dash-ed`), under `torchrun` / `accelerate launch`, with
DeepSpeed or FSDP. The data (`--train_data`, `--eval_data`: webdataset shards, a folder, a file list or a `datasets`
id) is read by `audio/datasets.py` as sequential crops of `--crop_seconds`; each process and dataloader worker reads its
own share. Short files are not padded with silence: a batch of crops of different lengths is padded by the feature
extractor, and its `attention_mask` keeps padded tokens out of the encoder, the decoder and the loss. The encoder is
exported as a ready-to-use Hub folder under `OUTPUT_DIR/encoder` at the end (and every `--export_every` steps).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils.data import DataLoader
from transformers import Trainer, set_seed

from ..audio.datasets import DashengAudioDataset, DashengAudioError, per_process_dataloader
from ..cli.preflight import DashengPreflightError, HubResource, check_resources, warn_if_bf16_is_emulated
from ..configuration_dasheng import DashengConfig
from ..feature_extraction_dasheng import DashengFeatureExtractor
from ..jobs.interrupts import DashengInterrupted, fault_point, finish_first
from ..jobs.lock import DashengLockError, DashengOutputLock
from ..modeling_dasheng_pretraining import DashengForPreTraining
from .arguments import (
    DashengDataArguments,
    DashengModelArguments,
    DashengPretrainingError,
    check_flags,
    parse_config_overrides,
    parse_gain,
)
from .checkpoints import check_checkpoint, complete_checkpoints, resume_checkpoint
from .encoder_export import DashengEncoderExportCallback, export_encoder, last_logged
from .training_arguments import DashengPretrainingArguments

__all__ = [
    "DashengPretrainer",
    "DashengPretrainingCollator",
    "StoppedInTraining",
    "build_model",
    "one_line",
    "run",
]

logger = logging.getLogger("dasheng_hf.pretraining")  # also under `python -m`, where __name__ is "__main__"


class StoppedInTraining(DashengPretrainingError):
    """A data problem met by one process while training (reported by that process, not only the first)."""


# ---------------------------------------------------------------------------------------------------------- model


def build_model(model_args: DashengModelArguments) -> tuple[DashengForPreTraining, DashengFeatureExtractor, str]:
    """The model to pretrain, its feature extractor, and a one-line description of where it came from."""
    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.mask_ratio is not None:
        overrides["mask_ratio"] = model_args.mask_ratio
    # The original normalises the spectrogram by batch statistics in training (and updates the running ones, which
    # the exported encoder uses); DashengConfig's inference default is the running statistics alone.
    overrides.setdefault("use_batch_statistics", True)
    if model_args.model_name_or_path and model_args.config_name:
        raise DashengPretrainingError(
            "Pass either --model_name_or_path (continue from an encoder) or --config_name (start from scratch)."
        )
    source = model_args.model_name_or_path
    if source:
        name = _local_or_hub(source, "--model_name_or_path")
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # the decoder's missing keys are said once, below
        try:
            model, loading = DashengForPreTraining.from_pretrained(name, output_loading_info=True, **overrides)
        except (OSError, ValueError) as error:
            raise DashengPretrainingError(
                f"Could not load an encoder from --model_name_or_path {source!r}: {one_line(error).rstrip('.')}."
            ) from error
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        fresh = [key for key in loading["missing_keys"] if not key.startswith("encoder.")]
        missing_encoder = [key for key in loading["missing_keys"] if key.startswith("encoder.")]
        if missing_encoder:
            raise DashengPretrainingError(
                f"--model_name_or_path {source!r} lacks {len(missing_encoder)} encoder tensors, e.g. "
                f"{missing_encoder[0]}: it is not a Dasheng encoder of this size."
            )
        if fresh:
            logger.warning(f"The decoder starts fresh: {source} holds the encoder only ({len(fresh)} decoder tensors).")
        try:
            feature_extractor = DashengFeatureExtractor.from_pretrained(name)
        except OSError:  # the first Hub layout has no preprocessor config
            feature_extractor = DashengFeatureExtractor.from_dasheng_config(model.config)
        return _with_attention(model, model_args), feature_extractor, f"continued from {source}"
    preset = model_args.config_name or "dasheng-base"
    try:
        if Path(preset).expanduser().is_dir() or "/" in preset:
            config = DashengConfig.from_pretrained(_local_or_hub(preset, "--config_name"), **overrides)
        else:
            config = DashengConfig.from_preset(preset, **overrides)
    except (OSError, ValueError) as error:
        raise DashengPretrainingError(f"--config_name {preset!r}: {error}") from error
    described = f"trained from scratch ({preset}" + (
        f", {model_args.config_overrides})" if model_args.config_overrides else ")"
    )
    model = _with_attention(DashengForPreTraining(config), model_args)
    return model, DashengFeatureExtractor.from_dasheng_config(config), described


def _local_or_hub(source: str, flag: str) -> str:
    """A local folder's path, or a Hub id that is cached or reachable; else one error saying what is missing."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path)
    try:
        check_resources([HubResource(flag, source)], advice="dasheng-convert makes one from the released checkpoints")
    except DashengPreflightError as error:
        raise DashengPretrainingError(str(error)) from None
    return source


def _with_attention(model: DashengForPreTraining, model_args: DashengModelArguments) -> DashengForPreTraining:
    if model_args.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise DashengPretrainingError(
            "--attn_implementation flex_attention: PyTorch's FlexAttention has no backward pass on CPUs; "
            "use sdpa (the default) or eager."
        )
    if model_args.attn_implementation:
        try:
            model.set_attn_implementation(model_args.attn_implementation)
        except (ImportError, ValueError) as error:
            name = model_args.attn_implementation
            raise DashengPretrainingError(f"--attn_implementation {name!r}: {error}") from error
    return model


# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class DashengPretrainingCollator:
    """
    Crops to model inputs: an optional random gain per crop, then log-mel features.

    Items are dicts with `audio`: mono float32 samples at 16 kHz, and optionally `num_samples`, the real length of
    a zero-padded crop (a file shorter than a crop). Crops are cut to their real length, and the feature extractor
    pads the batch and returns `attention_mask` `(batch, frames)`, with which the model keeps padding out of
    attention and the loss (the original instead reconstructs the padding as silence). Returns `input_values`
    `(batch, 64, frames)` and, when some crop was short, `attention_mask`.
    """

    feature_extractor: DashengFeatureExtractor
    gain_db: tuple[float, float] | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        clips = [
            torch.as_tensor(np.asarray(item["audio"], dtype=np.float32))[: item.get("num_samples")] for item in items
        ]
        if self.gain_db is not None:
            gains = torch.empty(len(clips)).uniform_(*self.gain_db)
            clips = [clip * 10.0 ** (gain / 20.0) for clip, gain in zip(clips, gains.tolist())]
        features = self.feature_extractor(
            clips,
            sampling_rate=self.feature_extractor.sampling_rate,
            return_tensors="pt",
            return_attention_mask=False,
        )
        return dict(features)


# -------------------------------------------------------------------------------------------------------- trainer


class DashengPretrainer(Trainer):
    """
    `Trainer` whose data loaders read each process's own share of the stream (no re-sharding by accelerate), and
    whose evaluation masks with fixed noise (the same tokens removed at every evaluation), summed over processes.
    """

    def _loader(self, dataset: DashengAudioDataset, batch_size: int) -> DataLoader:
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
        )
        return per_process_dataloader(loader, self.args.device)

    def get_train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self._train_batch_size)

    def get_eval_dataloader(self, eval_dataset: DashengAudioDataset | None = None) -> DataLoader:
        return self._loader(eval_dataset if eval_dataset is not None else self.eval_dataset, self.args.eval_batch_size)

    def evaluate(
        self,
        eval_dataset: DashengAudioDataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix="eval",
    ) -> dict[str, float]:
        """Mean loss over the eval crops (`{prefix}_loss`) and their number (`{prefix}_crops`)."""
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        was_training = model.training
        model.eval()
        config = self.model.config
        generator = torch.Generator().manual_seed(self.args.seed)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        totals = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # loss x crops, crops, skipped files
        dataset.reset_skipped()  # the files this pass skipped, not those of earlier evaluations too
        with torch.no_grad():
            for batch in self.get_eval_dataloader(dataset):
                batch = self._prepare_inputs(batch)
                frames = batch["input_values"].shape[-1]
                tokens = (frames - config.patch_size[1]) // config.patch_stride[1] + 1
                noise = None
                if tokens <= config.chunk_num_tokens:
                    groups = math.ceil(tokens / config.mask_group_size)
                    noise = torch.rand(len(batch["input_values"]), groups, generator=generator).to(self.args.device)
                with self.compute_loss_context_manager():
                    loss = model(**batch, noise=noise).loss
                count = len(batch["input_values"])
                totals[:2] += torch.stack([loss.double() * count, totals.new_tensor(count)])
        totals[2] = dataset.num_skipped
        if self.args.world_size > 1:
            torch.distributed.all_reduce(totals)
        model.train(was_training)
        if totals[1] == 0:
            raise DashengPretrainingError("The evaluation data yielded no readable audio.")
        metrics = {
            f"{metric_key_prefix}_loss": float(totals[0] / totals[1]),
            f"{metric_key_prefix}_crops": int(totals[1]),
        }
        if totals[2]:
            metrics[f"{metric_key_prefix}_skipped_files"] = int(totals[2])
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Saves as Trainer does; an interrupt during the save takes effect once the checkpoint is complete."""
        with finish_first():
            super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        fault_point("checkpoint-save")  # the weights are written, the optimizer and trainer state not yet
        super()._save_optimizer_and_scheduler(output_dir)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds `skipped_files`, the unreadable training files skipped so far by all processes, once there are any."""
        skipped = self.num_skipped_files()
        if skipped:
            logs = {**logs, "skipped_files": skipped}
        super().log(logs, *args, **kwargs)

    def num_skipped_files(self) -> int:
        """Training files skipped so far, summed over processes (call it on every process)."""
        count = torch.tensor(float(self.train_dataset.num_skipped), device=self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(count)
        return int(count)


# ----------------------------------------------------------------------------------------------------------- main


def _setup_logging(training_args: DashengPretrainingArguments) -> None:
    """
    The first process logs at info level; the others only at `--log_level_replica` (default error), except for
    the files they skip themselves, which only they can report.
    """
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    verbose = training_args.log_level in ("debug", "info", "detail")  # config dumps only when asked for
    for name in ("configuration_utils", "modeling_utils", "feature_extraction_utils", "generation.configuration_utils"):
        logging.getLogger(f"transformers.{name}").setLevel(logging.NOTSET if verbose else max(level, logging.WARNING))
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # Transformers' records have their own handler; with `CI` set it also propagates them to the root one.
    transformers.utils.logging.disable_propagation()
    logging.getLogger("dasheng_hf").setLevel(level)
    logging.getLogger("dasheng_hf.audio").setLevel(min(level, logging.WARNING))
    if training_args.should_log:
        for note in getattr(training_args, "_notes", []):
            logger.warning(note)


def run(
    model_args: DashengModelArguments, data_args: DashengDataArguments, training_args: DashengPretrainingArguments
) -> dict[str, Any]:
    """Pretrain as the arguments say; returns the training metrics (and `eval_loss` with `--eval_data`)."""
    _setup_logging(training_args)
    check_training_flags(model_args, data_args, training_args)
    gain = parse_gain(data_args.gain_augmentation_db)
    output_dir = Path(training_args.output_dir)
    created = not output_dir.exists()
    lock = None
    if training_args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = DashengOutputLock(output_dir, "dasheng-pretrain", warn=logger.warning)
        try:
            lock.acquire()
        except DashengLockError as error:
            _remove_if_unused(output_dir, created, None)
            raise DashengPretrainingError(str(error)) from None
    try:
        return _run(model_args, data_args, training_args, gain)
    except BaseException:
        _remove_if_unused(output_dir, created, lock)
        raise
    finally:
        if lock is not None:
            lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Gloo's threads are joined here, not in the interpreter's teardown (which aborted a rank at exit).
            torch.distributed.destroy_process_group()


def _remove_if_unused(output_dir: Path, created: bool, lock: DashengOutputLock | None) -> None:
    """A folder this run created and that holds nothing of it yet (no checkpoint, no model) is removed."""
    if lock is not None:
        lock.release()
    if created and output_dir.is_dir() and not any(output_dir.glob("checkpoint-*")):
        if not (output_dir / "model.safetensors").exists() and not (output_dir / "encoder").exists():
            shutil.rmtree(output_dir, ignore_errors=True)


def check_training_flags(
    model_args: DashengModelArguments, data_args: DashengDataArguments, training_args: DashengPretrainingArguments
) -> None:
    """Every flag checked before any work: Dasheng's ([`check_flags`]) and the Trainer flags that could fail late."""
    if not data_args.train_data:
        raise DashengPretrainingError("--train_data is required (shard pattern, folder, file list or datasets id).")
    if training_args.max_steps <= 0:
        given = "is required" if training_args.max_steps == -1 else f"must be positive, got {training_args.max_steps}"
        raise DashengPretrainingError(
            f"--max_steps {given}: the data is streamed, so the run length is given in optimizer steps "
            "(the paper: 1500000 steps of 256 crops)."
        )
    check_flags(model_args, data_args)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise DashengPretrainingError(f"--{name} must be at least 1, got {getattr(training_args, name)}.")
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "adam_epsilon"):
        value = getattr(training_args, name)
        if not math.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
            raise DashengPretrainingError(
                f"--{name} must be a finite {'positive' if name == 'learning_rate' else 'non-negative'} number, "
                f"got {value}."
            )
    if training_args.save_strategy != "no" and training_args.save_steps <= 0:
        raise DashengPretrainingError(f"--save_steps must be positive, got {training_args.save_steps}.")
    output_dir = Path(training_args.output_dir)
    for parent in (output_dir, *output_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise DashengPretrainingError(
                    f"--output_dir {output_dir}: {parent} is a file, not a folder; pass a folder for the run."
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DashengPretrainingError(f"--output_dir {output_dir}: {parent} is not writable.")
            break
    if not data_args.eval_data and training_args.eval_strategy != "no":
        raise DashengPretrainingError(f"--eval_strategy {training_args.eval_strategy.value} needs --eval_data.")
    warning = warn_if_bf16_is_emulated() if training_args.bf16 and not torch.cuda.is_available() else None
    if warning:
        logger.warning(warning.removeprefix("warning: "))


def _run(
    model_args: DashengModelArguments,
    data_args: DashengDataArguments,
    training_args: DashengPretrainingArguments,
    gain: tuple[float, float] | None,
) -> dict[str, Any]:
    checkpoint = resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)

    train_dataset = _crop_dataset(data_args.train_data, data_args, training_args.seed, train=True)
    eval_dataset = None
    if data_args.eval_data:
        eval_dataset = _crop_dataset(data_args.eval_data, data_args, training_args.seed, train=False)

    model, feature_extractor, init = build_model(model_args)
    logger.info(f"Pretraining a {model.num_parameters():,}-parameter model, {init}.")
    trainer = DashengPretrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DashengPretrainingCollator(feature_extractor, gain),
        processing_class=feature_extractor,
    )
    card = {
        "init": init,
        "train_data": data_args.train_data,
        "eval_data": data_args.eval_data,
        "crop_seconds": data_args.crop_seconds,
    }
    if data_args.export_every:
        trainer.add_callback(DashengEncoderExportCallback(trainer, data_args.export_every, card))

    if checkpoint is not None:
        check_checkpoint(checkpoint, model, data_args.allow_missing_optimizer_state, training_args.process_index)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except (DashengPretrainingError, DashengAudioError) as error:
        raise StoppedInTraining(one_line(error)) from error
    except DashengInterrupted as error:
        complete, _ = complete_checkpoints(training_args.output_dir)
        error.detail = f"at step {trainer.state.global_step}; " + (
            f"the newest complete checkpoint is {complete[-1]} (continue with --resume_from_checkpoint last)"
            if complete
            else "no checkpoint was saved yet"
        )
        raise
    trainer.save_model()  # the whole pretraining model (encoder and decoder), to continue from later
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    last_eval_step = last_logged(trainer.state.log_history, "eval_loss")[1]
    if eval_dataset is not None and last_eval_step != trainer.state.global_step:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    export_encoder(trainer, Path(training_args.output_dir) / "encoder", card)
    skipped = trainer.num_skipped_files()
    if skipped:
        logger.warning(f"{skipped} unreadable training files were skipped (each named in a warning above).")
    return metrics


def _crop_dataset(source: str, data_args: DashengDataArguments, seed: int, train: bool) -> DashengAudioDataset:
    """Training crops: shuffled, endless, each process its share; evaluation crops: in order, one pass, split too."""
    return DashengAudioDataset(
        source,
        crop_seconds=data_args.crop_seconds,
        shuffle=train,
        shuffle_buffer=data_args.shuffle_buffer,
        seed=seed,
        repeat=train,
        audio_column=data_args.audio_column,
    )


def one_line(error: Exception) -> str:
    """The message of `error`, also when a dataloader worker raised it (then wrapped with the worker's traceback)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)
