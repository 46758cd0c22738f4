"""The HEAR 2021 API (`evaluation/hear.py`): the official validator's checks, numbers, long audio."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from dasheng_hf import DashengModel
from dasheng_hf.cli.preflight import DashengPreflightError
from dasheng_hf.evaluation import hear
from helpers import concatenated_fsdd, hf_state_dict, max_abs_diff, tiny_config
from safetensors.torch import save_file

ACCEPTABLE_SAMPLE_RATES = [16000, 22050, 32000, 44100, 48000]  # hearvalidator's list


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, reference_tiny):
    folder = tmp_path_factory.mktemp("dasheng-hear")
    model = DashengModel(tiny_config())
    model.load_state_dict(hf_state_dict(reference_tiny))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hear_model(model_folder):
    model = hear.load_model(str(model_folder))
    return model.to("cpu")  # as the validator does


def white_noise(num_audio: int, seconds: float, sample_rate: int) -> torch.Tensor:
    """The validator's test audio: uniform white noise in [-1, 1], float32."""
    return torch.rand(num_audio, int(seconds * sample_rate)) * 2 - 1


def test_load_model_attributes(hear_model):
    assert isinstance(hear_model, torch.nn.Module)
    assert hear_model.sample_rate == 16000 and hear_model.sample_rate in ACCEPTABLE_SAMPLE_RATES
    assert isinstance(hear_model.scene_embedding_size, int) and hear_model.scene_embedding_size == 64
    assert isinstance(hear_model.timestamp_embedding_size, int) and hear_model.timestamp_embedding_size == 64
    assert not hear_model.training


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])
def test_timestamp_embeddings_pass_the_validator_checks(hear_model, reference_tiny, seconds):
    audio = white_noise(2, seconds, hear_model.sample_rate)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, hear_model)
    assert embeddings.dtype == torch.float32
    embeddings, timestamps = embeddings.detach().cpu().numpy(), timestamps.detach().cpu().numpy()
    assert embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[0] == 2 and embeddings.shape[:2] == timestamps.shape
    assert embeddings.shape[2] == hear_model.timestamp_embedding_size
    assert embeddings.shape[1] == (audio.shape[1] // 160 - 3) // 4 + 1
    differences = np.diff(timestamps)
    average = differences.mean()
    assert np.max(np.abs(differences - average)) <= 1  # a constant hop, within 1 ms
    assert average == pytest.approx(40.0) and np.max(differences) <= 50.0
    assert timestamps.min() <= average  # the validator warns otherwise
    length_ms = 1000 * seconds
    assert timestamps.max() <= length_ms  # the validator fails otherwise
    assert timestamps.max() >= length_ms - min(average, 50)  # the validator warns otherwise
    np.testing.assert_allclose(timestamps[0, :3], [20.0, 60.0, 100.0])  # centres of the 40 ms tokens
    with torch.no_grad():
        expected = reference_tiny(audio)
    assert max_abs_diff(torch.from_numpy(embeddings), expected) <= 1e-4


def test_scene_embeddings_pass_the_validator_checks(hear_model, reference_tiny):
    audio = white_noise(4, 2.74, hear_model.sample_rate)
    embeddings = hear.get_scene_embeddings(audio, hear_model)
    assert embeddings.dtype == torch.float32
    embeddings = embeddings.detach().cpu().numpy()
    assert embeddings.ndim == 2 and embeddings.shape == (4, hear_model.scene_embedding_size)
    with torch.no_grad():
        expected = reference_tiny(audio).mean(1)
    assert max_abs_diff(torch.from_numpy(embeddings), expected) <= 1e-4


def test_batches_are_split_to_bound_memory(model_folder):
    """With one chunk per pass, clips go through a few at a time, with the same results as all at once."""
    whole = hear.load_model(str(model_folder))
    limited = hear.load_model(str(model_folder))
    limited.model.config.max_chunks_per_pass = 1
    assert limited.max_batch_samples == 1008 * 160
    passes = []
    limited.model.register_forward_hook(lambda module, args, output: passes.append(output.last_hidden_state.shape[0]))
    audio = torch.stack([concatenated_fsdd(64000, start=5 * i) for i in range(5)])  # 4 s of speech each
    embeddings, _ = hear.get_timestamp_embeddings(audio, limited)
    assert passes == [2, 2, 1]
    assert max_abs_diff(embeddings, hear.get_timestamp_embeddings(audio, whole)[0]) <= 1e-5


def test_twenty_minutes_in_one_call(hear_model):
    """20 minutes of audio: every 10.08 s chunk is encoded alike, and the timestamps do not drift."""
    period = 1008 * 160  # one chunk of attention: 10.08 s
    speech = concatenated_fsdd(period)
    repeats = 20 * 60 * 16000 // period + 1
    audio = speech.repeat(repeats)[None, : 20 * 60 * 16000]
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, hear_model)
    assert embeddings.shape == (1, 30000, 64) and timestamps.shape == (1, 30000)
    assert float(timestamps[0, -1]) == 1_199_980.0 and float(timestamps[0, 1] - timestamps[0, 0]) == 40.0
    # The signal repeats every chunk, so every chunk but the first (reflect padding) and the last (shorter) is alike;
    # they also equal the middle chunk of 30 s of the same signal (the same loudest sample sets the dB floor).
    chunks = embeddings[0, : 119 * 252].reshape(119, 252, 64)
    assert max_abs_diff(chunks[1:], chunks[1:2].expand(118, -1, -1)) <= 1e-4
    short, _ = hear.get_timestamp_embeddings(speech.repeat(3)[None], hear_model)
    assert max_abs_diff(chunks[1], short[0, 252:504]) <= 1e-4


