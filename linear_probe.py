"""
ESC-50-style evaluation of audio encoders: 5-fold linear probe, end-to-end fine-tuning and k-NN, with `Trainer`.

    python -m dasheng_hf.linear_probe --model mispeech/dasheng-base --dataset ashraq/esc50 --output-dir runs/esc50

`--dataset` is a Hub dataset with `audio`, `fold` and `target` columns (and optionally `category`) or a local folder
in the ESC-50 release layout (`audio/*.wav`, `meta/esc50.csv`). Whole clips are used at 16 kHz, batched with the
attention mask. In probe mode (the default) the frozen encoder embeds every clip once, the embeddings are cached on
disk, and a linear head is trained per fold on them; `--knn` replaces the head by k-nearest-neighbour voting. Runs
unchanged under `torchrun` / `accelerate launch`. Writes `OUT/metrics.json`, `OUT/predictions.csv` and each fold's
training log `OUT/fold{k}/log_history.json`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging

from .audio_data import DashengAudioClips, DashengAudioError, read_file_list
from .feature_extraction_dasheng import DashengFeatureExtractor
from .modeling_dasheng import DashengForAudioClassification, DashengModel

__all__ = [
    "AudioClips",
    "LinearProbeError",
    "LinearProbeHead",
    "ProbeOptions",
    "cached_embeddings",
    "embed_clips",
    "knn_predict",
    "load_audio_clips",
    "load_encoder",
    "main",
    "run_protocol",
    "train_linear_probe",
]

logger = logging.get_logger(__name__)

SAMPLING_RATE = 16000
DEFAULT_MODEL = "mispeech/dasheng-base"
DEFAULT_DATASET = "ashraq/esc50"
# Default (epochs, learning rate, batch size) per mode: a frozen-encoder linear head on standardised embeddings, and
# end-to-end fine-tuning of a pretrained encoder.
MODE_DEFAULTS = {"probe": (30, 1e-2, 256), "finetune": (10, 5e-5, 16)}
_CACHE_VERSION = "2"  # 2: audio decoded by audio_data (soundfile, torchcodec; sinc resampling)


class LinearProbeError(ValueError):
    """A problem with the command's inputs (model, dataset, folds); the message says how to fix it."""


# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class AudioClips:
    """
    Labelled clips with their cross-validation folds; audio is decoded (mono, 16 kHz) when asked for.

    Attributes:
        audio: The clips (a [`DashengAudioClips`]: files or `datasets` rows).
        labels: `(num_clips,)` int64 class indices `0 .. len(label_names) - 1`.
        folds: `(num_clips,)` int64 fold of each clip.
        label_names: Name of each class index.
        fingerprint: Identifies the data and its order (part of the embedding cache key).
        source: The `--dataset` argument it was loaded from.
    """

    audio: DashengAudioClips
    labels: np.ndarray
    folds: np.ndarray
    label_names: list[str]
    fingerprint: str
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def waveform(self, index: int) -> np.ndarray:
        """Clip `index` as mono float32 samples at 16 kHz; [`DashengAudioError`] names a clip that cannot be used."""
        return self.audio[int(index)]["audio"]

    def name(self, index: int) -> str:
        """The file (and list row) of clip `index`, for messages."""
        return self.audio.record(int(index)).origin

    def subset(self, indices: Sequence[int]) -> AudioClips:
        """The clips at `indices` (same labels and names, a fingerprint of their own)."""
        indices = [int(index) for index in indices]
        audio = DashengAudioClips.from_records([self.audio.units[index] for index in indices])
        fingerprint = hashlib.sha256(f"{self.fingerprint}|{indices}".encode()).hexdigest()
        labels, folds = self.labels[indices], self.folds[indices]
        return replace(self, audio=audio, labels=labels, folds=folds, fingerprint=fingerprint)


