"""
Clip embeddings for the ESC-50 evaluation (`linear_probe.py`): labelled clips, any Transformers audio encoder, and the
on-disk embedding cache.

[`load_encoder`] loads Dasheng with this project's classes and any other audio model with the Auto classes;
[`embed_clips`] embeds whole clips, batched with the attention mask; [`cached_embeddings`] stores them once per model
and dataset under a cache folder. Audio is decoded by `audio/datasets.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging as python_logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.utils import logging

from .. import modeling_dasheng
from ..audio.datasets import SAMPLING_RATE, DashengAudioClips, DashengAudioError
from ..feature_extraction_dasheng import DashengFeatureExtractor
from ..modeling_dasheng import DashengForAudioClassification, DashengModel

__all__ = [
    "DEFAULT_MODEL",
    "AudioClips",
    "LinearProbeError",
    "cached_embeddings",
    "embed_clips",
    "featurize",
    "hub_hint",
    "is_local_path",
    "load_encoder",
    "read_model_config",
]

logger = logging.get_logger(__name__)

DEFAULT_MODEL = "mispeech/dasheng-base"
_CACHE_VERSION = "2"  # 2: audio decoded by audio_data (soundfile, torchcodec; sinc resampling)


class LinearProbeError(ValueError):
    """A problem with the command's inputs (model, dataset, folds); the message says how to fix it."""


@dataclass
class AudioClips:
    """
    Labelled clips with their evaluation protocol; audio is decoded (mono, 16 kHz) when asked for, or the clips come
    as embeddings already computed (`dasheng-embed` output).

    Attributes:
        audio: The clips (a [`DashengAudioClips`]: files or `datasets` rows), or None with `embeddings`.
        labels: `(num_clips,)` int64 class indices `0 .. len(label_names) - 1` (single-label), or `(num_clips,
            num_classes)` float32 multi-hot targets (multi-label).
        folds: `(num_clips,)` int64 fold of each clip (cross-validation), or None.
        label_names: Name of each class index.
        fingerprint: Identifies the data and its order (part of the embedding cache key).
        source: The `--dataset` argument it was loaded from.
        splits: `(num_clips,)` `"train"`, `"validation"` or `"test"` of each clip (given splits), or None.
        files: Each clip's file name (or id), for `predictions.csv`; default its message name.
        embeddings: `(num_clips, hidden)` float32 embeddings computed before, or None.
    """

    audio: DashengAudioClips | None
    labels: np.ndarray
    folds: np.ndarray | None
    label_names: list[str]
    fingerprint: str
    source: str
    splits: np.ndarray | None = None
    files: list[str] | None = None
    embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        """Whether each clip has a set of labels (multi-hot `labels`) rather than one class."""
        return self.labels.ndim == 2

    def waveform(self, index: int) -> np.ndarray:
        """Clip `index` as mono float32 samples at 16 kHz; [`DashengAudioError`] names a clip that cannot be used."""
        if self.audio is None:
            raise LinearProbeError(f"{self.source} holds embeddings, not audio: a head on audio needs the audio files.")
        return self.audio[int(index)]["audio"]

    def name(self, index: int) -> str:
        """The file (and list row) of clip `index`, for messages."""
        if self.audio is None:
            return self.file(index)
        return self.audio.record(int(index)).origin

    def file(self, index: int) -> str:
        """The file name (or dataset id) of clip `index`, for `predictions.csv`."""
        if self.files is not None:
            return self.files[int(index)]
        record = self.audio.record(int(index))
        return record.path or record.key

    def subset(self, indices: Sequence[int]) -> AudioClips:
        """The clips at `indices` (same labels and names, a fingerprint of their own)."""
        indices = [int(index) for index in indices]
        audio = None if self.audio is None else DashengAudioClips.from_records([self.audio.units[i] for i in indices])
        fingerprint = hashlib.sha256(f"{self.fingerprint}|{indices}".encode()).hexdigest()

        def pick(values: Any) -> Any:
            return (
                None
                if values is None
                else values[indices]
                if isinstance(values, np.ndarray)
                else [values[i] for i in indices]
            )

        return replace(
            self,
            audio=audio,
            labels=self.labels[indices],
            folds=pick(self.folds),
            splits=pick(self.splits),
            files=pick(self.files),
            embeddings=pick(self.embeddings),
            fingerprint=fingerprint,
        )


def is_local_path(path: str) -> bool:
    """A path rather than a Hub id: it exists, starts like a path, or has more parts than `owner/name`."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.strip("/").count("/") > 1


def hub_hint(kind: str) -> str:
    """The end of a message about something the Hub did not give: says so when offline, and to pass a local `kind`."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return (" The Hub is switched off (HF_HUB_OFFLINE=1)." if offline else "") + (
        f" Without the Hub, pass a local {kind} instead"
    )


