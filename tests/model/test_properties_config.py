"""
Property-based tests of DashengConfig (hypothesis): any mix of field values (valid, out of range, wrong type, NaN,
None, lists, strings), given directly, through a legacy `encoder_kwargs` or as `from_pretrained` overrides, either
raises a ValueError naming a field that an independent oracle finds wrong, or gives a config that holds the values,
saves, and loads back equal with a consistent `encoder_kwargs` mirror.
"""

from __future__ import annotations

import json
import math
import tempfile

from dasheng_hf import DashengConfig
from hypothesis import event, given, settings
from hypothesis import strategies as st

# Configs are cheap to build: eight times the profile's examples.
MORE = settings(max_examples=8 * settings().max_examples)
WEIRD = [None, -1, 0, 0.5, 1.5, 2, -0.5, float("nan"), float("inf"), "x", "768", [1], [64, 4], True, False, {}]


def positive_int(value) -> bool:
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return integral and not isinstance(value, bool) and value >= 1


def real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flag(value) -> bool:
    return isinstance(value, bool)


def pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(positive_int(v) for v in value)


# field: (oracle for the value alone, plausible valid values, default when not given)
FIELDS = {
    "hidden_size": (positive_int, [64, 96, 128, 768, 100, 64.0], 768),
    "num_hidden_layers": (positive_int, [1, 2, 12], 12),
    "num_attention_heads": (positive_int, [1, 2, 4, 8, 12, 3], 12),
    "intermediate_size": (positive_int, [1, 256, 3072], None),
    "hidden_act": (lambda v: v in ("gelu", "relu", "silu"), ["gelu", "relu", "gelo"], "gelu"),
    "qkv_bias": (flag, [True, False], True),
    "layer_norm_eps": (lambda v: real(v) and v > 0, [1e-6, 1e-12, 1.0], 1e-6),
    "hidden_dropout_prob": (lambda v: real(v) and 0 <= v <= 1, [0.0, 0.1, 1.0, 1], 0.0),
    "attention_probs_dropout_prob": (lambda v: real(v) and 0 <= v <= 1, [0.0, 0.3], 0.0),
    "drop_path_rate": (lambda v: real(v) and 0 <= v <= 1, [0.0, 0.2], 0.0),
    "num_mel_bins": (positive_int, [64, 32], 64),
    "patch_size": (pair, [[64, 4], (64, 4), [64, 8], [32, 4], [64]], [64, 4]),
    "patch_stride": (pair, [[64, 4], (64, 4), [64, 8], [64, 0]], [64, 4]),
    "target_length": (positive_int, [1008, 1000, 8, 1001, 4], 1008),
    "batch_norm_eps": (lambda v: real(v) and v > 0, [1e-5, 1e-3], 1e-5),
    "batch_norm_momentum": (lambda v: v is None or (real(v) and 0 <= v <= 1), [0.01, 0.1, None], 0.01),
    "use_batch_statistics": (flag, [True, False], False),
    "max_chunks_per_pass": (positive_int, [1, 32, 1000], 32),
    "sampling_rate": (positive_int, [16000, 8000, 44100], 16000),
    "n_fft": (positive_int, [512, 1024, 256], 512),
    "win_length": (positive_int, [512, 400, 1024], 512),
    "hop_length": (positive_int, [160, 320, 1], 160),
    "f_min": (lambda v: real(v) and v >= 0, [0.0, 0, 50.0, 7999.0], 0.0),
    "f_max": (lambda v: real(v) and v > 0, [8000.0, 8000, 4000.0, 11025.0, 22050], 8000.0),
    "center": (flag, [True, False], True),
    "top_db": (lambda v: v is None or (real(v) and v > 0), [120.0, 80, None, 1e-3], 120.0),
    "outputdim": (lambda v: v is None or positive_int(v), [None, 10, 527], None),
    "head_layer_norm_eps": (lambda v: real(v) and v > 0, [1e-5], 1e-5),
    "loss": (lambda v: v in ("BCELoss", "CrossEntropyLoss"), ["BCELoss", "CrossEntropyLoss", "MSELoss"], "BCELoss"),
    "initializer_range": (lambda v: real(v) and v >= 0, [0.02, 0.0], 0.02),
    "decoder_hidden_size": (positive_int, [512, 768, 96, 500], None),
    "decoder_num_hidden_layers": (positive_int, [8, 1], None),
    "decoder_num_attention_heads": (positive_int, [16, 24, 6, 5], None),
    "decoder_intermediate_size": (positive_int, [2048, 7], None),
    "mask_ratio": (lambda v: real(v) and 0 < v < 1, [0.75, 0.5, 0.999, 1.0, 0.0], 0.75),
    "mask_group_size": (positive_int, [2, 1, 252, 253], 2),
    "norm_pix_loss": (flag, [True, False], True),
}
PRESET_FIELDS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
DECODER_PRESET = {"decoder_hidden_size": 512, "decoder_num_hidden_layers": 8, "decoder_num_attention_heads": 16}


# Fields for which None means "the preset" or "the default".
NONE_IS_DEFAULT = {"intermediate_size", "decoder_intermediate_size", *PRESET_FIELDS, *DECODER_PRESET}


