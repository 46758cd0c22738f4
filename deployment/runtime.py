"""
An exported Dasheng folder run with ONNX Runtime, numpy in and numpy out, without torch: `DashengOnnxEncoder`, and
the front end in numpy, `DashengNumpyFrontEnd` (16 kHz waveforms to `DashengFeatureExtractor`'s log-mel features).

This file imports numpy and onnxruntime only; `dasheng-export` copies it into every export folder as
`dasheng_onnx.py`, so `from dasheng_onnx import DashengOnnxEncoder` works where neither torch nor this package is
installed.

The front end's recipe, step by step (defaults of `DashengFeatureExtractor`; in an export folder `front_end.npz`
holds the exact float32 window and mel filters and `front_end.json` the numbers):
1. reflect-pad each clip by `n_fft // 2` samples at both ends (the edge sample is not repeated);
2. frames of `n_fft` = 512 samples every `hop_size` = 160 samples: `num_samples // 160 + 1` frames;
3. multiply by the periodic Hann window, real FFT, power `|X|^2` (257 bins);
4. mel energies: power `(frames, 257)` @ mel filters `(257, 64)` (HTK scale, 0 to 8 kHz, no area normalisation);
5. `10 * log10(max(mel, 1e-10))`, then floored at `top_db` = 120 dB below the clip's maximum;
6. in a batch, frames after a clip's end hold its silence level `max(-100, peak - top_db)` and the mask is 0.

Steps 1 to 4 run in float64 (with the float32 window and filters), so the features are the exact values of the
recipe, cast to float32; `DashengFeatureExtractor` computes them in float32, whose FFT rounding moves low-energy
bins (60 dB and more below the clip's peak) by up to a few hundredths of a dB.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DashengNumpyFrontEnd", "DashengOnnxEncoder", "DashengOnnxOutput"]

_AMIN = 1e-10
_AMIN_DB = -100.0
_FRAMES_PER_BLOCK = 4096  # frames framed and transformed at once: bounds memory for hours-long clips


class DashengNumpyFrontEnd:
    """
    Log-mel features `(batch, 64, frames)` and a frame mask from 16 kHz mono float waveforms, in numpy.

    Args:
        window: `(win_size,)` float32 analysis window, zero-padded to `n_fft` when shorter (centred).
        mel_filters: `(n_fft // 2 + 1, num_mel_bins)` float32 filters.
        n_fft, hop_size, sampling_rate: STFT size, hop in samples, expected sampling rate in Hz.
        top_db: Dynamic range kept below each clip's maximum (dB), or None.
        center: Reflect-pad each clip by `n_fft // 2` at both ends (Dasheng: True).
    """

    def __init__(
        self,
        window: np.ndarray,
        mel_filters: np.ndarray,
        n_fft: int = 512,
        hop_size: int = 160,
        sampling_rate: int = 16000,
        top_db: float | None = 120.0,
        center: bool = True,
    ):
        window = np.asarray(window, dtype=np.float32)
        if window.shape[0] < n_fft:  # torch.stft centres a shorter window in the frame
            left = (n_fft - window.shape[0]) // 2
            window = np.pad(window, (left, n_fft - window.shape[0] - left))
        self.window = window.astype(np.float64)
        self.mel_filters = np.asarray(mel_filters, dtype=np.float32).astype(np.float64)
        self.n_fft, self.hop_size, self.sampling_rate = n_fft, hop_size, sampling_rate
        self.top_db, self.center = top_db, center

    @classmethod
    def from_folder(cls, folder: str | Path) -> DashengNumpyFrontEnd:
        """The front end saved by `dasheng-export` (`front_end.npz` and `front_end.json`) in `folder`."""
        folder = Path(folder)
        arrays = np.load(folder / "front_end.npz")
        settings = json.loads((folder / "front_end.json").read_text())
        return cls(arrays["window"], arrays["mel_filters"], **settings)

    @property
    def min_num_samples(self) -> int:
        """Shortest clip: 4 frames (one 40 ms patch), as `DashengFeatureExtractor` requires."""
        if self.center:
            return max(3 * self.hop_size, self.n_fft // 2 + 1)
        return self.n_fft + 3 * self.hop_size

    def num_frames(self, num_samples: int) -> int:
        """Frames of a clip of `num_samples` samples."""
        if self.center:
            return num_samples // self.hop_size + 1
        return (num_samples - self.n_fft) // self.hop_size + 1

    def log_mel(self, waveform: Any) -> np.ndarray:
        """One clip `(samples,)` to its features `(num_mel_bins, frames)` float32 in dB (top_db floor applied)."""
        clip = self._check_clip(waveform)
        if self.center:
            pad = self.n_fft // 2
            clip = np.concatenate([clip[1 : pad + 1][::-1], clip, clip[-pad - 1 : -1][::-1]])
        num_frames = self.num_frames(len(clip) - (2 * (self.n_fft // 2) if self.center else 0))
        log_mel = np.empty((self.mel_filters.shape[1], num_frames), dtype=np.float64)
        for start in range(0, num_frames, _FRAMES_PER_BLOCK):
            stop = min(start + _FRAMES_PER_BLOCK, num_frames)
            offsets = np.arange(start, stop)[:, None] * self.hop_size + np.arange(self.n_fft)[None, :]
            power = np.abs(np.fft.rfft(clip[offsets] * self.window, axis=-1)) ** 2  # (frames, bins)
            log_mel[:, start:stop] = 10.0 * np.log10(np.maximum(power @ self.mel_filters, _AMIN)).T
        log_mel = log_mel.astype(np.float32)
        if self.top_db is not None:
            log_mel = np.maximum(log_mel, log_mel.max() - np.float32(self.top_db))
        return log_mel

    def __call__(self, waveforms: Any, sampling_rate: int | None = None) -> dict[str, np.ndarray]:
        """
        A clip or a list of clips to `{"input_values": (batch, mel, frames) float32, "attention_mask": (batch,
        frames) int64}`, padded on the right to the longest clip.
        """
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"The audio is sampled at {sampling_rate} Hz but Dasheng expects {self.sampling_rate} Hz: resample "
                f"it first."
            )
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1 or not isinstance(waveforms, (list, tuple)):
            waveforms = [waveforms]
        features = [self.log_mel(clip) for clip in waveforms]
        frames = max(feature.shape[1] for feature in features)
        input_values = np.empty((len(features), features[0].shape[0], frames), dtype=np.float32)
        attention_mask = np.zeros((len(features), frames), dtype=np.int64)
        for row, feature in enumerate(features):
            silence = _AMIN_DB if self.top_db is None else max(_AMIN_DB, float(feature.max()) - self.top_db)
            input_values[row] = silence
            input_values[row, :, : feature.shape[1]] = feature
            attention_mask[row, : feature.shape[1]] = 1
        return {"input_values": input_values, "attention_mask": attention_mask}

    def _check_clip(self, waveform: Any) -> np.ndarray:
        clip = np.asarray(waveform)
        if clip.ndim != 1 or not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(
                f"Each clip must be 1-D float audio in [-1, 1] at {self.sampling_rate} Hz, got an array of shape "
                f"{clip.shape} and dtype {clip.dtype}."
            )
        if clip.shape[0] < self.min_num_samples:
            raise ValueError(f"A clip of {clip.shape[0]} samples is too short: at least {self.min_num_samples}.")
        if not np.isfinite(clip).all():
            raise ValueError("A clip contains NaN or infinite samples.")
        return clip.astype(np.float32).astype(np.float64)


# The exported graphs take at least 8 frames; shorter batches are padded (mask 0) and the outputs cut back.
_MIN_FRAMES = 8


@dataclass
class DashengOnnxOutput:
    """
    Args:
        last_hidden_state: `(batch, frames // 4, hidden_size)` float32 token embeddings (25 Hz), zeros at padding.
        pooler_output: `(batch, hidden_size)` float32, the mean of each clip's real tokens.
        logits: `(batch, num_labels)` float32 before softmax/sigmoid, for a model with a head; else None.
    """

    last_hidden_state: np.ndarray
    pooler_output: np.ndarray
    logits: np.ndarray | None = None


class DashengOnnxEncoder:
    """
    An exported Dasheng (`dasheng-export`): log-mel features or 16 kHz waveforms to embeddings with ONNX Runtime.

    Args:
        folder: The export folder (`model.onnx`, `front_end.npz`, `front_end.json`, `dasheng_export.json`).
        quantized: Load `model_quantized.onnx` (int8) instead of `model.onnx`.
        num_threads: ONNX Runtime intra-op threads (None: its default, all cores).
        providers: ONNX Runtime execution providers (default: CPU).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        quantized: bool = False,
        num_threads: int | None = None,
        providers: list[str] | None = None,
    ):
        import onnxruntime

        self.folder = Path(folder)
        path = self.folder / ("model_quantized.onnx" if quantized else "model.onnx")
        if not path.is_file():
            hint = " Export with --quantize int8." if quantized else ""
            raise FileNotFoundError(f"{path} does not exist: pass a folder written by dasheng-export.{hint}")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]
        info_path = self.folder / "dasheng_export.json"
        self.info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.is_file() else {}
        self.front_end = DashengNumpyFrontEnd.from_folder(self.folder)

    @property
    def id2label(self) -> dict[int, str]:
        """Class names of a classifier by index (empty for an encoder)."""
        return {int(index): name for index, name in self.info.get("id2label", {}).items()}

    def __call__(self, input_values: np.ndarray, attention_mask: np.ndarray | None = None) -> DashengOnnxOutput:
        """
        Args:
            input_values: Log-mel features `(batch, 64, frames)` float32 (at least 4 frames).
            attention_mask: `(batch, frames)`, 1 for real frames then 0 (None: nothing is padded).
        """
        input_values = np.asarray(input_values, dtype=np.float32)
        if input_values.ndim != 3 or input_values.shape[1] != self.front_end.mel_filters.shape[1]:
            raise ValueError(
                f"input_values must be log-mel features (batch, {self.front_end.mel_filters.shape[1]}, frames), got "
                f"shape {input_values.shape}: compute them with `encode_audio` or the front end."
            )
        batch, _, frames = input_values.shape
        if attention_mask is None:
            attention_mask = np.ones((batch, frames), dtype=np.int64)
        attention_mask = np.asarray(attention_mask).astype(np.int64)
        if attention_mask.shape != (batch, frames):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(batch, frames)}.")
        if frames < 4 or attention_mask.sum(axis=1).min() < 4:
            raise ValueError("Every clip needs at least 4 real frames (480 samples at 16 kHz).")
        if frames < _MIN_FRAMES:  # padding under a zero mask changes nothing
            input_values = np.pad(input_values, ((0, 0), (0, 0), (0, _MIN_FRAMES - frames)), mode="edge")
            attention_mask = np.pad(attention_mask, ((0, 0), (0, _MIN_FRAMES - frames)))
        outputs = dict(
            zip(
                self.output_names,
                self.session.run(None, {"input_values": input_values, "attention_mask": attention_mask}),
            )
        )
        return DashengOnnxOutput(
            last_hidden_state=outputs["last_hidden_state"][:, : frames // 4],
            pooler_output=outputs["pooler_output"],
            logits=outputs.get("logits"),
        )

    def encode_audio(self, waveforms: Any, sampling_rate: int = 16000) -> DashengOnnxOutput:
        """One 16 kHz mono float clip `(samples,)` or a list of them, through the numpy front end and the graph."""
        return self(**self.front_end(waveforms, sampling_rate=sampling_rate))
