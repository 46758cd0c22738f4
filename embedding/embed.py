"""
`dasheng-embed`: Dasheng embeddings of any audio, written as Parquet (see `embedding/store.py` for the layout).

    dasheng-embed /data/my-audio --model mispeech/dasheng-base --output-dir runs/embeddings
    torchrun --nproc_per_node 2 -m dasheng_hf.embedding.embed shards/train-{000000..000099}.tar --output-dir out

Sources are anything the data layer reads (`audio/datasets.py`): folders, CSV/TSV file lists, webdataset tar shards,
`datasets` ids or paths. Each process takes every n-th part; a rerun skips the parts already written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli.preflight import (
    DashengPreflightError,
    HubResource,
    check_resources,
    new_output_folder,
    warn_if_bf16_is_emulated,
)

__all__ = ["main", "parse_layers", "run_embed"]

DEFAULT_MODEL = "mispeech/dasheng-base"
CONVERT_ADVICE = "for the released checkpoints, `dasheng-convert` writes such a folder from the original weights"


def parse_layers(text: str) -> list[int] | str:
    """`-1`, `all` or comma-separated layer indices."""
    if text.strip() == "all":
        return "all"
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes -1, all, or indices such as 4,8,12; got {text!r}.") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one index.")
    return layers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasheng-embed",
        description="Embed audio with Dasheng: clip embeddings (the mean of each clip's tokens), optionally 25 Hz "
        "frames and intermediate layers, written as Parquet shards with an info.json index. Resumable.",
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="Folders, CSV/TSV lists, tar shards, datasets.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Dasheng Hub id or local folder (default %(default)s).")
    parser.add_argument("--output-dir", required=True, help="Where the Parquet files and info.json go.")
    parser.add_argument("--frames", action="store_true", help="Also write every token (25 Hz) with its centre time.")
    parser.add_argument(
        "--layers",
        type=parse_layers,
        help="Also keep these hidden_states: -1 (last block), all, or indices such as 4,8,12 (0 = patch embeddings).",
    )
    parser.add_argument("--float16", action="store_true", help="Store embeddings as float16 (half the size).")
    parser.add_argument("--bf16", action="store_true", help="Compute in bfloat16 (fast on GPUs and CPUs with bf16).")
    parser.add_argument("--num-workers", type=int, default=2, help="Dataloader workers decoding audio (default 2).")
    parser.add_argument(
        "--batch-seconds", type=float, help="Audio per model batch (default 320 on a GPU, 60 on the CPU)."
    )
    parser.add_argument("--clips-per-part", type=int, default=1000, help="Clips per Parquet part (default 1000).")
    parser.add_argument("--file-column", default="filename", help="File column of CSV/TSV lists (default filename).")
    parser.add_argument(
        "--audio-root", help="Folder the relative paths of CSV/TSV lists start from (default: the list's folder)."
    )
    parser.add_argument("--audio-column", default="audio", help="Audio column of a datasets source.")
    parser.add_argument("--split", default="train", help="Split of a datasets source (default train).")
    parser.add_argument("--device", help="Default: this process's GPU if any, else the CPU.")
    parser.add_argument("--verbose", action="store_true", help="Name each skipped file as it happens.")
    return parser


def _check(arguments: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags checked before any work; each problem is one line (exit 2)."""
    import math

    problem = None
    output = Path(arguments.output_dir).expanduser()
    if arguments.num_workers < 0:
        problem = "--num-workers must be 0 or more."
    elif arguments.batch_seconds is not None and not (
        arguments.batch_seconds > 0 and math.isfinite(arguments.batch_seconds)
    ):
        problem = "--batch-seconds must be a positive number."
    elif arguments.clips_per_part < 1:
        problem = "--clips-per-part must be at least 1."
    elif output.exists() and not output.is_dir():
        problem = f"--output-dir {output} is a file; pass a folder."
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")


