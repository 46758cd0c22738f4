"""
The on-disk layout of `dasheng-embed`'s output, written so that an interrupted run resumes exactly:

    OUT/settings.json               what the embeddings were made with (a rerun with other settings is refused)
    OUT/clips/part-00000.parquet    one row per clip: file, key, duration, the source's label columns, embedding
                                    (and layer_<i> with --layers)
    OUT/frames/part-00000.parquet   with --frames: one row per token (25 Hz): file, key, time (centre, s), embedding
    OUT/parts/part-00000.json       a part's completion record (rows, skipped files), written last
    OUT/info.json                   the index, written once every part is done: model, weights fingerprint, counts

Every file is written under a temporary name and renamed into place, so a killed run leaves no partial file under a
final name; a part counts as done only once its record exists. `datasets.load_dataset("parquet",
data_files="OUT/clips/*.parquet")` and `pandas.read_parquet("OUT/clips")` read the clips.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .extract import SegmentOutput, frame_times

__all__ = [
    "EmbeddingStoreError",
    "PartWriter",
    "check_part_sources",
    "check_settings",
    "clear_unused",
    "done_parts",
    "read_clip_table",
    "remove_stale_partials",
    "unify_columns",
    "write_index",
]

_RESERVED = {"file", "key", "duration", "embedding", "time"}


class EmbeddingStoreError(ValueError):
    """An output folder that cannot be used as asked; the message says why and what to do."""


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _part_name(number: int) -> str:
    return f"part-{number:05d}"


def check_settings(
    output_dir: Path,
    settings: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    normalise: Callable[[str, Any], Any] | None = None,
) -> None:
    """
    Record `settings` in a new output folder, or check that an existing one was made with the same. A setting the
    stored file lacks (written before it existed) counts as its value in `defaults`; `normalise(key, value)` puts
    stored values in today's form (paths as real paths) before they are compared.
    """
    path = output_dir / "settings.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except ValueError as error:
            raise EmbeddingStoreError(f"{path} is damaged ({error}); pass another --output-dir.") from error
        stored = {**(defaults or {}), **stored}
        if normalise is not None:
            stored = {key: normalise(key, value) for key, value in stored.items()}
        differences = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
        if differences:
            shown = "; ".join(f"{key}: {stored.get(key)!r} there, {settings.get(key)!r} now" for key in differences)
            raise EmbeddingStoreError(
                f"{output_dir} holds embeddings made with other settings ({shown}); resume with the same settings, or "
                f"pass another --output-dir."
            )
        return
    _atomic_write_text(path, json.dumps(settings, indent=1))


def clear_unused(output_dir: Path) -> None:
    """Remove what a run that could use no clip wrote (settings, records, index), so that a corrected rerun starts
    afresh; the folder holds no embeddings."""
    for name in ("info.json", "settings.json"):
        (output_dir / name).unlink(missing_ok=True)
    for folder in ("parts", "clips", "frames"):
        if (output_dir / folder).is_dir():
            for path in (output_dir / folder).iterdir():
                path.unlink()
            (output_dir / folder).rmdir()


def done_parts(output_dir: Path) -> set[int]:
    """The parts whose completion record exists (written whole, after their Parquet files)."""
    return {int(path.stem.split("-")[1]) for path in (output_dir / "parts").glob("part-*.json")}


def check_part_sources(output_dir: Path, fingerprints: dict[int, str]) -> int:
    """
    Refuse to resume when a written part's sources changed since (files added, removed, renamed or rewritten).
    Returns how many written parts could not be checked (written by a version that kept no record of their files).
    """
    unchecked = 0
    for number in sorted(done_parts(output_dir)):
        record = json.loads((output_dir / "parts" / f"{_part_name(number)}.json").read_text())
        if "sources" not in record:
            unchecked += 1
        elif record["sources"] != fingerprints.get(number):
            raise EmbeddingStoreError(
                f"{output_dir}: the sources changed since its part {number} was written (files added, removed, "
                f"renamed or rewritten), so its parts no longer match them; to embed the files as they are now, pass "
                f"another --output-dir."
            )
    return unchecked


def remove_stale_partials(output_dir: Path, parts: Sequence[int]) -> None:
    """Temporary files a killed run left for these parts (each part belongs to one process)."""
    for number in parts:
        for folder in ("clips", "frames", "parts"):
            for path in (output_dir / folder).glob(f"{_part_name(number)}.*.partial-*"):
                path.unlink(missing_ok=True)


def _label_value(value: Any) -> Any:
    """Labels as strings (lists of strings for multi-label), so that every part has the same schema."""
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return None if value is None else str(value)


class PartWriter:
    """
    Collects one part's clips (their segments arrive in order) and writes its Parquet files and record.

    Args:
        output_dir: The output folder.
        number: The part.
        layers: The layer indices kept (column `layer_<i>` each), or None.
        frames: Write the frames file.
        float16: Store embeddings as float16 (float32 otherwise).
        sources: The part's fingerprint (`DashengAudioPart.fingerprint`), kept in its record.
    """

    def __init__(
        self,
        output_dir: Path,
        number: int,
        layers: Sequence[int] | None,
        frames: bool,
        float16: bool,
        sources: str | None = None,
    ):
        import pyarrow as pa

        self.output_dir, self.number, self.layers, self.float16 = output_dir, number, layers, float16
        self.sources = sources
        self.value_type = pa.float16() if float16 else pa.float32()
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.seconds = 0.0
        self._frames_writer = None
        self._frames_partial = None
        if frames:
            (output_dir / "frames").mkdir(exist_ok=True)
            self._frames_partial = output_dir / "frames" / f"{_part_name(number)}.parquet.partial-{os.getpid()}"

    def _column(self, matrix: np.ndarray) -> Any:
        import pyarrow as pa

        matrix = np.ascontiguousarray(matrix, dtype=np.float16 if self.float16 else np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=self.value_type), matrix.shape[1])

    def start_clip(self, item: dict[str, Any]) -> dict[str, Any]:
        """A clip (an event of `DashengFeatureStream`) whose segments follow: the state to pass to [`add_segment`]."""
        return {"item": item, "tokens": 0, "sum": None, "layer_sums": None, "remaining": item["num_segments"]}

    def add_segment(self, clip: dict[str, Any], output: SegmentOutput) -> bool:
        """The next segment of `clip` (in order); True once it was the last, and the clip's row is complete."""
        if self._frames_partial is not None and output.num_tokens:
            self._write_frames(clip, output)
        clip["tokens"] += output.num_tokens
        clip["sum"] = output.token_sum if clip["sum"] is None else clip["sum"] + output.token_sum
        if output.layer_sums is not None:
            sums = clip["layer_sums"]
            clip["layer_sums"] = output.layer_sums if sums is None else sums + output.layer_sums
        clip["remaining"] -= 1
        if clip["remaining"] == 0:
            self._finish_clip(clip)
        return clip["remaining"] == 0

    def _write_frames(self, clip: dict[str, Any], output: SegmentOutput) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {
            "file": pa.array([clip["item"]["file"]] * output.num_tokens, type=pa.string()),
            "key": pa.array([clip["item"]["key"]] * output.num_tokens, type=pa.string()),
            "time": pa.array(frame_times(clip["tokens"], output.num_tokens)),
            "embedding": self._column(output.tokens),
        }
        for position, layer in enumerate(self.layers or []):
            columns[f"layer_{layer}"] = self._column(output.layer_tokens[position])
        table = pa.table(columns)
        if self._frames_writer is None:
            self._frames_writer = pq.ParquetWriter(self._frames_partial, table.schema)
        self._frames_writer.write_table(table)

    def _finish_clip(self, clip: dict[str, Any]) -> None:
        item = clip["item"]
        row = {"file": item["file"], "key": item["key"], "duration": item["duration"]}
        for name, value in (item["labels"] or {}).items():
            row[f"source_{name}" if name in _RESERVED or name.startswith("layer_") else name] = _label_value(value)
        row["embedding"] = clip["sum"] / clip["tokens"]
        for position, layer in enumerate(self.layers or []):
            row[f"layer_{layer}"] = clip["layer_sums"][position] / clip["tokens"]
        self.rows.append(row)
        self.seconds += item["duration"]

    def skip(self, item: dict[str, Any]) -> None:
        """A clip that could not be used: named in the part's record."""
        self.skipped.append({"file": item["file"], "reason": item["reason"]})

    def _clip_columns(self) -> dict[str, Any]:
        """file, key, duration, the label columns (strings, or lists of strings), embedding, layer_<i>."""
        import pyarrow as pa

        fixed = {"file", "key", "duration", "embedding"}
        labels = dict.fromkeys(n for row in self.rows for n in row if n not in fixed and not n.startswith("layer_"))
        columns = {
            "file": pa.array([row["file"] for row in self.rows], type=pa.string()),
            "key": pa.array([row["key"] for row in self.rows], type=pa.string()),
            "duration": pa.array([row["duration"] for row in self.rows], type=pa.float64()),
        }
        for label in labels:  # a clip without the column (a source with other labels) has none
            values = [row.get(label) for row in self.rows]
            if any(isinstance(value, list) for value in values):  # lists somewhere: a single label is a list of one
                values = [[value] if isinstance(value, str) else value for value in values]
                columns[label] = pa.array(values, type=pa.list_(pa.string()))
            else:
                columns[label] = pa.array(values, type=pa.string())
        for name in ("embedding", *(f"layer_{layer}" for layer in self.layers or [])):
            columns[name] = self._column(np.stack([row[name] for row in self.rows]))
        return columns

    def abort(self) -> None:
        """An interrupted part: its temporary frames file is removed (its final files were never written)."""
        if self._frames_writer is not None:
            self._frames_writer.close()
            self._frames_writer = None
        if self._frames_partial is not None:
            self._frames_partial.unlink(missing_ok=True)

    def finish(self) -> dict[str, Any]:
        """Write the part (frames, clips, then its record, each renamed into place) and return its record."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = _part_name(self.number)
        if self._frames_writer is not None:
            self._frames_writer.close()
            os.replace(self._frames_partial, self.output_dir / "frames" / f"{name}.parquet")
        if self.rows:
            (self.output_dir / "clips").mkdir(exist_ok=True)
            table = pa.table(self._clip_columns())
            partial = self.output_dir / "clips" / f"{name}.parquet.partial-{os.getpid()}"
            try:
                pq.write_table(table, partial)
                os.replace(partial, self.output_dir / "clips" / f"{name}.parquet")
            finally:
                partial.unlink(missing_ok=True)
        record = {"part": self.number, "clips": len(self.rows), "seconds": self.seconds, "skipped": self.skipped}
        if self.sources is not None:
            record["sources"] = self.sources
        (self.output_dir / "parts").mkdir(exist_ok=True)
        _atomic_write_text(self.output_dir / "parts" / f"{name}.json", json.dumps(record))
        return record


def unify_columns(output_dir: Path) -> None:
    """
    Give every part of a table (clips, frames) the same columns in the same order, so that readers see one table:
    label columns that some clips parts lack (sources with other labels) and frames' `key` (absent from parts written
    by the first version) are added to them, empty. Each rewritten part is replaced atomically.
    """
    for folder, fixed in (("clips", ["file", "key", "duration"]), ("frames", ["file", "key", "time"])):
        _unify_table_columns(sorted((output_dir / folder).glob("part-*.parquet")), fixed)


def _unify_table_columns(paths: list[Path], fixed: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = {path: pq.read_schema(path) for path in paths}
    fields: dict[str, Any] = {"key": pa.field("key", pa.string())}
    for schema in schemas.values():
        for field in schema:
            if fields.setdefault(field.name, field).type != field.type:  # labels single here, lists there: lists
                fields[field.name] = pa.field(field.name, pa.list_(pa.string()))
    embeddings = [name for name in fields if name == "embedding" or name.startswith("layer_")]
    order = fixed + [name for name in fields if name not in fixed and name not in embeddings] + embeddings
    for path, schema in schemas.items():
        if schema.names == order and all(schema.field(name).type == fields[name].type for name in order):
            continue
        table = pq.read_table(path)
        for name in order:
            if name not in table.column_names:
                table = table.append_column(fields[name], pa.nulls(len(table), type=fields[name].type))
            elif table.schema.field(name).type != fields[name].type:  # single labels as lists of one
                values = [None if value is None else [value] for value in table[name].to_pylist()]
                column = pa.array(values, type=fields[name].type)
                table = table.set_column(table.column_names.index(name), fields[name], column)
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            pq.write_table(table.select(order), partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def write_index(output_dir: Path, num_parts: int, info: dict[str, Any]) -> dict[str, Any]:
    """Gather the parts' records into `info.json` (written last, atomically) and return it."""
    unify_columns(output_dir)
    records = [json.loads((output_dir / "parts" / f"{_part_name(n)}.json").read_text()) for n in range(num_parts)]
    skipped = [entry for record in records for entry in record["skipped"]]
    info = {
        **info,
        "num_clips": sum(record["clips"] for record in records),
        "num_skipped": len(skipped),
        "audio_hours": sum(record["seconds"] for record in records) / 3600,
        "clip_files": sorted(str(p.relative_to(output_dir)) for p in (output_dir / "clips").glob("part-*.parquet")),
        "frame_files": sorted(str(p.relative_to(output_dir)) for p in (output_dir / "frames").glob("part-*.parquet")),
        "skipped": skipped,
    }
    _atomic_write_text(output_dir / "info.json", json.dumps(info, indent=1))
    return info


