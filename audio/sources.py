"""
Audio sources and what they hold: folders, file lists (`.csv`/`.tsv` with a `filename` column), webdataset tar
shards (brace patterns, globs, folders of `.tar`) and `datasets` datasets, resolved into units (files, shards,
dataset rows) that yield [`AudioRecord`]s. See `audio/datasets.py` for the rules of each source.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .decoding import AUDIO_EXTENSIONS, SAMPLING_RATE, DashengAudioError, decode_audio

__all__ = [
    "AudioRecord",
    "DashengFileListColumnError",
    "TarShard",
    "expand_pattern",
    "find_audio_files",
    "read_file_list",
    "resolve_sources",
    "unit_records",
]


class DashengFileListColumnError(DashengAudioError):
    """A file list without the file column asked for (tools name it with `--file-column`)."""


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
        raise DashengFileListColumnError(
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
                raise DashengAudioError(
                    f"{where}: the path leads outside {root}; list files inside it without '..', give absolute paths, "
                    f"or name the folder the paths start from (--audio-root)."
                )
            full = str(root / normal)
        labels = {name: value for index, (name, value) in enumerate(zip(header, row)) if index != column}
        records.append(AudioRecord(key=filename, origin=where, path=full, labels=labels or None))
    if not records:
        raise DashengAudioError(f"{path}: the file list has no rows.")
    return records


class TarShard:
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
        with open(self.path, "rb") as handle:
            compressed = handle.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))  # gzip, bzip2, xz
        if compressed or os.path.getsize(self.path) >= end + 2 * tarfile.BLOCKSIZE:
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


def _class_label_columns(features: Any) -> dict[str, tuple[Any, bool]]:
    """The columns of `features` holding `ClassLabel` indices, or lists of them: `{column: (ClassLabel, is_list)}`."""
    import datasets

    found = {}
    for column, feature in features.items():
        inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            found[column] = (feature, False)
        elif isinstance(inner, datasets.ClassLabel):
            found[column] = (inner, True)
    return found


def _class_names(value: Any, label: Any, is_list: bool) -> Any:
    """`ClassLabel` indices as their names (-1, "no label", as None)."""
    if is_list:
        return [label.int2str(int(item)) for item in value if item is not None and int(item) >= 0]
    return None if value is None or int(value) < 0 else label.int2str(int(value))


class _DatasetRow:
    """
    Row `index` of a `datasets.Dataset` whose audio column is not decoded (`{"bytes", "path"}`); `ClassLabel` columns
    (`class_labels`, from [`_class_label_columns`]) become their names.
    """

    def __init__(
        self, dataset: Any, index: int, audio_column: str, source: str, class_labels: dict[str, tuple[Any, bool]]
    ):
        self.dataset, self.index, self.audio_column, self.source = dataset, index, audio_column, source
        self.class_labels = class_labels

    def records(self) -> Iterator[AudioRecord]:
        row = self.dataset[self.index]
        audio = row.pop(self.audio_column)
        for column, (label, is_list) in self.class_labels.items():
            row[column] = _class_names(row[column], label, is_list)
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
    class_labels = _class_label_columns(source.features)
    name = str(name or "dataset")
    return [_DatasetRow(source, index, audio_column, name, class_labels) for index in range(len(source))]


def _resolve(
    source: Any, audio_column: str, split: str, file_column: str, audio_root: str | None
) -> list[AudioRecord | TarShard | _DatasetRow]:
    """The units (files, shards, dataset rows) of one source; [`DashengAudioError`] if it matches nothing."""
    if not isinstance(source, (str, os.PathLike)):
        return _load_datasets_source(source, audio_column, split)
    text = os.fspath(source)
    local = Path(text).expanduser()
    if ".tar" in text and (glob.has_magic(text) or "{" in text or local.is_file()):
        return _unpublished_check([TarShard(path) for path in expand_pattern(text)])
    if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():  # save_to_disk
        return _load_datasets_source(text, audio_column, split)
    if local.is_dir():
        files = find_audio_files(local)
        if files:
            # Class folders (Transformers' audiofolder convention): with every file in a subfolder, the name of
            # its folder is its `label` (`dog/1.wav`, or `train/dog/1.wav`).
            classes = all(f.parent != local for f in files)
            return [
                AudioRecord(
                    key=str(f.relative_to(local)),
                    origin=str(f),
                    path=str(f),
                    labels={"label": f.parent.name} if classes else None,
                )
                for f in files
            ]
        shards = sorted(str(path) for path in local.glob("*.tar"))
        if shards:
            return _unpublished_check([TarShard(path) for path in shards])
        raise DashengAudioError(f"{local}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) or .tar shards in it.")
    if local.is_file() and local.suffix[1:].lower() in AUDIO_EXTENSIONS:
        return [AudioRecord(key=local.name, origin=str(local), path=str(local))]
    if local.is_file():
        return read_file_list(local, audio_root=audio_root, filename_column=file_column)
    if glob.has_magic(text) or "{" in text:
        return [AudioRecord(key=path, origin=path, path=path) for path in expand_pattern(text)]
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
    if looks_like_path or local.suffix[1:].lower() in (*AUDIO_EXTENSIONS, "csv", "tsv", "tar", "txt"):
        raise DashengAudioError(f"{text}: no such file or folder.")
    return _load_datasets_source(text, audio_column, split)


def _unpublished_check(shards: list[TarShard]) -> list[TarShard]:
    """Refuse shards whose folder holds the journal of a set `dasheng-make-shards` was killed while publishing."""
    for folder in sorted({os.path.dirname(os.path.abspath(shard.path)) for shard in shards}):
        journals = sorted(glob.glob(os.path.join(glob.escape(folder), ".*.publish.json")))
        if journals:
            raise DashengAudioError(
                f"{folder}: dasheng-make-shards was stopped while publishing shards there ({journals[0]}), so old and "
                f"new shards may be mixed; run dasheng-make-shards on that folder again (it completes the set first)."
            )
    return shards


def resolve_sources(
    sources: Any, audio_column: str, split: str, file_column: str = "filename", audio_root: str | None = None
) -> list[AudioRecord | TarShard | _DatasetRow]:
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, Sequence):
        sources = [sources]
    if not sources:
        raise DashengAudioError("No audio source given.")
    return [unit for source in sources for unit in _resolve(source, audio_column, split, file_column, audio_root)]


def unit_records(unit: AudioRecord | TarShard | _DatasetRow) -> Iterator[AudioRecord | DashengAudioError]:
    return iter([unit]) if isinstance(unit, AudioRecord) else unit.records()