def _hub_resources(arguments: argparse.Namespace) -> list[HubResource]:
    resources = [HubResource("--model", arguments.model)]
    for source in arguments.sources:  # what is not a path, pattern or file list is a `datasets` id
        if not (os.path.exists(os.path.expanduser(source)) or any(c in source for c in "*?[{") or "." in source[-5:]):
            resources.append(HubResource("SOURCE", source, kind="dataset"))
    return resources


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank), with a gloo/nccl process group under torchrun or accelerate launch."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def _load_model(name: str) -> Any:
    """A Dasheng encoder and its feature extractor (built from the config where the folder has none)."""
    from transformers import PretrainedConfig
    from transformers.utils import logging

    from ..feature_extraction_dasheng import DashengFeatureExtractor
    from ..modeling_dasheng import DashengModel

    path = Path(name).expanduser()
    source = str(path) if path.exists() else name
    try:
        config = PretrainedConfig.get_config_dict(source)[0]
    except OSError as error:
        raise DashengPreflightError(f"--model {name}: cannot read its config.json ({error}).") from error
    if not config:
        raise DashengPreflightError(f"--model {name} holds no config.json: pass a folder saved by save_pretrained.")
    if config.get("model_type") != "dasheng" and "encoder_kwargs" not in config:
        raise DashengPreflightError(
            f"--model {name} is a {config.get('model_type')!r} model; dasheng-embed embeds with Dasheng models "
            f"(dasheng-eval compares other encoders)."
        )
    logging.disable_progress_bar()  # one progress bar on the console: the embedding's
    try:
        model = DashengModel.from_pretrained(source)
    except OSError as error:  # a folder without weights, a missing shard
        raise DashengPreflightError(f"--model {name}: {str(error).splitlines()[0]}") from None
    try:
        feature_extractor = DashengFeatureExtractor.from_pretrained(source)
    except OSError:
        feature_extractor = DashengFeatureExtractor.from_dasheng_config(model.config)
    return model, feature_extractor


def _layers(requested: list[int] | str | None, num_layers: int) -> list[int] | None:
    """`--layers` as indices into `hidden_states` (0..num_layers - 1)."""
    if requested is None:
        return None
    layers = list(range(num_layers)) if requested == "all" else requested
    bad = [layer for layer in layers if not -num_layers <= layer < num_layers]
    if bad:
        raise DashengPreflightError(f"--layers {bad}: the model has hidden_states 0..{num_layers - 1} (or -1).")
    return [layer % num_layers for layer in layers]


def _normalised(text: str) -> str:
    """A local path as its real absolute path (`dir/`, `./dir` and `dir` agree, from any folder); else the text."""
    path = Path(text).expanduser()
    return os.path.realpath(path) if path.exists() else text


