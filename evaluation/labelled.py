"""
Labelled datasets for `dasheng-eval`, in any of the layouts users have, as [`AudioClips`]:

- a folder of class subfolders (`dog/1.wav`, `cat/2.wav`; Transformers' audiofolder convention), optionally inside
  split folders (`train/dog/1.wav`, `test/cat/2.wav`);
- a CSV/TSV file list: a file column and a label column (names settable), optionally a fold or a split column;
- a `datasets` id or path (`save_to_disk` folder) with an audio and a label column (`ClassLabel` names used; the
  `train`/`validation`/`test` splits it has become given splits);
- a `dasheng-embed` output folder (embeddings already computed; its label column);
- the ESC-50 release layout (`meta/esc50.csv`), read by `linear_probe.py`'s preset.

Labels that are lists, or strings joined by `label_separator`, make a multi-label task (multi-hot targets).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..audio.datasets import (
    AudioRecord,
    DashengAudioClips,
    DashengAudioError,
    DashengFileListColumnError,
    find_audio_files,
    read_file_list,
)
from .embeddings import AudioClips, LinearProbeError, hub_hint, is_local_path

__all__ = [
    "ESC50_DATASET",
    "SPLIT_NAMES",
    "DatasetColumns",
    "check_dataset_path",
    "load_esc50_clips",
    "load_labelled_clips",
    "refuse_duplicate_files",
]

ESC50_DATASET = "ashraq/esc50"

# Accepted split names and what they mean.
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation"}
SPLIT_NAMES |= {"val": "validation", "dev": "validation", "test": "test", "eval": "test", "evaluation": "test"}


@dataclass
class DatasetColumns:
    """Which columns of a file list, dataset or embedding table hold what (the `dasheng-eval` flags)."""

    file: str = "filename"
    label: str = "label"
    fold: str | None = None
    split: str | None = None
    label_separator: str | None = None
    audio: str = "audio"
    layer: int | None = None


def refuse_duplicate_files(files: Sequence[str], where: Sequence[str]) -> None:
    """One clear error naming the first file listed twice (a clip would sit in two folds, or train and test)."""
    first: dict[str, int] = {}
    for index, name in enumerate(files):
        if name in first:
            raise LinearProbeError(
                f"{where[index]}: the file is listed twice (also {where[first[name]]}); each clip must appear once, "
                f"or it would be both trained and tested on. Remove one of the rows."
            )
        first[name] = index


def _label_sets(values: Sequence[Any], separator: str | None) -> list[list[str]] | None:
    """Each clip's labels as a list for a multi-label task, or None for single-label values."""
    if any(isinstance(value, (list, tuple, np.ndarray)) for value in values):
        return [[str(item) for item in value] for value in values]
    if separator:
        return [[part.strip() for part in str(value).split(separator) if part.strip()] for value in values]
    return None


def _encode_labels(values: Sequence[Any], separator: str | None, names: list[str] | None = None):
    """`(labels, label_names)`: class indices (single-label) or multi-hot targets (multi-label)."""
    sets = _label_sets(values, separator)
    if sets is not None:
        classes = names or sorted({label for labels in sets for label in labels})
        index = {name: position for position, name in enumerate(classes)}
        targets = np.zeros((len(sets), len(classes)), dtype=np.float32)
        for row, labels in enumerate(sets):
            targets[row, [index[label] for label in labels]] = 1.0
        return targets, classes
    if names is not None and all(isinstance(value, (int, np.integer)) for value in values):
        _at_least_two_classes([names[value] for value in values])
        return np.asarray(values, dtype=np.int64), list(names)  # ClassLabel indices with their names
    text = [str(value).strip() for value in values]
    _at_least_two_classes(text)
    classes = sorted(set(text), key=lambda name: (len(name), name) if name.isdigit() else (1 << 30, name))
    index = {name: position for position, name in enumerate(classes)}
    return np.array([index[name] for name in text], dtype=np.int64), classes


def _at_least_two_classes(labels: Sequence[str]) -> None:
    """A single-label task needs two classes: with one, every head scores perfectly and the result means nothing."""
    if len(set(labels)) < 2:
        raise LinearProbeError(
            f"All {len(labels)} clips have the same label ({labels[0]!r}), so there is nothing to classify; name "
            f"the column that holds the classes with --label-column."
        )


def _splits(values: Sequence[Any], where: Sequence[str], column: str) -> np.ndarray:
    splits = []
    for value, name in zip(values, where):
        split = SPLIT_NAMES.get(str(value).strip().lower())
        if split is None:
            raise LinearProbeError(f"{name}: {column} {value!r} is not a split; use train, validation or test.")
        splits.append(split)
    if "train" not in splits or "test" not in splits:
        raise LinearProbeError(f"The {column} column needs train and test rows (has {sorted(set(splits))}).")
    return np.array(splits, dtype=object)


def _folds(values: Sequence[Any], where: Sequence[str], column: str) -> np.ndarray:
    folds = []
    for value, name in zip(values, where):
        try:
            folds.append(int(str(value).strip()))
        except ValueError:
            raise LinearProbeError(f"{name}: {column} {value!r} is not an integer.") from None
    return np.array(folds, dtype=np.int64)


