"""
PyTorch fp32 against ONNX Runtime fp32 and dynamic int8, dasheng-base (random weights), 2 threads, in one run.

Prints the CPU's flags that matter for int8 (avx512_vnni, avx_vnni, avx512_bf16), then per input (8 x 10 s, 1 x 60 s)
the median time of each runtime, interleaved round by round so that load from other processes hits all alike, the
ratios to PyTorch, the int8 model's minimum per-clip cosine to fp32, and the model files' sizes.

    python benchmarks/export_speed.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from dasheng_hf import DashengConfig, DashengModel
from dasheng_hf.deployment.exporters import export_onnx, quantize_int8
from dasheng_hf.deployment.runtime import DashengOnnxEncoder


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    present = set(flags.split(":")[1].split())
    return " ".join(f"{flag}={'yes' if flag in present else 'no'}" for flag in wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU flags: {cpu_flags()}; threads {args.threads}; torch {torch.__version__}")

    torch.manual_seed(0)
    model = DashengModel(DashengConfig(attn_implementation="sdpa")).eval()  # dasheng-base: 768 wide, 12 layers
    folder = Path(tempfile.mkdtemp(prefix="dasheng_export_speed_"))
    export_onnx(model, folder / "model.onnx")
    quantize_int8(folder / "model.onnx", folder / "model_quantized.onnx")
    (folder / "front_end.json").write_text("{}")
    np.savez(folder / "front_end.npz", window=np.hanning(512).astype(np.float32), mel_filters=np.ones((257, 64)))
    fp32 = DashengOnnxEncoder(folder, num_threads=args.threads)
    int8 = DashengOnnxEncoder(folder, quantized=True, num_threads=args.threads)

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "8 x 10 s": torch.randn(8, 64, 1001, generator=generator) * 10 - 40,
        "1 x 60 s": torch.randn(1, 64, 6001, generator=generator) * 10 - 40,
    }
    for name, features in inputs.items():
        array = features.numpy()
        runners = {
            "pytorch fp32": lambda features=features: model(features).pooler_output.numpy(),
            "ort fp32": lambda array=array: fp32(array).pooler_output,
            "ort int8": lambda array=array: int8(array).pooler_output,
        }
        times: dict[str, list[float]] = {key: [] for key in runners}
        outputs = {}
        with torch.inference_mode():
            for key, run in runners.items():  # warm-up
                outputs[key] = run()
            for _ in range(args.rounds):
                for key, run in runners.items():
                    start = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - start)
        base = statistics.median(times["pytorch fp32"])
        print(f"\n{name}:")
        for key in runners:
            median = statistics.median(times[key])
            print(f"  {key:13s} {median * 1000:8.0f} ms   {base / median:5.2f}x PyTorch fp32")
        reference, quantized = outputs["pytorch fp32"], outputs["ort int8"]
        norms = np.linalg.norm(reference, axis=-1) * np.linalg.norm(quantized, axis=-1)
        cosine = (reference * quantized).sum(-1) / norms
        difference = np.abs(outputs["ort fp32"] - reference).max()
        print(f"  ort fp32 max |diff| {difference:.2e}; int8 min cosine to PyTorch fp32 {cosine.min():.4f}")
    print("\nsizes:", ", ".join(f"{p.name} {p.stat().st_size / 1e6:.0f} MB" for p in sorted(folder.glob("model*"))))


if __name__ == "__main__":
    main()