def _device(requested: str | None, local_rank: int) -> str:
    """`--device`, checked before anything is written; by default this process's GPU if any, else the CPU."""
    import torch

    if requested is None:
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DashengPreflightError(f"--device {requested!r} is no device: pass cpu, cuda, cuda:N or mps.") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise DashengPreflightError(f"--device {requested}: dasheng-embed runs on cpu, cuda, mps or xpu devices.")
    if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DashengPreflightError(f"--device {requested}: no XPU is available here; pass --device cpu.")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise DashengPreflightError(f"--device {requested}: this machine has {count} CUDA GPU(s); pass --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DashengPreflightError(f"--device {requested}: MPS is not available here; pass --device cpu.")
    return requested


SETTING_DEFAULTS = {"file_column": "filename", "audio_root": None, "audio_column": "audio", "split": "train"}


def _stored_setting(key: str, value: Any) -> Any:
    """A setting as an earlier run stored it, in today's form (paths as real paths, resolved from here)."""
    if key in ("model", "audio_root") and isinstance(value, str):
        return _normalised(value)
    if key == "sources" and isinstance(value, list):
        return [_normalised(str(source)) for source in value]
    return value


def _settings(arguments: argparse.Namespace, fingerprint: str, num_parts: int, layers: list[int] | None) -> dict:
    """What the embeddings are made with: a rerun into the same folder must match (`store.check_settings`)."""
    return {
        "model": _normalised(arguments.model),
        "weights_sha256": fingerprint,
        "sources": [_normalised(str(source)) for source in arguments.sources],
        "file_column": arguments.file_column,
        "audio_root": arguments.audio_root and _normalised(arguments.audio_root),
        "audio_column": arguments.audio_column,
        "split": arguments.split,
        "num_parts": num_parts,
        "clips_per_part": arguments.clips_per_part,
        "layers": layers,
        "frames": arguments.frames,
        "dtype": "float16" if arguments.float16 else "float32",
        "compute_dtype": "bfloat16" if arguments.bf16 else "float32",
    }


def _embed_parts(
    arguments: argparse.Namespace,
    parts: list,
    model: Any,
    feature_extractor: Any,
    layers: list[int] | None,
    rank: int,
    device: str,
) -> float:
    """Embed `parts` and write them; returns the seconds the loop took (reading, features, model, writing)."""
    import torch
    from tqdm.auto import tqdm

    from ..jobs.interrupts import fault_point
    from .extract import DashengEmbedder, DashengFeatureStream
    from .store import PartWriter

    output_dir = Path(arguments.output_dir).expanduser()
    if arguments.bf16 and torch.device(device).type == "cpu" and rank == 0:
        warning = warn_if_bf16_is_emulated("--bf16")
        if warning:
            print(warning, file=sys.stderr)
    embedder = DashengEmbedder(model, layers, arguments.frames, arguments.bf16, device)
    batch_seconds = arguments.batch_seconds or (60.0 if torch.device(device).type == "cpu" else 320.0)
    # Workers form the batches (frames of 10 ms); small ones on a CPU start the model early.
    stream = DashengFeatureStream(parts, feature_extractor, model.config.chunk_num_tokens * 4, int(batch_seconds * 100))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(arguments.num_workers, len(parts)))
    fingerprints = {part.number: part.fingerprint() for part in parts}
    writers: dict[int, PartWriter] = {}
    clips: dict[int, dict[int, dict[str, Any]]] = {}  # per part: the clips whose segments are still coming
    total = sum(part.num_clips or 0 for part in parts) if all(part.num_clips for part in parts) else None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    desc = "Embedding" if world_size == 1 else f"Embedding (process 0's share, of {world_size})"
    bar = tqdm(total=total, unit="clip", desc=desc, disable=rank != 0, dynamic_ncols=True)
    seconds = 0.0
    started = time.perf_counter()
    batches = iter(loader)
    try:
        for batch in batches:
            number = batch["part"]
            if number not in writers:
                writers[number] = PartWriter(
                    output_dir, number, layers, arguments.frames, arguments.float16, fingerprints[number]
                )
                clips[number] = {}
            writer = writers[number]
            done = 0  # clips skipped or finished with this batch
            for event in batch["events"]:
                if event["kind"] == "skipped":
                    writer.skip(event)
                    done += 1
                    if arguments.verbose:
                        bar.write(f"skipped {event['reason']}")
                else:
                    clips[number][event["index"]] = writer.start_clip(event)
            if batch["lengths"]:
                outputs = embedder.forward(batch["features"].split(batch["lengths"], dim=-1))
                for owner, output in zip(batch["owners"], outputs):
                    if writer.add_segment(clips[number][owner], output):
                        seconds += clips[number].pop(owner)["item"]["duration"]
                        done += 1
            if batch["last"]:
                writer.finish()
                del writers[number], clips[number]
                fault_point("embed-part-written")
            bar.update(done)
            rate = seconds / 3600 / (time.perf_counter() - started)
            bar.set_postfix_str(f"{seconds / 3600:.3f} h audio, {rate:.3g} audio-h/s", refresh=False)
    finally:
        bar.close()
        # Stop the workers now, while this process still reads their queue (an interrupted run exits right after).
        del batches
        for writer in writers.values():  # parts left unfinished by an interrupt
            writer.abort()
    return time.perf_counter() - started


class _StoppedWithRankZero(DashengPreflightError):
    """Another process of a torchrun run: rank 0 found a problem and says what it is; this one ends quietly."""


