"""DashengConfig: every bad value is refused where it enters, decoder presets, and the `encoder_kwargs` mirror."""

from __future__ import annotations

import json
import logging

import pytest
from dasheng_hf import DashengConfig
from dasheng_hf.configuration_dasheng import CODE_FILES
from helpers import tiny_config
from transformers import AutoConfig, AutoModel

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}

# (field values, pattern of the message): each names the field and the value, and most say what is allowed.
BAD_VALUES = [
    ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, got 0"),
    ({"hidden_size": -64}, r"hidden_size must be a positive integer, got -64"),
    ({"hidden_size": 0}, r"hidden_size must be a positive integer, got 0"),
    ({"hidden_size": [768]}, r"hidden_size must be a positive integer, got \[768\] \(list\)"),
    ({"hidden_size": "768"}, r"hidden_size must be a positive integer, got '768' \(str\)"),
    ({"hidden_size": 64.5}, r"hidden_size must be a positive integer, got 64.5"),
    ({"hidden_size": True}, r"hidden_size must be a positive integer, got True \(bool\)"),
    ({"num_hidden_layers": -1}, r"num_hidden_layers must be a positive integer, got -1"),
    ({"intermediate_size": 0}, r"intermediate_size must be a positive integer, got 0.*Leave it out"),
    ({"num_mel_bins": 0}, r"num_mel_bins must be a positive integer, got 0"),
    ({"target_length": None}, r"target_length must be a positive integer, got None"),
    ({"target_length": 1001}, r"target_length \(1001\) must be a multiple of the time stride patch_stride\[1\] \(4\)"),
    ({"max_chunks_per_pass": 0}, r"max_chunks_per_pass must be a positive integer, got 0"),
    ({"n_fft": -512}, r"n_fft must be a positive integer, got -512"),
    ({"win_length": 0}, r"win_length must be a positive integer, got 0"),
    ({"hop_length": 0}, r"hop_length must be a positive integer, got 0"),
    ({"win_length": 1024}, r"win_length \(1024\) must not exceed n_fft \(512\)"),
    ({"hidden_size": 66}, r"hidden_size \(66\) must be divisible by num_attention_heads \(4\).*num_attention_heads=3"),
    ({"patch_size": None}, r"patch_size must be a pair \[mel bins, frames\] of positive integers, got None"),
    ({"patch_size": 4}, r"patch_size must be a pair"),
    ({"patch_size": [64, 4, 1]}, r"patch_size must be a pair"),
    ({"patch_stride": [64, 0]}, r"patch_stride\[1\] must be a positive integer, got 0"),
    ({"patch_size": [32, 4]}, r"patch_size\[0\] and patch_stride\[0\] must equal num_mel_bins \(64\)"),
    ({"layer_norm_eps": -1}, r"layer_norm_eps must be a finite number in \(0, inf\), got -1"),
    ({"layer_norm_eps": 0.0}, r"layer_norm_eps must be a finite number in \(0, inf\), got 0.0"),
    ({"batch_norm_eps": float("nan")}, r"batch_norm_eps must be a finite number in \(0, inf\), got nan"),
    ({"head_layer_norm_eps": 0}, r"head_layer_norm_eps must be a finite number in \(0, inf\)"),
    ({"batch_norm_momentum": 1.5}, r"batch_norm_momentum must be a finite number in \[0, 1\], got 1.5"),
    ({"hidden_dropout_prob": 1.1}, r"hidden_dropout_prob must be a finite number in \[0, 1\], got 1.1"),
    ({"attention_probs_dropout_prob": -0.1}, r"attention_probs_dropout_prob must be a finite number in \[0, 1\]"),
    ({"drop_path_rate": 2}, r"drop_path_rate must be a finite number in \[0, 1\], got 2"),
    ({"sampling_rate": 0}, r"sampling_rate must be a positive integer, got 0"),
    ({"sampling_rate": -16000}, r"sampling_rate must be a positive integer, got -16000"),
    ({"f_min": -1}, r"f_min must be a finite number in \[0, inf\), got -1"),
    ({"f_max": -8000}, r"f_max must be a finite number in \(0, inf\), got -8000"),
    ({"f_min": 8000}, r"0 <= f_min < f_max <= sampling_rate / 2 \(8000 Hz\); got f_min=8000, f_max=8000"),
    ({"f_max": 9000}, r"f_max <= sampling_rate / 2 \(8000 Hz\); got f_min=0, f_max=9000"),
    ({"sampling_rate": 8000}, r"sampling_rate / 2 \(4000 Hz\); got f_min=0, f_max=8000, sampling_rate=8000"),
    ({"top_db": 0}, r"top_db must be a finite number in \(0, inf\), got 0.*None keeps all"),
    ({"top_db": "x"}, r"top_db must be a finite number in \(0, inf\), got 'x'"),
    ({"center": "false"}, r"center must be true or false, got 'false'"),
    ({"qkv_bias": 1}, r"qkv_bias must be true or false, got 1"),
    ({"hidden_act": "gelu2"}, r"hidden_act must name an activation.*got 'gelu2'"),
    (
        {"loss": "MSELoss"},
        r"loss must be 'BCELoss' \(multi-label\) or 'CrossEntropyLoss' \(single label\), got 'MSELoss'",
    ),
    ({"outputdim": 0}, r"outputdim must be a positive integer, got 0.*None for no head"),
    ({"initializer_range": -0.02}, r"initializer_range must be a finite number in \[0, inf\)"),
    ({"decoder_hidden_size": 0}, r"decoder_hidden_size must be a positive integer, got 0"),
    ({"decoder_num_hidden_layers": -2}, r"decoder_num_hidden_layers must be a positive integer, got -2"),
    ({"decoder_num_attention_heads": 0}, r"decoder_num_attention_heads must be a positive integer, got 0"),
    ({"decoder_intermediate_size": -1}, r"decoder_intermediate_size must be a positive integer, got -1"),
    (
        {"decoder_hidden_size": 500},
        r"decoder_hidden_size \(500\) must be divisible by decoder_num_attention_heads \(16\)",
    ),
    ({"mask_ratio": 0.0}, r"mask_ratio must be a finite number in \(0, 1\), got 0.0"),
    ({"mask_ratio": 1}, r"mask_ratio must be a finite number in \(0, 1\), got 1"),
    ({"mask_group_size": 0}, r"mask_group_size must be a positive integer, got 0"),
    ({"mask_group_size": 253}, r"mask_group_size \(253\) must not exceed the tokens of one chunk \(252\)"),
    ({"norm_pix_loss": None}, r"norm_pix_loss must be true or false, got None"),
    ({"name": 7}, r"name must be a preset name"),
    ({"encoder_kwargs": [768]}, r"encoder_kwargs must be a mapping"),
    ({"encoder_kwargs": {"embed_dim": None}}, r"hidden_size \(from encoder_kwargs\['embed_dim'\]\) must be a positive"),
    ({"encoder_kwargs": {"num_heads": 0}}, r"num_attention_heads \(from encoder_kwargs\['num_heads'\]\) must be"),
    ({"encoder_kwargs": {"mlp_ratio": -4}}, r"intermediate_size \(from encoder_kwargs\['mlp_ratio'\]\) must be"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_bad_values_raise_naming_the_field(values, message):
    arguments = {**TINY, **values}
    if "encoder_kwargs" in values:
        arguments = values
    with pytest.raises(ValueError, match=message):
        DashengConfig(**arguments)


def test_valid_edge_values_are_accepted():
    config = DashengConfig(
        **TINY,
        hidden_dropout_prob=1.0,
        drop_path_rate=0.0,
        top_db=None,
        f_min=0,
        f_max=8000,
        batch_norm_momentum=None,
        mask_ratio=0.999,
        mask_group_size=252,
        intermediate_size=7,
    )
    assert (config.top_db, config.batch_norm_momentum, config.intermediate_size) == (None, None, 7)
    assert DashengConfig(hidden_size=64.0, num_attention_heads=4).hidden_size == 64  # integral floats are fine


@pytest.mark.parametrize("loader", ["AutoConfig", "AutoModel", "DashengConfig"])
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
        ("layer_norm_eps", -1, r"layer_norm_eps must be a finite number in \(0, inf\), got -1"),
        ("patch_size", None, r"patch_size must be a pair \[mel bins, frames\]"),
        ("top_db", "x", r"top_db must be a finite number in \(0, inf\), got 'x'"),
        ("hop_length", 0, "hop_length must be a positive integer, got 0"),
    ],
)
def test_bad_config_json_raises_through_from_pretrained(tmp_path, loader, field, value, message):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    load = {"AutoConfig": AutoConfig, "AutoModel": AutoModel, "DashengConfig": DashengConfig}[loader].from_pretrained
    with pytest.raises(ValueError, match=message):
        load(tmp_path, trust_remote_code=True)
    # Overrides at load time are checked the same way.
    path.write_text(json.dumps({**json.loads(path.read_text()), field: tiny_config().to_dict()[field]}))
    with pytest.raises(ValueError, match=message):
        load(tmp_path, trust_remote_code=True, **{field: value})