# ---------------------------------------------------------------------------------------------------------- model


def _is_dasheng(config_dict: dict[str, Any]) -> bool:
    return config_dict.get("model_type") == "dasheng" or "encoder_kwargs" in config_dict


def _dasheng_feature_extractor(name: str, model: PreTrainedModel) -> DashengFeatureExtractor:
    """The folder's own feature extractor, or one built from the model config when it has none (old Hub layout)."""
    try:
        return DashengFeatureExtractor.from_pretrained(name)
    except OSError:
        return DashengFeatureExtractor.from_dasheng_config(model.config)


def read_model_config(name: str) -> dict[str, Any]:
    """The config of `--model`, read without loading weights: a missing folder or bad id is reported here."""
    if is_local_path(name) and not Path(name).expanduser().is_dir():
        what = "is a file, not a model folder" if Path(name).expanduser().exists() else "does not exist"
        raise LinearProbeError(
            f"--model {name} {what}. Pass a folder written by save_pretrained (config.json and weights) or a Hub id "
            f"such as {DEFAULT_MODEL}."
        )
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(Path(name).expanduser()) if is_local_path(name) else name)
    except OSError as error:
        raise LinearProbeError(
            f"Could not load the model {name!r} ({error}).{hub_hint('model folder')}: a folder written by "
            f"save_pretrained (config.json and weights), e.g. --model /path/to/dasheng-base."
        ) from error
    if not config_dict.get("model_type") and not _is_dasheng(config_dict):
        raise LinearProbeError(
            f"Could not load the model {name!r}: it has no config.json with a model_type. Pass a Hub id or a folder "
            f"written by save_pretrained (config.json and weights)."
        )
    return config_dict


def load_encoder(
    name: str = DEFAULT_MODEL,
    trust_remote_code: bool = False,
    label_names: Sequence[str] | None = None,
    multi_label: bool = False,
) -> tuple[PreTrainedModel, FeatureExtractionMixin]:
    """
    Load an encoder and its feature extractor from a Hub id or a local folder.

    Dasheng checkpoints (this project's layout or the first Hub port) load with this project's classes; any other
    audio model loads with `AutoModel` / `AutoFeatureExtractor`. With `label_names` the model is a classifier with a
    fresh head of that many outputs (`DashengForAudioClassification` or `AutoModelForAudioClassification`), trained
    with a sigmoid per class when `multi_label`.
    """
    config_dict = read_model_config(name)
    if is_local_path(name):
        name = str(Path(name).expanduser())
    labels, remote = None, {} if _is_dasheng(config_dict) else {"trust_remote_code": trust_remote_code}
    if label_names is not None:
        id2label = dict(enumerate(label_names))
        labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        if multi_label:
            labels["problem_type"] = "multi_label_classification"
    try:
        if labels is None:
            model = (DashengModel if _is_dasheng(config_dict) else AutoModel).from_pretrained(name, **remote)
        else:
            model = _classifier_with_a_fresh_head(
                DashengForAudioClassification if _is_dasheng(config_dict) else AutoModelForAudioClassification,
                name,
                ignore_mismatched_sizes=True,
                **remote,
                **labels,
            )
        if _is_dasheng(config_dict):
            return model, _dasheng_feature_extractor(name, model)
        return model, AutoFeatureExtractor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:  # a folder without weights or without a preprocessor config
        raise LinearProbeError(f"Could not load the model {name!r}: {str(error).splitlines()[0]}") from None


class _HeldRecords(python_logging.Filter):
    """Holds back the log records whose message contains one of `needles`."""

    def __init__(self, *needles: str):
        super().__init__()
        self.needles, self.records = needles, []

    def filter(self, record: python_logging.LogRecord) -> bool:
        if any(needle in record.getMessage() for needle in self.needles):
            self.records.append(record)
            return False
        return True


@contextmanager
def _holding(loggers: Sequence[python_logging.Logger], *needles: str) -> Iterator[_HeldRecords]:
    held = _HeldRecords(*needles)
    for logger_ in loggers:
        logger_.addFilter(held)
    try:
        yield held
    finally:
        for logger_ in loggers:
            logger_.removeFilter(held)


def _classifier_with_a_fresh_head(model_class: Any, name: str, **kwargs: Any) -> PreTrainedModel:
    """
    `model_class.from_pretrained(name, **kwargs)` without the load report and the missing-head warning when all that
    is missing or re-initialised is the classification head (fine-tuning asks for a new one); any other missing,
    unexpected or mismatched weight keeps its warnings.
    """
    loggers = [python_logging.getLogger("transformers.modeling_utils"), modeling_dasheng.logger]
    with _holding(loggers, "LOAD REPORT", "holds no classification head") as held:
        model, info = model_class.from_pretrained(name, output_loading_info=True, **kwargs)
    prefix = f"{model.base_model_prefix}."
    changed = [
        *info.get("missing_keys", ()),
        *(e if isinstance(e, str) else e[0] for e in info.get("mismatched_keys", ())),
    ]
    if info.get("unexpected_keys") or any(key.startswith(prefix) for key in changed):
        for record in held.records:
            python_logging.getLogger(record.name).handle(record)
    return model