def _prepare_folder(output_dir: Path, settings: dict[str, Any], parts: list, rank: int, world_size: int) -> Any:
    """
    On rank 0: own the folder (lock), check the settings and that the written parts match the sources. Every process
    learns the outcome, so that all of them stop together when rank 0 refuses. Returns the lock to release.
    """
    import torch

    from ..jobs.lock import DashengLockError, DashengOutputLock
    from .store import EmbeddingStoreError, check_part_sources, check_settings, done_parts

    lock, problem = None, None
    if rank == 0:
        try:
            lock = DashengOutputLock(output_dir, "dasheng-embed").acquire()
            check_settings(output_dir, settings, SETTING_DEFAULTS, _stored_setting)
            written = done_parts(output_dir)  # the rest are fingerprinted as they are embedded
            fingerprints = {part.number: part.fingerprint() for part in parts if part.number in written}
            unchecked = check_part_sources(output_dir, fingerprints)
            if unchecked:
                print(
                    f"dasheng-embed: warning: {unchecked} written part(s) of {output_dir} keep no record of their "
                    f"files (an earlier version wrote them), so they cannot be checked against the sources.",
                    file=sys.stderr,
                )
        except (DashengLockError, EmbeddingStoreError) as error:
            problem = error
    if world_size > 1:
        shared = [None if problem is None else str(problem)]
        torch.distributed.broadcast_object_list(shared, src=0)
        if shared[0] is not None and rank != 0:
            raise _StoppedWithRankZero(shared[0])
    if problem is not None:
        if lock is not None:
            lock.release()
        raise problem
    return lock


def run_embed(arguments: argparse.Namespace) -> dict[str, Any] | None:
    """Embed `arguments.sources` as the command line says; returns the index (`info.json`) on rank 0."""
    import torch

    from ..audio.datasets import DashengFileListColumnError, audio_parts
    from .extract import FRAME_RATE, weights_fingerprint
    from .store import clear_unused, done_parts, remove_stale_partials, write_index

    started = time.perf_counter()
    rank, world_size, local_rank = _distributed()
    device = _device(arguments.device, local_rank)
    output_dir = Path(arguments.output_dir).expanduser()
    model, feature_extractor = _load_model(arguments.model)
    layers = _layers(arguments.layers, model.config.num_hidden_layers + 1)
    try:
        parts = audio_parts(
            arguments.sources,
            arguments.clips_per_part,
            arguments.audio_column,
            arguments.split,
            arguments.file_column,
            arguments.audio_root,
        )
    except DashengFileListColumnError as error:
        raise DashengPreflightError(f"{error} Name the file column with --file-column.") from None
    settings = _settings(arguments, weights_fingerprint(model), len(parts), layers)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = _prepare_folder(output_dir, settings, parts, rank, world_size)
    try:
        finished = done_parts(output_dir)
        mine = [part for part in parts if part.number % world_size == rank and part.number not in finished]
        remove_stale_partials(output_dir, [part.number for part in mine])
        loop_seconds = 0.0
        if mine:
            loop_seconds = _embed_parts(arguments, mine, model, feature_extractor, layers, rank, device)
        if world_size > 1:
            torch.distributed.barrier()
        info = None
        if rank == 0:
            index = output_dir / "info.json"
            if len(finished) == len(parts) and index.is_file():  # a finished folder: its index stays as it is
                info = json.loads(index.read_text())
            else:
                extra = {
                    "hidden_size": model.config.hidden_size,
                    "num_hidden_layers": model.config.num_hidden_layers,
                    "frame_rate": FRAME_RATE,
                    "frame_time": "centre of token i: 0.04 * i + 0.015 s",
                    "num_processes": world_size,
                    "embedding_seconds": loop_seconds,  # rank 0's: reading, features and model, not loading
                }
                info = write_index(output_dir, len(parts), {**settings, **extra})
            if info["num_clips"] == 0:
                clear_unused(output_dir)  # nothing worth keeping: a corrected rerun starts afresh
            _report(info, output_dir, finished, elapsed=time.perf_counter() - started)
    finally:
        if lock is not None:
            lock.release()
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return info


