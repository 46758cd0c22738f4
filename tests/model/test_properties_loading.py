"""Property-based tests of loading saved folders whose config, preprocessor config or weights were mutated.

Property: `from_pretrained` (our class, and `AutoModel` through the folder's own code) either raises a documented
exception whose message names the problem, or loads a model whose outputs on real speech are finite and equal to
those of the unmutated folder wherever the mutation does not change the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dasheng_hf import DashengFeatureExtractor, DashengModel
from helpers import fsdd_clip, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModel

# What loading a damaged folder may raise: our validation (ValueError, TypeError for wrong types), the file layer
# (OSError, and safetensors' own error for damaged headers), and JSON decoding for unreadable configs.
DOCUMENTED = (ValueError, TypeError, OSError, json.JSONDecodeError)

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5000, max_value=5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
CONFIG_FIELDS = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "layer_norm_eps",
    "patch_size",
    "patch_stride",
    "target_length",
    "num_mel_bins",
    "max_chunks_per_pass",
    "sampling_rate",
    "n_fft",
    "hop_length",
    "f_max",
    "top_db",
    "hidden_dropout_prob",
    "drop_path_rate",
    "outputdim",
    "loss",
    "encoder_kwargs",
    "decoder_hidden_size",
    "mask_ratio",
]
PREPROCESSOR_FIELDS = ["sampling_rate", "n_fft", "hop_size", "win_size", "f_min", "f_max", "top_db", "center"]
OUTCOMES: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    """Prints the outcome classes seen by this module's properties (read them with `pytest -s`)."""
    yield
    print("\nloading outcomes:", json.dumps(OUTCOMES, sort_keys=True))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], torch.Tensor]:
    folder = tmp_path_factory.mktemp("loading") / "model"
    model = DashengModel(tiny_config(num_hidden_layers=1)).eval()
    model.save_pretrained(folder)
    inputs = DashengFeatureExtractor()(fsdd_clip(3), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    return folder, inputs, expected


def _load_all_ways(folder: Path) -> list[torch.nn.Module]:
    return [DashengModel.from_pretrained(folder), AutoModel.from_pretrained(folder, trust_remote_code=True)]


def _check(folder: Path, inputs, expected: torch.Tensor | None, kind: str) -> None:
    try:
        models = _load_all_ways(folder)
    except DOCUMENTED as error:
        message = str(error)
        assert message and "Traceback" not in message
        OUTCOMES[f"{kind}: {type(error).__name__}"] = OUTCOMES.get(f"{kind}: {type(error).__name__}", 0) + 1
        return
    for model in models:
        with torch.no_grad():
            outputs = model.eval()(**inputs).last_hidden_state
        assert torch.isfinite(outputs).all()
        if expected is not None and outputs.shape == expected.shape:
            assert torch.allclose(outputs, expected, atol=1e-5)
    OUTCOMES[f"{kind}: loaded"] = OUTCOMES.get(f"{kind}: loaded", 0) + 1


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    return target


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(CONFIG_FIELDS), value=ODD_VALUES)
def test_mutated_config_values(saved, tmp_path, field, value):
    folder, inputs, _ = saved
    target = _copy(folder, tmp_path, "config")
    config = json.loads((target / "config.json").read_text())
    config[field] = value
    (target / "config.json").write_text(json.dumps(config))
    _check(target, inputs, None, "config value")


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(PREPROCESSOR_FIELDS), value=ODD_VALUES)
def test_mutated_preprocessor_values(saved, tmp_path, field, value):
    folder, inputs, expected = saved
    target = _copy(folder, tmp_path, "preprocessor")
    preprocessor = json.loads((target / "preprocessor_config.json").read_text())
    unchanged = preprocessor.get(field) == value
    preprocessor[field] = value
    (target / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    _check(target, inputs, expected if unchanged else None, "preprocessor value")


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["encoder.blocks.0.attn.qkv.weight", "encoder.init_bn.1.running_var", "encoder.norm.bias"]),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e30]),
)
def test_mutated_weight_values(saved, tmp_path, name, value):
    folder, inputs, _ = saved
    target = _copy(folder, tmp_path, "weights")
    weights = load_file(target / "model.safetensors")
    weights[name] = weights[name].clone().view(-1).index_fill_(0, torch.tensor([0]), value).view_as(weights[name])
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    _check(target, inputs, None, "weight value")


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files(saved, tmp_path, data):
    folder, inputs, _ = saved
    target = _copy(folder, tmp_path, "files")
    name = data.draw(st.sampled_from(["model.safetensors", "config.json", "preprocessor_config.json"]))
    content = (target / name).read_bytes()
    cut = data.draw(st.integers(min_value=0, max_value=len(content) - 1))
    garbage = data.draw(st.binary(max_size=16))
    (target / name).write_bytes(content[:cut] + garbage)
    _check(target, inputs, None, f"damaged {name}")
