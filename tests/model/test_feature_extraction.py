"""DashengFeatureExtractor against the original torchaudio front end, batching, Hub configs and bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor
from dasheng_hf.configuration_dasheng import front_end_mismatches
from helpers import LEGACY_PREPROCESSOR_CONFIG, concatenated_fsdd, fsdd_clip, make_reference_encoder, max_abs_diff


@pytest.fixture(scope="module")
def front_end():
    return make_reference_encoder().front_end


def test_mel_filters_equal_torchaudio(front_end, feature_extractor):
    assert torch.equal(torch.from_numpy(feature_extractor.mel_filters), front_end[0].mel_scale.fb)


def silence_db(features: torch.Tensor) -> torch.Tensor:
    """A clip's padding level from its features alone: 120 dB (top_db) below its peak, at least -100 dB."""
    return (features.max() - 120.0).clamp(min=-100.0)


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
        assert bool((batch.input_values[index, :, frames[index] :] == silence_db(expected)).all())


def test_padded_frames_are_the_original_silence(front_end, feature_extractor):
    """
    Padded frames hold what the original front end gives to the clip zero-padded to the batch's length (the first
    port padded so): each clip's -100 dB floor, raised to 120 dB (top_db) below its peak. The frames whose window
    still reaches the clip's last samples (up to n_fft / 2 = 256 samples past its end: the first one or two padded
    frames) legitimately differ: the original sees the clip's tail there, while our padding starts at the last frame.
    """
    long = concatenated_fsdd(24000, start=24)
    for short, level in ((4 * fsdd_clip(25), "top_db"), (1e-3 * fsdd_clip(26), "amin")):  # peak - 120 >, < -100
        batch = feature_extractor([short, long], sampling_rate=16000).input_values
        zero_padded = torch.nn.functional.pad(short, (0, long.numel() - short.numel()))
        expected = front_end(zero_padded[None])[0]
        real, silent = short.numel() // 160 + 1, -(-(short.numel() + 256) // 160)  # first frame of zeros only
        assert real < silent <= real + 2 and expected.shape[-1] - silent > 50
        assert max_abs_diff(batch[0, :, silent:], expected[:, silent:]) <= 1e-4
        assert max_abs_diff(batch[0, :, real:], silence_db(batch[0, :, :real])) == 0.0
        assert (float(batch[0, 0, -1]) > -99.0) == (level == "top_db")


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
    padded = feature_extractor([torch.full((16000,), 0.1), torch.full((800,), 0.1)], return_attention_mask=False)
    assert padded.attention_mask.sum(-1).tolist() == [101, 6]  # a padded batch always gets its mask


def test_returns_tensors_by_default_like_the_first_port(feature_extractor):
    clip = fsdd_clip(5)
    default = feature_extractor(clip, sampling_rate=16000)
    assert isinstance(default.input_values, torch.Tensor) and default.input_values.dtype == torch.float32
    as_lists = feature_extractor(clip, sampling_rate=16000, return_tensors=None)
    assert isinstance(as_lists["input_values"], list) and as_lists["input_values"][0].shape == (
        64,
        clip.numel() // 160 + 1,
    )


def test_reads_hub_preprocessor_config(tmp_path, feature_extractor):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY_PREPROCESSOR_CONFIG))
    loaded = DashengFeatureExtractor.from_pretrained(tmp_path)
    assert (loaded.hop_size, loaded.win_size, loaded.n_fft, loaded.top_db) == (160, 512, 512, 120.0)
    assert loaded.to_dict()["padding_value"] is None  # its 0.0 meant zero samples: silence, not 0 dB frames
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


