"""
Decoding audio for every tool: files or bytes to mono float32 at 16 kHz (soundfile, or torchcodec/FFmpeg for
formats soundfile cannot read; channels averaged; resampled with a Hann-windowed sinc filter, 6 zero crossings,
roll-off 0.99: torchaudio's default, which [`resample`] equals computed in float64 to about 1e-6), and cutting
waveforms into sequential crops.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is resampled: decoding files needs only numpy
    import torch

__all__ = [
    "AUDIO_EXTENSIONS",
    "MIN_SAMPLES",
    "SAMPLING_RATE",
    "DashengAudioError",
    "crop_audio",
    "decode_audio",
    "resample",
]

SAMPLING_RATE = 16000
MIN_SAMPLES = 480  # 30 ms at 16 kHz: the shortest input Dasheng encodes (one 40 ms token needs 3 frames)
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "aiff", "aif", "au", "w64", "webm", "mka", "caf")
_ZERO_CROSSINGS, _ROLLOFF = 6, 0.99
_BLOCK_STEPS = 16384  # resampling: output steps per matrix product


class DashengAudioError(ValueError):
    """A source or file that cannot be used; the message names it and says how to fix it."""


def resample(waveform: np.ndarray | torch.Tensor, orig_rate: int, new_rate: int) -> np.ndarray | torch.Tensor:
    """
    Resample `(..., samples)` from `orig_rate` to `new_rate` Hz (band-limited sinc interpolation, Hann window).

    Returns `ceil(samples * new_rate / orig_rate)` samples, of the input's type (numpy or torch) and float dtype.
    Computed with numpy on the CPU, in blocks (bounded memory for hours of audio).
    """
    if orig_rate == new_rate:
        return waveform
    divisor = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // divisor, int(orig_rate) // divisor
    is_torch = type(waveform).__module__.startswith("torch")
    signal = np.asarray(waveform.detach().float().cpu() if is_torch else waveform, dtype=np.float32)
    kernel, half_width = _sinc_kernel(down, up)
    shape, length = signal.shape[:-1], signal.shape[-1]
    padded = np.pad(signal.reshape(-1, length), ((0, 0), (half_width, half_width + down)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=-1)[:, ::down]  # (n, steps, taps)
    output = np.empty((*windows.shape[:2], up), dtype=np.float32)
    for start in range(0, windows.shape[1], _BLOCK_STEPS):
        output[:, start : start + _BLOCK_STEPS] = windows[:, start : start + _BLOCK_STEPS] @ kernel
    output = output.reshape(*shape, -1)[..., : math.ceil(length * up / down)]
    if not is_torch:
        return output
    import torch

    return torch.from_numpy(output).to(waveform.device, waveform.dtype)


@functools.lru_cache(maxsize=16)
def _sinc_kernel(down: int, up: int) -> tuple[np.ndarray, int]:
    """`(taps, up)` filters, one per output phase, for coprime rates `down -> up`; and the input padding."""
    cutoff = min(down, up) * _ROLLOFF  # in units of the common base rate
    half_width = math.ceil(_ZERO_CROSSINGS * down / cutoff)
    offsets = np.arange(-half_width, half_width + down) / down
    time = (offsets[:, None] - np.arange(up)[None, :] / up) * cutoff
    time = time.clip(-_ZERO_CROSSINGS, _ZERO_CROSSINGS)
    window = np.cos(time * math.pi / (2 * _ZERO_CROSSINGS)) ** 2
    return (np.sinc(time) * window * (cutoff / down)).astype(np.float32), half_width


def decode_audio(
    source: str | os.PathLike | bytes, name: str | None = None, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """
    Decode a file (path or bytes) to mono float32 samples in [-1, 1] at `sampling_rate`: `(samples,)`.

    Raises:
        DashengAudioError: unreadable, not a regular file, no samples (empty or header-only) or non-finite samples;
            the message names `name` (default: the path).
    """
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("<audio bytes>" if is_bytes else os.fspath(source))
    if not is_bytes and not os.path.isfile(source):
        reason = "does not exist" if not os.path.exists(source) else "is not a regular file"
        raise DashengAudioError(f"{name}: {reason}.")
    if (len(source) if is_bytes else os.path.getsize(source)) == 0:
        raise DashengAudioError(f"{name}: empty (0 bytes).")
    _check_wav_length(source, name, is_bytes)
    try:
        import soundfile

        data, rate = soundfile.read(io.BytesIO(source) if is_bytes else source, dtype="float32", always_2d=True)
        waveform = data.mean(axis=1, dtype=np.float32)
    except Exception as soundfile_error:
        waveform, rate = _decode_with_torchcodec(source, name, soundfile_error)
    if waveform.size == 0:
        raise DashengAudioError(f"{name}: no audio samples (an empty or header-only file).")
    if not np.isfinite(waveform).all():
        raise DashengAudioError(f"{name}: holds NaN or infinite samples.")
    return np.asarray(resample(waveform, rate, sampling_rate), dtype=np.float32)


def _check_wav_length(source: Any, name: str, is_bytes: bool) -> None:
    """Refuse a WAV file whose data chunk is shorter than its header says (decoders read what is there silently)."""
    try:
        handle = io.BytesIO(bytes(source)) if is_bytes else open(source, "rb")
    except OSError:
        return  # the decoder reports it
    with handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        total = handle.seek(0, io.SEEK_END)
        offset = 12
        while offset + 8 <= total:
            handle.seek(offset)
            chunk, size = handle.read(4), int.from_bytes(handle.read(4), "little")
            if chunk == b"data":
                available = total - offset - 8
                if 0 < size < 0xFFFFFFFF and size > available:  # 0 and 0xFFFFFFFF: a stream of unknown length
                    raise DashengAudioError(
                        f"{name}: truncated: its WAV header declares {size} bytes of audio but the file holds "
                        f"{available} ({100 * available / size:.0f}%); copy or download it again."
                    )
                return
            offset += 8 + size + (size & 1)


def _first_line(error: BaseException) -> str:
    """`Type: first line of the message` (torchcodec's load errors run to pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")


def _decode_with_torchcodec(source: Any, name: str, soundfile_error: Exception) -> tuple[np.ndarray, int]:
    cannot = f"{name}: soundfile cannot read it ({_first_line(soundfile_error)})"
    try:
        from torchcodec.decoders import AudioDecoder
    except ImportError as error:
        raise DashengAudioError(
            f"{cannot}; for other formats install torchcodec and FFmpeg (pip install torchcodec; apt-get install "
            f"ffmpeg) ({_first_line(error)})."
        ) from error
    except Exception as error:  # installed but not loadable (OSError, RuntimeError)
        raise DashengAudioError(_unloadable(cannot, error)) from error
    try:
        samples = AudioDecoder(bytes(source) if isinstance(source, memoryview) else source).get_all_samples()
        return samples.data.mean(dim=0).numpy(), int(samples.sample_rate)
    except Exception as error:
        if "Could not load libtorchcodec" in str(error):  # torchcodec loads FFmpeg on first use
            raise DashengAudioError(_unloadable(cannot, error)) from error
        raise DashengAudioError(f"{name}: unreadable audio ({_first_line(error)}).") from error


def _unloadable(cannot: str, error: BaseException) -> str:
    import torch

    return (
        f"{cannot}, and torchcodec, which reads other formats, does not load ({_first_line(error)}): install FFmpeg "
        f"(apt-get install ffmpeg), or the torchcodec release made for your torch {torch.__version__} (see "
        f"torchcodec's compatibility table)."
    )


def crop_audio(waveform: np.ndarray, crop_samples: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """
    Consecutive crops of `crop_samples`, as the original pretraining cuts them: `(crop, num_samples, offset)`.

    The last partial crop is dropped, unless the clip is shorter than one crop: then the clip is zero-padded to
    `crop_samples` and `num_samples` is its real length (for an attention mask).
    """
    if len(waveform) < crop_samples:
        padded = np.zeros(crop_samples, dtype=np.float32)
        padded[: len(waveform)] = waveform
        yield padded, len(waveform), 0
        return
    for offset in range(0, len(waveform) - crop_samples + 1, crop_samples):
        yield waveform[offset : offset + crop_samples], crop_samples, offset
