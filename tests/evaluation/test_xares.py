"""The X-ARES encoder (`evaluation/xares.py`): X-ARES's own checker, xares-llm's contract, numbers, long audio."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dasheng_hf import DashengModel
from dasheng_hf.cli.preflight import DashengPreflightError
from dasheng_hf.evaluation import xares
from dasheng_hf.evaluation.xares import DashengXaresEncoder
from helpers import concatenated_fsdd, hf_state_dict, max_abs_diff, tiny_config


def import_xares(name: str):
    """A module of the PyPI `xares` package: with `python -m pytest` run from the repository root, the root itself
    (the `dasheng_hf` package folder) is on sys.path, where `xares` would name this project's xares.py."""
    root = Path(__file__).resolve().parents[2]
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    try:
        module = importlib.import_module(name)
    finally:
        sys.path[:] = saved
    assert not Path(module.__file__).resolve().is_relative_to(root), module.__file__
    return module


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, reference_tiny):
    folder = tmp_path_factory.mktemp("dasheng-xares")
    model = DashengModel(tiny_config())
    model.load_state_dict(hf_state_dict(reference_tiny))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(model_folder):
    return DashengXaresEncoder(str(model_folder))


def test_passes_the_xares_checker(encoder):
    check_audio_encoder = import_xares("xares.audio_encoder_checker").check_audio_encoder
    assert check_audio_encoder(encoder) is True
    assert (encoder.sampling_rate, encoder.output_dim, encoder.hop_size_in_ms) == (16000, 64, 40)


def test_xares_run_finds_the_encoder_class():
    """`python -m xares.run dasheng_hf/evaluation/xares.py ...` takes the one name ending in "Encoder" from it."""
    attr_from_py_path = import_xares("xares.utils").attr_from_py_path
    assert attr_from_py_path("dasheng_hf/evaluation/xares.py", endswith="Encoder") is DashengXaresEncoder


def test_embeddings_match_the_original(encoder, reference_tiny):
    audio = torch.stack([concatenated_fsdd(50000, start=i) for i in range(2)])
    embeddings = encoder(audio)
    assert embeddings.shape == (2, 78, 64) and embeddings.dtype == torch.float32  # 3125 ms / 40 ms
    with torch.no_grad():  # clip by clip: the original sets the dB floor over a whole batch
        assert max_abs_diff(embeddings, torch.cat([reference_tiny(clip[None]) for clip in audio])) <= 1e-4
    assert max_abs_diff(encoder(audio[0]), embeddings[:1]) == 0  # one clip without a batch axis


def test_xares_llm_contract(encoder, reference_tiny):
    """forward(audio, audio_attention_mask) -> (features, mask), as xares-llm's checker and model call it."""
    forward = inspect.signature(encoder.forward)
    assert list(forward.parameters)[:2] == ["audio", "audio_attention_mask"]
    audio = torch.randn(3, 50000)
    features, mask = encoder(audio, None)
    assert features.shape == (3, 78, 64) and mask is None
    # Right-padded clips of 3.1 s and 1.2 s: each clip's tokens equal those of the clip alone; the mask marks them.
    long, short = concatenated_fsdd(50000), concatenated_fsdd(19200, start=7)
    batch = torch.stack([long, torch.nn.functional.pad(short, (0, 50000 - 19200))])
    sample_mask = torch.zeros(2, 50000, dtype=torch.long)
    sample_mask[0, :] = 1
    sample_mask[1, :19200] = 1
    features, mask = encoder(batch, sample_mask)
    assert features.shape == (2, 78, 64) and mask.shape == (2, 78) and mask.dtype == torch.long
    assert mask.sum(dim=1).tolist() == [78, 30]
    assert bool((features[1, 30:] == 0).all())
    with torch.no_grad():
        assert max_abs_diff(features[1, :30], reference_tiny(short[None])[0]) <= 1e-4
        assert max_abs_diff(features[0], reference_tiny(long[None])[0]) <= 1e-4
    bool_features, bool_mask = encoder(batch, sample_mask.bool())
    assert bool_mask.dtype == torch.bool and torch.equal(bool_features, features)
    full_features, full_mask = encoder(audio, torch.ones(3, 50000, dtype=torch.long))  # nothing padded
    assert full_mask.shape == (3, 78) and bool(full_mask.all()) and torch.equal(full_features, encoder(audio))


