"""
Pack audio files into webdataset tar shards for pretraining (the job of the original's `wavlist_to_tar`).

    python -m dasheng_hf.audio.make_shards FILELIST_OR_FOLDER OUTDIR [--shard_size 10000] [--num_workers 4]

The input is a CSV/TSV file list with a `filename` column (relative paths read from the list's folder; the other
columns of a row go into a `KEY.json` next to the audio) or a folder searched recursively for audio files. Files are
shuffled (seeded) and stored as they are, bytes and extension unchanged (`KEY.flac`, `KEY.wav`, ...), `--shard_size`
per shard, in `OUTDIR/PREFIX-000000.tar`, `PREFIX-000001.tar`, ... (`PREFIX`: the list's or folder's name). The key
of a file is its name without extension, dots replaced by `_`; two files with the same key, or a key starting with
`__` (webdataset's metadata), are errors.

Shard sets are published as a whole: shards are written in parallel under temporary names and checked, then a journal
`.PREFIX.publish.json` is renamed into place (the commit point), the shards are renamed to their final names (an
interrupt waits for these renames) and the journal is removed. An interruption before the commit leaves the old set
untouched; after it, the new set is completed, by this run or, after SIGKILL, by the next run on the folder (readers
refuse a folder whose journal is still there). The folder is locked for one run at a time (`.dasheng-run.lock`);
partial shards of a dead run are removed. The last line printed is the brace pattern of the shards, ready for
`--train_data`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import signal
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..jobs.interrupts import DashengInterrupted, fault_point, finish_first, interrupts_raise
from ..jobs.lock import DashengLockError, DashengOutputLock

__all__ = ["MakeShardsError", "ShardItem", "list_items", "main", "make_shards"]


class MakeShardsError(ValueError):
    """A problem with the inputs or the output folder; the message says what and how to fix it."""


ShardItem = tuple[str, str, str, str | None]  # (key, path, extension, json labels or None)


def _typed(value: str) -> Any:
    """A list cell as a JSON value: integers and decimals as numbers, anything else as the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def list_items(source: str | os.PathLike, filename_column: str = "filename") -> list[ShardItem]:
    """
    The files a list or folder names, checked: each exists, is a regular file with an audio extension, and has a
    key of its own. Raises [`MakeShardsError`] naming the offending files.
    """
    from .decoding import AUDIO_EXTENSIONS, DashengAudioError
    from .sources import AudioRecord, find_audio_files, read_file_list

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            files = find_audio_files(path)
            if not files:
                raise MakeShardsError(f"{path}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) under it.")
            records = [AudioRecord(key=str(file), origin=str(file), path=str(file)) for file in files]
        elif path.is_file():
            records = read_file_list(path, filename_column=filename_column)
        else:
            raise MakeShardsError(f"{path}: no such file list or folder.")
    except DashengAudioError as error:
        raise MakeShardsError(str(error)) from error
    items, owners, problems = [], {}, []
    for record in records:
        file = Path(record.path)
        extension = file.suffix[1:].lower()
        if not file.is_file():
            problems.append(f"{record.origin}: {'not a regular file' if file.exists() else 'missing'}")
            continue
        if extension not in AUDIO_EXTENSIONS:
            problems.append(f"{record.origin}: not an audio file extension ({', '.join(AUDIO_EXTENSIONS)})")
            continue
        key = file.stem.replace(".", "_")
        if key.startswith("__"):
            problems.append(f"{record.origin}: its key {key!r} starts with '__', which webdataset keeps for metadata")
            continue
        if key in owners:
            raise MakeShardsError(
                f"Two files share the key {key!r}: {owners[key]} and {record.origin}. Keys are file names without "
                f"extension and must be unique; rename one of them."
            )
        owners[key] = record.origin
        labels = None if not record.labels else json.dumps({k: _typed(v) for k, v in record.labels.items()})
        items.append((key, str(file), extension, labels))
    if problems:
        raise MakeShardsError(
            f"{len(problems)} of {len(records)} files cannot be packed (rename or remove them), e.g. {problems[:3]}."
        )
    return items