def featurize(feature_extractor: FeatureExtractionMixin, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Features of a batch of 16 kHz clips, padded to the longest (Dasheng pads itself and returns the mask)."""
    extra = {} if isinstance(feature_extractor, DashengFeatureExtractor) else {"padding": True}
    features = feature_extractor(waveforms, sampling_rate=SAMPLING_RATE, return_tensors="pt", **extra)
    return dict(features)


# ------------------------------------------------------------------------------------------------------ embedding


@torch.no_grad()
def embed_clips(
    model: PreTrainedModel,
    feature_extractor: FeatureExtractionMixin,
    clips: AudioClips,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    skipped: dict[int, str] | None = None,
    layer: int | None = None,
) -> np.ndarray:
    """
    Embed every clip whole, in order, `batch_size` at a time: the model's `pooler_output` or, lacking one, the mean
    of `last_hidden_state`; with `layer`, the mean over the clip's real tokens of `hidden_states[layer]` (0 the
    patch embeddings, i the output of block i, as `dasheng-embed --layers`).

    A clip that cannot be used (unreadable, empty, non-finite samples, shorter than 30 ms) is skipped with a warning
    that names it: its row is NaN and `skipped[index]` says why. A clip whose embedding is not finite raises
    [`LinearProbeError`].

    Returns:
        `(num_clips, hidden_size)` float32 embeddings in the order of `clips`.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    skipped = {} if skipped is None else skipped
    embeddings = None
    bar = tqdm(total=len(clips), desc="Embedding clips", unit="clip", disable=not progress)
    with logging_redirect_tqdm(), bar:  # warnings (files skipped) print above the bar, not into it
        for start in range(0, len(clips), batch_size):
            batch, waveforms = [], []
            for index in range(start, min(start + batch_size, len(clips))):
                try:
                    waveforms.append(clips.waveform(index))
                    batch.append(index)
                except DashengAudioError as error:
                    skipped[index] = str(error)
                    logger.warning(f"Skipped {error}")
            if batch:
                names = [clips.name(index) for index in batch]
                pooled = _checked_embeddings(model, feature_extractor, waveforms, device, names, layer)
                if embeddings is None:
                    embeddings = np.full((len(clips), pooled.shape[1]), np.nan, dtype=np.float32)
                embeddings[batch] = pooled
            bar.update(min(batch_size, len(clips) - start))
    if embeddings is None:
        raise LinearProbeError(f"None of the {len(clips)} clips of {clips.source} can be used, e.g. {skipped[0]}")
    return embeddings


def _checked_embeddings(
    model: PreTrainedModel,
    feature_extractor: FeatureExtractionMixin,
    waveforms: list[np.ndarray],
    device: torch.device,
    names: list[str],
    layer: int | None = None,
) -> np.ndarray:
    """`(batch, hidden)` finite float32 embeddings; a clip that the model refuses or turns into NaN is named."""
    try:
        pooled = _pooled_embeddings(model, feature_extractor, waveforms, device, layer).float().cpu().numpy()
    except ValueError as error:
        if len(waveforms) > 1:  # find the clip that is refused
            return np.concatenate(
                [
                    _checked_embeddings(model, feature_extractor, [w], device, [n], layer)
                    for w, n in zip(waveforms, names)
                ]
            )
        raise LinearProbeError(f"{names[0]}: {error}") from error
    for row, name, waveform in zip(pooled, names, waveforms):
        if not np.isfinite(row).all():
            raise LinearProbeError(
                f"{name}: its embedding is not finite (NaN or infinity); its samples reach {np.abs(waveform).max():.3g}"
                f": normalise the audio to [-1, 1], or leave the file out."
            )
    return pooled


