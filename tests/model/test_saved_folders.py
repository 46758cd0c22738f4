"""Folders saved before the repository layout change (fixture: `fixtures/saved_before_layout`, made by the script
beside it from git b0481c6) load as they are, and a save today writes the same files and the same `auto_map`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengForAudioClassification, DashengModel
from dasheng_hf.configuration_dasheng import CODE_FILES
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "saved_before_layout"
REPO = Path(__file__).resolve().parents[2]
CASES = [
    ("encoder", DashengModel, AutoModel),
    ("classifier", DashengForAudioClassification, AutoModelForAudioClassification),
]


def _json(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("transformers_version", None)
    return data


@pytest.mark.parametrize(("name", "model_class", "auto_class"), CASES)
def test_saving_today_writes_what_the_code_before_the_move_wrote(tmp_path, name, model_class, auto_class):
    config = DashengConfig.from_pretrained(FIXTURE / name)
    model_class(config).save_pretrained(tmp_path)
    DashengFeatureExtractor.from_pretrained(FIXTURE / name).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == json.loads((FIXTURE / name / "files.json").read_text())
    assert _json(tmp_path / "config.json") == _json(FIXTURE / name / "config.json")
    assert _json(tmp_path / "preprocessor_config.json") == _json(FIXTURE / name / "preprocessor_config.json")


@pytest.mark.parametrize("trust_remote_code", [True, False])
@pytest.mark.parametrize(("name", "model_class", "auto_class"), CASES)
def test_folders_saved_before_the_move_load(tmp_path, name, model_class, auto_class, trust_remote_code):
    folder = tmp_path / name
    shutil.copytree(FIXTURE / name, folder)
    for code_file in CODE_FILES:  # what save_pretrained copied: the Hub files, unchanged by the move
        shutil.copy(REPO / code_file, folder / code_file)
    torch.manual_seed(0)
    original = model_class(DashengConfig.from_pretrained(folder)).eval()
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    original.save_pretrained(folder)  # weights only are new; config and code files are the fixture's
    shutil.copy(FIXTURE / name / "config.json", folder / "config.json")

    loaded = auto_class.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    assert type(loaded).__name__ == model_class.__name__
    inputs = extractor([torch.randn(16000), torch.randn(8000)], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected, found = original(**inputs).logits, loaded(**inputs).logits
    assert torch.allclose(found, expected, atol=1e-6)
    if name == "classifier":
        assert loaded.config.id2label == {0: "yes", 1: "no", 2: "maybe"}
