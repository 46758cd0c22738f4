"""
Audio loading shared by the linear probe, pretraining and evaluation adapters: files, folders, file lists, webdataset
tar shards and `datasets`, decoded to mono float32 at 16 kHz. Decoding lives in `audio/decoding.py`, the sources in
`audio/sources.py`; this module holds the datasets built on them, and is where every tool imports audio from.

Sources (a string, or a list of them):

- a folder: every audio file under it (recursively), sorted by path; when every file sits in a subfolder (class
  folders, `dog/1.wav`), its folder's name is its `label`;
- a file list (`.csv`, `.tsv`) with a `filename` column (tools name another with `--file-column`): relative paths
  are read from the list's folder and may not leave it (`../` is an error naming the row); the other columns become
  each clip's `labels`;
- webdataset tar shards, as a brace pattern (`shards/train-{000000..000127}.tar`), a glob or a folder of `.tar`
  files: one sample per key, the audio member (`.flac`, `.wav`, `.mp3`, ...) and an optional `.json` (`labels`);
- a `datasets` dataset (Hub id, local path, or a `datasets.Dataset`) with an audio column.

Files are decoded with soundfile, or with torchcodec (FFmpeg) for formats soundfile cannot read, mixed down to mono by
averaging the channels, and resampled to 16 kHz with a Hann-windowed sinc filter (6 zero crossings, roll-off 0.99:
torchaudio's default; [`resample`] equals torchaudio computed in float64 to about 1e-6). A source that matches
nothing raises [`DashengAudioError`] when the dataset is built; an unreadable, empty, non-finite or too short file is
skipped with a warning that names it and counted in `num_skipped`.

[`audio_parts`] cuts sources into [`DashengAudioPart`]s, runs of consecutive clips read in order (each tar shard one
part), for tools that write one output file per part and resume by part (`dasheng-embed`).

[`DashengAudioDataset`] streams training crops and splits them over processes and dataloader workers ("consumers",
`world_size x num_workers`, consumer `rank * num_workers + worker_id`): shards (or files) are dealt out whole when
there are at least as many as consumers; with fewer, every consumer reads every shard and keeps every n-th sample
(tar shards) or every n-th crop (files). Every crop is used exactly once per epoch, and the order depends only on
`(seed, epoch)` and the number of consumers.

Use with `Trainer` on several processes: accelerate would otherwise re-split an `IterableDataset` (by default rank 0
reads everything and sends each process its batches; with `dispatch_batches=False` every process reads everything
and keeps one batch in N). To let each process read only its own share, build the training `DataLoader` yourself
and hand it to accelerate without re-sharding through [`per_process_dataloader`]:

    class PretrainingTrainer(Trainer):
        def get_train_dataloader(self):
            loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            return per_process_dataloader(loader, self.args.device)

with `DashengAudioDataset(..., repeat=True)` and `max_steps`: each process then runs through epochs on its own
(`set_epoch`, called by Trainer at the start, sets the first), so processes whose shares differ in length never
wait for each other at an epoch boundary. Keep `dataloader_persistent_workers` off (workers read the epoch when they
start). On `resume_from_checkpoint`, Trainer replays (reads and decodes) every batch already trained on to find its
place; to skip that, pass `ignore_data_skip=True` and build the dataset with a new `seed` (e.g. seed + global
step). For evaluation, build the dataset with `split_across_processes=False` and leave it to Trainer's default loader
(rank 0 reads, batches are sent to every process).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .decoding import (
    AUDIO_EXTENSIONS,
    MIN_SAMPLES,
    SAMPLING_RATE,
    DashengAudioError,
    crop_audio,
    decode_audio,
    resample,
)
from .sources import (
    AudioRecord,
    DashengFileListColumnError,
    TarShard,
    expand_pattern,
    find_audio_files,
    read_file_list,
    resolve_sources,
    unit_records,
)

__all__ = [  # the datasets, and the decoding and source helpers every tool imports from here
    "AUDIO_EXTENSIONS",
    "MIN_SAMPLES",
    "SAMPLING_RATE",
    "AudioRecord",
    "DashengAudioClips",
    "DashengAudioDataset",
    "DashengAudioError",
    "DashengAudioPart",
    "DashengFileListColumnError",
    "audio_parts",
    "crop_audio",
    "decode_audio",
    "expand_pattern",
    "find_audio_files",
    "per_process_dataloader",
    "read_file_list",
    "resample",
]

logger = logging.get_logger(__name__)

_MAX_SLOTS = 1024  # skip counters: one per process (slot 0) and dataloader worker


# ------------------------------------------------------------------------------------------------- datasets


class _SkipCounter:
    """Files skipped, counted in shared memory so that dataloader workers' counts reach the main process."""

    def __init__(self):
        self.counts = torch.zeros(_MAX_SLOTS, dtype=torch.int64).share_memory_()

    def add(self, error: DashengAudioError) -> None:
        """Count one skipped file and warn with `error`, which names it."""
        info = torch.utils.data.get_worker_info()
        self.counts[0 if info is None else 1 + info.id % (_MAX_SLOTS - 1)] += 1
        logger.warning(f"Skipped {error}")

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def reset(self) -> None:
        self.counts.zero_()


