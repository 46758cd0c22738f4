"""Property-based tests of convert_checkpoint.py: mutated checkpoints, configs, Hub folders and paths.

Property: every conversion either raises `ConversionError` with a one-line message and leaves nothing at (or
beside) the output path, or writes a folder that loads and reproduces the original `dasheng` model with the same
weights and settings. `hypothesis.event` records each example's outcome class (`--hypothesis-show-statistics`).
Example counts scale with the profile: the `ci` counts below, ten times as many under `deep` (at most 250).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from dasheng_hf import DashengModel
from dasheng_hf.convert_checkpoint import ConversionError, convert
from helpers import concatenated_fsdd, hf_state_dict, make_reference_encoder, max_abs_diff
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-4
# Front-end keys of the original constructor and the config fields they become.
FRONT_END = {"n_fft": "n_fft", "hop_size": "hop_length", "win_size": "win_length", "f_min": "f_min", "f_max": "f_max"}
FRONT_END.update(center="center", top_db="top_db")


def examples(ci: int) -> settings:
    """`ci` examples under the ci profile (25 by default), ten times as many under deeper ones (at most 250)."""
    scale = 1 if settings.default.max_examples <= 25 else 10
    return settings(
        max_examples=min(ci * scale, 250), suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
    )


@functools.cache
def reference() -> torch.nn.Module:
    return make_reference_encoder(64, 2, 4, seed=21)


@functools.cache
def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": reference().state_dict(), "config": {"num_heads": 4}}, buffer)
    return buffer.getvalue()


@functools.cache
def audio() -> torch.Tensor:
    return concatenated_fsdd(16000)


def classify(message: str) -> str:
    """The outcome class of a refusal, for the statistics."""
    for pattern, name in [
        (r"arbitrary code", "refused: code"),
        (r"damaged|cut short|checksum", "refused: damaged file"),
        (r"is (a JSON|a text|a safetensors|empty|a named pipe|a folder)|does not exist|not a Hub-layout",
         "refused: not a checkpoint"),
        (r"The output|Cannot (create|write)|symbolic link|does not name a folder", "refused: output path"),
        (r"tensors do not fit|not named dense|patch_embed|encoder has no|outside the encoder|head is incomplete",
         "refused: tensors"),
        (r"front end|front-end", "refused: front end"),
        (r"config|DashengConfig|time_pos_embed", "refused: config value"),
    ]:  # fmt: skip
        if re.search(pattern, message):
            return name
    return "refused: other"


def attempt(source: Path, output: Path, **kwargs: Any) -> str | None:
    """Convert; None on success, else the refusal's message, which must be one line and leave nothing behind."""
    before = sorted(path.name for path in output.parent.iterdir()) if output.parent.is_dir() else None
    try:
        convert(str(source), output, **kwargs)
    except ConversionError as error:
        message = str(error)
        assert message and "\n" not in message, message
        after = sorted(path.name for path in output.parent.iterdir()) if output.parent.is_dir() else None
        assert after == before, f"left behind: {set(after or []) - set(before or [])}"
        event(classify(message))
        return message
    event("converted")
    return None


def assert_reproduces_original(folder: Path, state: dict[str, torch.Tensor], **original_kwargs: Any) -> None:
    """The folder loads, and its tokens equal those of the original encoder with `state` and `original_kwargs`."""
    from dasheng.pretrained.pretrained import Dasheng

    expected_model = Dasheng(embed_dim=64, depth=2, **{"num_heads": 4, **original_kwargs}).eval()
    weights = {key: value.float() for key, value in state.items() if not key.startswith("front_end.")}
    assert set(expected_model.state_dict()) == set(weights) | {
        "front_end.0.mel_scale.fb",
        "front_end.0.spectrogram.window",
    }
    expected_model.load_state_dict(weights, strict=False)  # the front end of `original_kwargs`, not the checkpoint's
    model = DashengModel.from_pretrained(folder).eval()
    from dasheng_hf import DashengFeatureExtractor

    extractor = DashengFeatureExtractor.from_pretrained(folder)
    with torch.no_grad():
        found = model(**extractor(audio().numpy(), sampling_rate=16000, return_tensors="pt")).last_hidden_state
        expected = expected_model(audio()[None])
    assert found.shape == expected.shape and max_abs_diff(found, expected) < TOLERANCE


# ----------------------------------------------------------------------------------------------------------------
# Bytes of the checkpoint file
# ----------------------------------------------------------------------------------------------------------------


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    data = bytearray(checkpoint_bytes())
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "prefix"]))
    event(f"mutation: {kind}")
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
            data[position] ^= draw(st.integers(1, 255))
        return bytes(data)
    start = draw(st.integers(0, len(data) - 1))
    junk = draw(st.binary(min_size=1, max_size=64))
    if kind == "overwrite":
        data[start : start + len(junk)] = junk
        return bytes(data)
    if kind == "insert":
        return bytes(data[:start] + junk + data[start:])
    return junk + bytes(data)