@pytest.mark.parametrize(
    ("name", "decoder"),
    [
        ("dasheng-base", (512, 8, 16)),
        ("dasheng-0.6B", (512, 8, 16)),
        ("dasheng-1.2B", (768, 8, 24)),
        (None, (512, 8, 16)),
    ],
)
def test_decoder_presets_and_overrides(name, decoder):
    config = DashengConfig(name=name)
    got = (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads)
    assert got == decoder and config.decoder_intermediate_size == 4 * decoder[0]
    assert (config.mask_ratio, config.mask_group_size, config.norm_pix_loss) == (0.75, 2, True)
    custom = DashengConfig(
        name=name, decoder_hidden_size=96, decoder_num_attention_heads=6, decoder_num_hidden_layers=1
    )
    assert (custom.decoder_hidden_size, custom.decoder_num_hidden_layers, custom.decoder_num_attention_heads) == (
        96,
        1,
        6,
    )
    assert custom.decoder_intermediate_size == 384
    assert DashengConfig(name=name, decoder_intermediate_size=100).decoder_intermediate_size == 100


def test_pretraining_code_is_in_auto_map_and_saved(tmp_path):
    assert "modeling_dasheng_pretraining.py" in CODE_FILES
    tiny_config().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["auto_map"]["AutoModelForPreTraining"] == "modeling_dasheng_pretraining.DashengForPreTraining"
    assert (tmp_path / "modeling_dasheng_pretraining.py").is_file()
    assert written["decoder_hidden_size"] == 512 and written["mask_ratio"] == 0.75


