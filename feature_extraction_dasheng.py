"""Feature extractor of Dasheng: 16 kHz waveforms to 64-band log-mel spectrograms (dB), computed in torch."""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import PaddingStrategy, TensorType, logging

from .configuration_dasheng import copy_code_files, json_object

__all__ = ["DashengFeatureExtractor", "htk_mel_filter_bank"]

logger = logging.get_logger(__name__)

# Frames of the STFT computed at once per clip: bounds memory for hours-long audio (1 frame = 10 ms).
_FRAMES_PER_BLOCK = 1 << 16
# Frames per mel filter-bank product (see `_log_mel`).
_MEL_FRAMES = 1 << 12
# Clips with a sample above this magnitude could overflow float32 power spectra (from about 2e15 at n_fft 512):
# they are computed in float64, so that their dB values are exact; all other clips keep the float32 path.
_FLOAT32_SAFE_PEAK = 1e12
# dB of a frame of zero samples, `10 * log10(1e-10)`: the floor of every feature, before the top_db floor.
_AMIN_DB = -100.0


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


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _positive_int(name: str, value: Any, fix: str) -> int:
    if not (isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value > 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}). {fix}")
    return int(value)


def _padding_arguments(
    padding: Any, max_length: Any, truncation: Any, pad_to_multiple_of: Any, unit: str
) -> tuple[str, int | None]:
    """Check padding options as Transformers' feature extractors take them; returns the strategy and max_length."""
    if padding is True:
        padding = "longest"
    elif padding is False:
        padding = "do_not_pad"
    choices = [strategy.value for strategy in PaddingStrategy]
    if isinstance(padding, PaddingStrategy):
        padding = padding.value
    if padding not in choices:
        raise ValueError(f"padding must be True, False or one of {choices}, got {padding!r}.")
    if max_length is not None:
        max_length = _positive_int("max_length", max_length, f"It is a length in {unit}.")
    if pad_to_multiple_of is not None:
        pad_to_multiple_of = _positive_int("pad_to_multiple_of", pad_to_multiple_of, f"It is a length in {unit}.")
    if not isinstance(truncation, (bool, np.bool_)):
        raise ValueError(f"truncation must be True or False, got {truncation!r}.")
    if padding == "max_length" and max_length is None:
        raise ValueError(f"padding='max_length' needs max_length (in {unit}); or pass padding=True for the longest.")
    if truncation and max_length is None:
        raise ValueError(f"truncation=True needs max_length (in {unit}), the length to cut to.")
    if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
        max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
    return padding, max_length


def _target_length(
    lengths: list[int], padding: str, max_length: int | None, pad_to_multiple_of: int | None, unit: str
) -> int | None:
    """The padded length (in `unit`) of clips of `lengths` (already truncated), or None without padding."""
    if padding == "do_not_pad":
        return None
    if padding == "max_length":
        longer = [index for index, length in enumerate(lengths) if length > max_length]
        if longer:
            raise ValueError(
                f"Clip {longer[0]} has {lengths[longer[0]]} {unit}, more than max_length={max_length} with "
                f"padding='max_length': pass truncation=True to cut clips to max_length, or a larger max_length."
            )
        target = max_length
    else:
        target = max(lengths)
    if pad_to_multiple_of is not None:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    return target


def _examples(processed_features: Any, name: str) -> list[Mapping[str, Any]]:
    """`pad`'s input as a list of examples (mappings), each with `name`."""
    if isinstance(processed_features, Mapping):
        if name not in processed_features:
            raise ValueError(f"pad needs {name!r} among the features, got keys {sorted(processed_features)}.")
        batch = dict(processed_features)
        if isinstance(batch[name], (torch.Tensor, np.ndarray)) and batch[name].ndim == 2:  # one example
            batch = {key: [value] for key, value in batch.items()}
        values = batch[name]
        if not isinstance(values, (list, tuple, torch.Tensor, np.ndarray)) or len(values) == 0:
            raise ValueError(f"pad needs a non-empty batch of {name}, got {type(values).__name__}.")
        return [{key: value[index] for key, value in batch.items()} for index in range(len(values))]
    if isinstance(processed_features, (list, tuple)) and processed_features:
        for index, example in enumerate(processed_features):
            if not isinstance(example, Mapping) or name not in example:
                raise ValueError(
                    f"pad takes a list of examples with {name!r} (from DashengFeatureExtractor); example {index} is "
                    f"{type(example).__name__}"
                    + (f" with keys {sorted(example)}." if isinstance(example, Mapping) else ".")
                )
        return list(processed_features)
    raise ValueError(
        f"pad takes a BatchFeature, a dict with {name!r} or a non-empty list of such examples, got "
        f"{type(processed_features).__name__}."
    )


class DashengFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns 16 kHz mono waveforms into the log-mel spectrograms Dasheng was trained on.

    Power mel spectrogram (periodic Hann window, `n_fft` 512, hop 160 samples = 10 ms, centred with reflect padding,
    64 HTK mel bands from 0 to 8 kHz, no filter normalisation), then `10 * log10(max(mel, 1e-10))` floored at
    `top_db` below the clip's own maximum. A clip of `N` samples gives `N // 160 + 1` frames. Any finite float32
    audio gives finite features: clips with samples beyond 1e12 (unnormalised audio) are computed in float64.

    Clips of different lengths are padded on the right to the longest clip, after each clip's own reflect padding,
    so every clip's features equal those computed for it alone; `attention_mask` (1 = real frame) is returned
    whenever clips were padded. Padded frames hold each clip's silence level, the value the original front end gives
    to zero samples appended to that clip alone: `max(-100, peak - top_db)` dB, `peak` the clip's maximum (-100 dB
    without `top_db`), so a model that reads them (no mask passed) hears silence. [`~DashengFeatureExtractor.pad`] pads
    features computed clip by clip the same way, so `DataCollatorWithPadding(feature_extractor)` and Trainer's
    default collator work.

    Args:
        feature_size (`int`, *optional*, defaults to 64): Mel bands.
        sampling_rate (`int`, *optional*, defaults to 16000): Sampling rate the features expect, in Hz.
        padding_value (`float`, *optional*): Value of padded frames in dB; None (the default) for each clip's silence
            level. A first-port config (no `top_db` key) with `padding_value` 0.0, which meant zero samples there,
            loads as None.
        n_fft (`int`, *optional*, defaults to 512): FFT size in samples.
        win_size (`int`, *optional*, defaults to 512): Hann window length in samples, at most `n_fft`.
        hop_size (`int`, *optional*, defaults to 160): Hop between frames in samples.
        f_min (`float`, *optional*, defaults to 0): Lowest mel band edge in Hz, `0 <= f_min < f_max`.
        f_max (`float`, *optional*, defaults to 8000): Highest mel band edge in Hz, at most `sampling_rate / 2`
            (None: `sampling_rate / 2`).
        center (`bool`, *optional*, defaults to `True`): Reflect-pad `n_fft // 2` samples on both sides of a clip.
        top_db (`float`, *optional*, defaults to 120): Dynamic range kept below each clip's maximum, in dB (positive,
            or None for no floor).
        return_attention_mask (`bool`, *optional*, defaults to `True`): Return the mask for unpadded batches too.
            A padded batch always gets its mask, whatever this says.
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 64,
        sampling_rate: int = 16000,
        padding_value: float | None = None,
        n_fft: int = 512,
        win_size: int = 512,
        hop_size: int = 160,
        f_min: float = 0.0,
        f_max: float | None = 8000.0,
        center: bool = True,
        top_db: float | None = 120.0,
        return_attention_mask: bool = True,
        **kwargs,
    ):
        feature_size = _positive_int("feature_size", feature_size, "Dasheng uses 64 mel bands.")
        sampling_rate = _positive_int("sampling_rate", sampling_rate, "Dasheng expects 16000 Hz.")
        n_fft = _positive_int("n_fft", n_fft, "Dasheng uses 512.")
        win_size = _positive_int("win_size", win_size, "Dasheng uses 512.")
        hop_size = _positive_int("hop_size", hop_size, "Dasheng uses 160 (10 ms).")
        if win_size > n_fft:
            raise ValueError(f"win_size ({win_size}) must not exceed n_fft ({n_fft}); Dasheng uses 512 for both.")
        nyquist = sampling_rate / 2
        f_max = nyquist if f_max is None else f_max
        if not all(_is_real(value) and math.isfinite(value) for value in (f_min, f_max)) or not (
            0 <= f_min < f_max <= nyquist
        ):
            raise ValueError(
                f"The mel band edges must be numbers with 0 <= f_min < f_max <= sampling_rate / 2 ({nyquist:g} Hz); "
                f"got f_min={f_min!r}, f_max={f_max!r}, sampling_rate={sampling_rate}. Dasheng uses 0 and 8000 Hz."
            )
        if top_db is not None and not (_is_real(top_db) and 0 < top_db < math.inf):
            raise ValueError(f"top_db must be a positive number of dB or None, got {top_db!r}; Dasheng uses 120.")
        for name, value in (("center", center), ("return_attention_mask", return_attention_mask)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, got {value!r}.")
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=bool(return_attention_mask),
            **kwargs,
        )
        self.n_fft = n_fft
        self.win_size = win_size
        self.hop_size = hop_size
        self.f_min = float(f_min)
        self.f_max = float(f_max)
        self.center = bool(center)
        self.top_db = None if top_db is None else float(top_db)
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

    @classmethod
    def from_dict(cls, feature_extractor_dict: dict[str, Any], **kwargs: Any) -> Any:
        """From a `preprocessor_config.json` object; settings among `kwargs` override it, also those it lacks. The
        first port's configs (no `top_db`) padded with zeros: their `padding_value` 0.0 becomes None (silence)."""
        feature_extractor_dict = json_object(feature_extractor_dict, "preprocessor_config.json")
        if "top_db" not in feature_extractor_dict and feature_extractor_dict.get("padding_value") == 0.0:
            feature_extractor_dict = {**feature_extractor_dict, "padding_value": None}
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in names}
        return super().from_dict({**feature_extractor_dict, **overrides}, **kwargs)

    @property
    def padding_value(self) -> float:
        """
        dB of padded frames for code that pads features itself (Transformers' pipeline collation, which also pads the
        mask): the fixed `padding_value`, or -100 (the lowest silence level) where each clip gets its own (None).
        """
        return _AMIN_DB if self._padding_value is None else self._padding_value

    @padding_value.setter
    def padding_value(self, value: float | None) -> None:
        if value is not None and not (_is_real(value) and math.isfinite(value)):
            raise ValueError(
                f"padding_value must be a finite number of dB or None (each clip's silence level), got {value!r}."
            )
        self._padding_value = None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("mel_filters", None)
        output["padding_value"] = output.pop("_padding_value")
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Save `preprocessor_config.json` and the code files, so the folder loads with `trust_remote_code`."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        copy_code_files(save_directory)
        return files

    @property
    def min_num_samples(self) -> int:
        """Shortest clip in samples: 4 frames, the width of one patch (480 samples at the defaults)."""
        if self.center:  # reflect padding needs more samples than it reflects
            return max(3 * self.hop_size, self.n_fft // 2 + 1)
        return self.n_fft + 3 * self.hop_size

    def num_frames(self, num_samples: int) -> int:
        """Frames (10 ms each at the defaults) of a clip of `num_samples` samples."""
        if self.center:
            return num_samples // self.hop_size + 1
        return (num_samples - self.n_fft) // self.hop_size + 1

    def __call__(
        self,
        raw_speech: np.ndarray | torch.Tensor | Sequence[float] | Sequence[np.ndarray | torch.Tensor | Sequence[float]],
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = "pt",
        return_attention_mask: bool | None = None,
        padding: bool | str | PaddingStrategy = True,
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
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
            return_tensors: `"pt"` (the default, as in the first Hub port), `"np"` or `None` (lists of arrays).
            return_attention_mask: Return `attention_mask` also when no clip was padded.
            padding: `True` or `"longest"`: pad to the longest clip; `"max_length"`: pad to `max_length` samples;
                `False` or `"do_not_pad"`: clips of different lengths come back as a list (`return_tensors=None`).
            max_length: In samples: the length that `padding="max_length"` pads to and `truncation` cuts to.
            truncation: Keep only the first `max_length` samples of longer clips.
            pad_to_multiple_of: Round the padded length (in samples) up to a multiple of this.
            device: Where to compute (`"cuda"` for speed); results are moved to the CPU unless `return_tensors="pt"`.

        Returns:
            [`BatchFeature`] with `input_values` `(batch, 64, frames)` float32 log-mel in dB and, when clips were
            padded or asked for, `attention_mask` `(batch, frames)` int32 with 1 on real frames. Padded frames hold
            the clip's silence level (or `padding_value`); every clip's real frames equal those of the clip alone.
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
        padding, max_length = _padding_arguments(padding, max_length, truncation, pad_to_multiple_of, "samples")
        if max_length is not None and max_length < self.min_num_samples and (truncation or padding == "max_length"):
            raise ValueError(
                f"max_length ({max_length} samples) is shorter than the shortest clip Dasheng accepts "
                f"({self.min_num_samples} samples); pass a larger max_length."
            )
        clips = self._to_clips(raw_speech)
        if truncation:
            clips = [clip[:max_length] for clip in clips]
        lengths = [clip.numel() for clip in clips]
        target = _target_length(lengths, padding, max_length, pad_to_multiple_of, "samples")
        features, num_frames = self.extract_fbank_features(clips, device=device)
        if target is not None and self.num_frames(target) > features.shape[-1]:
            extra = self.num_frames(target) - features.shape[-1]
            features = self._fill_padding(torch.nn.functional.pad(features, (0, extra)), num_frames)
        return self._batch(features, num_frames, padding, return_attention_mask, return_tensors)

    def pad(
        self,
        processed_features: BatchFeature | Mapping[str, Any] | Sequence[Mapping[str, Any]],
        padding: bool | str | PaddingStrategy = True,
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | TensorType | None = None,
    ) -> BatchFeature:
        """
        Pad features made by this extractor (clip by clip or in batches) into one batch along frames.

        This is what `DataCollatorWithPadding(feature_extractor)` and Trainer's default collator call. Each example's
        `input_values` is `(64, frames)` (or `(1, 64, frames)`), as a tensor, array or nested lists; an example's own
        `attention_mask` (`(frames,)` or `(1, frames)`) marks frames that are already padding. Other keys (e.g.
        `labels`) are batched as they are.

        Args:
            processed_features: A list of such examples, or one [`BatchFeature`] / dict of batched values.
            padding, truncation: As in `__call__`; `padding=False` with clips of different lengths gives lists of
                numpy arrays, each clip's `(64, frames)` real frames (with the default `return_tensors=None`).
            max_length, pad_to_multiple_of: As in `__call__`, but in frames: this pads features, not audio.
            return_attention_mask: Return `attention_mask` also when nothing was padded.
            return_tensors: `"pt"`, `"np"` or `None` (the type of the input: tensors give `"pt"`, otherwise `"np"`).

        Returns:
            [`BatchFeature`] with `input_values` `(batch, 64, frames)` float32 and, when padded or asked for,
            `attention_mask` `(batch, frames)` int32; equal to extracting the clips together in one call.
        """
        examples = _examples(processed_features, self.model_input_names[0])
        name = self.model_input_names[0]
        padding, max_length = _padding_arguments(padding, max_length, truncation, pad_to_multiple_of, "frames")
        items, lengths, silence = [], [], []
        for index, example in enumerate(examples):
            item, length = self._feature_item(example[name], example.get("attention_mask"), index)
            items.append(item)
            silence.append(self._silence_db(item[None], torch.tensor([length])))  # from all its real frames
            lengths.append(min(length, max_length) if truncation else length)
        if return_tensors is None and (padding != "do_not_pad" or len(set(lengths)) == 1):
            return_tensors = "pt" if isinstance(examples[0][name], torch.Tensor) else "np"
        target = _target_length(lengths, padding, max_length, pad_to_multiple_of, "frames")
        width = max(lengths) if target is None else target
        features = torch.zeros(len(items), self.feature_size, width, dtype=torch.float32)
        for row, (item, length) in enumerate(zip(items, lengths)):
            features[row, :, :length] = item[:, :length]
        features = self._fill_padding(features, torch.tensor(lengths), torch.cat(silence))
        batch = self._batch(features, torch.tensor(lengths), padding, return_attention_mask, return_tensors)
        for key in examples[0]:
            if key not in (name, "attention_mask"):
                batch[key] = [example[key] for example in examples]
        return BatchFeature(dict(batch), tensor_type=return_tensors)

    def _feature_item(self, values: Any, mask: Any, index: int) -> tuple[torch.Tensor, int]:
        """One example's features as a `(feature_size, frames)` float32 tensor and its number of real frames."""
        try:
            item = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
        except (TypeError, ValueError) as error:
            raise ValueError(f"Example {index}: input_values is not a numeric array ({error}).") from error
        item = item[0] if item.ndim == 3 and item.shape[0] == 1 else item
        if item.ndim != 2 or item.shape[0] != self.feature_size or not (item.is_floating_point()):
            hint = "Pass the features that DashengFeatureExtractor returns."
            if item.ndim == 2 and item.shape[1] == self.feature_size:
                hint = "This looks like (frames, mel bins): Dasheng features are (mel bins, frames); transpose them."
            elif item.ndim == 1:
                hint = "This looks like a waveform: run it through the feature extractor first."
            raise ValueError(
                f"Example {index}: input_values has shape {tuple(item.shape)} and dtype {item.dtype}; expected float "
                f"features of shape ({self.feature_size}, frames). {hint}"
            )
        length = item.shape[1]
        if mask is not None:
            mask = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
            mask = mask[0] if mask.ndim == 2 and mask.shape[0] == 1 else mask
            length = int((mask != 0).sum()) if mask.ndim == 1 else -1
            if (
                mask.shape != (item.shape[1],)
                or not bool(((mask == 0) | (mask == 1)).all())
                or (length and not bool((mask[:length] == 1).all()))
            ):
                raise ValueError(
                    f"Example {index}: attention_mask of shape {tuple(mask.shape)} does not fit input_values "
                    f"{tuple(item.shape)}: it must be ({item.shape[1]},), 1 on real frames then 0 on padding."
                )
        return item.to(torch.float32), length

    def _batch(
        self,
        features: torch.Tensor,
        num_frames: torch.Tensor,
        padding: str,
        return_attention_mask: bool | None,
        return_tensors: str | TensorType | None,
    ) -> BatchFeature:
        """The BatchFeature of padded `features` `(batch, mel, frames)` with `num_frames` real frames each."""
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        with_mask = bool((num_frames < features.shape[-1]).any()) or return_attention_mask
        frame_index = torch.arange(features.shape[-1], device=num_frames.device)
        mask = (frame_index[None, :] < num_frames[:, None]).to(torch.int32)
        if padding == "do_not_pad" and bool((num_frames != features.shape[-1]).any()):
            if return_tensors is not None:
                raise ValueError(
                    "With padding=False the clips keep their own lengths, which differ, so they cannot be one "
                    f"{return_tensors!r} tensor: pass padding=True (pad to the longest) or return_tensors=None (lists)."
                )
            values = [row[:, :frames].cpu().numpy() for row, frames in zip(features, num_frames.tolist())]
            masks = [row[:frames].cpu().numpy() for row, frames in zip(mask, num_frames.tolist())]
            data = {"input_values": values, **({"attention_mask": masks} if return_attention_mask else {})}
            return BatchFeature(data)
        data = {"input_values": features, **({"attention_mask": mask} if with_mask else {})}
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
        if not bool(torch.isfinite(clip).all()):
            raise ValueError(f"Clip {index} contains NaN or infinite samples.")
        samples = clip.to(torch.float32)
        if not bool(torch.isfinite(samples).all()):
            raise ValueError(
                f"Clip {index} has samples beyond the float32 range (up to {float(clip.abs().max()):.3g}); the audio "
                f"looks unnormalised: scale it to [-1, 1] first, e.g. `x / np.abs(x).max()`."
            )
        return samples

    def extract_fbank_features(
        self, clips: list[torch.Tensor], device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Log-mel spectrograms of validated 1-D float32 clips, batched.

        Returns:
            `(features, num_frames)`: features `(batch, feature_size, max_frames)` float32 in dB, padded frames set
            to each clip's silence level (or `padding_value`); `num_frames` `(batch,)` int64, each clip's real
            frames. A clip's features do not depend on the other clips of the batch, to the last bit.
        """
        device = torch.device(device)
        num_frames = torch.tensor([self.num_frames(clip.numel()) for clip in clips], device=device)
        log_mel = torch.empty(len(clips), self.feature_size, int(num_frames.max()), device=device)
        loud = [bool(clip.abs().max() > _FLOAT32_SAFE_PEAK) for clip in clips]
        # Always float32, also inside a caller's autocast region: dB values need the precision. Loud clips (whose
        # power could overflow float32) in float64, on the CPU where the device has none (MPS).
        with torch.autocast(device.type, enabled=False):
            for flag, dtype in ((False, torch.float32), (True, torch.float64)):
                rows = [row for row, is_loud in enumerate(loud) if is_loud == flag]
                where = torch.device("cpu") if flag and device.type == "mps" else device
                if rows:
                    part = self._log_mel([clips[row] for row in rows], where, dtype).to(device)
                    log_mel[rows, :, : part.shape[-1]] = part
            is_real = torch.arange(log_mel.shape[-1], device=device)[None, :] < num_frames[:, None]
            if self.top_db is not None:
                # Floor at top_db below each clip's own maximum over its real frames.
                peak = log_mel.masked_fill(~is_real[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
                log_mel = torch.maximum(log_mel, peak - self.top_db)
            return self._fill_padding(log_mel, num_frames), num_frames

    def _silence_db(self, features: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        """
        `(batch,)` dB that the front end gives to frames of zero samples after each clip of `features` `(batch, mel,
        frames)`: `max(-100, peak - top_db)`, `peak` the maximum over its first `num_frames` frames (its real ones).
        """
        is_padding = torch.arange(features.shape[-1], device=features.device)[None, :] >= num_frames[:, None]
        peak = features.masked_fill(is_padding[:, None, :], float("-inf")).amax(dim=(1, 2))
        if self.top_db is None:
            return torch.full_like(peak, _AMIN_DB)
        return (peak - self.top_db).clamp(min=_AMIN_DB)

    def _fill_padding(
        self, features: torch.Tensor, num_frames: torch.Tensor, silence: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`features` with the frames after each clip's `num_frames` set to `padding_value` or its `silence` (dB)."""
        is_padding = torch.arange(features.shape[-1], device=features.device)[None, :] >= num_frames[:, None]
        if self._padding_value is not None:
            return features.masked_fill(is_padding[:, None, :], self._padding_value)
        silence = self._silence_db(features, num_frames) if silence is None else silence
        return torch.where(is_padding[:, None, :], silence[:, None, None].to(features), features)

    def _log_mel(self, clips: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`10 * log10(max(mel, 1e-10))` `(batch, feature_size, max_frames)` float32 (padding: undefined)."""
        pad = self.n_fft // 2 if self.center else 0
        num_frames = [self.num_frames(clip.numel()) for clip in clips]
        max_frames = max(num_frames)
        # Each clip is reflect-padded at its own ends, then zero-padded on the right to the longest clip.
        signal = torch.zeros(len(clips), (max_frames - 1) * self.hop_size + self.n_fft, device=device, dtype=dtype)
        width = signal.shape[1]
        for row, clip in enumerate(clips):
            clip = clip.to(device, dtype)
            length = clip.numel()
            signal[row, pad : min(pad + length, width)] = clip[: width - pad]
            if pad:  # reflection without repeating the edge sample, written in place (no padded copy of the clip)
                signal[row, :pad] = clip[1 : pad + 1].flip(0)
                right = min(pad, width - pad - length)
                if right > 0:
                    signal[row, pad + length : pad + length + right] = clip[-right - 1 : -1].flip(0)

        # The float32 window and filters of the original front end, also when computing in float64.
        window = torch.hann_window(self.win_size, periodic=True, device=device).to(dtype)
        mel_filters = torch.from_numpy(self.mel_filters).to(device, dtype)
        log_mel = torch.empty(len(clips), self.feature_size, max_frames, device=device)
        # The STFT is taken block by block so that memory stays bounded for long audio (frames are independent).
        # The mel product's result depends on its shape, so it is taken per clip over fixed spans of _MEL_FRAMES
        # frames: the same products whatever the batch, and for a clip of up to _MEL_FRAMES frames exactly the
        # product of torchaudio's MelScale.
        block = max(_MEL_FRAMES, _FRAMES_PER_BLOCK // len(clips) // _MEL_FRAMES * _MEL_FRAMES)
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
            for row, frames in enumerate(num_frames):
                for first in range(start, min(stop, frames), _MEL_FRAMES):
                    last = min(first + _MEL_FRAMES, stop, frames)
                    span = power[row : row + 1, :, first - start : last - start]
                    mel = torch.matmul(span.transpose(-1, -2), mel_filters).transpose(-1, -2)[0]
                    log_mel[row, :, first:last] = 10.0 * torch.log10(mel.clamp(min=1e-10))
        return log_mel


DashengFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