def oracle(given_values: dict) -> set[str]:
    """Names of the fields that are wrong, alone or together (empty: the config is valid)."""
    wrong = {
        name
        for name, value in given_values.items()
        if not (value is None and name in NONE_IS_DEFAULT) and not FIELDS[name][0](value)
    }
    if wrong:
        return wrong
    values = {name: default for name, (_, _, default) in FIELDS.items()}
    values.update(PRESET_FIELDS)
    values.update(DECODER_PRESET)
    values.update(
        {name: value for name, value in given_values.items() if not (value is None and name in NONE_IS_DEFAULT)}
    )
    rules = [
        ({"hidden_size", "num_attention_heads"}, values["hidden_size"] % values["num_attention_heads"] == 0),
        (
            {"decoder_hidden_size", "decoder_num_attention_heads"},
            values["decoder_hidden_size"] % values["decoder_num_attention_heads"] == 0,
        ),
        (
            {"patch_size", "patch_stride", "num_mel_bins"},
            values["patch_size"][0] == values["num_mel_bins"] == values["patch_stride"][0],
        ),
        ({"target_length", "patch_stride"}, values["target_length"] % values["patch_stride"][1] == 0),
        ({"target_length", "patch_size"}, values["target_length"] >= values["patch_size"][1]),
        (
            {"mask_group_size", "target_length"},
            values["mask_group_size"] <= values["target_length"] // values["patch_stride"][1],
        ),
        ({"win_length", "n_fft"}, values["win_length"] <= values["n_fft"]),
        (
            {"f_min", "f_max", "sampling_rate"},
            values["f_min"] < values["f_max"] <= values["sampling_rate"] / 2,
        ),
    ]
    return {name for names, holds in rules if not holds for name in names}


@st.composite
def field_values(draw):
    """A handful of fields, each a plausible value or a weird one."""
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
    plausible_or_weird = {
        name: st.sampled_from(FIELDS[name][1]) if draw(st.integers(0, 3)) else st.sampled_from(WEIRD) for name in names
    }
    return {name: draw(strategy) for name, strategy in plausible_or_weird.items()}


def check(given_values: dict, build) -> None:
    wrong = oracle(given_values)
    try:
        config = build()
    except ValueError as error:
        event(f"ValueError ({'several wrong' if len(wrong) > 1 else 'one wrong'})")
        assert wrong, f"valid values were refused: {error}"
        assert any(name in str(error) for name in wrong), (wrong, str(error))
        return
    event("valid config")
    assert not wrong, f"expected an error about {wrong}"
    for name, value in given_values.items():
        if value is not None:
            got = getattr(config, name)
            assert got == (list(value) if isinstance(value, tuple) else value), (name, got, value)
    mirror = config.to_dict()["encoder_kwargs"]
    assert mirror == {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "patch_size": config.patch_size,
        "patch_stride": config.patch_stride,
        "target_length": config.target_length,
    }
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        loaded = DashengConfig.from_pretrained(folder)
        assert json.loads(json.dumps(mirror)) == json.load(open(f"{folder}/config.json"))["encoder_kwargs"]
    volatile = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in volatile} == {
        k: v for k, v in config.to_dict().items() if k not in volatile
    }


@MORE
@given(values=field_values())
def test_any_field_values_raise_naming_a_wrong_field_or_round_trip(values):
    check(values, lambda: DashengConfig(**values))


LEGACY_KEYS = {
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "patch_size": "patch_size",
    "patch_stride": "patch_stride",
    "target_length": "target_length",
    "n_fft": "n_fft",
    "hop_size": "hop_length",
    "center": "center",
}


@MORE
@given(
    values=st.dictionaries(
        st.sampled_from(sorted(LEGACY_KEYS)),
        st.one_of(st.sampled_from([64, 4, 1008, [64, 4], 512, 160, True]), st.sampled_from(WEIRD)),
        max_size=4,
    ),
    name=st.sampled_from([None, "dasheng-base", "dasheng-1.2B"]),
)
def test_legacy_encoder_kwargs_raise_naming_the_field_or_define_it(values, name):
    """A first-port config: encoder_kwargs values are checked as the fields they set."""
    fields = {LEGACY_KEYS[key]: value for key, value in values.items()}
    preset = {"dasheng-1.2B": (1536, 40, 24)}.get(name, (768, 12, 12))
    for field, default in zip(("hidden_size", "num_hidden_layers", "num_attention_heads"), preset):
        fields.setdefault(field, default)
        if fields[field] is None:  # None in encoder_kwargs is a wrong value, not "use the preset"
            fields[field] = "None"
    if name == "dasheng-1.2B":
        fields.update(decoder_hidden_size=768, decoder_num_attention_heads=24)
    check(fields, lambda: DashengConfig(name=name, encoder_kwargs=values))


@MORE
@given(override=field_values())
def test_from_pretrained_overrides_are_checked_like_arguments(override):
    config = DashengConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        check({**base, **override}, lambda: DashengConfig.from_pretrained(folder, **override))