def _write_shard(job: tuple[str, list[ShardItem]]) -> int:
    """Write one shard to the path given (a temporary name); returns the number of files in it."""
    target, items = job
    try:
        with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, path, extension, labels in items:
                with open(path, "rb") as handle:
                    members = [(f"{key}.{extension}", handle.read())]
                if labels is not None:
                    members.append((f"{key}.json", labels.encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o444
                    tar.addfile(info, io.BytesIO(data))
                    fault_point("writing")
    except BaseException:
        Path(target).unlink(missing_ok=True)
        raise
    return len(items)


def _worker_signals() -> None:
    """Workers leave Ctrl-C and hangups to the main process (which cleans up) and end quietly when it stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pool_context() -> Any:
    """Forked workers where the platform has fork: they start at once, without importing the package again."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def _brace_pattern(output_dir: Path, prefix: str, count: int) -> str:
    return str(output_dir / (f"{prefix}-000000.tar" if count == 1 else f"{prefix}-{{000000..{count - 1:06d}}}.tar"))


def check_prefix(prefix: str) -> str:
    """A shard name prefix that stays inside the output folder; [`MakeShardsError`] otherwise."""
    if not prefix or prefix in (".", "..") or Path(prefix).name != prefix or "/" in prefix or os.sep in prefix:
        raise MakeShardsError(f"--prefix {prefix!r} must be a plain name (no '/' or '..'): shards stay in the folder.")
    if prefix.startswith("."):
        raise MakeShardsError(f"--prefix {prefix!r} must not start with '.' (hidden files are not read as shards).")
    return prefix


def _journal(output_dir: Path, prefix: str) -> Path:
    return output_dir / f".{prefix}.publish.json"


def _finish_publishing(output_dir: Path, prefix: str, say: Any) -> None:
    """Complete the publication of a run killed after its commit point (its journal is still there)."""
    journal = _journal(output_dir, prefix)
    if not journal.is_file():
        return
    try:
        plan = json.loads(journal.read_text())
        renames, stale = plan["renames"], plan["remove"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MakeShardsError(f"{journal}: unreadable publication journal ({error}); delete it and rerun.") from error
    lost = [final for temporary, final in renames if not (output_dir / temporary).exists()
            and not (output_dir / final).exists()]  # fmt: skip
    if lost:
        raise MakeShardsError(f"{journal}: cannot finish an interrupted run, {lost[:3]} are gone; delete it and rerun.")
    for temporary, final in renames:
        if (output_dir / temporary).exists():
            os.replace(output_dir / temporary, output_dir / final)
    for name in stale:
        (output_dir / name).unlink(missing_ok=True)
    journal.unlink()
    say(f"finished publishing the {len(renames)} shards of an interrupted run (process {plan.get('pid')}).")


def _verify(path: str, items: list[ShardItem]) -> None:
    """Re-read a written shard's member list: every file of `items` is there, in order, whole."""
    expected = [name for key, _, extension, labels in items for name in
                [f"{key}.{extension}"] + ([f"{key}.json"] if labels is not None else [])]  # fmt: skip
    with tarfile.open(path, "r:") as tar:
        found = [member.name for member in tar.getmembers()]
    if found != expected:
        raise MakeShardsError(f"{path}: the shard read back holds {len(found)} members, not {len(expected)}.")


def make_shards(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    shard_size: int = 10000,
    num_workers: int = 4,
    prefix: str | None = None,
    seed: int = 0,
    shuffle: bool = True,
    filename_column: str = "filename",
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """
    Write the shards (see the module docstring) and return their brace pattern.

    Raises:
        MakeShardsError: bad input files or options, an output that is a file, existing shards without `overwrite`,
            or a folder in use by another run.
        DashengInterrupted: SIGINT, SIGTERM or SIGHUP; its `published` attribute says whether the new set was
            published (interrupts during the final renames wait for them) or the folder was left as it was.
    """
    import numpy as np
    from tqdm.auto import tqdm

    if shard_size < 1 or num_workers < 1:
        raise MakeShardsError(f"--shard_size and --num_workers must be at least 1, got {shard_size}, {num_workers}.")
    if not 0 <= seed < 2**63:
        raise MakeShardsError(f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}.")
    if prefix is not None:
        check_prefix(prefix)
    output_dir = Path(output_dir).expanduser()
    for parent in (output_dir, *output_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise MakeShardsError(f"{parent}: exists and is not a folder; pass a folder for the shards.")
        if parent.exists():
            break
    items = list_items(source, filename_column)
    prefix = prefix or check_prefix(Path(source).expanduser().resolve().stem or "shard")
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MakeShardsError(f"{output_dir}: cannot create the folder ({error.strerror}).") from error
    say = (lambda message: print(f"dasheng-make-shards: {message}", file=sys.stderr)) if progress else (lambda _: None)
    lock = DashengOutputLock(output_dir, "dasheng-make-shards", warn=lambda m: say(f"warning: {m}"))
    published = False
    try:
        try:
            lock.acquire()
        except DashengLockError as error:
            raise MakeShardsError(str(error)) from error
        _finish_publishing(output_dir, prefix, say)
        stale_partials = sorted(output_dir.glob(f"{prefix}-[0-9]*.tar.*.partial"))
        for stale in stale_partials:  # the lock is ours: these belong to a run that died
            stale.unlink()
        if stale_partials:
            say(f"removed {len(stale_partials)} partial shards left by an interrupted run.")
        existing = sorted(output_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if existing and not overwrite:
            raise MakeShardsError(
                f"{output_dir} already holds {len(existing)} shards named {prefix}-*.tar; pass --overwrite to replace "
                f"them, or another --prefix or output folder."
            )
        if shuffle:
            items = [items[index] for index in np.random.default_rng(seed).permutation(len(items))]
        count = (len(items) + shard_size - 1) // shard_size
        finals = [output_dir / f"{prefix}-{index:06d}.tar" for index in range(count)]
        temporaries = [final.with_name(f"{final.name}.{os.getpid()}.partial") for final in finals]
        jobs = [
            (str(temporary), items[i * shard_size : (i + 1) * shard_size]) for i, temporary in enumerate(temporaries)
        ]
        try:
            with interrupts_raise():
                with tqdm(total=len(items), desc="Packing audio files", unit="file", disable=not progress) as bar:
                    if num_workers == 1 or len(jobs) == 1:
                        for job in jobs:
                            bar.update(_write_shard(job))
                    else:
                        with _pool_context().Pool(min(num_workers, len(jobs)), initializer=_worker_signals) as pool:
                            for written in pool.imap_unordered(_write_shard, jobs):
                                bar.update(written)
                for temporary, job in zip(temporaries, jobs):
                    _verify(str(temporary), job[1])
                fault_point("shards-written")
                with finish_first():
                    plan = {"pid": os.getpid(), "renames": [[t.name, f.name] for t, f in zip(temporaries, finals)],
                            "remove": sorted(path.name for path in set(existing) - set(finals))}  # fmt: skip
                    journal = _journal(output_dir, prefix)
                    staged = journal.with_name(f"{journal.name}.{os.getpid()}.partial")
                    staged.write_text(json.dumps(plan))
                    os.replace(staged, journal)  # the commit point
                    published = True
                    for index, (temporary, final) in enumerate(zip(temporaries, finals)):
                        os.replace(temporary, final)
                        if index == 0:
                            fault_point("publishing")
                    for name in plan["remove"]:
                        (output_dir / name).unlink(missing_ok=True)
                    journal.unlink()
        except BaseException as error:
            if not published:
                for temporary in temporaries:
                    temporary.unlink(missing_ok=True)
            if isinstance(error, DashengInterrupted):
                error.published = published
            raise
    finally:
        lock.release()
        if created and not published:
            try:
                output_dir.rmdir()  # only if empty: a failed first run leaves no folder behind
            except OSError:
                pass
    return _brace_pattern(output_dir, prefix, len(finals))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasheng-make-shards", description="Pack audio files into webdataset tar shards for pretraining."
    )
    parser.add_argument("source", help="CSV/TSV file list with a filename column, or a folder of audio files.")
    parser.add_argument("output_dir", help="Folder for the shards.")
    parser.add_argument("--shard_size", "--shard-size", type=int, default=10000, help="Files per shard (%(default)s).")
    parser.add_argument(
        "--num_workers", "--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="Parallel writers."
    )
    parser.add_argument("--prefix", help="Shard name prefix (default: the list's or folder's name).")
    parser.add_argument("--seed", type=int, default=0, help="Shuffling seed (%(default)s).")
    parser.add_argument("--no_shuffle", "--no-shuffle", action="store_true", help="Keep the input order.")
    parser.add_argument(
        "--file-column",
        "--filename_column",
        "--filename-column",
        dest="filename_column",
        default="filename",
        help="Default %(default)s.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace shards of the same prefix in output_dir.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (`dasheng-make-shards`, `python -m dasheng_hf.audio.make_shards`)."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        with interrupts_raise():
            pattern = make_shards(
                arguments.source,
                arguments.output_dir,
                shard_size=arguments.shard_size,
                num_workers=arguments.num_workers,
                prefix=arguments.prefix,
                seed=arguments.seed,
                shuffle=not arguments.no_shuffle,
                filename_column=arguments.filename_column,
                overwrite=arguments.overwrite,
            )
    except MakeShardsError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except OSError as error:  # reading an input file or writing a shard failed midway; nothing was left behind
        parser.exit(1, f"{parser.prog}: error: {error.filename or ''}: {error.strerror or error}\n")
    except KeyboardInterrupt as error:
        name = getattr(error, "signal_name", "SIGINT")
        if getattr(error, "published", False):
            parser.exit(130, f"{parser.prog}: interrupted ({name}) after the new shards were published; "
                        f"{arguments.output_dir} holds the new complete set.\n")  # fmt: skip
        parser.exit(130, f"{parser.prog}: interrupted ({name}); no new shard was published, {arguments.output_dir} "
                    f"holds what it held before.\n")  # fmt: skip
    print(pattern, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