class DashengAudioClips(torch.utils.data.Dataset):
    """
    Whole clips of a folder, file list or `datasets` source, by index (for evaluation and the linear probe).

    `clips[i]` is `{"audio": (samples,) float32 at 16 kHz, "num_samples", "key", "labels"}` (`labels` a dict or
    `None`); a bad clip raises [`DashengAudioError`] naming it (callers skip it and count).
    """

    def __init__(
        self,
        sources: Any,
        sampling_rate: int = SAMPLING_RATE,
        min_samples: int = MIN_SAMPLES,
        audio_column: str = "audio",
        split: str = "train",
    ):
        units = resolve_sources(sources, audio_column, split)
        shards = [unit.path for unit in units if isinstance(unit, TarShard)]
        if shards:
            raise DashengAudioError(f"{shards[0]}: tar shards are read in sequence; use DashengAudioDataset.")
        self.units, self.sampling_rate, self.min_samples = units, sampling_rate, min_samples

    @classmethod
    def from_records(
        cls, records: Sequence[AudioRecord], sampling_rate: int = SAMPLING_RATE, min_samples: int = MIN_SAMPLES
    ) -> DashengAudioClips:
        """Clips of records already listed (e.g. by [`read_file_list`])."""
        clips = cls.__new__(cls)
        clips.units, clips.sampling_rate, clips.min_samples = list(records), sampling_rate, min_samples
        return clips

    def __len__(self) -> int:
        return len(self.units)

    def record(self, index: int) -> AudioRecord:
        """The file behind clip `index` (its key, name for messages and labels), without decoding it."""
        return next(unit_records(self.units[index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.record(index)
        audio = record.decode(self.sampling_rate)
        if len(audio) < self.min_samples:
            raise DashengAudioError(
                f"{record.origin}: {len(audio)} samples at {self.sampling_rate} Hz, shorter than the "
                f"{self.min_samples} ({1000 * self.min_samples / self.sampling_rate:.0f} ms) the encoder needs."
            )
        return {"audio": audio, "num_samples": len(audio), "key": record.key, "labels": record.labels}


class DashengAudioDataset(torch.utils.data.IterableDataset):
    """
    Training crops streamed from any source (see the module docstring), split over processes and workers.

    Yields `{"audio": (crop_samples,) float32, "num_samples": real samples (the rest is zero padding), "key",
    "offset": first sample of the crop in the 16 kHz clip}` and `"labels"` where the source has them.

    Args:
        sources: A source or a list of sources.
        crop_seconds: Crop length; `None` yields whole clips (of varying length).
        shuffle: Shuffle the shards/files of every epoch and pass crops through a buffer of `shuffle_buffer`
            (memory: `shuffle_buffer x crop_seconds x 64 kB` per worker).
        seed: With the epoch (`set_epoch`), fixes the order.
        repeat: Start the next epoch when one ends, forever (for `max_steps` training on several processes).
        split_across_processes: Split over torch.distributed ranks (or `RANK`/`WORLD_SIZE`); `False` when a single
            process reads for all (accelerate's `dispatch_batches`).
        min_samples: Shorter files are skipped and counted.
    """

    def __init__(
        self,
        sources: Any,
        crop_seconds: float | None = 10.0,
        sampling_rate: int = SAMPLING_RATE,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        repeat: bool = False,
        split_across_processes: bool = True,
        min_samples: int = MIN_SAMPLES,
        audio_column: str = "audio",
        split: str = "train",
    ):
        if crop_seconds is not None and crop_seconds * sampling_rate < min_samples:
            raise DashengAudioError(f"crop_seconds={crop_seconds} is shorter than {min_samples} samples.")
        if shuffle_buffer < 1:
            raise DashengAudioError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}.")
        self.units = resolve_sources(sources, audio_column, split)
        self.crop_samples = None if crop_seconds is None else round(crop_seconds * sampling_rate)
        self.sampling_rate, self.shuffle, self.shuffle_buffer, self.seed = sampling_rate, shuffle, shuffle_buffer, seed
        self.repeat, self.split_across_processes, self.min_samples = repeat, split_across_processes, min_samples
        self.epoch = 0
        self._skipped = _SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (Trainer calls this)."""
        self.epoch = int(epoch)

    @property
    def num_skipped(self) -> int:
        """
        Distinct files (or damaged shards) skipped so far by this process and its dataloader workers: each is
        counted (and warned about) in the first epoch an iteration reads, not again in the epochs that repeat it.
        """
        return self._skipped.total

    def reset_skipped(self) -> None:
        """Start counting skipped files afresh (before another pass over evaluation data)."""
        self._skipped.reset()

    def consumer(self) -> tuple[int, int]:
        """`(index, count)` of the reader this code runs in: process rank x dataloader workers + worker id."""
        rank, world_size = 0, 1
        if self.split_across_processes:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            else:
                rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        return rank * workers + worker, world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self.consumer()
        epoch = first = self.epoch
        while True:
            count = 0
            crops = self._epoch_crops(epoch, consumer, consumers, count_skips=epoch == first)
            for item in self._shuffled(crops, epoch, consumer):
                count += 1
                yield item
            if not self.repeat:
                return
            if count == 0:
                raise DashengAudioError(
                    f"Reader {consumer} of {consumers} got no audio in epoch {epoch}: every file was skipped, or the "
                    f"source has fewer files or crops than processes x dataloader workers; use fewer workers."
                )
            epoch += 1

    def _epoch_crops(self, epoch: int, consumer: int, consumers: int, count_skips: bool) -> Iterator[dict[str, Any]]:
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        if len(order) >= consumers:  # whole shards / files per reader
            mine, keep_record, keep_crop = order[consumer::consumers], None, None
        elif any(isinstance(self.units[index], TarShard) for index in order):  # every n-th sample
            mine, keep_record, keep_crop = order, consumer, None
        else:  # every n-th crop
            mine, keep_record, keep_crop = order, None, consumer
        record_number = crop_number = 0
        for index in mine:
            records = unit_records(self.units[index])
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except Exception as error:  # a damaged shard: skip the rest of it
                    if count_skips and (keep_record is None or record_number % consumers == keep_record):
                        name = getattr(self.units[index], "path", str(index))
                        self._skipped.add(DashengAudioError(f"{name}: damaged, the rest of it is skipped ({error})."))
                    break
                number, record_number = record_number, record_number + 1
                if keep_record is not None and number % consumers != keep_record:
                    continue
                owner = count_skips and (keep_crop is None or number % consumers == keep_crop)  # warns and counts
                try:
                    if isinstance(record, DashengAudioError):
                        raise record
                    audio = record.decode(self.sampling_rate)
                    if len(audio) < self.min_samples:
                        raise DashengAudioError(
                            f"{record.origin}: {len(audio)} samples, fewer than {self.min_samples}."
                        )
                except DashengAudioError as error:
                    if owner:
                        self._skipped.add(error)
                    continue
                crops = [(audio, len(audio), 0)] if self.crop_samples is None else crop_audio(audio, self.crop_samples)
                for crop, num_samples, offset in crops:
                    number, crop_number = crop_number, crop_number + 1
                    if keep_crop is not None and number % consumers != keep_crop:
                        continue
                    item = {"audio": crop, "num_samples": num_samples, "key": record.key, "offset": offset}
                    if record.labels is not None:
                        item["labels"] = record.labels
                    yield item

    def _shuffled(self, items: Iterator[dict[str, Any]], epoch: int, consumer: int) -> Iterator[dict[str, Any]]:
        if not self.shuffle:
            yield from items
            return
        rng = np.random.default_rng([self.seed, epoch, consumer, 1])
        buffer: list[dict[str, Any]] = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            index = int(rng.integers(len(buffer)))
            buffer[index], item = item, buffer[index]
            yield item
        for index in rng.permutation(len(buffer)):
            yield buffer[index]


def _size_and_time(path: str | None) -> list[int | None]:
    """A file's size in bytes and modification time in ns (None for what has no file or cannot be read)."""
    try:
        status = os.stat(path) if path else None
    except OSError:
        status = None
    return [None, None] if status is None else [status.st_size, status.st_mtime_ns]


class DashengAudioPart:
    """
    A run of consecutive clips of a source, read in order (for tools that write one output file per part, such as
    `dasheng-embed`): up to `clips_per_part` files or dataset rows, or one whole webdataset tar shard.

    Attributes:
        number: The part's position among all parts of the sources (0, 1, ...).
        num_clips: Clips in it, or None for a tar shard (known once read).
    """

    def __init__(self, number: int, units: list[Any]):
        self.number, self._units = number, units
        self.num_clips = None if any(isinstance(unit, TarShard) for unit in units) else len(units)

    def fingerprint(self) -> str:
        """SHA-256 of what the part reads (real file and shard paths with their sizes and modification times, dataset
        rows): it changes when files are added, removed, renamed or rewritten in its sources."""
        digest = hashlib.sha256()
        for unit in self._units:
            if isinstance(unit, AudioRecord):
                where = os.path.realpath(unit.path) if unit.path else unit.origin
                identity = ["file", where, unit.key, *_size_and_time(unit.path)]
            elif isinstance(unit, TarShard):
                identity = ["shard", os.path.realpath(unit.path), *_size_and_time(unit.path)]
            else:
                where = os.path.expanduser(unit.source)
                identity = ["row", os.path.realpath(where) if os.path.exists(where) else unit.source, unit.index]
            digest.update(json.dumps(identity).encode() + b"\n")
        return digest.hexdigest()

    def records(self) -> Iterator[AudioRecord | DashengAudioError]:
        """The part's clips in order; a sample that cannot be read comes as the error that names it."""
        for unit in self._units:
            records = unit_records(unit)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except Exception as error:  # a damaged shard: the rest of it is lost, named once
                    yield DashengAudioError(f"{getattr(unit, 'path', unit)}: damaged, the rest is skipped ({error}).")
                    break
                yield record


def audio_parts(
    sources: Any,
    clips_per_part: int,
    audio_column: str = "audio",
    split: str = "train",
    file_column: str = "filename",
    audio_root: str | None = None,
) -> list[DashengAudioPart]:
    """
    The clips of `sources` (see the module docstring) cut into [`DashengAudioPart`]s: consecutive files or dataset
    rows by `clips_per_part`, each tar shard a part of its own. The same sources always give the same parts.
    `file_column` names the file column of CSV/TSV lists, `audio_root` the folder their relative paths start from
    (default: the list's folder).
    """
    if clips_per_part < 1:
        raise DashengAudioError(f"clips_per_part must be at least 1, got {clips_per_part}.")
    parts: list[DashengAudioPart] = []
    pending: list[Any] = []
    for unit in resolve_sources(sources, audio_column, split, file_column, audio_root):
        if isinstance(unit, TarShard) or len(pending) == clips_per_part:
            if pending:
                parts.append(DashengAudioPart(len(parts), pending))
            pending = []
        if isinstance(unit, TarShard):
            parts.append(DashengAudioPart(len(parts), [unit]))
        else:
            pending.append(unit)
    if pending:
        parts.append(DashengAudioPart(len(parts), pending))
    return parts


def per_process_dataloader(
    dataloader: torch.utils.data.DataLoader, device: torch.device | str | None = None
) -> torch.utils.data.DataLoader:
    """
    `dataloader` prepared by accelerate for this process alone (device placement, end-of-data tracking for gradient
    accumulation) without splitting it again: for a [`DashengAudioDataset`] that already reads only its process's
    share. See the module docstring for its use in `Trainer.get_train_dataloader`.
    """
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(
        dataloader,
        device=None if device is None else torch.device(device),
        num_processes=1,
        process_index=0,
        put_on_device=device is not None,
        dispatch_batches=False,
    )
