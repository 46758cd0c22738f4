"""Dasheng as an X-ARES / xares-llm audio encoder.

    python -m xares.run --max-jobs 8 dasheng_hf/evaluation/xares.py src/tasks/*.py      # X-ARES (pip install xares)
    python -m xares_llm.run dasheng_hf.evaluation.xares.DashengXaresEncoder task1 task1  # xares-llm

Both harnesses find the encoder class by its name ending in "Encoder", so this module defines exactly one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..feature_extraction_dasheng import DashengFeatureExtractor
from ..modeling_dasheng import DashengModel

__all__ = ["DashengXaresEncoder"]

_NO_MASK = object()  # `forward(audio)` (X-ARES) as opposed to `forward(audio, None)` (xares-llm)


class DashengXaresEncoder(nn.Module):
    """
    Frozen Dasheng encoder with the X-ARES contract: 16 kHz audio `(batch, samples)` in, one `output_dim`-wide
    embedding per 40 ms out, for clips of any length (10 minutes and more, in bounded memory).

    Args:
        model_name_or_path: Hub id or folder of a Dasheng model (`mispeech/dasheng-base`, `-0.6B`, `-1.2B`).
        options: Passed on to `DashengModel.from_pretrained` (e.g. `torch_dtype`, `revision`).
    """

    def __init__(self, model_name_or_path: str = "mispeech/dasheng-base", **options: Any):
        super().__init__()
        self.model = DashengModel.from_pretrained(model_name_or_path, **options).eval()
        self.model.requires_grad_(False)
        self.feature_extractor = DashengFeatureExtractor.from_dasheng_config(self.model.config)
        self.sampling_rate = self.feature_extractor.sampling_rate
        self.output_dim = int(self.model.config.hidden_size)
        config = self.model.config
        self.hop_size_in_ms = 1000 * config.patch_stride[1] * config.hop_length // self.sampling_rate  # 40

    def train(self, mode: bool = True) -> DashengXaresEncoder:
        """The encoder stays in eval mode whatever the harness's model around it does."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(
        self, audio: torch.Tensor, audio_attention_mask: Any = _NO_MASK
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            audio: `(batch, samples)` (or `(samples,)`) float samples at 16 kHz.
            audio_attention_mask: xares-llm's `(batch, samples)` mask, 1 for real samples (right padding), or None.
        Returns:
            With `audio` alone (X-ARES): embeddings `(batch, tokens, output_dim)` float32 on the model's device.
            With a mask argument, even None (xares-llm): `(embeddings, mask)`, the mask `(batch, tokens)` with 1 on
            tokens of real audio (None when None was passed); padded tokens are zeros.
        Clips shorter than 480 samples (30 ms) are zero-padded to that length.
        """
        if not isinstance(audio, torch.Tensor) or audio.ndim not in (1, 2) or not audio.is_floating_point():
            what = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
            raise ValueError(f"audio must be a float tensor (batch, samples) at {self.sampling_rate} Hz, got {what}.")
        audio = audio[None] if audio.ndim == 1 else audio
        with_mask = audio_attention_mask is not _NO_MASK
        mask = audio_attention_mask if with_mask else None
        if mask is not None and tuple(mask.shape) != tuple(audio.shape):
            raise ValueError(
                f"audio_attention_mask has shape {tuple(mask.shape)}; it must match audio {tuple(audio.shape)}."
            )
        lengths = [audio.shape[1]] * audio.shape[0] if mask is None else mask.long().sum(dim=1).tolist()
        shortest = self.feature_extractor.min_num_samples
        clips = [
            nn.functional.pad(clip[:length], (0, max(0, shortest - length))) for clip, length in zip(audio, lengths)
        ]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            features = self.feature_extractor(
                clips, sampling_rate=self.sampling_rate, return_tensors="pt", return_attention_mask=True, device=device
            )
            outputs = self.model(**features)
        embeddings = outputs.last_hidden_state.float()
        if not with_mask:
            return embeddings
        if mask is None:
            return embeddings, None
        valid = self.model.num_valid_tokens(features["attention_mask"]).to(embeddings.device)
        token_mask = torch.arange(embeddings.shape[1], device=embeddings.device)[None, :] < valid[:, None]
        return embeddings, token_mask.to(mask.dtype if not mask.is_floating_point() else torch.long)
