"""
`dasheng-embed`: Dasheng embeddings of any audio, written as Parquet (see `embedding/store.py` for the layout).

    dasheng-embed /data/my-audio --model mispeech/dasheng-base --output-dir runs/embeddings
    torchrun --nproc_per_node 2 -m dasheng_hf.embedding.embed shards/train-{000000..000099}.tar --output-dir out

Sources are anything the data layer reads (`audio/datasets.py`): folders, CSV/TSV file lists, webdataset tar shards,
`datasets` ids or paths. Each process takes every n-th part; a rerun skips the parts already written.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--audio-column", default="audio", help="Audio column of a datasets source.")
    parser.add_argument("--split", default="train", help="Split of a datasets source (default train).")
    parser.add_argument("--device", help="Default: this process's GPU if any, else the CPU.")
    parser.add_argument("--verbose", action="store_true", help="Name each skipped file as it happens.")
    return parser


def _check(arguments: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import math

    if arguments.num_workers < 0:
        parser.error("--num-workers must be 0 or more.")
    if arguments.batch_seconds is not None and not (
        arguments.batch_seconds > 0 and math.isfinite(arguments.batch_seconds)
    ):
        parser.error("--batch-seconds must be a positive number.")
    if arguments.clips_per_part < 1:
        parser.error("--clips-per-part must be at least 1.")
    output = Path(arguments.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        parser.error(f"--output-dir {output} is a file; pass a folder.")


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


def run_embed(arguments: argparse.Namespace) -> dict[str, Any] | None:
    """Embed `arguments.sources` as the command line says; returns the index (`info.json`) on rank 0."""
    import torch
    from tqdm.auto import tqdm

    from ..audio.datasets import audio_parts
    from .extract import FRAME_RATE, DashengEmbedder, DashengFeatureStream, weights_fingerprint
    from .store import PartWriter, check_settings, done_parts, remove_stale_partials, write_index

    started = time.perf_counter()
    rank, world_size, local_rank = _distributed()
    output_dir = Path(arguments.output_dir).expanduser()
    model, feature_extractor = _load_model(arguments.model)
    num_layers = model.config.num_hidden_layers + 1
    layers = arguments.layers
    if layers == "all":
        layers = list(range(num_layers))
    if layers is not None:
        bad = [layer for layer in layers if not -num_layers <= layer < num_layers]
        if bad:
            raise DashengPreflightError(f"--layers {bad}: the model has hidden_states 0..{num_layers - 1} (or -1).")
        layers = [layer % num_layers for layer in layers]
    parts = audio_parts(arguments.sources, arguments.clips_per_part, arguments.audio_column, arguments.split)
    settings = {
        "model": arguments.model,
        "weights_sha256": weights_fingerprint(model),
        "sources": [str(source) for source in arguments.sources],
        "num_parts": len(parts),
        "clips_per_part": arguments.clips_per_part,
        "layers": layers,
        "frames": arguments.frames,
        "dtype": "float16" if arguments.float16 else "float32",
        "compute_dtype": "bfloat16" if arguments.bf16 else "float32",
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    check_settings(output_dir, settings)
    finished = done_parts(output_dir)
    mine = [part for part in parts if part.number % world_size == rank and part.number not in finished]
    remove_stale_partials(output_dir, [part.number for part in mine])
    device = arguments.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if arguments.bf16 and torch.device(device).type == "cpu" and rank == 0:
        warning = warn_if_bf16_is_emulated("--bf16")
        if warning:
            print(warning, file=sys.stderr)
    embedder = DashengEmbedder(model, layers, arguments.frames, arguments.bf16, device)
    stream = DashengFeatureStream(mine, feature_extractor, model.config.chunk_num_tokens * 4)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(arguments.num_workers, len(mine)))
    batch_seconds = arguments.batch_seconds or (60.0 if torch.device(device).type == "cpu" else 320.0)
    budget = batch_seconds * 100  # frames: small batches on a CPU start the model early, overlapped with decoding
    writers: dict[int, PartWriter] = {}
    pending: dict[int, list[tuple[dict[str, Any], Any]]] = {}
    total = sum(part.num_clips or 0 for part in mine) if all(part.num_clips for part in mine) else None
    bar = tqdm(total=total, unit="clip", desc="Embedding", disable=rank != 0, dynamic_ncols=True)
    seconds = 0.0
    loop_started = time.perf_counter()

    def flush(number: int) -> None:
        batch = pending.pop(number, [])
        if batch:
            outputs = embedder.forward([segment for _, segment in batch])
            for (clip, _), output in zip(batch, outputs):
                writers[number].add_segment(clip, output)

    for item in loader:
        number = item["part"]
        writer = writers.get(number)
        if writer is None:
            writer = writers[number] = PartWriter(output_dir, number, layers, arguments.frames, arguments.float16)
        if item["kind"] == "end":
            flush(number)
            writer.finish()
            del writers[number]
            continue
        bar.update(1)
        if item["kind"] == "skipped":
            writer.skip(item)
            if arguments.verbose:
                bar.write(f"skipped {item['reason']}")
            continue
        clip = writer.start_clip(item)
        for segment in item["segments"]:
            queue = pending.setdefault(number, [])
            if queue and sum(s.shape[-1] for _, s in queue) + segment.shape[-1] > budget:
                flush(number)
                queue = pending.setdefault(number, [])
            queue.append((clip, segment))
        seconds += item["duration"]
        elapsed = time.perf_counter() - loop_started
        bar.set_postfix_str(f"{seconds / 3600:.3f} h audio, {seconds / 3600 / elapsed:.3g} audio-h/s", refresh=False)
    bar.close()
    loop_seconds = time.perf_counter() - loop_started
    if world_size > 1:
        torch.distributed.barrier()
    info = None
    if rank == 0:
        info = write_index(
            output_dir,
            len(parts),
            {
                **settings,
                "hidden_size": model.config.hidden_size,
                "frame_rate": FRAME_RATE,
                "frame_time": "centre of token i: 0.04 * i + 0.015 s",
                "num_processes": world_size,
                "embedding_seconds": loop_seconds,  # rank 0's: reading, features and model, not loading
            },
        )
        hours = info["audio_hours"]
        print(
            f"Embedded {info['num_clips']} clips ({hours:.3f} h of audio) in {time.perf_counter() - started:.1f} s; "
            f"skipped {info['num_skipped']}"
            + (f" (named in {output_dir / 'info.json'})" if info["num_skipped"] else "")
            + f". Written to {output_dir}.",
            flush=True,
        )
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return info


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (`dasheng-embed`, `python -m dasheng_hf.embedding.embed`)."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    _check(arguments, parser)
    try:
        check_resources(_hub_resources(arguments), advice=CONVERT_ADVICE)
        with new_output_folder(Path(arguments.output_dir).expanduser(), remove_partial=False):
            run_embed(arguments)
    except (DashengPreflightError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted; the parts written so far are kept, a rerun resumes.\n")


if __name__ == "__main__":
    main(sys.argv[1:])
