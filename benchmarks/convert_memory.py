"""
Peak memory of converting a 1.2B-shaped Dasheng checkpoint (4.8 GB in float32), as a multiple of its size.

    python benchmarks/convert_memory.py [--workdir DIR] [--keep]

Writes a synthetic checkpoint in the released format (`{"model": ..., "config": ...}`, random weights, the front end's
real buffers) into a temporary folder, converts it without --verify in a fresh process, and prints that process's
peak resident memory (`ru_maxrss`, which counts the memory-mapped checkpoint pages it touched) divided by the
checkpoint's size. The target is below 2.5. Needs about 10 GB of disk and 6 GB of free memory.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "make_checkpoint"]

TARGET_RATIO = 2.5


def make_checkpoint(path: Path, hidden: int = 1536, depth: int = 40, heads: int = 24) -> None:
    """Save a released-format checkpoint with random weights of the given size (1.2B by default)."""
    import torch
    from dasheng_hf import DashengConfig
    from dasheng_hf.conversion.checkpoint_contents import expected_front_end, expected_shapes

    config = DashengConfig(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads)
    state = {}
    for key, shape in expected_shapes(config, classifier=False).items():
        name = key.removeprefix("encoder.")
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(shape, dtype=torch.long)
        else:
            state[name] = torch.empty(shape).normal_(std=0.02)
    state["init_bn.1.running_var"].fill_(100.0)
    state.update({f"front_end.{name}": buffer for name, buffer in expected_front_end(config).items()})
    torch.save({"model": state, "config": {"embed_dim": hidden, "depth": depth, "num_heads": heads}}, path)


def _convert_and_report(checkpoint: str, output: str) -> None:
    """Run the converter in this (fresh) process and print its peak resident memory in bytes."""
    from dasheng_hf.convert_checkpoint import main as convert

    status = convert(["--checkpoint", checkpoint, "--output", output])
    print(f"PEAK_RSS_BYTES {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--workdir", help="where to put the checkpoint and output (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and converted folder")
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=2, metavar=("CHECKPOINT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_checkpoint:
        make_checkpoint(Path(args.make_checkpoint))
        return 0
    if args.convert:
        _convert_and_report(*args.convert)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dasheng-convert-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, output = workdir / "dasheng_12b_synthetic.pt", workdir / "converted"
    try:
        start = time.perf_counter()
        # Each step in its own process, so the conversion's peak is measured alone.
        subprocess.run([sys.executable, __file__, "--make-checkpoint", str(checkpoint)], check=True)
        size = checkpoint.stat().st_size
        print(f"checkpoint: {size / 1e9:.2f} GB written in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, __file__, "--convert", str(checkpoint), str(output)], capture_output=True, text=True
        )
        if result.returncode != 0:
            print(result.stdout + result.stderr, file=sys.stderr)
            return result.returncode
        peak = int(result.stdout.rsplit("PEAK_RSS_BYTES", 1)[1].split()[0])
        ratio = peak / size
        print(f"conversion: {time.perf_counter() - start:.0f} s, peak resident memory {peak / 1e9:.2f} GB")
        print(f"peak / checkpoint size = {ratio:.2f} (target < {TARGET_RATIO})")
        return 0 if ratio < TARGET_RATIO else 1
    finally:
        if not args.keep:
            checkpoint.unlink(missing_ok=True)
            shutil.rmtree(output, ignore_errors=True)
            if not args.workdir:
                workdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
