"""DashengFeatureExtractor against the original torchaudio front end, batching, Hub configs and bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from dasheng_hf import DashengFeatureExtractor
from helpers import fsdd_clip, make_reference_encoder, max_abs_diff

# The Hub's preprocessor_config.json of the first port (return_attention_mask false: it had no mask).
HUB_PREPROCESSOR_CONFIG = {
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


@pytest.fixture(scope="module")
def front_end():
    return make_reference_encoder().front_end


def test_mel_filters_equal_torchaudio(front_end, feature_extractor):
    assert torch.equal(torch.from_numpy(feature_extractor.mel_filters), front_end[0].mel_scale.fb)


def test_batch_equals_clip_by_clip_and_reference(front_end, feature_extractor):
    """Each clip gets its own reflect padding and dB floor: a batch equals clips computed alone by the original."""
    clips = [fsdd_clip(0), 0.5 * fsdd_clip(1)[:3000], 1e-3 * fsdd_clip(2), torch.full((480,), 0.2)]
    batch = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    frames = [clip.numel() // 160 + 1 for clip in clips]
    assert batch.input_values.shape == (4, 64, max(frames)) and batch.input_values.dtype == torch.float32
    assert batch.attention_mask.sum(-1).tolist() == frames
    for index, clip in enumerate(clips):
        expected = front_end(clip[None])[0]
        assert max_abs_diff(batch.input_values[index, :, : frames[index]], expected) == 0.0
        assert bool((batch.input_values[index, :, frames[index] :] == 0.0).all())


def test_per_clip_floor_differs_from_batch_quirk(front_end, feature_extractor):
    """The original floors at the maximum of the whole batch; ours floors each clip at its own maximum."""
    loud, quiet = 30 * fsdd_clip(3)[:5000], 1e-3 * fsdd_clip(4)[:5000]
    ours = feature_extractor([loud, quiet], sampling_rate=16000, return_tensors="pt").input_values
    assert max_abs_diff(ours[1], front_end(quiet[None])[0]) == 0.0
    assert max_abs_diff(front_end(torch.stack([loud, quiet]))[1], front_end(quiet[None])[0]) > 10.0


def test_accepted_input_types(feature_extractor):
    clip = fsdd_clip(6)
    expected = feature_extractor(clip, sampling_rate=16000, return_tensors="pt").input_values
    variants = [clip.numpy(), clip.double().numpy(), clip.tolist(), [clip.numpy()], clip[None], clip[None].numpy()]
    for variant in variants:
        got = feature_extractor(variant, sampling_rate=16000, return_tensors="pt").input_values
        assert max_abs_diff(got, expected) == 0.0
    as_numpy = feature_extractor([clip, clip[:5000]], sampling_rate=16000, return_tensors="np")
    assert isinstance(as_numpy["input_values"], np.ndarray) and as_numpy["attention_mask"].shape == (
        2,
        expected.shape[-1],
    )
    # A (2, N) array is two clips, not a stereo clip.
    assert feature_extractor(torch.stack([clip, clip]), sampling_rate=16000).input_values.__len__() == 2


def test_attention_mask_only_when_needed_or_asked(feature_extractor):
    equal = feature_extractor([torch.zeros(16000).add_(0.1)] * 2, sampling_rate=16000, return_tensors="pt")
    assert "attention_mask" in equal  # return_attention_mask defaults to True
    no_mask = feature_extractor(torch.zeros(16000).add_(0.1), sampling_rate=16000, return_attention_mask=False)
    assert "attention_mask" not in no_mask


def test_reads_hub_preprocessor_config(tmp_path, feature_extractor):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG))
    loaded = DashengFeatureExtractor.from_pretrained(tmp_path)
    assert (loaded.hop_size, loaded.win_size, loaded.n_fft, loaded.top_db) == (160, 512, 512, 120.0)
    clips = [fsdd_clip(7), fsdd_clip(8)[:2000]]
    padded = loaded(clips, sampling_rate=16000, return_tensors="pt")
    # return_attention_mask=False in the file, but a padded batch always gets its mask.
    assert padded.attention_mask.sum(-1).tolist() == [c.numel() // 160 + 1 for c in clips]
    expected = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    assert max_abs_diff(padded.input_values, expected.input_values) == 0.0
    assert "attention_mask" not in loaded(clips[0], sampling_rate=16000)


def test_long_audio_in_blocks_equals_one_stft(front_end, feature_extractor):
    """STFT blocks (for bounded memory) are seamless: 12 minutes equal the original front end."""
    waveform = 0.1 * torch.randn(12 * 60 * 16000, generator=torch.Generator().manual_seed(0))
    ours = feature_extractor(waveform, sampling_rate=16000, return_tensors="pt").input_values[0]
    assert ours.shape == (64, 72001)
    assert max_abs_diff(ours, front_end(waveform[None])[0]) <= 1e-4


@pytest.mark.parametrize(
    ("audio", "sampling_rate", "message"),
    [
        (np.zeros(16000, dtype=np.float32), 8000, "sampled at 8000 Hz but Dasheng expects 16000 Hz"),
        (np.zeros(0, dtype=np.float32), 16000, "Clip 0 is empty"),
        ([np.zeros(16000, dtype=np.float32), np.zeros(479, dtype=np.float32)], 16000, "Clip 1 is 479 samples"),
        (np.array([0.0] * 1000 + [np.nan] + [0.0] * 1000, dtype=np.float32), 16000, "NaN or infinite"),
        (np.array([0.0] * 1000 + [np.inf] + [0.0] * 1000, dtype=np.float32), 16000, "NaN or infinite"),
        (np.zeros((1, 2, 16000), dtype=np.float32), 16000, r"shape \(1, 2, 16000\)"),
        ([np.zeros((2, 16000), dtype=np.float32)], 16000, "must be 1-D mono"),
        (np.array(["a"] * 1000), 16000, "not numeric"),
        ("audio.wav", 16000, "got str"),
        (np.zeros(16000, dtype=np.int16), 16000, "Scale integer PCM"),
        ([], 16000, "empty list"),
        (np.zeros((16000, 2), dtype=np.float32), 16000, r"looks like \(samples, channels\)"),
    ],
)
def test_bad_input_raises(feature_extractor, audio, sampling_rate, message):
    with pytest.raises(ValueError, match=message):
        feature_extractor(audio, sampling_rate=sampling_rate)


def test_missing_sampling_rate_warns(feature_extractor, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        feature_extractor(np.zeros(16000, dtype=np.float32) + 0.1)
    assert "No sampling_rate was passed" in caplog.text