def _file_fingerprint(kind: str, records: Sequence[AudioRecord], extra: str = "") -> str:
    digest = hashlib.sha256(f"{kind}|{extra}".encode())
    for record in records:
        stat = Path(record.path).stat() if record.path and Path(record.path).exists() else None
        digest.update(f"{record.key}:{stat and stat.st_size}:{stat and stat.st_mtime_ns};".encode())
    return f"{kind}:{digest.hexdigest()}"


def _from_records(
    records: list[AudioRecord], columns: DatasetColumns, source: str, labels: list[Any], fingerprint: str
) -> AudioClips:
    where = [record.origin for record in records]
    refuse_duplicate_files([record.path or record.key for record in records], where)
    targets, names = _encode_labels(labels, columns.label_separator)
    folds = splits = None
    row_labels = [record.labels or {} for record in records]
    if columns.split:
        splits = _splits([row.get(columns.split) for row in row_labels], where, columns.split)
    elif columns.fold:
        folds = _folds([row.get(columns.fold) for row in row_labels], where, columns.fold)
    return AudioClips(
        audio=DashengAudioClips.from_records(records),
        labels=targets,
        folds=folds,
        splits=splits,
        label_names=names,
        fingerprint=fingerprint,
        source=source,
        files=[record.path or record.key for record in records],
    )


def _from_file_list(path: Path, columns: DatasetColumns) -> AudioClips:
    try:
        records = read_file_list(path, filename_column=columns.file)
    except DashengFileListColumnError as error:
        raise LinearProbeError(f"{error} Name the file column with --file-column.") from error
    except DashengAudioError as error:
        raise LinearProbeError(str(error)) from error
    header = set(records[0].labels or {})
    for flag, name in (("--label-column", columns.label), ("--fold-column", columns.fold)):
        if name and name not in header:
            raise LinearProbeError(f"{path} has no {name!r} column for {flag} (columns: {sorted(header)}).")
    if columns.split and columns.split not in header:
        raise LinearProbeError(
            f"{path} has no {columns.split!r} column for --split-column (columns: {sorted(header)})."
        )
    labels = [record.labels[columns.label] for record in records]
    fingerprint = _file_fingerprint("list", records, hashlib.sha256(path.read_bytes()).hexdigest())
    return _from_records(records, columns, str(path), labels, fingerprint)


def _from_class_folders(root: Path, columns: DatasetColumns) -> AudioClips:
    subfolders = sorted(path for path in root.iterdir() if path.is_dir())
    split_folders = [path for path in subfolders if path.name.lower() in SPLIT_NAMES]
    records, labels = [], []
    for base in split_folders or [root]:
        classes = sorted(path for path in base.iterdir() if path.is_dir())
        for folder in classes:
            for file in find_audio_files(folder):
                split = {"split": SPLIT_NAMES[base.name.lower()]} if split_folders else None
                records.append(
                    AudioRecord(key=str(file.relative_to(root)), origin=str(file), path=str(file), labels=split)
                )
                labels.append(folder.name)
    if not records:
        raise LinearProbeError(
            f"{root}: no audio files in class subfolders (expected {root}/<class>/<file>.wav, optionally under "
            f"train/ and test/)."
        )
    columns = DatasetColumns(split="split" if split_folders else None, fold=None)
    return _from_records(records, columns, str(root), labels, _file_fingerprint("folder", records))


def _from_embeddings(root: Path, columns: DatasetColumns) -> AudioClips:
    from ..embedding.store import EmbeddingStoreError, read_clip_table

    try:
        table, embeddings = read_clip_table(root, columns.layer)
    except EmbeddingStoreError as error:
        raise LinearProbeError(str(error)) from error
    if columns.label not in table.columns:
        raise LinearProbeError(
            f"{root}: no label column {columns.label!r} in the embeddings (columns: {list(table.columns)}); pass "
            f"--label-column, or embed a source that has labels (a file list, a datasets dataset)."
        )
    where = [f"{root} ({file})" for file in table["file"]]
    refuse_duplicate_files(list(table["file"]), where)
    targets, names = _encode_labels(list(table[columns.label]), columns.label_separator)
    folds = _folds(list(table[columns.fold]), where, columns.fold) if columns.fold else None
    splits = _splits(list(table[columns.split]), where, columns.split) if columns.split else None
    info = json.loads((root / "info.json").read_text())
    return AudioClips(
        audio=None,
        labels=targets,
        folds=folds,
        splits=splits,
        label_names=names,
        fingerprint=f"embedded:{info.get('weights_sha256')}:{len(table)}",
        source=str(root),
        files=list(table["file"]),
        embeddings=embeddings,
    )