# ---- Settings are checked where they enter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampling_rate": 0}, "sampling_rate must be a positive integer, got 0"),
        ({"sampling_rate": -16000}, "sampling_rate must be a positive integer, got -16000"),
        ({"f_max": -1}, r"0 <= f_min < f_max <= sampling_rate / 2 \(8000 Hz\); got f_min=0(\.0)?, f_max=-1"),
        ({"f_max": 8001}, r"f_max <= sampling_rate / 2 \(8000 Hz\); got f_min=0(\.0)?, f_max=8001"),
        ({"f_min": 8000}, r"got f_min=8000, f_max=8000(\.0)?,"),
        ({"f_min": -10}, "got f_min=-10"),
        (
            {"sampling_rate": 8000},
            r"sampling_rate / 2 \(4000 Hz\); got f_min=0(\.0)?, f_max=8000(\.0)?, sampling_rate=8000",
        ),
        ({"n_fft": 0}, "n_fft must be a positive integer, got 0"),
        ({"win_size": 1024}, r"win_size \(1024\) must not exceed n_fft \(512\)"),
        ({"hop_size": 0}, "hop_size must be a positive integer, got 0"),
        ({"hop_size": 160.5}, r"hop_size must be a positive integer, got 160.5 \(float\)"),
        ({"feature_size": 0}, "feature_size must be a positive integer, got 0"),
        ({"top_db": 0}, "top_db must be a positive number of dB or None, got 0"),
        ({"top_db": "x"}, "top_db must be a positive number of dB or None, got 'x'"),
        ({"center": "yes"}, "center must be true or false, got 'yes'"),
        ({"padding_value": float("nan")}, r"padding_value must be a finite number of dB or None .*, got nan"),
        ({"padding_value": "silence"}, r"padding_value must be a finite number of dB or None .*, got 'silence'"),
    ],
)
def test_bad_settings_raise(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        DashengFeatureExtractor(**settings)
    # The same through a preprocessor_config.json (the Hub's, with one value changed) and through overrides.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**LEGACY_PREPROCESSOR_CONFIG, **settings}))
    with pytest.raises(ValueError, match=message):
        DashengFeatureExtractor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY_PREPROCESSOR_CONFIG))
    with pytest.raises(ValueError, match=message):
        DashengFeatureExtractor.from_pretrained(tmp_path, **settings)


def test_front_end_mismatches_names_every_disagreeing_setting():
    config = DashengConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert front_end_mismatches(config, DashengFeatureExtractor()) == []
    assert front_end_mismatches(config, DashengFeatureExtractor.from_dasheng_config(config)) == []
    other = DashengFeatureExtractor(sampling_rate=8000, f_max=4000, n_fft=1024, center=False, top_db=None)
    found = front_end_mismatches(config, other)
    assert found == [
        "sampling rate: the model's config has sampling_rate=16000, the feature extractor sampling_rate=8000",
        "FFT size: the model's config has n_fft=512, the feature extractor n_fft=1024",
        "highest mel frequency: the model's config has f_max=8000.0, the feature extractor f_max=4000.0",
        "centring (reflect padding): the model's config has center=True, the feature extractor center=False",
        "dB range below the peak: the model's config has top_db=120.0, the feature extractor top_db=None",
    ]
    odd = DashengFeatureExtractor(feature_size=32, win_size=400, hop_size=320, f_min=50)
    assert [line.split(":")[0] for line in front_end_mismatches(config, odd)] == [
        "window length",
        "hop length",
        "lowest mel frequency",
        "number of mel bins",
    ]


# ---- Audio extremes --------------------------------------------------------------------------------------------


def test_loud_audio_gives_exact_finite_features(feature_extractor):
    """Power that would overflow float32 is computed in float64: features shift by exactly 20 log10(scale) dB."""
    clip = fsdd_clip(9)[:8000].double()
    quiet = feature_extractor(clip.float(), sampling_rate=16000).input_values
    for scale in (1e13, 1e20, 1e30, 3e38 / float(clip.abs().max())):
        loud = feature_extractor((clip * scale).float(), sampling_rate=16000).input_values
        assert bool(torch.isfinite(loud).all())
        # float64 is the more precise: quiet float32 features differ by up to ~0.01 dB far below the peak.
        assert max_abs_diff(loud, quiet + 20 * np.log10(scale)) < 0.05
    # In a batch, a loud clip changes nothing for the others.
    batch = feature_extractor([clip.float() * 1e30, clip.float()[:5000]], sampling_rate=16000).input_values
    alone = feature_extractor(clip.float()[:5000], sampling_rate=16000).input_values[0]
    assert torch.equal(batch[1, :, : alone.shape[-1]], alone)
    silent = feature_extractor(torch.zeros(4000), sampling_rate=16000, return_tensors="np")["input_values"]
    assert np.all(silent == -100.0)


def test_samples_beyond_float32_are_refused_as_unnormalised(feature_extractor):
    with pytest.raises(ValueError, match=r"Clip 1 has samples beyond the float32 range \(up to 1e\+39\).*unnormalised"):
        feature_extractor([np.zeros(1000), np.full(1000, 1e39)], sampling_rate=16000)


# ---- padding, max_length, truncation, pad_to_multiple_of (in samples) ------------------------------------------


