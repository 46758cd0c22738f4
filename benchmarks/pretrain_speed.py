"""Pretraining step speed and memory of DashengForPreTraining next to the original AudioTransformerMAE, in one run.

Both models get the same weights (the original's `dasheng_base` MAE with group masking, random initialisation) and
the same batch (8 x 10 s of audio), in training mode with the BatchNorm on batch statistics as the original trains.
A step is forward, loss, backward and an AdamW step (fused where PyTorch has it, as Trainer's default
`adamw_torch_fused`). The original takes waveforms and computes its spectrogram inside the step; ours takes the
feature extractor's log-mel features, computed by the data loader in training: the `ours+fe` row puts that
computation inside the step as well. Steps of the two models alternate and the median is reported, so both see the
same machine load; CPU seconds per step are reported beside wall time. Peak memory is the growth of the resident
set during one step, each model in a fresh process.

The `products` row is a floor under the step: the `mm`, `addmm` and `bmm` products of one step of ours (the linear
layers forward and backward, and in bf16 attention too, which runs eagerly there; in float32 attention runs inside
SDPA and is not included), recorded with their shapes, strides and dtypes and replayed alone on random tensors. The
original does the same products, so its ratio bounds what any implementation of this model could gain over the
original on this machine without doing less arithmetic.

    python benchmarks/pretrain_speed.py [--size base] [--batch 8] [--seconds 10] [--steps 3] [--threads 2]

Targets (issue 8): ours at least 1.0x the original in float32 and at least 1.5x under bf16 autocast (CPU, 2 threads).
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
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengForPreTraining
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["main"]

SAMPLING_RATE = 16000
# (hidden, layers, heads) of the encoder and (hidden, layers, heads) of its decoder, as in the original's recipes.
SIZES = {"tiny": ((64, 2, 4), (32, 2, 4)), "base": ((768, 12, 12), (512, 8, 16))}


def build_pair(size: str) -> tuple[torch.nn.Module, DashengForPreTraining]:
    """The original MAE (group masking, random weights) and DashengForPreTraining with the same weights."""
    from dasheng.train.models import AudioTransformerMAE, AudioTransformerMAE_Decoder, AudioTransformerMAE_Encoder

    (width, depth, heads), (decoder_width, decoder_depth, decoder_heads) = SIZES[size]
    torch.manual_seed(0)
    encoder = AudioTransformerMAE_Encoder(embed_dim=width, depth=depth, num_heads=heads, group_masking=True)
    decoder = AudioTransformerMAE_Decoder(
        input_dim=width,
        outputdim=256,
        embed_dim=decoder_width,
        depth=decoder_depth,
        num_heads=decoder_heads,
        num_patches=encoder.patch_embed.num_patches,
    )
    reference = AudioTransformerMAE(encoder, decoder).train()
    config = DashengConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        decoder_hidden_size=decoder_width,
        decoder_num_hidden_layers=decoder_depth,
        decoder_num_attention_heads=decoder_heads,
        use_batch_statistics=True,
    )
    model = DashengForPreTraining(config).train()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("encoder.front_end.")}
    model.load_state_dict(state, strict=True)
    return reference, model


def make_steps(
    reference: torch.nn.Module, model: DashengForPreTraining, waveforms: torch.Tensor, bf16: bool
) -> dict[str, Callable[[], float]]:
    """One training step of each model (forward, backward, AdamW step), returning the loss."""
    extractor = DashengFeatureExtractor()
    features = extractor(list(waveforms), sampling_rate=SAMPLING_RATE, return_tensors="pt")
    optimizers = {}
    for name, module in (("original", reference), ("ours", model)):
        try:
            optimizers[name] = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
        except RuntimeError:
            optimizers[name] = torch.optim.AdamW(module.parameters(), lr=1e-5)

    def step(name: str, compute_loss: Callable[[dict], torch.Tensor], prepare: Callable[[], dict]) -> float:
        optimizers[name].zero_grad(set_to_none=True)
        inputs = prepare()  # outside autocast, as in a data loader
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = compute_loss(inputs)
        loss.backward()
        optimizers[name].step()
        return float(loss.detach())

    def extract() -> dict:
        return extractor(list(waveforms), sampling_rate=SAMPLING_RATE, return_tensors="pt")

    return {
        "original": lambda: step("original", lambda _: reference(waveforms, return_loss=True), dict),
        "ours": lambda: step("ours", lambda inputs: model(**inputs).loss, lambda: features),
        "ours+fe": lambda: step("ours", lambda inputs: model(**inputs).loss, extract),
    }


def time_interleaved(steps: dict[str, Callable[[], float]], repeats: int) -> dict[str, tuple[float, float]]:
    """
    Median wall and CPU seconds (all threads of this process) per step of each function, alternating between them
    after one warm-up call each. CPU time is the steadier figure on a machine shared with other jobs.
    """
    for function in steps.values():
        function()
    times = {name: ([], []) for name in steps}
    for _ in range(repeats):
        for name, function in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            function()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return {name: (statistics.median(wall), statistics.median(cpu)) for name, (wall, cpu) in times.items()}


class _RecordProducts(TorchDispatchMode):
    """Records the shape, strides and dtype of the operands of every matrix product that runs under it."""

    OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            operands = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, operands, kwargs or {}))
        return func(*args, **(kwargs or {}))


def matrix_products_of(step: Callable[[], float]) -> Callable[[], float]:
    """A function that runs the matrix products of one call of `step` alone, on random operands of the same layout."""
    recorder = _RecordProducts()
    with recorder:
        step()
    calls = [(func, [_random_like(operand) for operand in operands], kw) for func, operands, kw in recorder.calls]

    def replay() -> float:
        for func, tensors, kwargs in calls:
            func(*tensors, **kwargs)
        return 0.0

    return replay


def _random_like(operand):
    if not isinstance(operand, tuple):
        return operand
    shape, stride, dtype = operand
    storage = 1 + sum((size - 1) * step for size, step in zip(shape, stride))
    return torch.randn(storage, dtype=dtype).as_strided(shape, stride)


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_memory(size: str, batch: int, seconds: float, which: str, bf16: bool) -> float:
    """Growth of the resident set (GiB) during one training step of `which`, after a warm-up step."""
    reference, model = build_pair(size)
    waveforms = make_batch(batch, seconds)
    step = make_steps(reference, model, waveforms, bf16)[which]
    step()  # allocates gradients and optimizer state, as every later step has them
    before = resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident set
    step()
    return (resident_kib("VmHWM") - before) / 2**20


def make_batch(batch: int, seconds: float) -> torch.Tensor:
    return 0.1 * torch.randn(batch, int(seconds * SAMPLING_RATE), generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each model after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-of", choices=["original", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(step_memory(args.size, args.batch, args.seconds, args.memory_of, args.bf16))
        return

    reference, model = build_pair(args.size)
    waveforms = make_batch(args.batch, args.seconds)
    print(
        f"{args.size}: {args.batch} x {args.seconds:g} s, {torch.get_num_threads()} threads; median of {args.steps} "
        f"alternating steps; ratio = original time / ours (above 1: ours faster); ours+fe computes features in the step"
    )
    columns = ("precision", "model", "steps/s", "ratio", "CPU s/step", "ratio", "peak memory")
    print(" | ".join(f"{column:>11}" for column in columns))
    for bf16 in (False, True):
        steps = make_steps(reference, model, waveforms, bf16)
        steps["products"] = matrix_products_of(steps["ours"])
        seconds = time_interleaved(steps, args.steps)
        memory = {}
        if not args.skip_memory:
            for which in ("original", "ours"):
                command = [sys.executable, __file__, "--memory-of", which, "--size", args.size]
                command += ["--batch", str(args.batch), "--seconds", str(args.seconds), "--threads", str(args.threads)]
                output = subprocess.run(command + ["--bf16"] * bf16, capture_output=True, text=True, check=True)
                memory[which] = float(output.stdout.strip().splitlines()[-1])
        (wall_original, cpu_original) = seconds["original"]
        for name, (wall, cpu) in seconds.items():
            row = (
                "bf16" if bf16 else "fp32",
                name,
                f"{1 / wall:.4f}",
                f"{wall_original / wall:.2f}x",
                f"{cpu:.1f}",
                f"{cpu_original / cpu:.2f}x",
                f"{memory[name]:.2f} GiB" if name in memory else "-",
            )
            print(" | ".join(f"{value:>11}" for value in row), flush=True)


if __name__ == "__main__":
    main()