def test_legacy_hub_folder_loads_with_the_config_front_end(tmp_path, reference_tiny):
    config = {
        "architectures": ["DashengModel"],
        "encoder_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": [64, 4], "patch_stride": [64, 4]},
        "model_type": "dasheng",
        "name": "dasheng-base",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(hf_state_dict(reference_tiny), str(tmp_path / "model.safetensors"))
    model = hear.load_model(str(tmp_path))
    assert model.scene_embedding_size == 64
    audio = white_noise(2, 1.0, 16000)
    with torch.no_grad():
        assert max_abs_diff(hear.get_scene_embeddings(audio, model), reference_tiny(audio).mean(1)) <= 1e-4


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [
        ("", "mispeech/dasheng-base"),
        ("dasheng-0.6B", "mispeech/dasheng-0.6B"),
        ("dasheng-1.2B", "mispeech/dasheng-1.2B"),
    ],
)
def test_size_names_resolve_to_hub_ids(tmp_path, name, repo_id):
    with pytest.raises(DashengPreflightError, match=f"'{repo_id}' is not in the local Hugging Face cache"):
        hear.load_model(name, cache_dir=str(tmp_path))  # offline with an empty cache: nothing to load


def test_loading_errors_are_one_line_before_any_download(tmp_path):
    """Offline, a Hub id is refused at once (no retries) and a missing folder is named as missing."""
    with pytest.raises(DashengPreflightError) as offline:
        hear.load_model("dasheng-base", cache_dir=str(tmp_path))
    message = str(offline.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "dasheng-convert" in message
    assert offline.value.__cause__ is None and offline.value.__context__ is None  # no chained traceback
    with pytest.raises(DashengPreflightError, match="does not exist") as missing:
        hear.load_model(str(tmp_path / "no-such-model"))
    assert "repo id" not in str(missing.value).lower()


def test_a_folder_without_config_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="Could not load a Dasheng model from") as error:
        hear.load_model(str(tmp_path / "empty"))
    assert "\n" not in str(error.value) and error.value.__suppress_context__


def test_readme_example_is_device_agnostic(model_folder):
    """The README's HEAR example runs as written on a machine without a GPU (with a local folder for the Hub id)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### HEAR", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '.to("cuda")' not in code.replace('"cuda" if', "")
    namespace: dict = {}
    exec(code.replace('"mispeech/dasheng-base"', repr(str(model_folder))).replace("16000 * 5", "16000"), namespace)
    assert namespace["scene"].shape == (4, 64)


@pytest.mark.parametrize(("shape", "match"), [((2, 0), "has no samples"), ((0, 16000), "holds no sounds")])
def test_empty_audio_is_named(hear_model, shape, match):
    """Before: ZeroDivisionError for (2, 0), a bare max() error for (0, 16000)."""
    for function in (hear.get_scene_embeddings, hear.get_timestamp_embeddings):
        with pytest.raises(ValueError, match=match):
            function(torch.zeros(shape), hear_model)


def test_bad_inputs_are_named(hear_model, tmp_path):
    with pytest.raises(ValueError, match=r"\(n_sounds, n_samples\).*audio\[None\]"):
        hear.get_scene_embeddings(torch.zeros(16000), hear_model)
    with pytest.raises(ValueError, match="float samples"):
        hear.get_scene_embeddings(torch.zeros(1, 16000, dtype=torch.int16), hear_model)
    checkpoint = tmp_path / "dasheng_base.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="dasheng-convert --checkpoint"):
        hear.load_model(str(checkpoint))