def _is_local(path: str) -> bool:
    """A path rather than a Hub id: it exists, starts like a path, or has more parts than `owner/name`."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.strip("/").count("/") > 1


def _hub_hint(kind: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return (" The Hub is switched off (HF_HUB_OFFLINE=1)." if offline else "") + (
        f" Without the Hub, pass a local {kind} instead"
    )


def _integers(values: Sequence[Any], column: str, name: Any) -> list[int]:
    """`values` as integers; a cell that is not one is an error naming its row (`name(index)`)."""
    integers = []
    for index, value in enumerate(values):
        try:
            integers.append(int(str(value).strip()))
        except ValueError:
            raise LinearProbeError(f"{name(index)}: {column} {value!r} is not an integer.") from None
    return integers


def load_audio_clips(source: str = DEFAULT_DATASET) -> AudioClips:
    """
    Load a dataset with ESC-50 columns: a local folder in the release layout or a Hub dataset id.

    The local folder holds `meta/esc50.csv` (columns `filename`, `fold`, `target`, optionally `category`) and the
    files under `audio/` (names relative to it, staying inside it); a Hub dataset has one `train` split with `audio`,
    `fold`, `target` (and `category`). Audio at any sampling rate is resampled to 16 kHz when decoded.
    """
    if _is_local(source):
        root = Path(source).expanduser()
        meta = root / "meta" / "esc50.csv"
        if not meta.is_file():
            raise LinearProbeError(
                f"{root} is not a folder in the ESC-50 release layout: {meta} is missing. Pass the unpacked "
                f"ESC-50-master folder (audio/*.wav and meta/esc50.csv), or a Hub dataset id such as {DEFAULT_DATASET}."
            )
        try:
            records = read_file_list(meta, audio_root=root / "audio", allow_absolute=False)
        except DashengAudioError as error:
            raise LinearProbeError(str(error)) from error
        missing_columns = {"fold", "target"} - set(records[0].labels or {})
        if missing_columns:
            raise LinearProbeError(f"{meta} lacks the columns {sorted(missing_columns)}.")
        missing = [record.origin for record in records if not Path(record.path).is_file()]
        if missing:
            raise LinearProbeError(f"{len(missing)} files listed in {meta} are missing, e.g. {missing[:3]}.")
        digest = hashlib.sha256(meta.read_bytes())
        for record in records:
            stat = Path(record.path).stat()
            digest.update(f"{record.key}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        audio = DashengAudioClips.from_records(records)
        columns = {name: [record.labels[name] for record in records] for name in ("fold", "target")}
        columns["category"] = [record.labels.get("category") or record.labels["target"] for record in records]
        fingerprint = f"local:{digest.hexdigest()}"
    else:
        from datasets import load_dataset

        try:
            dataset = load_dataset(source, split="train")
        except Exception as error:
            raise LinearProbeError(
                f"Could not load the dataset {source!r} from the Hugging Face Hub ({type(error).__name__}: {error})."
                f"{_hub_hint('copy of ESC-50')}: download https://github.com/karoldvl/ESC-50/archive/master.zip, "
                f"unzip it and pass --dataset /path/to/ESC-50-master."
            ) from error
        missing_columns = {"audio", "fold", "target"} - set(dataset.column_names)
        if missing_columns:
            raise LinearProbeError(
                f"The dataset {source!r} lacks the columns {sorted(missing_columns)}; it needs audio, fold and target."
            )
        fingerprint = f"hub:{source}:{dataset._fingerprint}"
        columns = {"target": list(dataset["target"]), "fold": list(dataset["fold"])}
        columns["category"] = list(dataset["category"]) if "category" in dataset.column_names else columns["target"]
        audio = DashengAudioClips(dataset.select_columns(["audio"]))
    folds = _integers(columns["fold"], "fold", lambda index: audio.record(index).origin)
    targets = _integers(columns["target"], "target", lambda index: audio.record(index).origin)
    classes = sorted(set(targets))
    index_of = {target: index for index, target in enumerate(classes)}
    names = {target: str(category) for target, category in zip(targets, columns["category"])}
    return AudioClips(
        audio=audio,
        labels=np.array([index_of[target] for target in targets], dtype=np.int64),
        folds=np.array(folds, dtype=np.int64),
        label_names=[names[target] for target in classes],
        fingerprint=fingerprint,
        source=source,
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


def _model_config(name: str) -> dict[str, Any]:
    """The config of `--model`, read without loading weights: a missing folder or bad id is reported here."""
    if _is_local(name) and not Path(name).expanduser().is_dir():
        what = "is a file, not a model folder" if Path(name).expanduser().exists() else "does not exist"
        raise LinearProbeError(
            f"--model {name} {what}. Pass a folder written by save_pretrained (config.json and weights) or a Hub id "
            f"such as {DEFAULT_MODEL}."
        )
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(Path(name).expanduser()) if _is_local(name) else name)
    except OSError as error:
        raise LinearProbeError(
            f"Could not load the model {name!r} ({error}).{_hub_hint('model folder')}: a folder written by "
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
) -> tuple[PreTrainedModel, FeatureExtractionMixin]:
    """
    Load an encoder and its feature extractor from a Hub id or a local folder.

    Dasheng checkpoints (this project's layout or the first Hub port) load with this project's classes; any other
    audio model loads with `AutoModel` / `AutoFeatureExtractor`. With `label_names` the model is a classifier with a
    fresh head of that many outputs (`DashengForAudioClassification` or `AutoModelForAudioClassification`).
    """
    config_dict = _model_config(name)
    if _is_local(name):
        name = str(Path(name).expanduser())
    labels = None
    if label_names is not None:
        id2label = dict(enumerate(label_names))
        labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if _is_dasheng(config_dict):
        if labels is None:
            model = DashengModel.from_pretrained(name)
        else:
            model = DashengForAudioClassification.from_pretrained(name, ignore_mismatched_sizes=True, **labels)
        return model, _dasheng_feature_extractor(name, model)
    if labels is None:
        model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForAudioClassification.from_pretrained(
            name, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True, **labels
        )
    return model, AutoFeatureExtractor.from_pretrained(name, trust_remote_code=trust_remote_code)


def _featurize(feature_extractor: FeatureExtractionMixin, waveforms: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Features of a batch of 16 kHz clips, padded to the longest (Dasheng pads itself and returns the mask)."""
    extra = {} if isinstance(feature_extractor, DashengFeatureExtractor) else {"padding": True}
    features = feature_extractor(waveforms, sampling_rate=SAMPLING_RATE, return_tensors="pt", **extra)
    return dict(features)


@torch.no_grad()
def embed_clips(
    model: PreTrainedModel,
    feature_extractor: FeatureExtractionMixin,
    clips: AudioClips,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    skipped: dict[int, str] | None = None,
) -> np.ndarray:
    """
    Embed every clip whole, in order, `batch_size` at a time: the model's `pooler_output` or, lacking one, the mean
    of `last_hidden_state`.

    A clip that cannot be used (unreadable, empty, non-finite samples, shorter than 30 ms) is skipped with a warning
    that names it: its row is NaN and `skipped[index]` says why. A clip whose embedding is not finite raises
    [`LinearProbeError`].

    Returns:
        `(num_clips, hidden_size)` float32 embeddings in the order of `clips`.
    """
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    skipped = {} if skipped is None else skipped
    embeddings = None
    with tqdm(total=len(clips), desc="Embedding clips", unit="clip", disable=not progress) as bar:
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
                pooled = _checked_embeddings(model, feature_extractor, waveforms, device, names)
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
) -> np.ndarray:
    """`(batch, hidden)` finite float32 embeddings; a clip that the model refuses or turns into NaN is named."""
    try:
        pooled = _pooled_embeddings(model, feature_extractor, waveforms, device).float().cpu().numpy()
    except ValueError as error:
        if len(waveforms) > 1:  # find the clip that is refused
            return np.concatenate(
                [_checked_embeddings(model, feature_extractor, [w], device, [n]) for w, n in zip(waveforms, names)]
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
    model: PreTrainedModel, feature_extractor: FeatureExtractionMixin, waveforms: list[np.ndarray], device: torch.device
) -> torch.Tensor:
    """`pooler_output`, or the mean of `last_hidden_state`, of a batch: `(batch, hidden)`."""
    inputs = _featurize(feature_extractor, waveforms)
    outputs = model(**{key: value.to(device) for key, value in inputs.items()})
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is not None:
        return pooled
    if len(waveforms) > 1 and len({len(waveform) for waveform in waveforms}) > 1:
        # A plain mean would average padding too, making a clip's embedding depend on its batch: one at a time.
        return torch.cat([_pooled_embeddings(model, feature_extractor, [waveform], device) for waveform in waveforms])
    return outputs.last_hidden_state.mean(dim=1)


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
) -> tuple[np.ndarray, dict[int, str], bool]:
    """
    Embeddings of `clips` from `cache_dir` if this model and data were embedded before, else computed and stored
    (`KEY.npz`: the embeddings, the key and the skipped clips, written atomically).

    Returns:
        `(embeddings, skipped, from_cache)`: see [`embed_clips`] for `embeddings` (NaN rows) and `skipped`.

    Raises:
        LinearProbeError: a cache file that is damaged or belongs to other data; the message says how to clear it.
    """
    key = f"{_CACHE_VERSION}|{_model_fingerprint(model_name, model)}|{clips.fingerprint}"
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    if path.exists():
        embeddings, skipped = _read_cache(path, key, len(clips))
        return embeddings, skipped, True
    skipped: dict[int, str] = {}
    embeddings = embed_clips(
        model, feature_extractor, clips, batch_size=batch_size, device=device, progress=progress, skipped=skipped
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


def _read_cache(path: Path, key: str, num_clips: int) -> tuple[np.ndarray, dict[int, str]]:
    clear = f"Delete it (rm {path}) to embed the clips again, or pass another --cache-dir."
    try:
        with np.load(path, allow_pickle=False) as stored:
            embeddings, stored_key = stored["embeddings"], str(stored["key"])
            skipped = {int(index): reason for index, reason in json.loads(str(stored["skipped"])).items()}
    except Exception as error:  # truncated, not a zip, missing arrays, bad JSON: all mean a damaged file
        raise LinearProbeError(
            f"The embedding cache {path} is damaged ({type(error).__name__}: {error}). {clear}"
        ) from error
    unusable = set(np.flatnonzero(~np.isfinite(embeddings).all(axis=1)).tolist()) if embeddings.ndim == 2 else None
    if stored_key != key or embeddings.ndim != 2 or len(embeddings) != num_clips or unusable != set(skipped):
        raise LinearProbeError(
            f"The embedding cache {path} does not match this model and dataset ({embeddings.shape} embeddings for "
            f"{num_clips} clips). {clear}"
        )
    return embeddings, skipped


# --------------------------------------------------------------------------------------------------- evaluation


class LinearProbeHead(nn.Module):
    """Logistic regression on embeddings standardised with the training fold's mean and standard deviation."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, num_labels: int):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-6))
        self.classifier = nn.Linear(self.mean.numel(), num_labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.classifier((embeddings - self.mean) / self.std)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _EmbeddingDataset(torch.utils.data.Dataset):
    def __init__(self, embeddings: np.ndarray, labels: np.ndarray):
        self.embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings[index], "labels": self.labels[index]}


class _WaveformDataset(torch.utils.data.Dataset):
    def __init__(self, clips: AudioClips, indices: np.ndarray):
        self.clips, self.indices = clips, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = int(self.indices[index])
        return {"waveform": self.clips.waveform(clip), "labels": int(self.clips.labels[clip])}


class _WaveformCollator:
    """Batches whole clips of different lengths through the feature extractor."""

    def __init__(self, feature_extractor: FeatureExtractionMixin):
        self.feature_extractor = feature_extractor

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _featurize(self.feature_extractor, [item["waveform"] for item in items])
        batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        return batch


def _accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def _multi_process_cpu() -> bool:
    """Several processes without a GPU: Trainer and accelerate only go distributed (gloo) when told to use the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _training_arguments(
    output_dir: Path,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    large_eval_batches: bool = False,
    **kw: Any,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=max(batch_size, 64) if large_eval_batches else batch_size,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=_multi_process_cpu(),
        dataloader_pin_memory=torch.cuda.is_available(),
        **kw,
    )


def _fit_and_predict(trainer: Trainer, eval_dataset: torch.utils.data.Dataset, output_dir: Path) -> np.ndarray:
    """Train, write the log history, and return the predicted class of every evaluation item."""
    trainer.train()
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return np.argmax(trainer.predict(eval_dataset).predictions, axis=-1)


def train_linear_probe(
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    eval_embeddings: np.ndarray,
    eval_labels: np.ndarray,
    num_labels: int,
    output_dir: str | Path,
    epochs: float = MODE_DEFAULTS["probe"][0],
    learning_rate: float = MODE_DEFAULTS["probe"][1],
    batch_size: int = MODE_DEFAULTS["probe"][2],
    seed: int = 0,
) -> np.ndarray:
    """
    Train a [`LinearProbeHead`] with `Trainer` (evaluated on the eval set every epoch, for the curve only).

    Returns:
        `(num_eval,)` predicted class indices of the eval embeddings after the last epoch.
    """
    set_seed(seed)
    mean, std = train_embeddings.mean(axis=0), train_embeddings.std(axis=0)
    head = LinearProbeHead(mean, std, num_labels)
    eval_dataset = _EmbeddingDataset(eval_embeddings, eval_labels)
    args = _training_arguments(Path(output_dir), epochs, learning_rate, batch_size, seed, large_eval_batches=True)
    trainer = Trainer(
        model=head,
        args=args,
        train_dataset=_EmbeddingDataset(train_embeddings, train_labels),
        eval_dataset=eval_dataset,
        compute_metrics=_accuracy,
    )
    # The head is tiny: on the CPU, intra-op threads only add synchronisation (several times slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_and_predict(trainer, eval_dataset, Path(output_dir))
    finally:
        torch.set_num_threads(threads)


def knn_predict(
    train_embeddings: np.ndarray, train_labels: np.ndarray, query_embeddings: np.ndarray, k: int = 10
) -> np.ndarray:
    """
    k-NN classification by cosine similarity of L2-normalised embeddings.

    Each query takes the majority class of its `k` most similar training clips; ties between classes go to the
    class with the larger summed similarity.
    """
    train = train_embeddings / np.linalg.norm(train_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    query = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    k = min(k, len(train))
    similarity = query @ train.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    nearest_similarity = np.take_along_axis(similarity, nearest, axis=1)
    num_labels = int(train_labels.max()) + 1
    votes = np.zeros((len(query), num_labels))
    summed = np.zeros((len(query), num_labels))
    rows = np.repeat(np.arange(len(query)), k)
    np.add.at(votes, (rows, train_labels[nearest].ravel()), 1.0)
    np.add.at(summed, (rows, train_labels[nearest].ravel()), nearest_similarity.ravel())
    # Summed similarity lies in [-k, k], so shifted by k and divided by 2k + 1 it is below one vote.
    return np.argmax(votes + (summed + k) / (2 * k + 1), axis=1)


# ------------------------------------------------------------------------------------------------------ protocol


@dataclass
class ProbeOptions:
    """Options of [`run_protocol`], one per command-line flag."""

    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    output_dir: str = "linear_probe_output"
    folds: tuple[int, ...] | None = None
    mode: str = "probe"
    knn: bool = False
    k: int = 10
    epochs: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    embedding_batch_size: int = 16
    freeze_encoder: bool = False
    seed: int = 0
    cache_dir: str | None = None
    trust_remote_code: bool = False


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dasheng_hf" / "embeddings"


def _check_options(options: ProbeOptions) -> None:
    """Option values, checked before anything is loaded."""
    if options.mode not in MODE_DEFAULTS:
        raise LinearProbeError(f"--mode must be one of {sorted(MODE_DEFAULTS)}, got {options.mode!r}.")
    if options.knn and options.mode != "probe":
        raise LinearProbeError("--knn evaluates frozen embeddings without training: drop --mode finetune.")
    positive = {
        "--embedding-batch-size": options.embedding_batch_size,
        "--batch-size": options.batch_size,
        "--k": options.k,
        "--epochs": None if options.knn else options.epochs,
        "--learning-rate": None if options.knn else options.learning_rate,
    }
    for flag, value in positive.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise LinearProbeError(f"{flag} must be a positive number, got {value}.")


def _check_folds(options: ProbeOptions, clips: AudioClips) -> tuple[int, ...]:
    available = sorted({int(fold) for fold in clips.folds})
    folds = tuple(options.folds) if options.folds else tuple(available)
    unknown = sorted(set(folds) - set(available))
    if unknown:
        raise LinearProbeError(f"Folds {unknown} are not in {clips.source}, which has folds {available}.")
    if len(available) < 2:
        raise LinearProbeError(f"{clips.source} has a single fold {available}; cross-validation needs two or more.")
    return folds


def _writable_folder(path: Path, flag: str) -> Path:
    """Create `path` (a folder for outputs) now, so that a bad path is reported before any work."""
    if path.exists() and not path.is_dir():
        raise LinearProbeError(f"{flag} {path} is a file; pass a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LinearProbeError(f"{flag} {path}: cannot create the folder ({error.strerror}).") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise LinearProbeError(f"{flag} {path}: the folder is not writable.")
    return path


def _usable_clips(clips: AudioClips, progress: bool) -> dict[int, str]:
    """Decode every clip once (before fine-tuning) and return those that cannot be used, with the reason."""
    from tqdm.auto import tqdm

    skipped = {}
    for index in tqdm(range(len(clips)), desc="Checking clips", unit="clip", disable=not progress):
        try:
            clips.waveform(index)
        except DashengAudioError as error:
            skipped[index] = str(error)
            logger.warning(f"Skipped {error}")
    return skipped


def run_protocol(options: ProbeOptions) -> dict[str, Any]:
    """
    Run the cross-validation protocol that `options` describe and write `metrics.json`, `predictions.csv` and the
    per-fold training logs to `options.output_dir`.

    Clips that cannot be used (unreadable, empty, non-finite, too short) are skipped, named in a warning and in
    `metrics.json` (`skipped_clips`), and left out of every fold.

    Returns:
        The metrics: `accuracy_mean`, `accuracy_std`, `fold_accuracies` ({fold: accuracy}) and the run's settings
        and timings.
    """
    from accelerate import PartialState

    started = time.perf_counter()
    _check_options(options)
    output_dir = _writable_folder(Path(options.output_dir).expanduser(), "--output-dir")
    cache_dir = None
    if options.mode == "probe":
        cache_dir = _writable_folder(Path(options.cache_dir or _default_cache_dir()).expanduser(), "--cache-dir")
    state = PartialState(cpu=_multi_process_cpu())
    clips = load_audio_clips(options.dataset)
    folds = _check_folds(options, clips)
    default_epochs, default_learning_rate, default_batch_size = MODE_DEFAULTS[options.mode]
    epochs = options.epochs if options.epochs is not None else default_epochs
    learning_rate = options.learning_rate if options.learning_rate is not None else default_learning_rate
    batch_size = options.batch_size or default_batch_size
    num_labels = len(clips.label_names)

    embedding_seconds, from_cache = 0.0, None
    if options.mode == "probe":
        model, feature_extractor = load_encoder(options.model, options.trust_remote_code)
        embed_started = time.perf_counter()
        with state.main_process_first():  # one rank embeds and writes the cache; the others then read it
            embeddings, skipped, from_cache = cached_embeddings(
                options.model,
                model,
                feature_extractor,
                clips,
                cache_dir,
                batch_size=options.embedding_batch_size,
                device=state.device,
                progress=state.is_local_main_process,
            )
        embedding_seconds = time.perf_counter() - embed_started
        del model
    else:
        _model_config(options.model)  # a bad --model is reported before the clips are read
        skipped = _usable_clips(clips, progress=state.is_local_main_process)
    usable = np.ones(len(clips), dtype=bool)
    usable[list(skipped)] = False
    if skipped and state.is_main_process:
        print(f"Skipped {len(skipped)} of {len(clips)} clips that cannot be used (see metrics.json).", flush=True)

    training_started = time.perf_counter()
    accuracies: dict[int, float] = {}
    predictions = np.full(len(clips), -1, dtype=np.int64)
    for fold in folds:
        test = np.flatnonzero((clips.folds == fold) & usable)
        train = np.flatnonzero((clips.folds != fold) & usable)
        if not len(test) or not len(train):
            raise LinearProbeError(f"Fold {fold} leaves no usable clips to {'test' if train.size else 'train'} on.")
        fold_dir = output_dir / f"fold{fold}"
        if options.mode == "probe" and options.knn:
            predicted = knn_predict(embeddings[train], clips.labels[train], embeddings[test], k=options.k)
        elif options.mode == "probe":
            predicted = train_linear_probe(
                embeddings[train],
                clips.labels[train],
                embeddings[test],
                clips.labels[test],
                num_labels,
                fold_dir,
                epochs=epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                seed=options.seed,
            )
        else:
            predicted = _finetune_fold(options, clips, train, test, fold_dir, epochs, learning_rate, batch_size)
        predictions[test] = predicted
        accuracies[fold] = float((predicted == clips.labels[test]).mean())
        if state.is_main_process:
            print(f"fold {fold}: accuracy {accuracies[fold]:.4f}", flush=True)
    training_seconds = time.perf_counter() - training_started

    values = np.array(list(accuracies.values()))
    metrics = {
        "accuracy_mean": float(values.mean()),
        "accuracy_std": float(values.std()),
        "fold_accuracies": {str(fold): accuracy for fold, accuracy in accuracies.items()},
        "method": "knn" if options.knn else options.mode,
        "model": options.model,
        "dataset": options.dataset,
        "num_clips": len(clips),
        "num_skipped": len(skipped),
        "skipped_clips": [{"index": index, "reason": reason} for index, reason in sorted(skipped.items())],
        "num_labels": num_labels,
        "label_names": clips.label_names,
        "epochs": None if options.knn else epochs,
        "learning_rate": None if options.knn else learning_rate,
        "batch_size": None if options.knn else batch_size,
        "k": options.k if options.knn else None,
        "seed": options.seed,
        "num_processes": state.num_processes,
        "embeddings_from_cache": from_cache,
        "embedding_seconds": embedding_seconds,
        "training_seconds": training_seconds,
        "total_seconds": time.perf_counter() - started,
        "options": asdict(options),
    }
    if state.is_main_process:
        _write_results(output_dir, metrics, clips, predictions, folds)
    state.wait_for_everyone()
    return metrics


def _finetune_fold(
    options: ProbeOptions,
    clips: AudioClips,
    train: np.ndarray,
    test: np.ndarray,
    fold_dir: Path,
    epochs: float,
    learning_rate: float,
    batch_size: int,
) -> np.ndarray:
    """Fine-tune a fresh classifier on the training folds with `Trainer`; predict the held-out fold."""
    set_seed(options.seed)
    model, feature_extractor = load_encoder(options.model, options.trust_remote_code, clips.label_names)
    if options.freeze_encoder:
        if not hasattr(model, "freeze_encoder"):
            raise LinearProbeError(f"{type(model).__name__} has no freeze_encoder(); drop --freeze-encoder.")
        model.freeze_encoder()
    eval_dataset = _WaveformDataset(clips, test)
    trainer = Trainer(
        model=model,
        args=_training_arguments(fold_dir, epochs, learning_rate, batch_size, options.seed),
        train_dataset=_WaveformDataset(clips, train),
        eval_dataset=eval_dataset,
        data_collator=_WaveformCollator(feature_extractor),
        processing_class=feature_extractor,
        compute_metrics=_accuracy,
    )
    return _fit_and_predict(trainer, eval_dataset, fold_dir)


def _write_results(
    output_dir: Path, metrics: dict[str, Any], clips: AudioClips, predictions: np.ndarray, folds: tuple[int, ...]
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (output_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "fold", "label", "prediction"])
        for index in np.flatnonzero(np.isin(clips.folds, folds) & (predictions >= 0)):
            writer.writerow([index, clips.folds[index], clips.labels[index], predictions[index]])
    lines = ["", f"{metrics['method']} on {clips.source} with {metrics['model']}", "fold  accuracy"]
    lines += [f"{fold:>4}  {accuracy:.4f}" for fold, accuracy in metrics["fold_accuracies"].items()]
    lines.append(f"mean  {metrics['accuracy_mean']:.4f} +- {metrics['accuracy_std']:.4f}")
    if metrics["method"] != "finetune":
        cache = " (from cache)" if metrics["embeddings_from_cache"] else ""
        lines.append(
            f"embedding {metrics['embedding_seconds']:.1f} s{cache}, evaluation {metrics['training_seconds']:.1f} s"
        )
    lines.append(f"written to {output_dir / 'metrics.json'}")
    print("\n".join(lines), flush=True)


def _parse_folds(text: str) -> tuple[int, ...]:
    try:
        folds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--folds takes comma-separated integers such as 1,2,3,4,5, got {text!r}."
        ) from error
    if not folds:
        raise argparse.ArgumentTypeError("--folds needs at least one fold.")
    return folds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasheng-linear-probe",
        description="Cross-validated evaluation of an audio encoder on ESC-50-style data: linear probe on frozen "
        "embeddings, end-to-end fine-tuning, or k-NN.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local folder (default %(default)s).")
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="Hub dataset id or local folder in the ESC-50 layout: audio/*.wav, meta/esc50.csv (default %(default)s).",
    )
    parser.add_argument("--output-dir", required=True, help="Where metrics.json and the training logs go.")
    parser.add_argument("--folds", type=_parse_folds, help="Held-out folds to evaluate, e.g. 1,2,3,4,5 (default all).")
    parser.add_argument("--mode", choices=sorted(MODE_DEFAULTS), default="probe", help="Default %(default)s.")
    parser.add_argument("--knn", action="store_true", help="k-NN on the frozen embeddings instead of a linear head.")
    parser.add_argument("--k", type=int, default=10, help="Neighbours for --knn (default %(default)s).")
    parser.add_argument("--epochs", type=float, help="Default: probe 30, finetune 10.")
    parser.add_argument("--learning-rate", type=float, help="Default: probe 1e-2, finetune 5e-5.")
    parser.add_argument(
        "--batch-size", type=int, help="Training batch size per process; default probe 256, finetune 16."
    )
    parser.add_argument("--embedding-batch-size", type=int, default=16, help="Clips per embedding batch.")
    parser.add_argument("--freeze-encoder", action="store_true", help="Finetune mode: train only the head.")
    parser.add_argument("--seed", type=int, default=0, help="Default %(default)s.")
    parser.add_argument("--cache-dir", help=f"Embedding cache (default {_default_cache_dir()}).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow models with code on the Hub.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (`dasheng-linear-probe`, `python -m dasheng_hf.linear_probe`)."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.k < 1:
        parser.error("--k must be at least 1.")
    try:
        run_protocol(ProbeOptions(**vars(arguments)))
    except (LinearProbeError, DashengAudioError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