MIRROR = {
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "patch_size": [64, 4],
    "patch_stride": [64, 4],
    "target_length": 1008,
}


def test_saved_config_carries_a_consistent_encoder_kwargs_mirror(tmp_path):
    config = tiny_config()
    assert dict(config.encoder_kwargs) == MIRROR
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["encoder_kwargs"] == MIRROR and written["hidden_size"] == 64
    loaded = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    volatile = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in volatile} == {
        k: v for k, v in config.to_dict().items() if k not in volatile
    }
    # Overrides at load time change the fields and the mirror together, without a warning.
    wider = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True, hidden_size=128, num_attention_heads=8)
    assert (wider.hidden_size, wider.encoder_kwargs["embed_dim"], wider.encoder_kwargs["num_heads"]) == (128, 128, 8)
    # The mirror follows fields changed after construction too, and cannot be written.
    config.num_hidden_layers = 3
    assert config.to_dict()["encoder_kwargs"]["depth"] == 3
    with pytest.raises(AttributeError, match="read-only mirror"):
        config.encoder_kwargs = {"embed_dim": 1}
    with pytest.raises(TypeError):
        config.encoder_kwargs["embed_dim"] = 1


def test_legacy_encoder_kwargs_define_the_architecture(tmp_path):
    legacy = {"architectures": ["DashengModel"], "model_type": "dasheng", "name": "dasheng-base", "loss": "BCELoss"}
    legacy["encoder_kwargs"] = {**MIRROR, "mlp_ratio": 2.0, "n_mels": 64, "hop_size": 160}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    config = DashengConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.intermediate_size == 128 and dict(config.encoder_kwargs) == MIRROR
    override = DashengConfig.from_pretrained(tmp_path, hidden_size=96, num_attention_heads=6)
    assert (override.hidden_size, override.num_attention_heads, override.intermediate_size) == (96, 6, 192)
    # Saved again, the folder has fields and a mirror that agree.
    config.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["encoder_kwargs"] == MIRROR and again["intermediate_size"] == 128


def test_fields_win_over_a_disagreeing_mirror_with_a_warning(caplog):
    from transformers.utils import logging as hf_logging

    written = tiny_config().to_dict()
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        config = DashengConfig(**{**written, "hidden_size": 128, "num_attention_heads": 8})
    assert config.hidden_size == 128 and config.encoder_kwargs["embed_dim"] == 128
    assert "hidden_size=128 vs encoder_kwargs['embed_dim']=64" in caplog.text
    assert "num_attention_heads=8 vs encoder_kwargs['num_heads']=4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        DashengConfig(**written)  # a consistent mirror is silent
    assert "disagree" not in caplog.text


def test_the_original_encoders_argument_names_given_directly_set_the_fields(tmp_path, caplog):
    """`DashengConfig(embed_dim=64, depth=2, num_heads=4)`, as the original `dasheng` constructor is called, builds
    that architecture (it used to be kept as unused attributes beside a dasheng-base)."""
    config = DashengConfig(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.intermediate_size == 128 and dict(config.encoder_kwargs)["embed_dim"] == 64
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert not {"embed_dim", "depth", "num_heads", "mlp_ratio"} & set(written)  # only the fields and the mirror
    assert DashengConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    # A field given as well wins (the original name fills in only what the fields leave out), with a warning.
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        assert DashengConfig(hidden_size=32, embed_dim=64, num_heads=4, depth=1).hidden_size == 32
    assert "the original names given (the first Hub port's) disagree: hidden_size=32 vs embed_dim=64." in caplog.text
    with pytest.raises(ValueError, match=r"num_attention_heads \(from num_heads\) must be a positive integer"):
        DashengConfig(embed_dim=64, num_heads=0)
