"""Shared test helpers: reference checkpoints with perturbed random weights, and real audio from ../shared/data.

Tests that need recorded speech (FSDD) or a label table get it through `fsdd_files`/`fsdd_clip`/`concatenated_fsdd`
and `labels_file`: where the data is missing, these skip the test with one line saying where the data comes from and
how to point the tests at a copy (`DASHENG_TEST_DATA`); every other test runs without it.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

DATA_DIR = Path(os.environ.get("DASHENG_TEST_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
FSDD_DIR = DATA_DIR / "fsdd"
LABELS_DIR = DATA_DIR / "labels"
SAMPLING_RATE = 16000
# The tests use the 1,000 recordings of two FSDD speakers (a full FSDD `recordings/` folder works too).
FSDD_SPEAKERS = ("george", "jackson")
FSDD_SOURCE = "Free Spoken Digit Dataset: github.com/Jakobovski/free-spoken-digit-dataset, CC BY-SA 4.0"
LABEL_SOURCES = {  # file: where it comes from
    "audioset_class_labels_indices.csv": "github.com/YuanGongND/ast, egs/audioset/data/",
    "esc50_class_labels_indices.csv": "github.com/YuanGongND/ast, egs/esc50/data/",
}


def tiny_config(**kwargs):
    """A 64-wide, 2-layer Dasheng: the maths of the released sizes, fast on a CPU."""
    from dasheng_hf import DashengConfig

    return DashengConfig(**{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, **kwargs})


def make_reference_encoder(embed_dim: int = 64, depth: int = 2, num_heads: int = 4, seed: int = 0, **kwargs):
    """The original `dasheng==0.0.9` encoder with every tensor perturbed (BatchNorm statistics and norms included)."""
    from dasheng.pretrained.pretrained import Dasheng

    torch.manual_seed(seed)
    model = Dasheng(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.startswith("front_end.") or not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 400 + 50)  # dB variance scale
            elif name.endswith("running_mean"):
                tensor.copy_(noise * 10 - 40)
            elif name.endswith("weight") and tensor.ndim == 1:  # norms: around one
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.add_(0.02 * noise)
        model.init_bn[1].num_batches_tracked.fill_(1000)
    return model.eval()


def hf_state_dict(reference) -> dict[str, torch.Tensor]:
    """The Hub layout: the original encoder's state dict minus `front_end.*`, prefixed `encoder.`."""
    return {f"encoder.{k}": v.clone() for k, v in reference.state_dict().items() if not k.startswith("front_end.")}


def load_wav(path: str | Path) -> torch.Tensor:
    """A mono WAV file as float32 samples in [-1, 1], resampled to 16 kHz."""
    import soundfile
    import torchaudio

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    waveform = torch.from_numpy(samples.mean(axis=1))
    if rate != SAMPLING_RATE:
        waveform = torchaudio.functional.resample(waveform, rate, SAMPLING_RATE)
    return waveform


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


def fsdd_files() -> list[str]:
    """The FSDD recordings of `FSDD_SPEAKERS` (8 kHz WAVs, `{digit}_{speaker}_{take}.wav`), sorted; skips the calling
    test (or fixture) where there are none."""
    files = sorted(path for speaker in FSDD_SPEAKERS for path in glob.glob(str(FSDD_DIR / f"*_{speaker}_*.wav")))
    if not files:
        _skip(
            f"needs recorded speech, and {FSDD_DIR} holds no FSDD WAVs ({FSDD_SOURCE}): put its recordings/*.wav in "
            f"a folder fsdd/ and set DASHENG_TEST_DATA to the folder above it"
        )
    return files


def labels_file(name: str) -> Path:
    """A label table from `LABELS_DIR` (`index,mid,display_name`); skips the calling test where it is missing."""
    path = LABELS_DIR / name
    if not path.is_file():
        _skip(
            f"needs the label table {name}, missing from {LABELS_DIR} (it comes from {LABEL_SOURCES.get(name, '?')}): "
            f"put it in a folder labels/ and set DASHENG_TEST_DATA to the folder above it"
        )
    return path


def fsdd_clip(index: int) -> torch.Tensor:
    return load_wav(fsdd_files()[index])


def concatenated_fsdd(num_samples: int, start: int = 0) -> torch.Tensor:
    """Real speech of exactly `num_samples` samples at 16 kHz, made of consecutive FSDD clips."""
    parts, total, index = [], 0, start
    while total < num_samples:
        clip = fsdd_clip(index % len(fsdd_files()))
        parts.append(clip)
        total += clip.numel()
        index += 1
    return torch.cat(parts)[:num_samples]


def samples_for_frames(num_frames: int) -> int:
    """Shortest clip with exactly `num_frames` frames (frames = samples // 160 + 1)."""
    return (num_frames - 1) * 160


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# The first Hub port's preprocessor_config.json (return_attention_mask false: it had no mask).
LEGACY_PREPROCESSOR_CONFIG = {
    "center": True,
    "f_max": 8000,
    "f_min": 0,
    "feature_extractor_type": "DashengFeatureExtractor",
    "feature_size": 64,
    "hop_size": 160,
    "n_fft": 512,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": 16000,
    "win_size": 512,
}


__all__ = [name for name in dir() if not name.startswith("_") and name not in {"annotations", "glob", "os"}]