@examples(ci=25)
@given(content=damaged_files())
def test_damaged_checkpoint_files_are_refused_as_damaged(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        source, output = Path(root) / "model.pt", Path(root) / "out"
        source.write_bytes(content)
        message = attempt(source, output)
        if message is None:  # only changes that leave the archive's data intact may pass
            with zipfile.ZipFile(source) as archive:
                assert archive.testzip() is None
            assert_reproduces_original(output, reference().state_dict())
        else:
            assert "arbitrary code" not in message


# ----------------------------------------------------------------------------------------------------------------
# Tensors of the state dict
# ----------------------------------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64]


@st.composite
def mutated_states(draw: st.DrawFn) -> dict[str, Any]:
    state: dict[str, Any] = {key: value.clone() for key, value in reference().state_dict().items()}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(state)))
        kind = draw(st.sampled_from(["drop", "extra", "rename", "reshape", "dtype", "nonfinite", "negative", "value"]))
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):  # replaced by a plain value in an earlier round
            continue
        event(f"mutation: {kind}")
        if kind == "drop":
            del state[key]
        elif kind == "extra":
            state[draw(st.sampled_from(["blocks.9.x", "extra", "outputlayer.0.weight", "norm.scale"]))] = torch.ones(3)
        elif kind == "rename":
            state[key + draw(st.sampled_from(["_", ".0", "s"]))] = state.pop(key)
        elif kind == "reshape":
            shape = list(tensor.shape) or [1]
            axis = draw(st.integers(0, len(shape) - 1))
            shape[axis] = max(0, shape[axis] + draw(st.sampled_from([-1, 1, 2])))
            state[key] = torch.zeros(draw(st.sampled_from([shape, shape + [1], [tensor.numel()]])))
        elif kind == "dtype":
            state[key] = tensor.to(draw(st.sampled_from(DTYPES)))
        elif kind in ("nonfinite", "negative") and tensor.is_floating_point() and tensor.numel():
            value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")])) if kind == "nonfinite" else -1.0
            tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = value
        elif kind == "value":
            state[key] = draw(st.sampled_from([1, "x", [1.0], None]))
    return state


