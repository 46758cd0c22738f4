"""A model folder without weights (or without a config) is one clear line in dasheng-eval and dasheng-embed."""

from __future__ import annotations

import pytest
from dasheng_hf.cli.preflight import DashengPreflightError
from dasheng_hf.embedding import embed
from dasheng_hf.evaluation.embeddings import LinearProbeError, load_encoder
from helpers import tiny_config


@pytest.fixture
def weightless(tmp_path):
    tiny_config().save_pretrained(tmp_path)  # config.json only
    return tmp_path


def test_eval_names_the_missing_weights_in_one_line(weightless):
    with pytest.raises(LinearProbeError) as error:
        load_encoder(str(weightless))
    message = str(error.value)
    assert "\n" not in message and "model.safetensors" in message and str(weightless) in message


def test_embed_names_the_missing_weights_in_one_line(weightless):
    with pytest.raises(DashengPreflightError) as error:
        embed._load_model(str(weightless))
    message = str(error.value)
    assert "\n" not in message and "model.safetensors" in message


def test_embed_names_a_folder_without_config(tmp_path):
    with pytest.raises(DashengPreflightError, match="holds no config.json|cannot read its config.json"):
        embed._load_model(str(tmp_path))