def test_ten_minutes(encoder):
    """Ten minutes and a five-minute clip padded beside it, in one call."""
    period = 1008 * 160
    speech = concatenated_fsdd(period)
    minutes = 10 * 60 * 16000
    audio = torch.zeros(2, minutes)
    audio[0] = speech.repeat(minutes // period + 1)[:minutes]
    audio[1, : minutes // 2] = audio[0, : minutes // 2]
    mask = (torch.arange(minutes)[None, :] < torch.tensor([[minutes], [minutes // 2]])).long()
    features, token_mask = encoder(audio, mask)
    assert features.shape == (2, 15000, 64) and token_mask.sum(dim=1).tolist() == [15000, 7500]
    assert bool(torch.isfinite(features).all())
    # The signal repeats every 10.08 s chunk: inner chunks of both clips are alike.
    chunks = features[:, : 29 * 252].reshape(2, 29, 252, 64)
    assert max_abs_diff(chunks[0, 1:], chunks[0, 1:2].expand(28, -1, -1)) <= 1e-4
    assert max_abs_diff(chunks[1, 1:29], chunks[0, 1:29]) <= 1e-4


def test_stays_frozen_in_eval_mode(encoder):
    encoder.train()
    assert encoder.training and not encoder.model.training
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    encoder.eval()


def test_bad_inputs_are_named(encoder):
    with pytest.raises(ValueError, match=r"float tensor \(batch, samples\)"):
        encoder(torch.zeros(2, 16000, dtype=torch.int16))
    with pytest.raises(ValueError, match="must match audio"):
        encoder(torch.zeros(2, 16000), torch.ones(2, 8000))
    short = encoder(torch.randn(1, 200))  # under 30 ms: zero-padded to one token
    assert short.shape == (1, 1, 64)


def test_the_harness_constructor_can_be_pointed_at_any_model(model_folder, monkeypatch, tmp_path):
    """X-ARES and xares-llm call DashengXaresEncoder() without arguments: DASHENG_XARES_MODEL or DEFAULT_MODEL."""
    monkeypatch.setenv("DASHENG_XARES_MODEL", str(model_folder))
    assert DashengXaresEncoder().output_dim == 64
    monkeypatch.delenv("DASHENG_XARES_MODEL")
    monkeypatch.setattr(xares, "DEFAULT_MODEL", str(model_folder))
    assert DashengXaresEncoder().output_dim == 64


def test_loading_errors_are_one_line(monkeypatch, tmp_path):
    """Offline, the default Hub id is refused at once; a missing folder is a missing path, not a bad repo id."""
    monkeypatch.delenv("DASHENG_XARES_MODEL", raising=False)
    with pytest.raises(DashengPreflightError) as offline:
        DashengXaresEncoder(cache_dir=str(tmp_path))
    message = str(offline.value)
    assert "\n" not in message and "'mispeech/dasheng-base'" in message and "HF_HUB_OFFLINE" in message
    assert "DASHENG_XARES_MODEL" in message
    for how in ("argument", "variable"):
        missing = str(tmp_path / "missing")
        if how == "variable":
            monkeypatch.setenv("DASHENG_XARES_MODEL", missing)
        with pytest.raises(DashengPreflightError, match=f"'{missing}' does not exist"):
            DashengXaresEncoder(missing if how == "argument" else None)


def right_padded(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.masked_fill(m == 1, 2), "only 0 and 1.*got 2"),
        (lambda m: -m, "only 0 and 1.*got -1"),
        (lambda m: m.float() * 0.5, "only 0 and 1.*got 0.5"),
        (lambda m: torch.where(m == 1, torch.tensor(float("nan")), m.float()), "only 0 and 1.*got nan"),
        (lambda m: m.index_fill(1, torch.tensor([100]), 0), "clip 0 has 0 before 1"),  # a hole
        (lambda m: m.flip(1), "clip 1 has 0 before 1"),  # left padding
        (lambda m: m.index_fill(0, torch.tensor([1]), 0), "marks no real sample in clip 1"),
    ],
    ids=["two", "negative", "half", "nan", "hole", "left-padding", "all-zeros"],
)
def test_bad_masks_are_refused(encoder, change, match):
    """Before: each gave wrong token masks without a word (all zeros marked one token valid)."""
    mask = right_padded([16000, 8000], 16000)
    with pytest.raises(ValueError, match=match):
        encoder(torch.randn(2, 16000), change(mask))


def test_numpy_and_list_masks_work_like_tensors(encoder):
    """Before: AttributeError."""
    audio, mask = torch.randn(2, 16000), right_padded([16000, 8000], 16000)
    expected, expected_mask = encoder(audio, mask)
    for other in (mask.numpy(), mask.numpy().astype(np.float32), mask.tolist(), mask.bool().numpy()):
        features, token_mask = encoder(audio, other)
        assert torch.equal(features, expected) and torch.equal(token_mask.long(), expected_mask)
    with pytest.raises(ValueError, match="must match audio"):
        encoder(audio, [[1, 1], [1, 0]])


@pytest.mark.parametrize("shape", [(2, 0), (0, 16000)])
def test_empty_audio_is_named(encoder, shape):
    with pytest.raises(ValueError, match="audio is empty"):
        encoder(torch.zeros(shape))