def _report(info: dict[str, Any], output_dir: Path, finished: set[int], elapsed: float) -> None:
    """The result line: what this run embedded and what the folder holds; an error if it holds no clip at all."""
    if info["num_clips"] == 0:
        first = info["skipped"][0]["reason"] if info["skipped"] else "the sources hold no clips"
        raise DashengPreflightError(f"none of the {info['num_skipped']} clips could be used, e.g. {first}")
    skipped = f"skipped {info['num_skipped']}" + (
        f" (named in {output_dir / 'info.json'})" if info["num_skipped"] else ""
    )
    holds = f"{info['num_clips']} clips ({info['audio_hours']:.3f} h of audio)"
    if len(finished) == info["num_parts"]:
        parts = f"all {len(finished)} parts" if len(finished) > 1 else "its one part"
        print(f"Nothing to do: {output_dir} already holds {parts}, {holds}; {skipped}.", flush=True)
        return
    records = [json.loads(path.read_text()) for path in (output_dir / "parts").glob("part-*.json")]
    new = [record for record in records if record["part"] not in finished]
    clips, hours = sum(record["clips"] for record in new), sum(record["seconds"] for record in new) / 3600
    line = f"Embedded {clips} clips ({hours:.3f} h of audio) in {elapsed:.1f} s; {skipped}. Written to {output_dir}"
    if finished:
        line += f": {holds} in all, {len(finished)} of its {info['num_parts']} parts from an earlier run"
    print(line + ".", flush=True)


def _failure(error: BaseException, interrupt: str | None) -> tuple[int, str] | None:
    """The exit status and line for a run that ended in `error` (None: a bug, whose traceback is kept)."""
    from ..jobs.lock import DashengLockError

    kept = "the parts written so far are kept, and the same command resumes"
    if interrupt:  # the signal also stopped the workers, and their end was seen first
        return 130, f"interrupted ({interrupt}); {kept}."
    if " in DataLoader worker process " in str(error):  # a worker's own failure, raised again here
        return 1, f"error: a decoding worker failed ({str(error).strip().splitlines()[-1].strip()}); {kept}."
    if isinstance(error, (DashengPreflightError, DashengLockError, ValueError)):
        return 2, f"error: {error}"
    if isinstance(error, OSError):  # a full disk, a folder that turned read-only
        where = f" ({error.filename})" if error.filename else ""
        return 1, f"error: cannot write{where}: {error.strerror or error}; {kept}."
    if not isinstance(error, RuntimeError):
        return None
    first = str(error).strip().splitlines()[0].strip().rstrip(".") if str(error).strip() else type(error).__name__
    if "DataLoader worker" in first:  # a decoding worker killed (out of memory)
        advice = "if memory ran out, pass a smaller --num-workers or --batch-seconds"
        return 1, f"error: a decoding worker died ({first}); {advice}; {kept}."
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank = os.environ.get("RANK")
        return 1, f"error: process {rank} stopped ({first}): another process of this run failed first; {kept}."
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (`dasheng-embed`, `python -m dasheng_hf.embedding.embed`)."""
    from ..jobs.interrupts import DashengInterrupted, interrupts_raise, received_interrupt

    parser = _parser()
    arguments = parser.parse_args(argv)
    _check(arguments, parser)
    try:
        with interrupts_raise():  # an error within is mapped knowing which interrupts this run received
            check_resources(_hub_resources(arguments), advice=CONVERT_ADVICE)
            with new_output_folder(Path(arguments.output_dir).expanduser(), remove_partial=False):
                run_embed(arguments)
    except _StoppedWithRankZero:
        sys.exit(2)
    except KeyboardInterrupt as error:
        name = error.signal_name if isinstance(error, DashengInterrupted) else "SIGINT"
        failure = _failure(error, name)
        parser.exit(failure[0], f"{parser.prog}: {failure[1]}\n")
    except Exception as error:
        failure = _failure(error, received_interrupt())
        if failure is None:
            raise
        parser.exit(failure[0], f"{parser.prog}: {failure[1]}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
