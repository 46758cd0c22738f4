"""The converter on hostile checkpoints (code-carrying pickles of every protocol and format, pickles nested thousands
of levels deep), and config / preprocessor JSON files that are not JSON objects: each one clear error, nothing run."""

from __future__ import annotations

import os
import pathlib
import pickle
import sys

import pytest
import torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengModel
from dasheng_hf.convert_checkpoint import main
from helpers import make_reference_encoder


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))


class _Calls:
    """Pickles as `function(*arguments)`: loading it without weights_only would call the function."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def _error(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("form", ["torch.save zip", "torch.save legacy", "bare pickle"])
@pytest.mark.parametrize("payload", ["Path.touch", "getattr", "Path", "nested"])
def test_code_carrying_pickles_are_named_as_code_whatever_they_call(tmp_path, capsys, protocol, form, payload) -> None:
    marker = tmp_path / "touched"
    objects = {
        "Path.touch": _Calls(pathlib.Path.touch, pathlib.Path(marker)),
        "getattr": _Calls(getattr, pathlib.Path(marker), "touch"),
        "Path": pathlib.Path(marker),
        "nested": {"model": {}, "config": {"a": [_Calls(os.system, f"touch {marker}")]}},
    }
    checkpoint = tmp_path / "evil.pt"
    if form == "bare pickle":
        checkpoint.write_bytes(pickle.dumps(objects[payload], protocol=protocol))
    else:
        zipped = form == "torch.save zip"
        torch.save(objects[payload], checkpoint, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    line = _error(capsys)
    assert "could run arbitrary code" in line and "damaged" not in line and "text file" not in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_pickle_nested_thousands_of_levels_deep_is_one_clear_error(tmp_path, capsys) -> None:
    deep: list = []
    inner = deep
    for _ in range(3000):
        inner.append([])
        inner = inner[0]
    state = make_reference_encoder(64, 2, 4, seed=5).state_dict()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # only to write it
    try:
        torch.save({"model": state, "config": {"num_heads": deep}}, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    assert main(["--checkpoint", str(tmp_path / "deep.pt"), "--output", str(tmp_path / "out")]) == 1
    assert "nests lists, tuples or dicts more than 32 levels deep" in _error(capsys)


@pytest.mark.parametrize("content,kind", [("null", "null"), ("[]", "an array"), ("7", "a number"), ('"x"', "a string")])
def test_a_config_json_that_is_not_an_object_is_one_clear_error(tmp_path, content, kind) -> None:
    (tmp_path / "config.json").write_text(content)
    for load in (DashengConfig.from_pretrained, DashengModel.from_pretrained):
        with pytest.raises(ValueError, match=f"config.json holds {kind}, not a JSON object"):
            load(tmp_path)


@pytest.mark.parametrize("content,kind", [("[]", "an array"), ("[1, 2]", "an array"), ("7", "a number")])
def test_a_preprocessor_config_that_is_not_an_object_is_one_clear_error(tmp_path, content, kind) -> None:
    (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(ValueError, match=f"preprocessor_config.json holds {kind}, not a JSON object"):
        DashengFeatureExtractor.from_pretrained(tmp_path)