def test_padding_and_truncation_in_samples(feature_extractor):
    clips = [concatenated_fsdd(16000, start=11), concatenated_fsdd(8000, start=12), fsdd_clip(13)[:3000]]
    frames = [c.numel() // 160 + 1 for c in clips]
    alone = [feature_extractor(c, sampling_rate=16000).input_values[0] for c in clips]

    to_max = feature_extractor(clips, sampling_rate=16000, padding="max_length", max_length=32000)
    assert to_max.input_values.shape == (3, 64, 201) and to_max.attention_mask.sum(-1).tolist() == frames
    for row, features in enumerate(alone):
        assert torch.equal(to_max.input_values[row, :, : frames[row]], features)
        assert bool((to_max.input_values[row, :, frames[row] :] == silence_db(features)).all())

    multiple = feature_extractor(clips, sampling_rate=16000, pad_to_multiple_of=12000)
    assert multiple.input_values.shape == (3, 64, 24000 // 160 + 1)

    cut = feature_extractor(clips, sampling_rate=16000, max_length=6000, truncation=True)
    assert cut.attention_mask.sum(-1).tolist() == [38, 38, 19]
    assert torch.equal(cut.input_values[0], feature_extractor(clips[0][:6000], sampling_rate=16000).input_values[0])

    # max_length without truncation and without padding="max_length" changes nothing (as in Transformers).
    longest = feature_extractor(clips, sampling_rate=16000, max_length=4000)
    assert longest.input_values.shape == (3, 64, 101)

    unpadded = feature_extractor(clips, sampling_rate=16000, padding=False, return_tensors=None)
    assert [v.shape[-1] for v in unpadded["input_values"]] == frames
    assert all(np.array_equal(v, a.numpy()) for v, a in zip(unpadded["input_values"], alone))
    assert torch.equal(feature_extractor(clips[:1], sampling_rate=16000, padding=False).input_values[0], alone[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"padding": "max_length"}, r"padding='max_length' needs max_length \(in samples\)"),
        ({"truncation": True}, r"truncation=True needs max_length \(in samples\)"),
        ({"padding": "max_length", "max_length": 8000}, "Clip 0 has 16000 samples, more than max_length=8000"),
        ({"padding": "maximum"}, r"padding must be True, False or one of \['longest', 'max_length', 'do_not_pad'\]"),
        ({"padding": False}, "With padding=False the clips keep their own lengths, which differ"),
        ({"max_length": 100, "truncation": True}, r"max_length \(100 samples\) is shorter than the shortest clip"),
        ({"max_length": 0}, "max_length must be a positive integer, got 0"),
        ({"pad_to_multiple_of": -8}, "pad_to_multiple_of must be a positive integer, got -8"),
        ({"truncation": "yes", "max_length": 8000}, "truncation must be True or False"),
    ],
)
def test_contradictory_padding_options_raise(feature_extractor, options, message):
    clips = [torch.full((16000,), 0.1), torch.full((4000,), 0.1)]
    with pytest.raises(ValueError, match=message):
        feature_extractor(clips, sampling_rate=16000, **options)


# ---- pad(): DataCollatorWithPadding and Trainer's default collator ---------------------------------------------


def test_collator_round_trip_equals_one_batched_call(feature_extractor):
    """Extract each clip alone, collate with DataCollatorWithPadding: bit for bit the direct batched call."""
    from transformers import DataCollatorWithPadding

    clips = [fsdd_clip(index) for index in (14, 15, 16, 17)]
    direct = feature_extractor(clips, sampling_rate=16000)
    collator = DataCollatorWithPadding(feature_extractor)
    as_tensors = [{**feature_extractor(c, sampling_rate=16000), "label": i} for i, c in enumerate(clips)]
    # As a `datasets` column stores them: nested lists, squeezed, without a mask.
    as_lists = [
        {"input_values": feature_extractor(c, sampling_rate=16000).input_values[0].tolist(), "label": i}
        for i, c in enumerate(clips)
    ]
    # Rows of padded sub-batches, each with its own mask.
    first, second = feature_extractor(clips[:2], sampling_rate=16000), feature_extractor(clips[2:], sampling_rate=16000)
    as_rows = [
        {"input_values": part.input_values[row].numpy(), "attention_mask": part.attention_mask[row].numpy(), "label": 0}
        for part in (first, second)
        for row in range(2)
    ]
    for examples in (as_tensors, as_lists, as_rows):
        batch = collator(examples)
        assert torch.equal(batch["input_values"], direct.input_values)
        assert torch.equal(batch["attention_mask"], direct.attention_mask)
        assert batch["labels"].shape == (4,) and "label" not in batch
    assert torch.equal(feature_extractor.pad(direct).input_values, direct.input_values)
    as_numpy = feature_extractor.pad(as_rows)
    assert isinstance(as_numpy["input_values"], np.ndarray) and as_numpy["attention_mask"].dtype == np.int32