@examples(ci=10)
@given(state=mutated_states())
def test_mutated_tensors_are_refused_or_reproduce_the_original(state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as root:
        source, output = Path(root) / "model.pt", Path(root) / "out"
        torch.save({"model": state, "config": {"num_heads": 4}}, source)
        if attempt(source, output) is None:
            assert_reproduces_original(output, state)


# ----------------------------------------------------------------------------------------------------------------
# Values of the original checkpoint's config
# ----------------------------------------------------------------------------------------------------------------

ODD_VALUES = st.sampled_from([0, -1, None, "x", True, float("nan"), float("inf"), [], {}, [4, 4], 1e30])
CONFIG_VALUES = {
    "hop_size": st.one_of(st.sampled_from([80, 160, 320]), ODD_VALUES),
    "win_size": st.one_of(st.sampled_from([400, 512, 1024]), ODD_VALUES),
    "n_fft": st.one_of(st.sampled_from([256, 512]), ODD_VALUES),
    "f_min": st.one_of(st.floats(-100, 9000), ODD_VALUES),
    "f_max": st.one_of(st.sampled_from([8000.0, 7000.0, 8001.0]), ODD_VALUES),
    "center": st.one_of(st.booleans(), ODD_VALUES),
    "top_db": st.one_of(st.floats(-10, 200), ODD_VALUES),
    "drop_rate": st.one_of(st.floats(-1, 2), ODD_VALUES),
    "target_length": st.one_of(st.sampled_from([1008, 1004, 512]), ODD_VALUES),
    "patch_stride": st.one_of(st.sampled_from([4, [64, 4], [64, 2], (64, 4)]), ODD_VALUES),
    "num_heads": st.one_of(st.sampled_from([4, 8, 3, 16]), ODD_VALUES),
    "pooling": st.one_of(st.sampled_from(["mean", "token"]), ODD_VALUES),
    "time_patch_out": ODD_VALUES,
}


@examples(ci=15)
@given(config=st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_config_values_are_refused_or_honoured(config: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as root:
        source, output = Path(root) / "model.pt", Path(root) / "out"
        torch.save({"model": reference().state_dict(), "config": {"num_heads": 4, **config}}, source)
        if attempt(source, output) is not None:
            return
        written = json.loads((output / "config.json").read_text())
        for key, field in FRONT_END.items():
            if key in config:
                assert written[field] == config[key], field
        kwargs = {key: config[key] for key in (*FRONT_END, "target_length", "num_heads") if key in config}
        if "patch_stride" in config:
            kwargs["patch_stride"] = written["patch_stride"]
        assert_reproduces_original(output, reference().state_dict(), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Hub-layout folders: config.json fields and text, preprocessor config
# ----------------------------------------------------------------------------------------------------------------

HUB_VALUES = {
    "num_attention_heads": st.one_of(st.sampled_from([4, 8, 0, 3]), ODD_VALUES),
    "hidden_size": st.one_of(st.sampled_from([64, 32]), ODD_VALUES),
    "hop_length": CONFIG_VALUES["hop_size"],
    "win_length": CONFIG_VALUES["win_size"],
    "n_fft": CONFIG_VALUES["n_fft"],
    "f_max": CONFIG_VALUES["f_max"],
    "top_db": CONFIG_VALUES["top_db"],
    "center": CONFIG_VALUES["center"],
    "target_length": CONFIG_VALUES["target_length"],
    "patch_size": st.one_of(st.sampled_from([[64, 4], [64, 2], 4]), ODD_VALUES),
    "id2label": st.one_of(st.just({"0": "a"}), ODD_VALUES),
}


@examples(ci=12)
@given(
    fields=st.fixed_dictionaries({}, optional=HUB_VALUES),
    text_damage=st.one_of(st.none(), st.tuples(st.integers(0, 200), st.text(max_size=3))),
    preprocessor=st.one_of(st.none(), st.fixed_dictionaries({}, optional={"hop_size": CONFIG_VALUES["hop_size"]})),
)
def test_hub_folders_are_refused_or_reproduce_the_original(fields, text_damage, preprocessor) -> None:
    with tempfile.TemporaryDirectory() as root:
        folder, output = Path(root) / "hub", Path(root) / "out"
        folder.mkdir()
        config = {"model_type": "dasheng", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        text = json.dumps({**config, **fields})
        if text_damage is not None:
            position, replacement = text_damage
            text = text[:position] + replacement + text[position + len(replacement) :]
        (folder / "config.json").write_text(text)
        if preprocessor is not None:
            (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
        save_file(hf_state_dict(reference()), folder / "model.safetensors")
        if attempt(folder, output) is not None:
            return
        written = json.loads((output / "config.json").read_text())
        kwargs = {key: written[field] for key, field in FRONT_END.items()}
        kwargs.update(target_length=written["target_length"], patch_stride=written["patch_stride"])
        kwargs.update(num_heads=written["num_attention_heads"])  # not told by the tensors: taken as written
        assert_reproduces_original(output, reference().state_dict(), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------

NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12)
NAMES = NAMES.filter(lambda name: name not in (".", ".."))


@examples(ci=10)
@given(
    output_kind=st.sampled_from(["new", "nested", "file", "full folder", "empty folder", "symlink", "under a file"]),
    source_kind=st.sampled_from(["file", "missing", "folder", "fifo", "relative"]),
    name=NAMES,
    overwrite=st.booleans(),
)
def test_paths_are_refused_or_written_whole(output_kind: str, source_kind: str, name: str, overwrite: bool) -> None:
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        inputs, work = root / "inputs", root / "work"
        inputs.mkdir()
        work.mkdir()
        source = inputs / "model.pt"
        source.write_bytes(checkpoint_bytes())
        if source_kind == "missing":
            source = inputs / name
        elif source_kind == "folder":
            source = inputs / "folder"
            source.mkdir()
        elif source_kind == "fifo":
            source = inputs / "pipe"
            os.mkfifo(source)
        elif source_kind == "relative":
            source = Path(os.path.relpath(source))
        output = work / name
        if output_kind == "nested":
            output = work / name / name / "out"
        elif output_kind == "file":
            output.write_text("a file")
        elif output_kind == "full folder":
            output.mkdir()
            (output / "old.txt").write_text("old")
        elif output_kind == "empty folder":
            output.mkdir()
        elif output_kind == "symlink":
            output.symlink_to(inputs)
        elif output_kind == "under a file":
            output.write_text("a file")
            output = output / "out"
        before = sorted(os.listdir(work))
        message = attempt(source, output, overwrite=overwrite)
        if message is not None:
            assert sorted(os.listdir(work)) == before
            assert (inputs / "model.pt").read_bytes() == checkpoint_bytes()
            return
        assert output.is_dir() and not output.is_symlink()
        assert set(load_file(output / "model.safetensors")) == set(hf_state_dict(reference()))
        assert [path for path in output.parent.iterdir() if path.name.startswith(f".{output.name}.")] == []


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))
