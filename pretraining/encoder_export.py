"""
The encoder a pretraining run exports: a ready-to-use `DashengModel` Hub folder (weights, config, preprocessor
config, code files and a model card stating the data, steps and final loss), always complete under its final name.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..modeling_dasheng import DashengModel

__all__ = ["DashengEncoderExportCallback", "export_encoder", "last_logged"]

logger = logging.getLogger("dasheng_hf.pretraining")


class DashengEncoderExportCallback(TrainerCallback):
    """Exports the encoder to `OUTPUT_DIR/encoder` every `every` optimizer steps (see [`export_encoder`])."""

    def __init__(self, trainer: Trainer, every: int, card: dict[str, Any]):
        self.trainer, self.every, self.card = trainer, every, card

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            export_encoder(self.trainer, Path(args.output_dir) / "encoder", self.card)


def last_logged(log_history: list[dict[str, Any]], key: str) -> tuple[float | None, int | None]:
    """The last value logged under `key` in `Trainer.state.log_history`, and its step (None, None if never)."""
    for entry in reversed(log_history):
        if key in entry:
            return entry[key], entry.get("step")
    return None, None


def export_encoder(trainer: Trainer, folder: Path, card: dict[str, Any]) -> None:
    """
    Write the trained encoder as a `DashengModel` Hub folder: weights, config, preprocessor config, the code files
    and a model card. Called on every process (sharded weights are gathered); process 0 writes into a temporary
    folder beside `folder` and renames it into place, so `folder` is always a complete export.
    """
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    skipped = trainer.num_skipped_files()
    if not trainer.is_world_process_zero():
        return
    config = copy.deepcopy(trainer.model.config)
    config.architectures = ["DashengModel"]
    config.use_batch_statistics = False  # inference and fine-tuning use the running statistics
    encoder_state = {key: value.detach().cpu() for key, value in state_dict.items() if key.startswith("encoder.")}
    with torch.device("meta"):
        encoder = DashengModel(config)
    encoder.load_state_dict(encoder_state, strict=True, assign=True)
    for stale in folder.parent.glob(f".{folder.name}.partial-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        trainer.processing_class.save_pretrained(partial)
        encoder.save_pretrained(partial)
        (partial / "README.md").write_text(_model_card(trainer, {**card, "skipped": skipped}))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    previous = folder.with_name(f".{folder.name}.previous-{os.getpid()}")
    if folder.exists():
        os.replace(folder, previous)
    os.replace(partial, folder)
    shutil.rmtree(previous, ignore_errors=True)
    logger.info(f"Exported the encoder at step {trainer.state.global_step} to {folder}")


def _model_card(trainer: Trainer, card: dict[str, Any]) -> str:
    state, config = trainer.state, trainer.model.config
    loss, loss_step = last_logged(state.log_history, "loss")
    eval_loss, eval_step = last_logged(state.log_history, "eval_loss")
    batch = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    batch *= trainer.args.world_size
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: feature-extraction",
        "tags: [audio, dasheng, masked-autoencoder, dasheng_hf]",
        "---",
        "",
        "# Dasheng encoder, pretrained with `dasheng_hf.pretraining.pretrain`",
        "",
        f"A Dasheng audio encoder ({config.hidden_size} hidden, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads) {card['init']}, with the masked-autoencoder objective "
        f"(mask ratio {config.mask_ratio}).",
        "",
        f"- Training data: `{card['train_data']}` ({card['crop_seconds']:g} s crops)",
        f"- Steps: {state.global_step} of {state.max_steps}, {batch} crops per step",
        f"- Final training loss: {loss:.4f} (logged at step {loss_step})"
        if loss is not None
        else "- Final training loss: not logged yet",
    ]
    if eval_loss is not None:
        lines.append(f"- Evaluation loss: {eval_loss:.4f} at step {eval_step} on `{card['eval_data']}`")
    if card.get("skipped"):
        lines.append(f"- Unreadable files skipped: {card['skipped']}")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoFeatureExtractor, AutoModel",
        "",
        'feature_extractor = AutoFeatureExtractor.from_pretrained("path/to/encoder", trust_remote_code=True)',
        'model = AutoModel.from_pretrained("path/to/encoder", trust_remote_code=True)',
        'inputs = feature_extractor(waveform_16khz, sampling_rate=16000, return_tensors="pt")',
        "embeddings = model(**inputs).last_hidden_state  # (batch, tokens, hidden): 25 per second",
        "```",
        "",
    ]
    return "\n".join(lines)
