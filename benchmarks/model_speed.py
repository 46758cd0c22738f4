"""Speed and memory of DashengModel next to the original dasheng==0.0.9, measured side by side in one run.

Prints audio-seconds encoded per second of wall time (features included) for both implementations on the same
weights and inputs, the bf16-autocast speed-up over fp32 with the pooled-embedding cosine similarity, the cost of
padded batches of mixed lengths (batch time over the summed time of its clips one at a time) for this code and for
the padded implementation it replaced (loaded from git revision `--before-rev`), and the peak memory of encoding one
hour of audio with dasheng-base on the CPU (in a fresh process).

    python benchmarks/model_speed.py [--size base] [--repeats 3] [--skip-hour] [--before-rev 4d692a8]

Targets: fp32 at least as fast as the original for 8 x 10 s and 1 x 60 s; bf16 autocast at least 1.6x faster than
fp32 where the CPU has bf16 instructions, cosine similarity >= 0.999; mixed batches (1 x 60 s + 7 x 2 s, and 32
clips of 0.5 to 12 s) at most 1.10x the time of their clips alone; equal-length batches no slower than the padded
implementation (>= 0.97x); one hour under 3 GB.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
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


def load_before(revision: str, state: dict[str, torch.Tensor], config: DashengConfig) -> torch.nn.Module:
    """DashengModel as it was at git `revision` (the padded implementation), with the same weights."""
    root = Path(__file__).resolve().parents[1]
    package = Path(tempfile.mkdtemp()) / "dasheng_hf_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("configuration_dasheng.py", "modeling_dasheng.py", "feature_extraction_dasheng.py"):
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{revision}:{name}"], capture_output=True, text=True, check=True
        ).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(package.parent))
    before = importlib.import_module("dasheng_hf_before.modeling_dasheng")
    old_config = importlib.import_module("dasheng_hf_before.configuration_dasheng").DashengConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
    )
    model = before.DashengModel(old_config)
    model.load_state_dict(state, strict=True)
    return model.eval()


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


def encode(model: torch.nn.Module, extractor: DashengFeatureExtractor, waveforms: torch.Tensor) -> torch.Tensor:
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


def compare_mixed_batches(size: str, repeats: int, revision: str) -> None:
    """Batch time over the summed one-at-a-time time of the same clips, before (padded) and now (padding-free)."""
    _, model = build_pair(size)
    before = load_before(revision, model.state_dict(), model.config)
    extractor = DashengFeatureExtractor()
    generator = torch.Generator().manual_seed(0)
    uniform = (0.5 + 11.5 * torch.rand(32, generator=generator)).tolist()
    batches = {
        "1 x 60 s + 7 x 2 s": [60.0] + [2.0] * 7,
        "32 x 0.5-12 s": uniform,
        "8 x 10 s (equal)": [10.0] * 8,
    }
    print(f"\nmixed lengths, dasheng-{size}: batch time / sum of one-at-a-time times (before = git {revision})")
    columns = ("batch", "before", "now", "now vs before")
    print(" | ".join(f"{column:>20}" for column in columns))
    for label, seconds in batches.items():
        clips = [0.1 * torch.randn(int(s * SAMPLING_RATE), generator=generator) for s in seconds]
        cells = [label]
        times = {}
        with torch.inference_mode():
            for name, candidate in (("before", before), ("now", model)):
                batch_time = time_call(lambda: encode(candidate, extractor, clips), repeats)  # noqa: B023
                alone = sum(time_call(lambda: encode(candidate, extractor, [c]), repeats) for c in clips)  # noqa: B023
                times[name] = batch_time
                cells.append(f"{batch_time / alone:.2f}")
        cells.append(f"{times['before'] / times['now']:.2f}x faster")
        print(" | ".join(f"{cell:>20}" for cell in cells))


# Peak resident memory from VmHWM (this process's own high-water mark): ru_maxrss would also count the parent's memory
# at fork time, which Linux carries across exec.
HOUR_SCRIPT = """
import sys, time, torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengModel
def peak_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
hidden, layers, heads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = DashengModel(DashengConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)).eval()
baseline = peak_bytes()
waveform = 0.1 * torch.randn(3600 * 16000)
start = time.perf_counter()
with torch.inference_mode():
    inputs = DashengFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    outputs = model(**inputs)
elapsed = time.perf_counter() - start
peak = peak_bytes()
print(tuple(outputs.last_hidden_state.shape), f"{elapsed:.1f}", peak / 2**30, baseline / 2**30)
"""


def hour_memory(size: str) -> None:
    """Peak resident memory of a fresh process that encodes one hour of audio (VmHWM, includes the weights)."""
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
    parser.add_argument("--before-rev", default="4d692a8", help="git revision of the padded implementation")
    parser.add_argument("--only-mixed", action="store_true", help="only the mixed-length comparison")
    args = parser.parse_args(argv)
    if not args.only_mixed:
        compare_speed(args.size, args.repeats)
    compare_mixed_batches(args.size, args.repeats, args.before_rev)
    if not args.skip_hour and not args.only_mixed:
        hour_memory(args.size)


if __name__ == "__main__":
    main()
