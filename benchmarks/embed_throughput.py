"""
Throughput of `dasheng-embed` against the bare model forward on the same audio, and its peak memory on a 1 h file.

    python benchmarks/embed_throughput.py [--files 1000] [--depth 12] [--workers 2] [--device cpu]

One run on the same audio, side by side: audio-hours per second of the whole `dasheng-embed` loop over a folder of
real files (decoding, resampling and features in dataloader workers, the model, Parquet writing), and of the bare
model forward on the same batches of already-computed features; their ratio (goal: at least 0.90 with 2 workers), in
float32 and bfloat16. Two folders of the same speech: the FSDD recordings as they are (../shared/data/fsdd, 8 kHz,
about 0.45 s each, where the cost per file weighs most) and 10 s clips of them end to end (16 kHz, the length of
ESC-50 and AudioSet clips). Then the peak resident memory of `dasheng-embed` (largest
process: main or worker) on one 1 h file of concatenated FSDD speech, next to the same command on a 1 s file. The
model is a randomly initialised Dasheng of base width with `--depth` blocks (12 as dasheng-base; the 1 h run uses 2).
Prints the CPU's bf16 flags: on a CPU without avx512_bf16/amx_bf16, bfloat16 is emulated and slow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

DATA_DIR = Path(os.environ.get("DASHENG_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
GOAL = 0.90


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    shown = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})
    return f"{model}; {os.cpu_count()} CPUs; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def bare_forward_seconds(model, feature_folder_batches, bf16: bool, device: str) -> float:
    """Seconds of the model alone on padded batches of features already computed (as dasheng-embed batches them)."""
    import torch

    total = 0.0
    for values, mask in feature_folder_batches:
        values, mask = values.to(device), mask.to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            model(input_values=values, attention_mask=mask)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total += time.perf_counter() - started
    return total


def feature_batches(files: list[Path], clips_per_part: int, batch_seconds: float) -> tuple[list, float]:
    """The batches dasheng-embed forms (per part, up to `batch_seconds`), as padded tensors; and the audio seconds."""
    import torch
    from dasheng_hf import DashengFeatureExtractor
    from dasheng_hf.audio.datasets import decode_audio

    extractor = DashengFeatureExtractor()
    batches, seconds = [], 0.0
    for start in range(0, len(files), clips_per_part):
        pending = []
        for path in files[start : start + clips_per_part]:
            audio = decode_audio(path)
            seconds += len(audio) / 16000
            segment = extractor(audio, sampling_rate=16000, return_tensors="pt")["input_values"][0]
            if pending and sum(s.shape[-1] for s in pending) + segment.shape[-1] > batch_seconds * 100:
                batches.append(pending)
                pending = []
            pending.append(segment)
        if pending:
            batches.append(pending)
    padded = []
    for batch in batches:
        lengths = [segment.shape[-1] for segment in batch]
        values = torch.full((len(batch), 64, max(lengths)), -100.0)
        mask = torch.zeros(len(batch), max(lengths), dtype=torch.long)
        for row, segment in enumerate(batch):
            values[row, :, : lengths[row]], mask[row, : lengths[row]] = segment, 1
        padded.append((values, mask))
    return padded, seconds


def write_long_files(files: list[Path], folder: Path, seconds: float, count: float) -> None:
    """`count` (rounded up) 16 kHz WAV files of `seconds` each, FSDD recordings one after another."""
    import numpy as np
    import soundfile
    from dasheng_hf.audio.datasets import decode_audio

    folder.mkdir()
    index = 0
    for number in range(max(1, int(np.ceil(count)))):
        pieces, total = [], 0
        while total < seconds * 16000:
            pieces.append(decode_audio(files[index % len(files)]))
            total, index = total + len(pieces[-1]), index + 1
        audio = np.concatenate(pieces)[: int(seconds * 16000)]
        soundfile.write(folder / f"{number:05d}.wav", audio, 16000, "PCM_16")


_WRAPPER = (  # runs the command and prints the peak RSS (KiB) of its largest process, workers included
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def run_embed(arguments: list[str]) -> tuple[dict, float]:
    """`dasheng-embed` in a subprocess: its info.json and the peak RSS (MiB) of its largest process."""
    command = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "dasheng_hf.embedding.embed", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    peak = int(result.stdout.strip().splitlines()[-1]) / 1024
    output = Path(arguments[arguments.index("--output-dir") + 1])
    return json.loads((output / "info.json").read_text()), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="FSDD files embedded (default 1000).")
    parser.add_argument("--depth", type=int, default=12, help="Blocks of the base-width model (default 12).")
    parser.add_argument("--workers", type=int, default=2, help="Dataloader workers of dasheng-embed (default 2).")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--batch-seconds", type=float, help="Audio per batch, both sides (default 60 CPU, 320 GPU).")
    parser.add_argument(
        "--threads", type=int, help="Model threads, both sides (default: all cores; fewer leaves cores to decoding)."
    )
    parser.add_argument("--skip-hour", action="store_true", help="Leave out the 1 h memory measurement.")
    arguments = parser.parse_args()

    import torch
    from dasheng_hf import DashengConfig, DashengModel

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
        os.environ["OMP_NUM_THREADS"] = str(arguments.threads)  # dasheng-embed's main process (workers take 1)
    device = arguments.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"CPU: {cpu_flags()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} model threads, device {device}")
    files = sorted((DATA_DIR / "fsdd").glob("*.wav"))[: arguments.files]
    if not files:
        raise SystemExit(f"No FSDD recordings under {DATA_DIR / 'fsdd'}; set DASHENG_TEST_DATA.")
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        torch.manual_seed(0)
        model = DashengModel(DashengConfig(num_hidden_layers=arguments.depth)).eval()
        model.save_pretrained(root / "model")
        batch_seconds = arguments.batch_seconds or (60.0 if device == "cpu" else 320.0)
        model = model.to(device)
        print(f"model: base width, depth {arguments.depth}; {batch_seconds:g} s of audio per batch")
        print(f"{'audio':>24}  {'precision':>9}  {'embed audio-h/s':>15}  {'bare forward audio-h/s':>22}  ratio")
        folders = {"FSDD files (~0.45 s)": root / "fsdd", "10 s clips of FSDD": root / "ten"}
        folders["FSDD files (~0.45 s)"].mkdir()
        for path in files:
            (root / "fsdd" / path.name).symlink_to(path.resolve())
        write_long_files(files, root / "ten", 10, len(files) * 0.45 / 10)
        for name, folder in folders.items():
            clips = sorted(folder.iterdir())
            batches, seconds = feature_batches(clips, 1000, batch_seconds)
            bare_forward_seconds(model, batches[:1], False, device)  # warm-up
            for bf16 in (False, True):
                flags = ["--bf16"] if bf16 else []
                common = ["--model", str(root / "model"), "--num-workers", str(arguments.workers), *flags]
                common += ["--batch-seconds", str(batch_seconds)]
                if arguments.device:
                    common += ["--device", device]
                # The bare forward right before and right after the command, averaged: a shared machine's load drifts.
                before = bare_forward_seconds(model, batches, bf16, device)
                output = root / f"out-{folder.name}-{bf16}"
                info, _ = run_embed([str(folder), "--output-dir", str(output), *common])
                forward = (before + bare_forward_seconds(model, batches, bf16, device)) / 2
                embed_rate = info["audio_hours"] / info["embedding_seconds"]
                bare_rate = seconds / 3600 / forward
                precision = "bfloat16" if bf16 else "float32"
                ratio = embed_rate / bare_rate
                print(
                    f"{name:>24}  {precision:>9}  {embed_rate:>15.4f}  {bare_rate:>22.4f}  {ratio:.2f} "
                    f"({'meets' if ratio >= GOAL else 'below'} the goal of {GOAL})",
                    flush=True,
                )
        if arguments.skip_hour:
            return
        small = DashengModel(DashengConfig(num_hidden_layers=2))
        small.save_pretrained(root / "small")
        for name, length in (("second", 1), ("hour", 3600)):
            write_long_files(files, root / name, length, 1)
            started = time.perf_counter()
            info, peak = run_embed(
                [str(root / name), "--model", str(root / "small"), "--output-dir", str(root / f"mem-{name}")]
                + ["--num-workers", "1"]
            )
            print(
                f"1 {name} file (base width, 2 blocks): peak RSS of the largest process {peak:.0f} MiB, "
                f"{time.perf_counter() - started:.1f} s, {info['num_clips']} clip",
                flush=True,
            )


if __name__ == "__main__":
    main()
