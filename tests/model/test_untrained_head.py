"""A classifier whose head was never trained (an encoder-only folder) says so in one line; the pipeline refuses it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from dasheng_hf import DashengForAudioClassification, DashengModel
from helpers import hf_state_dict, tiny_config
from transformers import pipeline


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory, reference_tiny):
    folder = tmp_path_factory.mktemp("encoder-only")
    model = DashengModel(tiny_config())
    model.load_state_dict(hf_state_dict(reference_tiny))
    model.save_pretrained(folder)
    return folder


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.endswith("modeling_dasheng")]


def test_pipeline_refuses_an_untrained_head(encoder_folder):
    """Before: `LABEL_1` with a confident score from a random 2-label head."""
    with pytest.raises(ValueError, match=r"has no trained classification head.*pooler_output") as refused:
        pipeline("audio-classification", model=str(encoder_folder), trust_remote_code=True)
    assert "\n" not in str(refused.value) and str(encoder_folder) in str(refused.value)


def test_classifier_from_an_encoder_folder_warns_in_one_line(encoder_folder, caplog):
    with caplog.at_level(logging.WARNING):
        model, info = DashengForAudioClassification.from_pretrained(
            encoder_folder, num_labels=5, output_loading_info=True
        )
    assert not model.head_is_trained
    assert sorted(info["missing_keys"]) == [f"outputlayer.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")]
    (line,) = warnings_of(caplog)
    assert "holds no classification head" in line and "5 outputs are random" in line and "\n" not in line


def test_a_trained_head_loads_quietly_and_classifies(encoder_folder, tmp_path, caplog):
    classifier = DashengForAudioClassification.from_pretrained(encoder_folder, num_labels=3)
    classifier.save_pretrained(tmp_path)  # fine-tuned (here: as it is) and saved: the head is now in the folder
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = DashengForAudioClassification.from_pretrained(tmp_path)
    assert loaded.head_is_trained and not warnings_of(caplog)
    scores = pipeline("audio-classification", model=str(tmp_path), trust_remote_code=True)(
        np.zeros(16000, dtype=np.float32), top_k=3
    )
    assert len(scores) == 3