def test_trainer_default_collator_pads_frames(feature_extractor, tmp_path):
    from dasheng_hf import DashengForAudioClassification
    from helpers import tiny_config
    from transformers import Trainer, TrainingArguments

    model = DashengForAudioClassification(tiny_config(num_labels=3))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, processing_class=feature_extractor)
    clips = [fsdd_clip(18)[:6000], concatenated_fsdd(9000, start=19)]
    batch = trainer.data_collator([{**feature_extractor(c, sampling_rate=16000), "label": 1} for c in clips])
    assert batch["input_values"].shape == (2, 64, 57) and batch["attention_mask"].shape == (2, 57)
    assert model(**batch).loss.ndim == 0


@pytest.mark.parametrize("padding_value", [None, -80.0])
def test_pad_fills_padding_as_the_batched_call(padding_value):
    """pad() recovers each clip's silence level from its own features: bit for bit the batched call's padding."""
    extractor = DashengFeatureExtractor(padding_value=padding_value)
    clips = [fsdd_clip(27), 1e-3 * fsdd_clip(28)[:3000], 30 * concatenated_fsdd(12000, start=29)]
    alone = [extractor(clip, sampling_rate=16000).input_values[0] for clip in clips]
    for call_options, pad_options in (({}, {}), ({"padding": "max_length", "max_length": 16000}, {"max_length": 101})):
        pad_options = {**call_options, **pad_options}
        direct = extractor(clips, sampling_rate=16000, **call_options)
        padded = extractor.pad([{"input_values": features} for features in alone], **pad_options)
        assert torch.equal(padded.input_values, direct.input_values)
        assert torch.equal(padded.attention_mask, direct.attention_mask)
        for row, features in zip(direct.input_values, alone):
            expected = silence_db(features) if padding_value is None else torch.tensor(padding_value)
            assert bool((row[:, features.shape[-1] :] == expected).all())


def test_padding_value_round_trips_and_first_port_zero_means_silence(tmp_path):
    """
    None (silence) and fixed dB values survive save/load; a first-port config's 0.0 (zero samples) loads as None.
    The `padding_value` attribute stays a number (-100 dB for None) for code that pads itself, e.g. pipelines.
    """

    def setting(folder):
        return DashengFeatureExtractor.from_pretrained(folder).to_dict()["padding_value"]

    for padding_value in (None, 0.0, -80.0):
        extractor = DashengFeatureExtractor(padding_value=padding_value)
        assert extractor.padding_value == (-100.0 if padding_value is None else padding_value)
        extractor.save_pretrained(tmp_path / str(padding_value))
        saved = json.loads((tmp_path / str(padding_value) / "preprocessor_config.json").read_text())
        assert saved["padding_value"] == padding_value and saved["top_db"] == 120.0
        assert setting(tmp_path / str(padding_value)) == padding_value
    # The first port's configs have no top_db (it had no such setting) and padded the waveform with zeros.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY_PREPROCESSOR_CONFIG))
    assert setting(tmp_path) is None
    DashengFeatureExtractor.from_pretrained(tmp_path).save_pretrained(tmp_path / "resaved")
    assert setting(tmp_path / "resaved") is None
    assert DashengFeatureExtractor.from_pretrained(tmp_path, padding_value=0.0).to_dict()["padding_value"] == 0.0
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**LEGACY_PREPROCESSOR_CONFIG, "padding_value": -50}))
    assert setting(tmp_path) == -50.0
    extractor = DashengFeatureExtractor()
    extractor.padding_value = -70.0  # as Transformers' own messages suggest setting it
    assert torch.equal(
        extractor([torch.full((800,), 0.1), torch.full((16000,), 0.1)]).input_values[0, :, 6:],
        torch.full((64, 95), -70.0),
    )
    with pytest.raises(ValueError, match="padding_value must be a finite number of dB or None"):
        extractor.padding_value = float("inf")


