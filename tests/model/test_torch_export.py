"""torch.export with a frame mask, dynamic batch and frames (issue 15, defect 4): the program equals eager."""

from __future__ import annotations

import pytest
import torch
from dasheng_hf import DashengForAudioClassification, DashengModel
from dasheng_hf.modeling_dasheng_layers import DashengChunkedSequences
from helpers import concatenated_fsdd, fsdd_clip, hf_state_dict, max_abs_diff, samples_for_frames, tiny_config

TOLERANCE = 1e-5


def _dynamic_shapes():
    batch = torch.export.Dim("batch", min=1, max=1024)
    frames = torch.export.Dim("frames", min=8, max=1_000_000)  # exporting specialises a 1-token axis: >= 8 frames
    return {"input_values": {0: batch, 2: frames}, "attention_mask": {0: batch, 1: frames}}


def _export(model, input_values, attention_mask):
    with torch.no_grad():
        return torch.export.export(
            model,
            (),
            {"input_values": input_values, "attention_mask": attention_mask},
            dynamic_shapes=_dynamic_shapes(),
        )


def _batches(feature_extractor):
    """Padded batches of real speech the program was not traced on: other sizes, chunk counts and masks."""
    yield feature_extractor(
        [concatenated_fsdd(samples_for_frames(2530)), fsdd_clip(3), concatenated_fsdd(16000 * 11, start=9)],
        sampling_rate=16000,
        return_tensors="pt",
    )  # 2.5 chunks, a short clip, one chunk and a bit
    yield feature_extractor([fsdd_clip(11)], sampling_rate=16000, return_tensors="pt")  # one clip, one chunk
    yield feature_extractor(
        [fsdd_clip(20)[:1200], fsdd_clip(21), fsdd_clip(22), fsdd_clip(23)], sampling_rate=16000, return_tensors="pt"
    )


@pytest.mark.parametrize("model_class", [DashengModel, DashengForAudioClassification])
def test_exported_program_with_a_mask_equals_eager(reference_tiny, feature_extractor, model_class):
    model = model_class(tiny_config(num_labels=4)).eval()
    model.load_state_dict(hf_state_dict(reference_tiny), strict=False)
    traced = feature_extractor([fsdd_clip(0), fsdd_clip(1)[:3000]], sampling_rate=16000, return_tensors="pt")
    program = _export(model, traced.input_values, traced.attention_mask)
    for inputs in _batches(feature_extractor):
        with torch.no_grad():
            expected = model(**inputs)
            exported = program.module()(input_values=inputs.input_values, attention_mask=inputs.attention_mask)
        assert max_abs_diff(exported.logits, expected.logits) <= TOLERANCE
        if model_class is DashengModel:
            assert max_abs_diff(exported.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
            assert max_abs_diff(exported.pooler_output, expected.pooler_output) <= TOLERANCE


def test_export_does_not_guard_on_mask_values(tiny_pair):
    """Traced on a full mask, the program still masks: no branch was taken on the mask's values."""
    _, model = tiny_pair
    input_values = torch.randn(2, 64, 600) * 10 - 40
    program = _export(model, input_values, torch.ones(2, 600, dtype=torch.long))
    mask = torch.ones(2, 600, dtype=torch.long)
    mask[0, 101:] = 0
    with torch.no_grad():
        exported = program.module()(input_values=input_values, attention_mask=mask)
        expected = model(input_values, mask)
        alone = model(input_values[:1, :, :101])
    assert max_abs_diff(exported.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
    assert max_abs_diff(exported.pooler_output[0], alone.pooler_output[0]) <= TOLERANCE
    assert bool((exported.last_hidden_state[0, 25:] == 0).all())


def test_chunked_layout_masks_keys_of_the_last_chunk():
    sequences = DashengChunkedSequences(torch.tensor([600, 3]), 2, 600, 252)
    assert sequences.num_chunks == 3
    # Clip 0: 252, 252, 96 real tokens; clip 1: 3 real tokens, then two chunks with none.
    assert sequences.key_padding_mask.sum(-1).tolist() == [252, 252, 96, 3, 0, 0]
    tokens = torch.randn(2, 600, 8)
    packed = sequences.pack(tokens)
    assert packed.shape == (2 * 756, 8)
    unpacked = sequences.unpack(packed)
    valid = torch.arange(600)[None, :] < torch.tensor([600, 3])[:, None]
    assert torch.equal(unpacked, torch.where(valid[..., None], tokens, 0.0))


def test_output_attentions_is_refused_under_export(tiny_pair):
    _, model = tiny_pair
    with pytest.raises(Exception, match="output_attentions=True cannot be exported"):
        torch.export.export(model, (torch.randn(1, 64, 100),), {"output_attentions": True})
