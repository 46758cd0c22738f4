"""Regressions for defects that Transformers' own common test suites found (tests/transformers_suite/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dasheng_hf import DashengFeatureExtractor, DashengForPreTraining, DashengModel
from dasheng_hf.modeling_dasheng import DashengWeightShapeError
from helpers import tiny_config


def test_pretraining_attentions_are_on_the_path_to_the_loss():
    # test_retain_grad_hidden_states_attentions: the returned weights must be the ones the blocks use.
    torch.manual_seed(0)
    model = DashengForPreTraining(tiny_config(decoder_hidden_size=64, decoder_num_hidden_layers=1)).train()
    features = torch.randn(2, 64, 1008) * 15 - 40
    mask = torch.ones(2, 1008, dtype=torch.long)
    mask[1, 600:] = 0
    output = model(features, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    attentions, hidden_states = output.attentions[0], output.hidden_states[0]
    assert attentions.shape == (2, 4, 63, 63)  # (sequences, heads, visible, visible)
    attentions.retain_grad()
    hidden_states.retain_grad()
    output.loss.backward()
    assert attentions.grad is not None and bool(attentions.grad.abs().sum() > 0)
    assert hidden_states.grad is not None
    # Rows of real tokens sum to one; the padded rows of the shorter clip (37 visible tokens of 150) are zeros.
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(4, 63))
    assert bool((attentions[1, :, 37:] == 0).all()) and bool((attentions[1, :, :37].sum(-1) - 1).abs().max() < 1e-5)


@pytest.mark.parametrize("as_torch", [False, True])
def test_pad_without_padding_returns_the_items_as_they_are(as_torch):
    items = [np.random.default_rng(0).normal(size=(64, frames)).astype(np.float32) for frames in (100, 120)]
    examples = [
        {"input_values": torch.from_numpy(item) if as_torch else item, "labels": i} for i, item in enumerate(items)
    ]
    padded = DashengFeatureExtractor().pad(examples, padding=False)
    assert [tuple(value.shape) for value in padded["input_values"]] == [(64, 100), (64, 120)]
    assert all(isinstance(value, np.ndarray) for value in padded["input_values"])
    for value, item in zip(padded["input_values"], items):
        np.testing.assert_array_equal(np.asarray(value), item)
    assert [len(mask) for mask in padded["attention_mask"]] == [100, 120]
    assert padded["labels"] == [0, 1]
    # Equal lengths still make one array; a tensor type cannot hold clips of different lengths.
    assert DashengFeatureExtractor().pad(examples[:1] * 2, padding=False)["input_values"].shape == (2, 64, 100)
    with pytest.raises(ValueError, match="padding=True"):
        DashengFeatureExtractor().pad(examples, padding=False, return_tensors="np")


def test_weights_of_other_shapes_raise_value_and_runtime_error(tmp_path):
    DashengModel(tiny_config()).save_pretrained(tmp_path)
    for expected in (ValueError, RuntimeError):  # ours, and what code written for Transformers catches
        with pytest.raises(expected, match="do not have the shapes its config describes") as caught:
            DashengModel.from_pretrained(tmp_path, intermediate_size=128)
        assert isinstance(caught.value, DashengWeightShapeError)
        assert "ignore_mismatched_sizes=True" in str(caught.value)
    model = DashengModel.from_pretrained(tmp_path, intermediate_size=128, ignore_mismatched_sizes=True)
    assert model.encoder.blocks[0].mlp.fc1.weight.shape == (128, 64)