def test_pad_lengths_in_frames_and_bad_examples(feature_extractor):
    clips = [concatenated_fsdd(8000, start=20), fsdd_clip(21)[:4000]]
    examples = [{"input_values": feature_extractor(c, sampling_rate=16000).input_values[0]} for c in clips]
    padded = feature_extractor.pad(examples, padding="max_length", max_length=60, pad_to_multiple_of=16)
    assert padded.input_values.shape == (2, 64, 64) and padded.attention_mask.sum(-1).tolist() == [51, 26]
    cut = feature_extractor.pad(examples, max_length=30, truncation=True)
    assert cut.input_values.shape == (2, 64, 30) and torch.equal(
        cut.input_values[0], examples[0]["input_values"][:, :30]
    )
    with pytest.raises(ValueError, match=r"Example 1 has 26|more than max_length=20"):
        feature_extractor.pad(examples, padding="max_length", max_length=20)
    transposed = [{"input_values": examples[0]["input_values"].T}]
    with pytest.raises(ValueError, match=r"looks like \(frames, mel bins\).*transpose"):
        feature_extractor.pad(transposed)
    with pytest.raises(ValueError, match="looks like a waveform"):
        feature_extractor.pad([{"input_values": clips[0]}])
    bad_mask = [{"input_values": examples[1]["input_values"], "attention_mask": torch.tensor([0, 1] * 13)}]
    with pytest.raises(ValueError, match=r"attention_mask .* 1 on real frames then 0 on padding"):
        feature_extractor.pad(bad_mask)
    with pytest.raises(ValueError, match="list of examples with 'input_values'"):
        feature_extractor.pad([{"labels": 1}])
    with pytest.raises(ValueError, match="pad takes a BatchFeature"):
        feature_extractor.pad([])


# ---- The first Hub port's documented behaviour -----------------------------------------------------------------
# Its tests: (batch, samples) tensors or float64 arrays and lists of clips give (batch, 64, samples // 160 + 1)
# tensors without arguments; lists pad to the longest clip, and with max_length + truncation are cut to max_length;
# its notebook calls `feature_extractor(clip, sampling_rate=..., max_length=16000, truncation=True)` and squeezes
# `input_values` to (64, frames). Clips under 480 samples are refused here (the first port zero-padded them).


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: torch.randn(2, 160000), (2, 64, 1001)),
        (lambda: torch.randn(3, 320000), (3, 64, 2001)),
        (lambda: np.random.rand(2, 160000), (2, 64, 1001)),
        (lambda: [torch.randn(160000), torch.randn(160000)], (2, 64, 1001)),
        (lambda: [np.random.rand(160000), np.random.rand(160000)], (2, 64, 1001)),
    ],
)
def test_first_port_shapes(feature_extractor, make, shape):
    inputs = feature_extractor(make())
    assert isinstance(inputs["input_values"], torch.Tensor) and inputs["input_values"].shape == shape


def test_first_port_max_length_and_truncation(feature_extractor):
    short = np.random.rand(480)
    cut = feature_extractor([short, np.random.rand(160000)], max_length=32000, truncation=True)
    assert cut["input_values"].shape == (2, 64, 201) and cut["attention_mask"].sum(-1).tolist() == [4, 201]
    kept = feature_extractor([short, np.random.rand(16000)], max_length=16000)
    assert kept["input_values"].shape == (2, 64, 101)
    with pytest.raises(ValueError, match="Clip 0 is 10 samples long; Dasheng needs at least 480 samples"):
        feature_extractor([np.random.rand(10), np.random.rand(16000)], max_length=16000)


def test_first_port_notebook_flow(tmp_path):
    """The ESC-50 notebook's preprocessing and Trainer collation, on a legacy preprocessor config and a new one."""
    from transformers import AutoFeatureExtractor, DataCollatorWithPadding

    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "preprocessor_config.json").write_text(json.dumps(LEGACY_PREPROCESSOR_CONFIG))
    DashengFeatureExtractor().save_pretrained(tmp_path / "new")
    audio = [fsdd_clip(22).numpy(), np.tile(fsdd_clip(23).numpy(), 8)[:80000]]  # one clip under 1 s, one of 5 s
    for folder in ("legacy", "new"):
        extractor = AutoFeatureExtractor.from_pretrained(tmp_path / folder, trust_remote_code=True)
        rows = []
        for label, clip in enumerate(audio):
            inputs = extractor(clip, sampling_rate=extractor.sampling_rate, max_length=16000, truncation=True)
            inputs["input_values"] = inputs["input_values"].squeeze(0)
            assert inputs["input_values"].shape == (64, min(clip.size, 16000) // 160 + 1)
            assert ("attention_mask" in inputs) == (folder == "new")  # the legacy config asks for none
            rows.append({**inputs, "labels": label})
        batch = DataCollatorWithPadding(extractor)(rows)
        assert batch["input_values"].shape == (2, 64, 101)
        assert batch["attention_mask"].tolist() == [
            [1] * (audio[0].size // 160 + 1) + [0] * (101 - audio[0].size // 160 - 1),
            [1] * 101,
        ]
        expected = extractor([audio[0], audio[1][:16000]], sampling_rate=16000)
        assert torch.equal(batch["input_values"], expected.input_values)
