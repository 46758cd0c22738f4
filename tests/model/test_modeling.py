"""DashengModel against the original dasheng==0.0.9 encoder, on real speech, one clip at a time."""

from __future__ import annotations

import pytest
import torch
from dasheng_hf import DashengConfig, DashengForAudioClassification, DashengModel
from helpers import (
    concatenated_fsdd,
    fsdd_clip,
    hf_state_dict,
    make_reference_encoder,
    max_abs_diff,
    samples_for_frames,
    tiny_config,
)

TOLERANCE = 1e-4


def run_ours(model, extractor, waveforms, **kwargs):
    inputs = extractor(waveforms, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs, **kwargs), inputs


@pytest.mark.parametrize(
    "num_samples",
    [
        480,  # the shortest input: 4 frames, one token
        7000,  # a single FSDD-length clip
        samples_for_frames(1008),  # exactly one chunk
        samples_for_frames(1009),  # one chunk and a frame (still 252 tokens)
        samples_for_frames(2016),  # exactly two chunks: the old port dropped the second
        samples_for_frames(2020),  # two chunks and a one-token tail
        25 * 16000,  # 25 s: two chunks and a partial third
        61 * 16000 + 37,  # 61 s: six chunks and a partial seventh
    ],
)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_reference_on_real_speech(tiny_pair, feature_extractor, num_samples, attn_implementation):
    reference, model = tiny_pair
    model.config._attn_implementation = attn_implementation
    waveform = concatenated_fsdd(num_samples)
    with torch.no_grad():
        expected = reference(waveform[None])
    outputs, inputs = run_ours(model, feature_extractor, waveform)
    frames = num_samples // 160 + 1
    assert inputs.input_values.shape == (1, 64, frames)
    assert outputs.last_hidden_state.shape == expected.shape == (1, frames // 4, 64)
    assert max_abs_diff(outputs.last_hidden_state, expected) <= TOLERANCE
    assert max_abs_diff(outputs.pooler_output, expected.mean(1)) <= TOLERANCE
    model.config._attn_implementation = "sdpa"


def test_base_size_matches_reference(feature_extractor):
    """One full-size parity test: dasheng-base (768 wide, 12 layers) on 25 s of speech."""
    reference = make_reference_encoder(embed_dim=768, depth=12, num_heads=12, seed=3)
    model = DashengModel(DashengConfig.from_preset("dasheng-base"))
    model.load_state_dict(hf_state_dict(reference), strict=True)
    model.eval()
    waveform = concatenated_fsdd(25 * 16000, start=40)
    with torch.no_grad():
        expected = reference(waveform[None])
    outputs, _ = run_ours(model, feature_extractor, waveform)
    assert outputs.last_hidden_state.shape == (1, 625, 768)
    assert max_abs_diff(outputs.last_hidden_state, expected) <= TOLERANCE


def test_hour_long_input(tiny_pair, feature_extractor):
    """An hour and a second of audio runs and matches the original (tiny width)."""
    reference, model = tiny_pair
    waveform = 0.1 * torch.randn(3601 * 16000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(waveform[None])
    outputs, _ = run_ours(model, feature_extractor, waveform)
    assert outputs.last_hidden_state.shape == (1, 90025, 64)
    assert max_abs_diff(outputs.last_hidden_state, expected) <= TOLERANCE


def test_batch_invariance_and_padding(tiny_pair, feature_extractor):
    """Each clip's outputs are the same alone and in a padded batch; padded tokens are zeros."""
    _, model = tiny_pair
    clips = [
        concatenated_fsdd(samples_for_frames(3000)),  # 750 tokens: 3 chunks (2 full + 246)
        fsdd_clip(5),  # under a second: its 2nd and 3rd chunks are pure padding
        concatenated_fsdd(samples_for_frames(1010), start=7),  # 252 tokens + 2 frames
        torch.zeros(480).add_(0.01),  # the shortest clip
    ]
    batched, inputs = run_ours(model, feature_extractor, clips)
    assert "attention_mask" in inputs
    valid = model.num_valid_tokens(inputs.attention_mask)
    assert valid.tolist() == [(c.numel() // 160 + 1) // 4 for c in clips]
    for index, clip in enumerate(clips):
        alone, _ = run_ours(model, feature_extractor, clip)
        count = int(valid[index])
        assert max_abs_diff(batched.last_hidden_state[index, :count], alone.last_hidden_state[0]) <= TOLERANCE
        assert max_abs_diff(batched.pooler_output[index], alone.pooler_output[0]) <= TOLERANCE
        assert bool((batched.last_hidden_state[index, count:] == 0).all())


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padded_tokens_have_finite_gradients(feature_extractor, attn_implementation):
    model = DashengModel(tiny_config(attn_implementation=attn_implementation)).train()
    clips = [0.1 * torch.randn(samples_for_frames(2100)), 0.1 * torch.randn(1000)]
    inputs = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    outputs = model(**inputs)
    assert torch.isfinite(outputs.last_hidden_state).all()
    (outputs.last_hidden_state.sum() + outputs.pooler_output.sum()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_eager_and_sdpa_agree_on_padded_batch(reference_tiny, feature_extractor):
    clips = [0.1 * torch.randn(samples_for_frames(1500)), 0.1 * torch.randn(3000), 0.1 * torch.randn(40000)]
    results = {}
    for implementation in ("eager", "sdpa"):
        model = DashengModel(tiny_config(attn_implementation=implementation)).eval()
        model.load_state_dict(hf_state_dict(reference_tiny))
        assert model.config._attn_implementation == implementation
        results[implementation], _ = run_ours(model, feature_extractor, clips)
    assert max_abs_diff(results["eager"].last_hidden_state, results["sdpa"].last_hidden_state) <= TOLERANCE


def test_outputs_hidden_states_and_attentions(tiny_pair, feature_extractor):
    _, model = tiny_pair
    clips = [0.1 * torch.randn(samples_for_frames(1100)), 0.1 * torch.randn(16000)]
    outputs, inputs = run_ours(model, feature_extractor, clips, output_hidden_states=True, output_attentions=True)
    num_tokens = 1100 // 4
    assert len(outputs.hidden_states) == model.config.num_hidden_layers + 1
    assert all(state.shape == (2, num_tokens, 64) for state in outputs.hidden_states)
    final = model.encoder.norm(outputs.hidden_states[-1]) * (outputs.last_hidden_state != 0).any(-1, keepdim=True)
    assert max_abs_diff(final, outputs.last_hidden_state) <= 1e-5
    assert len(outputs.attentions) == model.config.num_hidden_layers
    weights = outputs.attentions[0]
    assert weights.shape == (2, 2, 4, 252, 252)
    # Clip 0: chunk 1 has 23 tokens, padded to 252; clip 1: 25 valid tokens in chunk 0, chunk 1 is pure padding.
    torch.testing.assert_close(weights[0, 1, :, :23, :23].sum(-1), torch.ones(4, 23))
    assert bool((weights[0, 1, :, 23:, :] == 0).all()) and bool((weights[0, 1, :, :, 23:] == 0).all())
    torch.testing.assert_close(weights[1, 0, :, :25, :].sum(-1), torch.ones(4, 25))
    assert bool((weights[1, 0, :, :, 25:] == 0).all()) and bool((weights[1, 1] == 0).all())
    # Without asking, hidden_states is the last hidden state (the Hub card's contract).
    plain, _ = run_ours(model, feature_extractor, clips)
    assert plain.hidden_states is plain.last_hidden_state and plain.attentions is None


def test_train_mode_keeps_running_statistics(tiny_pair, feature_extractor):
    """BatchNorm uses and keeps its running statistics in training mode unless the config says otherwise."""
    reference, model = tiny_pair
    inputs = feature_extractor(
        [0.1 * torch.randn(8000), 0.1 * torch.randn(16000)], sampling_rate=16000, return_tensors="pt"
    )
    trained = DashengModel(tiny_config()).train()
    trained.load_state_dict(model.state_dict())
    stats = trained.encoder.init_bn[1].running_mean.clone()
    train_out = trained(**inputs).last_hidden_state
    assert torch.equal(trained.encoder.init_bn[1].running_mean, stats)
    with torch.no_grad():
        assert max_abs_diff(train_out, model(**inputs).last_hidden_state) <= 1e-6

    batch_stats = DashengModel(tiny_config(use_batch_statistics=True)).train()
    batch_stats.load_state_dict(model.state_dict())
    batch_stats.freeze_encoder()  # frozen: running statistics, never updated
    batch_stats(**inputs)
    assert torch.equal(batch_stats.encoder.init_bn[1].running_mean, stats)
    batch_stats.encoder.requires_grad_(True)
    batch_stats(**inputs)
    assert not torch.equal(batch_stats.encoder.init_bn[1].running_mean, stats)


def test_padding_values_never_leak(tiny_pair, feature_extractor):
    """Whatever the padded frames hold (even -inf), a clip's outputs only depend on its real frames."""
    _, model = tiny_pair
    clips = [0.1 * torch.randn(samples_for_frames(1400)), 0.1 * torch.randn(12000)]
    inputs = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    expected = model(**inputs).last_hidden_state
    poisoned = inputs.input_values.masked_fill(inputs.attention_mask[:, None, :] == 0, float("-inf"))
    with torch.no_grad():
        outputs = model(poisoned, attention_mask=inputs.attention_mask)
    assert torch.isfinite(outputs.last_hidden_state).all() and torch.isfinite(outputs.pooler_output).all()
    assert max_abs_diff(outputs.last_hidden_state, expected) <= 1e-5


def test_dropout_and_drop_path_only_in_training(tiny_pair, feature_extractor):
    _, model = tiny_pair
    config = tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.2)
    noisy = DashengModel(config)
    noisy.load_state_dict(model.state_dict())
    inputs = feature_extractor(0.1 * torch.randn(16000), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        assert max_abs_diff(noisy.eval()(**inputs).last_hidden_state, model(**inputs).last_hidden_state) <= 1e-6
        assert max_abs_diff(noisy.train()(**inputs).last_hidden_state, model(**inputs).last_hidden_state) > 1e-3


def test_gradient_checkpointing_gives_same_gradients(tiny_pair, feature_extractor):
    _, model = tiny_pair
    inputs = feature_extractor(
        [0.1 * torch.randn(40000), 0.1 * torch.randn(9000)], sampling_rate=16000, return_tensors="pt"
    )
    gradients = []
    for checkpointing in (False, True):
        copy = DashengModel(tiny_config()).train()
        copy.load_state_dict(model.state_dict())
        if checkpointing:  # Transformers 5 renamed it; 4.57 only has the old name
            getattr(copy, "activation_checkpointing_enable", copy.gradient_checkpointing_enable)()
        calls = []
        copy.encoder.blocks[0].mlp.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        copy(**inputs).pooler_output.pow(2).sum().backward()
        gradients.append(copy.encoder.blocks[0].attn.qkv.weight.grad.clone())
        # Checkpointing runs each block forward again during backward.
        assert len(calls) == (2 if checkpointing else 1)
    assert max_abs_diff(*gradients) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_on_long_input(tiny_pair, feature_extractor, dtype):
    _, model = tiny_pair
    half = DashengModel(tiny_config()).eval()
    half.load_state_dict(model.state_dict())
    half.to(dtype)
    clips = [0.1 * torch.randn(samples_for_frames(2600)), 0.1 * torch.randn(20000)]
    full, inputs = run_ours(model, feature_extractor, clips)
    with torch.no_grad():
        low = half(**inputs)
    assert low.last_hidden_state.dtype == dtype
    assert torch.isfinite(low.last_hidden_state).all()
    similarity = torch.nn.functional.cosine_similarity(low.pooler_output.float(), full.pooler_output, dim=-1)
    assert similarity.min() >= 0.999


def test_bf16_autocast(tiny_pair, feature_extractor):
    _, model = tiny_pair
    full, inputs = run_ours(model, feature_extractor, 0.1 * torch.randn(samples_for_frames(1300)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**inputs)
    similarity = torch.nn.functional.cosine_similarity(low.pooler_output.float(), full.pooler_output, dim=-1)
    assert similarity.min() >= 0.999


def test_sliced_inference_matches_one_pass(tiny_pair, feature_extractor):
    """Chunks go through in slices of max_chunks_per_pass without gradients; the result does not change."""
    _, model = tiny_pair
    inputs = feature_extractor(0.1 * torch.randn(samples_for_frames(8000)), sampling_rate=16000, return_tensors="pt")
    sliced = DashengModel(tiny_config(max_chunks_per_pass=2)).eval()
    sliced.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        assert max_abs_diff(sliced(**inputs).last_hidden_state, expected) <= 1e-5


def test_head_logits_and_loss(tiny_pair, feature_extractor):
    """With outputdim the original head's pre-sigmoid output is `logits`; labels give config.loss."""
    _, model = tiny_pair
    headed = DashengModel(tiny_config(outputdim=5)).eval()
    missing, unexpected = headed.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == [
        "outputlayer.0.bias",
        "outputlayer.0.weight",
        "outputlayer.1.bias",
        "outputlayer.1.weight",
    ]
    inputs = feature_extractor(0.1 * torch.randn(16000), sampling_rate=16000, return_tensors="pt")
    outputs = headed(**inputs, labels=torch.tensor([3]))
    expected = headed.outputlayer[1](headed.outputlayer[0](outputs.pooler_output))
    assert outputs.logits.shape == (1, 5) and max_abs_diff(outputs.logits, expected) == 0
    targets = torch.nn.functional.one_hot(torch.tensor([3]), 5).float()
    torch.testing.assert_close(
        outputs.loss, torch.nn.functional.binary_cross_entropy(outputs.logits.sigmoid(), targets)
    )
    headed.config.loss = "CrossEntropyLoss"
    outputs = headed(**inputs, labels=torch.tensor([3]))
    torch.testing.assert_close(outputs.loss, torch.nn.functional.cross_entropy(outputs.logits, torch.tensor([3])))
    headed.config.loss = "MSELoss"
    with pytest.raises(ValueError, match="config.loss must be"):
        headed(**inputs, labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="outputdim"):
        model(**inputs, labels=torch.tensor([1]))


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification"])
def test_audio_classification_losses(tiny_pair, feature_extractor, problem_type):
    _, model = tiny_pair
    classifier = DashengForAudioClassification(tiny_config(num_labels=3, problem_type=problem_type))
    classifier.load_state_dict(model.state_dict(), strict=False)
    classifier.freeze_encoder()
    assert all(not p.requires_grad for p in classifier.encoder.parameters())
    inputs = feature_extractor(
        [0.1 * torch.randn(16000), 0.1 * torch.randn(9000)], sampling_rate=16000, return_tensors="pt"
    )
    labels = torch.tensor([0, 2]) if problem_type.startswith("single") else torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    outputs = classifier(**inputs, labels=labels)
    assert outputs.logits.shape == (2, 3)
    if problem_type.startswith("single"):
        expected = torch.nn.functional.cross_entropy(outputs.logits, labels)
    else:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits, labels)
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert classifier.outputlayer[1].weight.grad is not None
    assert classifier.encoder.blocks[0].mlp.fc1.weight.grad is None


def test_input_validation(tiny_pair, feature_extractor):
    _, model = tiny_pair
    inputs = feature_extractor(
        [0.1 * torch.randn(16000), 0.1 * torch.randn(9000)], sampling_rate=16000, return_tensors="pt"
    )
    with pytest.raises(ValueError, match="waveform"):
        model(torch.randn(1, 16000))
    with pytest.raises(ValueError, match="swapped"):
        model(inputs.input_values.transpose(1, 2))
    with pytest.raises(ValueError, match="at least 4"):
        model(torch.randn(1, 64, 3))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(inputs.input_values, attention_mask=inputs.attention_mask[:, :-1])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(inputs.input_values, attention_mask=inputs.attention_mask[:1])
    with pytest.raises(ValueError, match="right padding"):
        model(inputs.input_values, attention_mask=inputs.attention_mask.flip(-1))


def test_inputs_as_arrays_and_lists(tiny_pair, feature_extractor):
    """Masks and labels as lists or numpy arrays, int32 labels and numpy features work like tensors."""
    _, model = tiny_pair
    classifier = DashengForAudioClassification(tiny_config(num_labels=3))
    classifier.load_state_dict(model.state_dict(), strict=False)
    inputs = feature_extractor(
        [0.1 * torch.randn(16000), 0.1 * torch.randn(9000)], sampling_rate=16000, return_tensors="pt"
    )
    expected = classifier(**inputs, labels=torch.tensor([0, 2]))
    for mask, labels in (
        (inputs.attention_mask.tolist(), [0, 2]),
        (inputs.attention_mask.numpy(), torch.tensor([0, 2], dtype=torch.int32).numpy()),
        (inputs.attention_mask.bool(), torch.tensor([0, 2], dtype=torch.int32)),
    ):
        outputs = classifier(inputs.input_values.numpy(), attention_mask=mask, labels=labels)
        assert max_abs_diff(outputs.logits, expected.logits) <= 1e-6
        assert max_abs_diff(outputs.loss, expected.loss) <= 1e-6
    headed = DashengModel(tiny_config(outputdim=3, loss="CrossEntropyLoss"))
    assert headed(**inputs, labels=torch.tensor([0, 2], dtype=torch.int32)).loss.isfinite()


def test_refuses_masks_that_are_not_zero_or_one_and_empty_batches(tiny_pair, feature_extractor):
    _, model = tiny_pair
    inputs = feature_extractor(
        [0.1 * torch.randn(16000), 0.1 * torch.randn(9000)], sampling_rate=16000, return_tensors="pt"
    )
    scaled = inputs.attention_mask.float() * 1.9  # 1.9 on real frames: .long() would have read it as 1
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(inputs.input_values, attention_mask=scaled)
    half = inputs.attention_mask.float().masked_fill(inputs.attention_mask == 0, 0.5)
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(inputs.input_values, attention_mask=half)
    with pytest.raises(ValueError, match="empty batch"):
        model(inputs.input_values[:0])
    with pytest.raises(ValueError, match="floating point"):
        model(inputs.input_values.long())
