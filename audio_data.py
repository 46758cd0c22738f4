"""
Audio loading shared by the linear probe, pretraining and evaluation adapters: files, folders, file lists, webdataset
tar shards and `datasets`, decoded to mono float32 at 16 kHz.

Sources (a string, or a list of them):

- a folder: every audio file under it (recursively), sorted by path;
- a file list (`.csv`, `.tsv`) with a `filename` column: relative paths are read from the list's folder and may not
  leave it (`../` is an error naming the row); the other columns become each clip's `labels`;
- webdataset tar shards, as a brace pattern (`shards/train-{000000..000127}.tar`), a glob or a folder of `.tar`
  files: one sample per key, the audio member (`.flac`, `.wav`, `.mp3`, ...) and an optional `.json` (`labels`);
- a `datasets` dataset (Hub id, local path, or a `datasets.Dataset`) with an audio column.

Files are decoded with soundfile, or with torchcodec (FFmpeg) for formats soundfile cannot read, mixed down to mono by
averaging the channels, and resampled to 16 kHz with a Hann-windowed sinc filter (6 zero crossings, roll-off 0.99:
torchaudio's default, which [`resample`] equals to about 1e-6). A source that matches nothing raises
[`DashengAudioError`] when the dataset is built; an unreadable, empty, non-finite or too short file is skipped with
a warning that names it and counted in `num_skipped`.

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
start). For evaluation, build the dataset with `split_across_processes=False` and leave it to Trainer's default
loader (rank 0 reads, batches are sent to every process).
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import math
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

__all__ = [
    "AUDIO_EXTENSIONS",
    "MIN_SAMPLES",
    "SAMPLING_RATE",
    "AudioRecord",
    "DashengAudioClips",
    "DashengAudioDataset",
    "DashengAudioError",
    "crop_audio",
    "decode_audio",
    "expand_pattern",
    "find_audio_files",
    "per_process_dataloader",
    "read_file_list",
    "resample",
]

logger = logging.get_logger(__name__)

SAMPLING_RATE = 16000
MIN_SAMPLES = 480  # 30 ms at 16 kHz: the shortest input Dasheng encodes (one 40 ms token needs 3 frames)
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "aiff", "aif", "au", "w64", "webm", "mka", "caf")
_ZERO_CROSSINGS, _ROLLOFF = 6, 0.99
_MAX_SLOTS = 1024  # skip counters: one per process (slot 0) and dataloader worker


class DashengAudioError(ValueError):
    """A source or file that cannot be used; the message names it and says how to fix it."""


# ------------------------------------------------------------------------------------------------- decoding


def resample(waveform: np.ndarray | torch.Tensor, orig_rate: int, new_rate: int) -> np.ndarray | torch.Tensor:
    """
    Resample `(..., samples)` from `orig_rate` to `new_rate` Hz (band-limited sinc interpolation, Hann window).

    Returns `ceil(samples * new_rate / orig_rate)` samples, of the input's type (numpy or torch) and float dtype.
    """
    if orig_rate == new_rate:
        return waveform
    divisor = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // divisor, int(orig_rate) // divisor
    is_numpy = isinstance(waveform, np.ndarray)
    signal = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)) if is_numpy else waveform
    kernel, half_width = _sinc_kernel(down, up)
    shape, length = signal.shape[:-1], signal.shape[-1]
    padded = torch.nn.functional.pad(signal.reshape(-1, 1, length).float(), (half_width, half_width + down))
    phases = torch.nn.functional.conv1d(padded, kernel.to(padded.device), stride=down)  # (n, up, steps)
    output = phases.transpose(1, 2).reshape(*shape, -1)[..., : math.ceil(length * up / down)]
    return output.numpy() if is_numpy else output.to(waveform.dtype)


@functools.lru_cache(maxsize=16)
def _sinc_kernel(down: int, up: int) -> tuple[torch.Tensor, int]:
    """`(up, 1, taps)` filters, one per output phase, for coprime rates `down -> up`; and the input padding."""
    cutoff = min(down, up) * _ROLLOFF  # in units of the common base rate
    half_width = math.ceil(_ZERO_CROSSINGS * down / cutoff)
    offsets = torch.arange(-half_width, half_width + down, dtype=torch.float64) / down
    time = (offsets[None, :] - torch.arange(up, dtype=torch.float64)[:, None] / up) * cutoff
    time = time.clamp(-_ZERO_CROSSINGS, _ZERO_CROSSINGS)
    window = torch.cos(time * math.pi / (2 * _ZERO_CROSSINGS)) ** 2
    kernel = torch.special.sinc(time) * window * (cutoff / down)
    return kernel.float()[:, None, :], half_width


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


def _decode_with_torchcodec(source: Any, name: str, soundfile_error: Exception) -> tuple[np.ndarray, int]:
    try:
        from torchcodec.decoders import AudioDecoder
    except ImportError as error:  # also raised when FFmpeg's libraries are missing
        raise DashengAudioError(
            f"{name}: soundfile cannot read it ({soundfile_error}); for other formats install torchcodec and FFmpeg "
            f"(pip install torchcodec; apt-get install ffmpeg) ({error})."
        ) from error
    try:
        samples = AudioDecoder(bytes(source) if isinstance(source, memoryview) else source).get_all_samples()
        return samples.data.mean(dim=0).numpy(), int(samples.sample_rate)
    except Exception as error:
        raise DashengAudioError(f"{name}: unreadable audio ({type(error).__name__}: {error}).") from error


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


# -------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class AudioRecord:
    """One audio file of a source: a path or the bytes read from a shard, with its labels and a name for messages."""

    key: str
    origin: str
    path: str | None = None
    data: bytes | None = None
    labels: dict[str, Any] | None = None

    def decode(self, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
        """`(samples,)` float32 mono at `sampling_rate`; raises [`DashengAudioError`] naming `origin`."""
        return decode_audio(self.data if self.path is None else self.path, self.origin, sampling_rate)


def expand_pattern(pattern: str) -> list[str]:
    """
    Paths a shard pattern names: brace ranges and lists (`train-{000000..000127}.tar`, `{a,b}.tar`) expanded, then
    glob patterns (`*`, `?`, `[...]`) matched. Raises [`DashengAudioError`] if a named file is missing or a glob
    matches nothing.
    """
    names = _expand_braces(pattern)
    paths, missing = [], []
    for name in names:
        if glob.has_magic(name):
            paths += sorted(glob.glob(os.path.expanduser(name), recursive=True))
        elif os.path.isfile(os.path.expanduser(name)):
            paths.append(os.path.expanduser(name))
        else:
            missing.append(name)
    if missing:
        raise DashengAudioError(f"{pattern}: {len(missing)} of {len(names)} files do not exist, e.g. {missing[:3]}.")
    if not paths:
        raise DashengAudioError(f"{pattern}: matches no files.")
    return paths


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(value).zfill(width) for value in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


def find_audio_files(folder: str | os.PathLike) -> list[Path]:
    """Audio files (by extension, see `AUDIO_EXTENSIONS`) under `folder`, recursively, sorted by path."""
    root = Path(folder).expanduser()
    found = [path for path in root.rglob("*") if path.suffix[1:].lower() in AUDIO_EXTENSIONS and path.is_file()]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def read_file_list(
    path: str | os.PathLike,
    audio_root: str | os.PathLike | None = None,
    filename_column: str = "filename",
    allow_absolute: bool = True,
) -> list[AudioRecord]:
    """
    Records of a CSV/TSV file list (UTF-8, with or without a byte-order mark; `.tsv` tab-separated, `.csv` comma,
    anything else sniffed). `filename` is read relative to `audio_root` (default: the list's folder) and may not leave
    it; absolute paths are taken as they are when `allow_absolute`. The other columns become `labels` (strings).
    Files are not opened here (a missing one is skipped when read).
    """
    path = Path(path).expanduser()
    root = Path(audio_root).expanduser() if audio_root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DashengAudioError(f"{path}: cannot read the file list ({error}).") from error
    lines = text.splitlines()
    if path.suffix.lower() in (".tsv", ".tab"):
        delimiter = "\t"
    elif path.suffix.lower() == ".csv":
        delimiter = ","
    else:
        delimiter = max("\t,;", key=lambda candidate: lines[0].count(candidate)) if lines else ","
    rows = csv.reader(lines, delimiter=delimiter)
    header = [name.strip() for name in next(rows, [])]
    if filename_column not in header:
        raise DashengAudioError(
            f"{path}: no {filename_column!r} column in the header {header} (delimiter {delimiter!r})."
        )
    column = header.index(filename_column)
    records = []
    for line_number, row in enumerate(rows, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DashengAudioError(f"{path} row {line_number}: {len(row)} cells, the header has {len(header)}.")
        filename = row[column].strip()
        where = f"{path} row {line_number} ({filename})"
        if not filename:
            raise DashengAudioError(f"{path} row {line_number}: empty {filename_column}.")
        if os.path.isabs(filename):
            if not allow_absolute:
                raise DashengAudioError(f"{where}: absolute paths are not allowed; name files relative to {root}.")
            full = filename
        else:
            normal = os.path.normpath(filename)
            if normal == ".." or normal.startswith(".." + os.sep) or normal.startswith("../"):
                raise DashengAudioError(f"{where}: the path leads outside {root}; list files inside it, without '..'.")
            full = str(root / normal)
        labels = {name: value for index, (name, value) in enumerate(zip(header, row)) if index != column}
        records.append(AudioRecord(key=filename, origin=where, path=full, labels=labels or None))
    if not records:
        raise DashengAudioError(f"{path}: the file list has no rows.")
    return records


class _TarShard:
    """A webdataset tar shard, read as a stream: consecutive members sharing a key form one sample."""

    def __init__(self, path: str):
        self.path = path

    def records(self) -> Iterator[AudioRecord | DashengAudioError]:
        """The samples in order; a sample without audio or with bad json comes as the error that names it."""
        key, parts = None, {}
        with tarfile.open(self.path, mode="r|*") as tar:
            for member in tar:
                directory, base = posixpath.split(member.name)
                if not member.isfile() or base.startswith((".", "__")):
                    continue
                stem, _, extension = base.partition(".")
                member_key = posixpath.join(directory, stem)
                if member_key != key and parts:
                    yield self._record(key, parts)
                    parts = {}
                key = member_key
                parts[extension.lower()] = tar.extractfile(member).read()
            end = tar.offset
        if not self.path.endswith(".tar") or os.path.getsize(self.path) >= end + 2 * tarfile.BLOCKSIZE:
            if parts:
                yield self._record(key, parts)
        else:  # a plain tar cut at a header ends like a complete one, but for its end-of-archive blocks
            raise DashengAudioError(f"{self.path}: truncated after {end} bytes (no end-of-archive marker).")

    def _record(self, key: str, parts: dict[str, bytes]) -> AudioRecord | DashengAudioError:
        origin = f"{self.path}:{key}"
        audio = next((extension for extension in parts if extension.rsplit(".", 1)[-1] in AUDIO_EXTENSIONS), None)
        if audio is None:
            return DashengAudioError(f"{origin}: no audio member (has {sorted(parts)}).")
        labels = None
        if "json" in parts:
            try:
                labels = json.loads(parts["json"])
            except ValueError as error:
                return DashengAudioError(f"{origin}: unreadable .json ({error}).")
        return AudioRecord(key=key, origin=origin, data=parts[audio], labels=labels)


class _DatasetRow:
    """Row `index` of a `datasets.Dataset` whose audio column is not decoded (`{"bytes", "path"}`)."""

    def __init__(self, dataset: Any, index: int, audio_column: str, source: str):
        self.dataset, self.index, self.audio_column, self.source = dataset, index, audio_column, source

    def records(self) -> Iterator[AudioRecord]:
        row = self.dataset[self.index]
        audio = row.pop(self.audio_column)
        origin = f"{self.source}[{self.index}]" + (f" ({audio.get('path')})" if audio.get("path") else "")
        key = audio.get("path") or str(self.index)
        if audio.get("bytes") is not None:
            yield AudioRecord(key=key, origin=origin, data=audio["bytes"], labels=row or None)
        else:
            yield AudioRecord(key=key, origin=origin, path=audio.get("path"), labels=row or None)


def _load_datasets_source(source: Any, audio_column: str, split: str) -> list[_DatasetRow]:
    import datasets

    name = source if isinstance(source, str) else getattr(getattr(source, "info", None), "dataset_name", None)
    if isinstance(source, str):
        try:
            local = Path(source).expanduser()
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
                source = datasets.load_from_disk(str(local))
                source = source[split] if isinstance(source, datasets.DatasetDict) else source
            else:
                source = datasets.load_dataset(source, split=split)
        except Exception as error:
            raise DashengAudioError(
                f"{name}: not a folder, file list or shard pattern, and `datasets` cannot load it "
                f"({type(error).__name__}: {error})."
            ) from error
    if audio_column not in source.column_names:
        raise DashengAudioError(f"{name}: no audio column {audio_column!r} (columns: {source.column_names}).")
    source = source.cast_column(audio_column, datasets.Audio(decode=False))
    if len(source) == 0:
        raise DashengAudioError(f"{name}: the dataset has no rows.")
    return [_DatasetRow(source, index, audio_column, str(name or "dataset")) for index in range(len(source))]


def _resolve(source: Any, audio_column: str, split: str) -> list[AudioRecord | _TarShard | _DatasetRow]:
    """The units (files, shards, dataset rows) of one source; [`DashengAudioError`] if it matches nothing."""
    if not isinstance(source, (str, os.PathLike)):
        return _load_datasets_source(source, audio_column, split)
    text = os.fspath(source)
    local = Path(text).expanduser()
    if ".tar" in text and (glob.has_magic(text) or "{" in text or local.is_file()):
        return [_TarShard(path) for path in expand_pattern(text)]
    if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():  # save_to_disk
        return _load_datasets_source(text, audio_column, split)
    if local.is_dir():
        files = find_audio_files(local)
        if files:
            return [AudioRecord(key=str(f.relative_to(local)), origin=str(f), path=str(f)) for f in files]
        shards = sorted(str(path) for path in local.glob("*.tar"))
        if shards:
            return [_TarShard(path) for path in shards]
        raise DashengAudioError(f"{local}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) or .tar shards in it.")
    if local.is_file() and local.suffix[1:].lower() in AUDIO_EXTENSIONS:
        return [AudioRecord(key=local.name, origin=str(local), path=str(local))]
    if local.is_file():
        return read_file_list(local)
    if glob.has_magic(text) or "{" in text:
        return [AudioRecord(key=path, origin=path, path=path) for path in expand_pattern(text)]
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
    if looks_like_path or local.suffix[1:].lower() in (*AUDIO_EXTENSIONS, "csv", "tsv", "tar", "txt"):
        raise DashengAudioError(f"{text}: no such file or folder.")
    return _load_datasets_source(text, audio_column, split)


def _resolve_all(sources: Any, audio_column: str, split: str) -> list[AudioRecord | _TarShard | _DatasetRow]:
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, Sequence):
        sources = [sources]
    if not sources:
        raise DashengAudioError("No audio source given.")
    return [unit for source in sources for unit in _resolve(source, audio_column, split)]


def _unit_records(unit: AudioRecord | _TarShard | _DatasetRow) -> Iterator[AudioRecord | DashengAudioError]:
    return iter([unit]) if isinstance(unit, AudioRecord) else unit.records()


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
        units = _resolve_all(sources, audio_column, split)
        shards = [unit.path for unit in units if isinstance(unit, _TarShard)]
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
        return next(_unit_records(self.units[index]))

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
        self.units = _resolve_all(sources, audio_column, split)
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
        """Files (or damaged shards) skipped so far by this process and its dataloader workers."""
        return self._skipped.total

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
        epoch = self.epoch
        while True:
            count = 0
            for item in self._shuffled(self._epoch_crops(epoch, consumer, consumers), epoch, consumer):
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

    def _epoch_crops(self, epoch: int, consumer: int, consumers: int) -> Iterator[dict[str, Any]]:
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        if len(order) >= consumers:  # whole shards / files per reader
            mine, keep_record, keep_crop = order[consumer::consumers], None, None
        elif any(isinstance(self.units[index], _TarShard) for index in order):  # every n-th sample
            mine, keep_record, keep_crop = order, consumer, None
        else:  # every n-th crop
            mine, keep_record, keep_crop = order, None, consumer
        record_number = crop_number = 0
        for index in mine:
            records = _unit_records(self.units[index])
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except Exception as error:  # a damaged shard: skip the rest of it
                    if keep_record is None or record_number % consumers == keep_record:
                        name = getattr(self.units[index], "path", str(index))
                        self._skipped.add(DashengAudioError(f"{name}: damaged, the rest of it is skipped ({error})."))
                    break
                number, record_number = record_number, record_number + 1
                if keep_record is not None and number % consumers != keep_record:
                    continue
                owner = keep_crop is None or number % consumers == keep_crop  # warns and counts a bad file
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
