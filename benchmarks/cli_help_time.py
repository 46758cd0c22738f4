"""
Time each console script's `--help` (the target: well under a second) and say whether it imported torch or
transformers on the way.

    python benchmarks/cli_help_time.py [--repeats 3]

The scripts are read from pyproject.toml's `[project.scripts]`, so every tool is timed once it is declared there.
An installed script is run as installed; one that is not (say, added since the last `pip install -e .`) is run as
its console-script wrapper does it, `from module import main; sys.exit(main())`, in a fresh interpreter. Each time is
the median wall time of `--repeats` runs, interpreter start-up included (printed too, for comparison).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """`name: "module:function"` from pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def command(name: str, entry: str, *options: str) -> list[str]:
    module, function = entry.split(":")
    installed = shutil.which(name)
    if installed:
        return [sys.executable, *options, installed, "--help"]
    wrapper = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
    return [sys.executable, *options, "-c", wrapper, "--help"]


def timed(argv: list[str], repeats: int) -> tuple[float, subprocess.CompletedProcess]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy())
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def heavy_imports(argv: list[str]) -> list[str]:
    """Which of torch and transformers the command imported (from `python -X importtime`)."""
    result = subprocess.run(argv, capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import")}
    return [name for name in ("torch", "transformers") if name in imported]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per script; the median is printed")
    args = parser.parse_args()
    baseline, _ = timed([sys.executable, "-c", "pass"], args.repeats)
    print(f"python {sys.version.split()[0]}; interpreter start-up alone: {baseline:.2f} s (median of {args.repeats})")
    print(f"{'script':<24}{'--help':>9}  {'how':<10} heavy imports")
    for name, entry in sorted(console_scripts().items()):
        argv = command(name, entry)
        seconds, result = timed(argv, args.repeats)
        how = "installed" if shutil.which(name) else "wrapper"
        if result.returncode != 0:
            error = (result.stderr.strip().splitlines() or ["?"])[-1][:80]
            print(f"{name:<24}{'failed':>9}  {how:<10} exit {result.returncode}: {error}")
            continue
        heavy = heavy_imports(command(name, entry, "-X", "importtime"))
        print(f"{name:<24}{seconds:>8.2f}s  {how:<10} {', '.join(heavy) or 'none'}")


if __name__ == "__main__":
    main()
