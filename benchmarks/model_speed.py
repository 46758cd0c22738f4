"""Speed and memory of DashengModel next to the original dasheng==0.0.9, measured side by side in one run.

Prints audio-seconds encoded per second of wall time (features included) for both implementations on the same
weights and inputs, the bf16-autocast speed-up over fp32 with the pooled-embedding cosine similarity, and the peak
memory of encoding one hour of audio with dasheng-base on the CPU (in a fresh process).

    python benchmarks/model_speed.py [--size base] [--repeats 3] [--skip-hour]

Targets (issue 2): fp32 at least as fast as the original for 8 x 10 s and 1 x 60 s; bf16 autocast at least 1.6x
faster than fp32 where the CPU has bf16 instructions, cosine similarity >= 0.999; one hour under 3 GB.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengModel

__all__ = ["main"]

SAMPLING_RATE = 16000
SIZES = {"base": (768, 12, 12), "0.6B": (1280, 32, 16), "1.2B": (1536, 40, 24)}


def build_pair(size: str) -> tuple[torch.nn.Module, DashengModel]:
    """The original encoder with random weights, and DashengModel with the same weights."""
    from dasheng.pretrained.pretrained import Dasheng

    hidden, layers, heads = SIZES[size]
    torch.manual_seed(0)
    reference = Dasheng(embed_dim=hidden, depth=layers, num_heads=heads).eval()
    model = DashengModel(DashengConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads))
    state = {f"encoder.{k}": v for k, v in reference.state_dict().items() if not k.startswith("front_end.")}
    model.load_state_dict(state, strict=True)
    return reference, model.eval()


def time_call(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of `function` in seconds, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_has_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def encode(model: DashengModel, extractor: DashengFeatureExtractor, waveforms: torch.Tensor) -> torch.Tensor:
    inputs = extractor(list(waveforms), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    return model(**inputs).pooler_output


def compare_speed(size: str, repeats: int) -> None:
    reference, model = build_pair(size)
    extractor = DashengFeatureExtractor()
    print(f"dasheng-{size}, {torch.get_num_threads()} threads, bf16 instructions: {cpu_has_bf16()}")
    columns = ("input", "original", "ours fp32", "ratio", "ours bf16", "bf16/fp32", "cos")
    print(" | ".join(f"{column:>10}" for column in columns))
    for batch, seconds in ((8, 10), (1, 60)):
        waveforms = 0.1 * torch.randn(batch, seconds * SAMPLING_RATE, generator=torch.Generator().manual_seed(batch))
        audio_seconds = batch * seconds
        with torch.inference_mode():
            original = time_call(lambda: reference(waveforms), repeats)  # noqa: B023
            ours = time_call(lambda: encode(model, extractor, waveforms), repeats)  # noqa: B023
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours_bf16 = time_call(lambda: encode(model, extractor, waveforms), repeats)  # noqa: B023
                pooled_bf16 = encode(model, extractor, waveforms).float()
            pooled = encode(model, extractor, waveforms)
        cosine = torch.nn.functional.cosine_similarity(pooled, pooled_bf16, dim=-1).min().item()
        cells = (
            f"{batch} x {seconds} s",
            f"{audio_seconds / original:.1f}/s",
            f"{audio_seconds / ours:.1f}/s",
            f"{original / ours:.2f}x",
            f"{audio_seconds / ours_bf16:.1f}/s",
            f"{ours / ours_bf16:.2f}x",
            f"{cosine:.5f}",
        )
        print(" | ".join(f"{cell:>10}" for cell in cells))


HOUR_SCRIPT = """
import resource, sys, time, torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengModel
hidden, layers, heads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = DashengModel(DashengConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)).eval()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
waveform = 0.1 * torch.randn(3600 * 16000)
start = time.perf_counter()
with torch.inference_mode():
    inputs = DashengFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    outputs = model(**inputs)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(tuple(outputs.last_hidden_state.shape), f"{elapsed:.1f}", peak / 2**20, baseline / 2**20)
"""


def hour_memory(size: str) -> None:
    """Peak resident memory of a fresh process that encodes one hour of audio (ru_maxrss, includes the weights)."""
    result = subprocess.run(
        [sys.executable, "-c", HOUR_SCRIPT, *map(str, SIZES[size])], capture_output=True, text=True, check=True
    )
    shape, elapsed, peak, baseline = result.stdout.strip().rsplit(" ", 3)
    print(
        f"one hour of audio, dasheng-{size}: output {shape} in {float(elapsed):.0f} s; peak memory "
        f"{float(peak):.2f} GB (process with weights loaded: {float(baseline):.2f} GB; target < 3 GB)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hour", action="store_true", help="skip the one-hour memory measurement")
    args = parser.parse_args(argv)
    compare_speed(args.size, args.repeats)
    if not args.skip_hour:
        hour_memory(args.size)


if __name__ == "__main__":
    main()