def read_clip_table(output_dir: str | os.PathLike, layer: int | None = None) -> tuple[Any, np.ndarray]:
    """
    The clips of a `dasheng-embed` output folder: `(table without embeddings as a pandas DataFrame, (clips,
    hidden) float32 embeddings)`, `layer` selecting a `layer_<i>` column instead of `embedding` (negative: counted
    from the last block, as `--layers -1`).
    """
    import pandas as pd

    folder = Path(output_dir)
    if not (folder / "info.json").is_file():
        raise EmbeddingStoreError(f"{folder} has no info.json: not a finished dasheng-embed output (rerun it to end).")
    info = json.loads((folder / "info.json").read_text())
    if layer is not None and layer < 0:  # counted from the end, as --layers -1 was written: layer_<blocks>
        if "num_hidden_layers" not in info:
            raise EmbeddingStoreError(f"{folder} does not record its model's blocks: pass the layer as in layer_<i>.")
        layer += info["num_hidden_layers"] + 1
    column = "embedding" if layer is None else f"layer_{layer}"
    frames = [pd.read_parquet(folder / name) for name in info["clip_files"]]
    if not frames:
        raise EmbeddingStoreError(f"{folder} holds no embedded clips.")
    table = pd.concat(frames, ignore_index=True)
    if column not in table.columns:
        raise EmbeddingStoreError(f"{folder} has no {column} column (has {list(table.columns)}).")
    embeddings = np.stack(table[column].to_numpy()).astype(np.float32)
    return table.drop(columns=[c for c in table.columns if c == "embedding" or c.startswith("layer_")]), embeddings
