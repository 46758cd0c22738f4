"""Feature extractor of Dasheng: 16 kHz waveforms to 64-band log-mel spectrograms (dB), computed in torch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import TensorType, logging

from .configuration_dasheng import copy_code_files

__all__ = ["DashengFeatureExtractor", "htk_mel_filter_bank"]

logger = logging.get_logger(__name__)

# Frames of the STFT computed at once per clip: bounds memory for hours-long audio (1 frame = 10 ms).
_FRAMES_PER_BLOCK = 1 << 16


def htk_mel_filter_bank(
    num_frequency_bins: int, num_mel_filters: int, f_min: float, f_max: float, sampling_rate: int
) -> torch.Tensor:
    """
    Triangular mel filters on the HTK mel scale, `mel = 2595 * log10(1 + hz / 700)`, without area normalisation.

    Computed in float32 like the front end Dasheng was trained with, so features match it bit for bit.

    Returns:
        `(num_frequency_bins, num_mel_filters)` float32 weights; bins are linearly spaced from 0 to Nyquist.
    """
    bin_hz = torch.linspace(0, sampling_rate // 2, num_frequency_bins)
    mel_edges = torch.linspace(
        2595.0 * np.log10(1.0 + f_min / 700.0), 2595.0 * np.log10(1.0 + f_max / 700.0), num_mel_filters + 2
    )
    hz_edges = 700.0 * (10.0 ** (mel_edges / 2595.0) - 1.0)
    widths = hz_edges[1:] - hz_edges[:-1]
    offsets = hz_edges[None, :] - bin_hz[:, None]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.minimum(rising, falling).clamp(min=0.0)


class DashengFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns 16 kHz mono waveforms into the log-mel spectrograms Dasheng was trained on.

    Power mel spectrogram (periodic Hann window, `n_fft` 512, hop 160 samples = 10 ms, centred with reflect padding,
    64 HTK mel bands from 0 to 8 kHz, no filter normalisation), then `10 * log10(max(mel, 1e-10))` floored at
    `top_db` below the clip's own maximum. A clip of `N` samples gives `N // 160 + 1` frames.

    Clips of different lengths are padded on the right to the longest clip, after each clip's own reflect padding,
    so every clip's features equal those computed for it alone; `attention_mask` (1 = real frame) is returned
    whenever clips were padded.

    Args:
        feature_size (`int`, *optional*, defaults to 64): Mel bands.
        sampling_rate (`int`, *optional*, defaults to 16000): Sampling rate the features expect, in Hz.
        padding_value (`float`, *optional*, defaults to 0.0): Value of padded frames.
        n_fft (`int`, *optional*, defaults to 512): FFT size in samples.
        win_size (`int`, *optional*, defaults to 512): Hann window length in samples.
        hop_size (`int`, *optional*, defaults to 160): Hop between frames in samples.
        f_min (`float`, *optional*, defaults to 0): Lowest mel band edge in Hz.
        f_max (`float`, *optional*, defaults to 8000): Highest mel band edge in Hz.
        center (`bool`, *optional*, defaults to `True`): Reflect-pad `n_fft // 2` samples on both sides of a clip.
        top_db (`float`, *optional*, defaults to 120): Dynamic range kept below each clip's maximum, in dB.
        return_attention_mask (`bool`, *optional*, defaults to `True`): Return the mask for unpadded batches too.
            A padded batch always gets its mask, whatever this says.
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 64,
        sampling_rate: int = 16000,
        padding_value: float = 0.0,
        n_fft: int = 512,
        win_size: int = 512,
        hop_size: int = 160,
        f_min: float = 0.0,
        f_max: float = 8000.0,
        center: bool = True,
        top_db: float | None = 120.0,
        return_attention_mask: bool = True,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        if win_size > n_fft:
            raise ValueError(f"win_size ({win_size}) must not exceed n_fft ({n_fft}).")
        self.n_fft = n_fft
        self.win_size = win_size
        self.hop_size = hop_size
        self.f_min = f_min
        self.f_max = f_max
        self.center = center
        self.top_db = top_db
        # (n_fft // 2 + 1, feature_size) float32 triangular HTK filters without normalisation.
        self.mel_filters = htk_mel_filter_bank(n_fft // 2 + 1, feature_size, f_min, f_max, sampling_rate).numpy()

    @classmethod
    def from_dasheng_config(cls, config: Any, **kwargs: Any) -> DashengFeatureExtractor:
        """The feature extractor a [`DashengConfig`] was trained with (its front-end fields)."""
        return cls(
            feature_size=config.num_mel_bins,
            sampling_rate=config.sampling_rate,
            n_fft=config.n_fft,
            win_size=config.win_length,
            hop_size=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            center=config.center,
            top_db=config.top_db,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("mel_filters", None)
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Save `preprocessor_config.json` and the three code files, so the folder loads with `trust_remote_code`."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        copy_code_files(save_directory)
        return files

    @property
    def min_num_samples(self) -> int:
        """Shortest clip in samples: 4 frames, the width of one patch (480 samples at the defaults)."""
        return 3 * self.hop_size if self.center else self.n_fft + 3 * self.hop_size

    def num_frames(self, num_samples: int) -> int:
        """Frames (10 ms each at the defaults) of a clip of `num_samples` samples."""
        if self.center:
            return num_samples // self.hop_size + 1
        return (num_samples - self.n_fft) // self.hop_size + 1

    def __call__(
        self,
        raw_speech: np.ndarray | torch.Tensor | Sequence[float] | Sequence[np.ndarray | torch.Tensor | Sequence[float]],
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        return_attention_mask: bool | None = None,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> BatchFeature:
        """
        Compute log-mel features of one clip or a batch.

        Args:
            raw_speech: One mono clip (1-D numpy array, torch tensor or list of floats), a list of clips, or a 2-D
                `(batch, samples)` array of equal-length clips. A `(2, N)` stereo array is read as two clips: mix it
                down first (`x.mean(0)`). Samples are floats, nominally in [-1, 1].
            sampling_rate: Sampling rate of `raw_speech` in Hz; must be 16000.
            return_tensors: `"pt"`, `"np"` or `None` (lists).
            return_attention_mask: Return `attention_mask` also when no clip was padded.
            device: Where to compute (`"cuda"` for speed); results are moved to the CPU unless `return_tensors="pt"`.

        Returns:
            [`BatchFeature`] with `input_values` `(batch, 64, frames)` float32 log-mel in dB and, when clips were
            padded or asked for, `attention_mask` `(batch, frames)` int32 with 1 on real frames.
        """
        if kwargs:
            logger.warning(f"DashengFeatureExtractor ignores the arguments {sorted(kwargs)}.")
        if sampling_rate is None:
            logger.warning(
                "No sampling_rate was passed to DashengFeatureExtractor. Pass `sampling_rate=16000` to make sure "
                "the audio is at the rate the model expects; a wrong rate silently gives wrong features."
            )
        elif sampling_rate != self.sampling_rate:
            raise ValueError(
                f"The audio is sampled at {sampling_rate} Hz but Dasheng expects {self.sampling_rate} Hz. Resample "
                f"it first, e.g. `torchaudio.functional.resample(x, {sampling_rate}, {self.sampling_rate})`, "
                f"`librosa.resample(x, orig_sr={sampling_rate}, target_sr={self.sampling_rate})`, or with datasets "
                f"`ds.cast_column('audio', Audio(sampling_rate={self.sampling_rate}))`."
            )
        clips = self._to_clips(raw_speech)
        features, num_frames = self.extract_fbank_features(clips, device=device)
        padded = bool((num_frames < features.shape[-1]).any())
        data = {"input_values": features}
        if padded or return_attention_mask or (return_attention_mask is None and self.return_attention_mask):
            frame_index = torch.arange(features.shape[-1], device=num_frames.device)
            data["attention_mask"] = (frame_index[None, :] < num_frames[:, None]).to(torch.int32)
        if return_tensors not in ("pt", TensorType.PYTORCH):
            data = {key: value.cpu().numpy() for key, value in data.items()}
            if return_tensors is None:
                data = {key: list(value) for key, value in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    def _to_clips(self, raw_speech: Any) -> list[torch.Tensor]:
        """Validate the input and return a list of 1-D float32 CPU tensors."""
        if isinstance(raw_speech, (np.ndarray, torch.Tensor)):
            items = [raw_speech] if raw_speech.ndim <= 1 else list(raw_speech) if raw_speech.ndim == 2 else None
            if raw_speech.ndim == 2 and 0 < raw_speech.shape[1] <= 8 < raw_speech.shape[0]:
                raise ValueError(
                    f"Got an array of shape {tuple(raw_speech.shape)}, which looks like (samples, channels). Pass "
                    f"mono clips: mix down with `x.mean(axis=1)`, or pass `x.T` for a batch of {raw_speech.shape[1]}."
                )
            if items is None:
                raise ValueError(
                    f"Expected one clip (samples,) or a batch (batch, samples), got an array of shape "
                    f"{tuple(raw_speech.shape)}. Mix multi-channel audio down to mono and pass clips as a list."
                )
        elif isinstance(raw_speech, (list, tuple)):
            if len(raw_speech) == 0:
                raise ValueError("Got an empty list: pass at least one clip.")
            is_batch = isinstance(raw_speech[0], (np.ndarray, torch.Tensor, list, tuple))
            items = list(raw_speech) if is_batch else [raw_speech]
        else:
            raise ValueError(
                f"Expected audio as a numpy array, torch tensor or list of floats, got {type(raw_speech).__name__}."
            )
        return [self._to_clip(item, index) for index, item in enumerate(items)]

    def _to_clip(self, item: Any, index: int) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            clip = item.detach().cpu()
        else:
            try:
                array = np.asarray(item)
                clip = torch.from_numpy(array if array.flags.writeable else array.copy())
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Clip {index} is not numeric audio ({type(item).__name__}): pass float samples."
                ) from error
        if clip.is_complex() or not clip.is_floating_point():
            hint = ""
            if clip.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
                hint = " Scale integer PCM to [-1, 1] first, e.g. `x.astype(np.float32) / 32768` for 16-bit audio."
            raise ValueError(f"Clip {index} has dtype {clip.dtype}; expected real floating-point samples.{hint}")
        if clip.ndim != 1:
            raise ValueError(
                f"Clip {index} has shape {tuple(clip.shape)}; each clip must be 1-D mono audio. Mix multi-channel "
                f"audio down to mono first."
            )
        if clip.numel() < self.min_num_samples:
            what = "empty" if clip.numel() == 0 else f"{clip.numel()} samples long"
            raise ValueError(
                f"Clip {index} is {what}; Dasheng needs at least {self.min_num_samples} samples "
                f"({1000 * self.min_num_samples / self.sampling_rate:.0f} ms at {self.sampling_rate} Hz)."
            )
        clip = clip.to(torch.float32)
        if not bool(torch.isfinite(clip).all()):
            raise ValueError(f"Clip {index} contains NaN or infinite samples.")
        return clip

    def extract_fbank_features(
        self, clips: list[torch.Tensor], device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Log-mel spectrograms of validated 1-D float32 clips, batched.

        Returns:
            `(features, num_frames)`: features `(batch, feature_size, max_frames)` float32 in dB, padded frames set
            to `padding_value`; `num_frames` `(batch,)` int64, each clip's real frames.
        """
        device = torch.device(device)
        # Always float32, also inside a caller's autocast region: dB values need the precision.
        with torch.autocast(device.type, enabled=False):
            return self._log_mel(clips, device)

    def _log_mel(self, clips: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.n_fft // 2 if self.center else 0
        lengths = [clip.numel() for clip in clips]
        num_frames = torch.tensor([self.num_frames(length) for length in lengths], device=device)
        max_frames = int(num_frames.max())
        # Each clip is reflect-padded at its own ends, then zero-padded on the right to the longest clip.
        signal = torch.zeros(len(clips), (max_frames - 1) * self.hop_size + self.n_fft, device=device)
        width = signal.shape[1]
        for row, clip in enumerate(clips):
            clip = clip.to(device)
            length = clip.numel()
            signal[row, pad : min(pad + length, width)] = clip[: width - pad]
            if pad:  # reflection without repeating the edge sample, written in place (no padded copy of the clip)
                signal[row, :pad] = clip[1 : pad + 1].flip(0)
                right = min(pad, width - pad - length)
                if right > 0:
                    signal[row, pad + length : pad + length + right] = clip[-right - 1 : -1].flip(0)

        window = torch.hann_window(self.win_size, periodic=True, device=device)
        mel_filters = torch.from_numpy(self.mel_filters).to(device)
        log_mel = torch.empty(len(clips), self.feature_size, max_frames, device=device)
        # The STFT is taken block by block so that memory stays bounded for long audio (frames are independent).
        block = max(1, _FRAMES_PER_BLOCK // len(clips))
        for start in range(0, max_frames, block):
            stop = min(start + block, max_frames)
            segment = signal[:, start * self.hop_size : (stop - 1) * self.hop_size + self.n_fft]
            stft = torch.stft(
                segment,
                n_fft=self.n_fft,
                hop_length=self.hop_size,
                win_length=self.win_size,
                window=window,
                center=False,
                return_complex=True,
            )
            power = stft.abs().pow(2)
            mel = torch.matmul(mel_filters.T, power)
            log_mel[:, :, start:stop] = 10.0 * torch.log10(mel.clamp(min=1e-10))

        is_real = torch.arange(max_frames, device=device)[None, :] < num_frames[:, None]
        if self.top_db is not None:
            # Floor at top_db below each clip's own maximum over its real frames.
            peak = log_mel.masked_fill(~is_real[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
            log_mel = torch.maximum(log_mel, peak - self.top_db)
        log_mel = log_mel.masked_fill(~is_real[:, None, :], self.padding_value)
        return log_mel, num_frames


DashengFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