def _from_datasets(source: str, columns: DatasetColumns) -> AudioClips:
    import datasets

    try:
        local = Path(source).expanduser()
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(source)
    except Exception as error:
        raise LinearProbeError(
            f"Could not load the dataset {source!r} ({type(error).__name__}: {error}). Pass a folder of class "
            f"subfolders, a CSV/TSV file list, a dasheng-embed output folder, or a datasets folder (save_to_disk)."
        ) from error
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    unknown = [name for name in parts if name.lower() not in SPLIT_NAMES]
    if len(parts) > 1 and unknown:
        raise LinearProbeError(f"{source}: splits {unknown} are not train, validation or test.")
    split_of = [SPLIT_NAMES.get(name.lower(), "train") for name in parts]
    data = datasets.concatenate_datasets(list(parts.values()))
    for flag, name in (("--audio-column", columns.audio), ("--label-column", columns.label)):
        if name not in data.column_names:
            raise LinearProbeError(f"{source} has no {name!r} column for {flag} (columns: {data.column_names}).")
    feature = data.features[columns.label]
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
    labels = list(data[columns.label])
    if names and labels and isinstance(labels[0], list):
        labels = [[names[item] for item in value] for value in labels]
        names = None
    audio = DashengAudioClips(data, audio_column=columns.audio)
    where = [f"{source}[{index}]" for index in range(len(data))]
    files = [audio.record(index).key for index in range(len(data))]
    splits = None
    if len(parts) > 1:
        splits = np.array([s for s, part in zip(split_of, parts.values()) for _ in range(len(part))], dtype=object)
    elif columns.split:
        splits = _splits(list(data[columns.split]), where, columns.split)
    folds = _folds(list(data[columns.fold]), where, columns.fold) if columns.fold else None
    targets, label_names = _encode_labels(labels, columns.label_separator, names)
    return AudioClips(
        audio=audio,
        labels=targets,
        folds=folds,
        splits=splits,
        label_names=label_names,
        fingerprint=f"datasets:{source}:{data._fingerprint}",
        source=source,
        files=files,
    )


def check_dataset_path(source: str) -> None:
    """
    Refuse, before anything is loaded, a `--dataset` that is an unfinished `dasheng-embed` output (its folders or
    `settings.json` but no `info.json`) or a local path that is not there: one that reads as a path or names a table
    (`.csv`, `.tsv`, `.parquet`).
    """
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "info.json").is_file():
        started = (path / "settings.json").is_file() or any((path / "parts").glob("part-*.json"))
        if started or any((path / "clips").glob("part-*.parquet*")):
            raise LinearProbeError(
                f"{source} is an unfinished dasheng-embed output (no info.json); rerun the same dasheng-embed command "
                f"to finish it."
            )
    table = path.suffix.lower() in (".csv", ".tsv", ".parquet")
    if not path.exists() and (is_local_path(source) or table):  # else a Hub id, which the Hub check judges
        raise LinearProbeError(f"--dataset {source!r} does not exist (no such file or folder).")


def load_labelled_clips(source: str, columns: DatasetColumns | None = None) -> AudioClips:
    """Load a labelled dataset in any layout of the module docstring; the layout is recognised from what is there."""
    columns = columns or DatasetColumns()
    check_dataset_path(source)
    path = Path(source).expanduser()
    if path.is_file():
        return _from_file_list(path, columns)
    if path.is_dir() and (path / "info.json").is_file() and (path / "clips").is_dir():
        return _from_embeddings(path, columns)
    if path.is_dir() and (path / "meta" / "esc50.csv").is_file():
        return load_esc50_clips(str(path))
    if path.is_dir() and not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _from_class_folders(path, columns)
    return _from_datasets(source, columns)


# ---------------------------------------------------------------------------------------------------- ESC-50


def _integers(values: Sequence[Any], column: str, name: Any) -> list[int]:
    """`values` as integers; a cell that is not one is an error naming its row (`name(index)`)."""
    integers = []
    for index, value in enumerate(values):
        try:
            integers.append(int(str(value).strip()))
        except ValueError:
            raise LinearProbeError(f"{name(index)}: {column} {value!r} is not an integer.") from None
    return integers


def load_esc50_clips(source: str = ESC50_DATASET) -> AudioClips:
    """
    Load a dataset with ESC-50 columns: a local folder in the release layout or a Hub dataset id.

    The local folder holds `meta/esc50.csv` (columns `filename`, `fold`, `target`, optionally `category`) and the
    files under `audio/` (names relative to it, staying inside it); a Hub dataset has one `train` split with `audio`,
    `fold`, `target` (and `category`). Audio at any sampling rate is resampled to 16 kHz when decoded.
    """
    if is_local_path(source):
        root = Path(source).expanduser()
        meta = root / "meta" / "esc50.csv"
        if not meta.is_file():
            raise LinearProbeError(
                f"{root} is not a folder in the ESC-50 release layout: {meta} is missing. Pass the unpacked "
                f"ESC-50-master folder (audio/*.wav and meta/esc50.csv), or a Hub dataset id such as {ESC50_DATASET}."
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
        refuse_duplicate_files([record.path for record in records], [record.origin for record in records])
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
                f"{hub_hint('copy of ESC-50')}: download https://github.com/karoldvl/ESC-50/archive/master.zip, "
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
