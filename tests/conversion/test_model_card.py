"""Model cards claim only what is true: the release's facts only for the released checkpoints (by checksum)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from dasheng_hf.conversion import checkpoint_files, model_card
from dasheng_hf.convert_checkpoint import RELEASED_NAMES, main
from helpers import make_reference_encoder

RELEASE_FACTS = ("272k hours", "HEAR", "mispeech/", "license: apache-2.0")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny encoder in the released file format: not one of the released checkpoints."""
    path = tmp_path_factory.mktemp("card") / "my_dasheng.pt"
    config = {"embed_dim": 64, "depth": 2, "num_heads": 4}
    torch.save({"model": make_reference_encoder(64, 2, 4, seed=5).state_dict(), "config": config}, path)
    return path


def test_a_random_checkpoint_gets_a_card_of_what_the_conversion_was(checkpoint, tmp_path):
    output = tmp_path / "dasheng-base"  # the folder's name claims nothing either
    assert main(["--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    card = (output / "README.md").read_text()
    for claim in RELEASE_FACTS:
        assert claim not in card, claim
    assert f"model_id = {str(output)!r}".replace("'", '"') in card  # the usage runs on the folder as written
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"my_dasheng.pt ({checkpoint.stat().st_size / 1e6:.1f} MB, sha256 {sha256})" in card
    assert "not one of the released Dasheng checkpoints" in card
    assert "checked against the original implementation" not in card  # no --verify


def test_a_released_checkpoint_is_recognised_by_its_checksum(checkpoint, tmp_path, monkeypatch):
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    monkeypatch.setitem(model_card.RELEASED_SHA256, "dasheng-base", sha256)
    output = tmp_path / "dasheng-base"
    assert main(["--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    card = (output / "README.md").read_text()
    assert "272k hours" in card and "license: apache-2.0" in card and 'model_id = "mispeech/dasheng-base"' in card
    assert "Converted from the original release" in card
    # HEAR scores belong to the released size: this tiny stand-in is not it, so none are quoted.
    assert "80.2" not in card


def test_released_names_and_urls_are_recognised():
    assert model_card.released_checkpoint("dasheng-0.6B", None) == "dasheng-0.6B"
    url = checkpoint_files.RELEASED_CHECKPOINTS["dasheng-1.2B"]
    assert model_card.released_checkpoint(url, "0" * 64) == "dasheng-1.2B"
    assert model_card.released_checkpoint("/models/dasheng_base.pt", "0" * 64) is None
    assert set(RELEASED_NAMES) == set(checkpoint_files.RELEASED_CHECKPOINTS)  # --help lists them without torch
