"""Dasheng as an X-ARES / xares-llm audio encoder.

    python -m xares.run --max-jobs 8 dasheng_hf/evaluation/xares.py src/tasks/*.py      # X-ARES (pip install xares)
    python -m xares_llm.run dasheng_hf.evaluation.xares.DashengXaresEncoder task1 task1  # xares-llm

Both harnesses find the encoder class by its name ending in "Encoder", so this module defines exactly one, and
construct it without arguments. Which model it loads then: the environment variable `DASHENG_XARES_MODEL` (a folder
or a Hub id), else the module-level setting `DEFAULT_MODEL` (`mispeech/dasheng-base` unless changed), so that

    DASHENG_XARES_MODEL=/models/my-dasheng python -m xares.run --max-jobs 8 dasheng_hf/evaluation/xares.py ...

evaluates a local folder (for example one written by `dasheng-convert`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..cli.preflight import HubResource, check_resources
from ..feature_extraction_dasheng import DashengFeatureExtractor
from ..modeling_dasheng import DashengModel

__all__ = ["DEFAULT_MODEL", "MODEL_VARIABLE", "DashengXaresEncoder"]

DEFAULT_MODEL = "mispeech/dasheng-base"  # loaded when neither an argument nor DASHENG_XARES_MODEL names a model
MODEL_VARIABLE = "DASHENG_XARES_MODEL"

_NO_MASK = object()  # `forward(audio)` (X-ARES) as opposed to `forward(audio, None)` (xares-llm)


class DashengXaresEncoder(nn.Module):
    """
    Frozen Dasheng encoder with the X-ARES contract: 16 kHz audio `(batch, samples)` in, one `output_dim`-wide
    embedding per 40 ms out, for clips of any length (10 minutes and more, in bounded memory).

    Args:
        model_name_or_path: Hub id or folder of a Dasheng model (`mispeech/dasheng-base`, `-0.6B`, `-1.2B`). None
            (as the harnesses construct it): `$DASHENG_XARES_MODEL` if set, else the module's `DEFAULT_MODEL`.
        options: Passed on to `DashengModel.from_pretrained` (e.g. `torch_dtype`, `revision`).
    Raises:
        `DashengPreflightError` (a `ValueError`) before any download when the folder does not exist or the Hub id is
        neither cached nor reachable (offline with `HF_HUB_OFFLINE`, without retries).
    """

    def __init__(self, model_name_or_path: str | os.PathLike | None = None, **options: Any):
        super().__init__()
        flag = "model_name_or_path"
        if model_name_or_path is None:
            model_name_or_path = os.environ.get(MODEL_VARIABLE) or DEFAULT_MODEL
            flag = MODEL_VARIABLE if os.environ.get(MODEL_VARIABLE) else "DEFAULT_MODEL"
        check_resources(
            [HubResource(flag, str(model_name_or_path))],
            advice=f"for the harnesses set {MODEL_VARIABLE} to it; `dasheng-convert --checkpoint dasheng-base --output "
            f"FOLDER` writes one for a released checkpoint",
            cache_dir=options.get("cache_dir"),
        )
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
        if audio.shape[0] == 0 or audio.shape[1] == 0:
            raise ValueError(f"audio is empty (shape {tuple(audio.shape)}): pass at least one clip with samples.")
        with_mask = audio_attention_mask is not _NO_MASK
        mask = audio_attention_mask if with_mask else None
        lengths = [audio.shape[1]] * audio.shape[0] if mask is None else _clip_lengths(mask, audio.shape)
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
        dtype = mask.dtype if isinstance(mask, torch.Tensor) and not mask.is_floating_point() else torch.long
        return embeddings, token_mask.to(dtype)


def _clip_lengths(mask: Any, shape: tuple[int, ...]) -> list[int]:
    """
    Samples of real audio per clip from xares-llm's `(batch, samples)` mask, checked as the model checks its frame
    mask: a tensor, array or list of only 0 and 1 (any dtype), 1 for real samples followed by 0 for padding (right
    padding, no holes), at least one real sample per clip.
    """
    try:
        mask = torch.as_tensor(mask)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"audio_attention_mask must be a tensor, array or list of 0 and 1 ({error}).") from None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"audio_attention_mask has shape {tuple(mask.shape)}; it must match audio {tuple(shape)}.")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(
            f"audio_attention_mask must hold only 0 and 1 (1 = real sample, 0 = padding), got {odd}: pass the mask "
            f"of the padded batch, not weights or lengths."
        )
    mask = mask.to(torch.long)
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        clip = int((mask[:, 1:] > mask[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(
            f"audio_attention_mask of clip {clip} has 0 before 1: it must mark real samples first, then padding "
            f"(right padding, no holes)."
        )
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        clip = int((lengths == 0).nonzero()[0])
        raise ValueError(f"audio_attention_mask marks no real sample in clip {clip}: every clip needs audio.")
    return lengths.tolist()