def _pooled_embeddings(
    model: PreTrainedModel,
    feature_extractor: FeatureExtractionMixin,
    waveforms: list[np.ndarray],
    device: torch.device,
    layer: int | None = None,
) -> torch.Tensor:
    """`pooler_output`, or the mean of `last_hidden_state` (or of `hidden_states[layer]`), of a batch: `(batch,
    hidden)`."""
    inputs = {key: value.to(device) for key, value in featurize(feature_extractor, waveforms).items()}
    outputs = model(**inputs, **({} if layer is None else {"output_hidden_states": True}))
    if layer is None and getattr(outputs, "pooler_output", None) is not None:
        return outputs.pooler_output
    if layer is not None and not -len(outputs.hidden_states or ()) <= layer < len(outputs.hidden_states or ()):
        raise LinearProbeError(
            f"--layer {layer} is out of range: the model gives {len(outputs.hidden_states or ())} hidden states (0 the "
            f"embeddings, then one per block), so --layer takes 0 to {len(outputs.hidden_states or ()) - 1}."
        )
    states = outputs.last_hidden_state if layer is None else outputs.hidden_states[layer]
    if isinstance(model, DashengModel):  # the mean over each clip's real tokens, as its pooler_output
        counts = model.num_valid_tokens(inputs.get("attention_mask"), inputs["input_values"].shape[-1]).to(device)
        real = torch.arange(states.shape[1], device=device)[None, :] < counts[:, None]
        return states.masked_fill(~real[..., None], 0).sum(dim=1) / counts[:, None].to(states.dtype)
    if len(waveforms) > 1 and len({len(waveform) for waveform in waveforms}) > 1:
        # A plain mean would average padding too, making a clip's embedding depend on its batch: one at a time.
        return torch.cat(
            [_pooled_embeddings(model, feature_extractor, [waveform], device, layer) for waveform in waveforms]
        )
    return states.mean(dim=1)


# ---------------------------------------------------------------------------------------------------------- cache


def _model_fingerprint(name: str, model: PreTrainedModel) -> str:
    """Identifies the weights: the files of a local folder (name, size, time) or the Hub revision."""
    path = Path(name)
    if path.is_dir():
        stats = sorted(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in path.iterdir() if f.is_file())
        return f"local:{path.resolve()}:{';'.join(stats)}"
    return f"hub:{name}:{getattr(model.config, '_commit_hash', None)}"


def cached_embeddings(
    model_name: str,
    model: PreTrainedModel,
    feature_extractor: FeatureExtractionMixin,
    clips: AudioClips,
    cache_dir: str | Path,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    layer: int | None = None,
) -> tuple[np.ndarray, dict[int, str], bool]:
    """
    Embeddings of `clips` from `cache_dir` if this model, data and `layer` were embedded before, else computed and
    stored (`KEY.npz`: the embeddings, the key and the skipped clips, written atomically). See [`embed_clips`].

    Returns:
        `(embeddings, skipped, from_cache)`: see [`embed_clips`] for `embeddings` (NaN rows) and `skipped`.

    Raises:
        LinearProbeError: a cache file that is damaged or belongs to other data; the message says how to clear it.
    """
    key = f"{_CACHE_VERSION}|{_model_fingerprint(model_name, model)}|{clips.fingerprint}"
    key += "" if layer is None else f"|layer {layer}"  # default embeddings keep the key they always had
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    if path.exists():
        embeddings, skipped = _read_cache(path, key, len(clips), getattr(model.config, "hidden_size", None))
        return embeddings, skipped, True
    skipped: dict[int, str] = {}
    embeddings = embed_clips(
        model, feature_extractor, clips, batch_size, device, progress=progress, skipped=skipped, layer=layer
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        with partial.open("wb") as handle:
            np.savez(handle, embeddings=embeddings, key=np.array(key), skipped=np.array(json.dumps(skipped)))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return embeddings, skipped, False


def _read_cache(path: Path, key: str, num_clips: int, width: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """The cache file's embeddings and skipped clips; a file that is damaged, of other data or of another width (the
    model's `hidden_size`) is an error that says how to clear it (it is never recomputed silently)."""
    clear = f"Delete it (rm {path}) to embed the clips again, or pass another --cache-dir."
    try:
        with np.load(path, allow_pickle=False) as stored:
            embeddings, stored_key = stored["embeddings"], str(stored["key"])
            skipped = {int(index): reason for index, reason in json.loads(str(stored["skipped"])).items()}
    except Exception as error:  # truncated, not a zip, missing arrays, bad JSON: all mean a damaged file
        raise LinearProbeError(
            f"The embedding cache {path} is damaged ({type(error).__name__}: {error}). {clear}"
        ) from error
    if embeddings.ndim == 2 and width is not None and embeddings.shape[1] != width and len(embeddings) == num_clips:
        raise LinearProbeError(
            f"The embedding cache {path} holds embeddings {embeddings.shape[1]} wide, but the model gives {width}. "
            f"{clear}"
        )
    unusable = set(np.flatnonzero(~np.isfinite(embeddings).all(axis=1)).tolist()) if embeddings.ndim == 2 else None
    if stored_key != key or embeddings.ndim != 2 or len(embeddings) != num_clips or unusable != set(skipped):
        raise LinearProbeError(
            f"The embedding cache {path} does not match this model and dataset ({embeddings.shape} embeddings for "
            f"{num_clips} clips). {clear}"
        )
    return embeddings, skipped
