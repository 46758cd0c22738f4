"""Padding-free batches: real tokens only through the blocks, attention backends, gradients, compile."""

from __future__ import annotations

import functools

import pytest
import torch
from dasheng_hf import DashengForAudioClassification, DashengModel
from dasheng_hf.modeling_dasheng import DashengPackedSequences
from helpers import concatenated_fsdd, fsdd_clip, hf_state_dict, max_abs_diff, samples_for_frames, tiny_config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TOLERANCE = 1e-4


@functools.cache
def _mixed_clips() -> tuple[torch.Tensor, ...]:
    return (
        concatenated_fsdd(samples_for_frames(3000)),
        fsdd_clip(5),
        concatenated_fsdd(samples_for_frames(1010), start=7),
        torch.zeros(480).add_(0.01),
    )


def mixed_clips() -> list[torch.Tensor]:
    """A 3-chunk clip (2 full + 246 tokens), a sub-second clip, a chunk and a bit, and the shortest clip."""
    return [clip.clone() for clip in _mixed_clips()]


def attention_backends():
    backends = ["eager", "sdpa"]
    try:  # flex attention compiles a CPU kernel; only where this torch and compiler allow it
        from torch.nn.attention.flex_attention import flex_attention

        query = torch.randn(1, 1, 8, 16)
        torch.compile(flex_attention)(query, query, query)
        backends.append("flex_attention")
    except Exception:  # noqa: BLE001 - any failure means the backend is unavailable here
        pass
    return backends


def test_split_into_chunks_packs_real_tokens_longest_first():
    sequences = DashengPackedSequences.split_into_chunks([600, 3, 252, 0], 600, 252, torch.device("cpu"))
    # Clip 0: 252, 252, 96; clip 1: 3; clip 2: 252; clip 3: nothing (no real token, no chunk).
    assert sequences.lengths == [252, 252, 252, 96, 3]
    assert list(zip(sequences.clip_index, sequences.chunk_index)) == [(0, 0), (0, 1), (2, 0), (0, 2), (1, 0)]
    assert sequences.groups == [(0, 3, 252), (3, 1, 96), (4, 1, 3)]
    assert sequences.token_index[252 * 2 : 252 * 2 + 2].tolist() == [1200, 1201]
    assert sequences.cu_seqlens(torch.device("cpu")).tolist() == [0, 252, 504, 756, 852, 855]
    tokens = torch.randn(4, 600, 8)
    unpacked = sequences.unpack(sequences.pack(tokens))
    valid = torch.arange(600)[None, :] < torch.tensor([600, 3, 252, 0])[:, None]
    assert torch.equal(unpacked, torch.where(valid[..., None], tokens, 0.0))
    # Unpadded single clip: the packed order is the source's own order, nothing is gathered.
    assert DashengPackedSequences.split_into_chunks([600], 600, 252, torch.device("cpu")).token_index is None


def test_padding_is_never_computed(tiny_pair, feature_extractor):
    _, model = tiny_pair
    clips = mixed_clips()
    inputs = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    seen = []
    handle = model.encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    assert seen == [(int(model.num_valid_tokens(inputs.attention_mask).sum()), 64)]


@pytest.mark.parametrize("attn_implementation", attention_backends())
def test_mixed_batch_matches_clips_alone(reference_tiny, feature_extractor, attn_implementation):
    model = DashengModel(tiny_config(attn_implementation=attn_implementation)).eval()
    model.load_state_dict(hf_state_dict(reference_tiny))
    clips = mixed_clips()
    inputs = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        batched = model(**inputs)
        valid = model.num_valid_tokens(inputs.attention_mask)
        for index, clip in enumerate(clips):
            expected = reference_tiny(clip[None])
            count = int(valid[index])
            assert max_abs_diff(batched.last_hidden_state[index, :count], expected[0]) <= TOLERANCE
            assert max_abs_diff(batched.pooler_output[index], expected[0].mean(0)) <= TOLERANCE
            assert bool((batched.last_hidden_state[index, count:] == 0).all())


def test_gradients_of_a_mixed_batch_equal_those_of_its_clips(tiny_pair, feature_extractor):
    """Training on a padded batch gives the gradients of the clips alone: padding neither costs nor leaks."""
    _, model = tiny_pair
    trained = DashengForAudioClassification(tiny_config(num_labels=3)).train()
    trained.load_state_dict(model.state_dict(), strict=False)
    clips, labels = mixed_clips(), torch.tensor([0, 2, 1, 2])
    inputs = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    trained(**inputs, labels=labels).loss.mul(len(clips)).backward()
    batched = {name: parameter.grad.clone() for name, parameter in trained.named_parameters()}
    trained.zero_grad()
    for clip, label in zip(clips, labels):
        alone = feature_extractor(clip, sampling_rate=16000, return_tensors="pt")
        trained(**alone, labels=label[None]).loss.backward()
    for name, parameter in trained.named_parameters():
        assert torch.isfinite(batched[name]).all(), name
        assert max_abs_diff(batched[name], parameter.grad) <= 1e-5, name


def test_set_attn_implementation_switches_the_running_model(tiny_pair, feature_extractor):
    _, model = tiny_pair
    switched = DashengModel(tiny_config(attn_implementation="sdpa")).eval()
    switched.load_state_dict(model.state_dict())
    inputs = feature_extractor(mixed_clips(), sampling_rate=16000, return_tensors="pt")
    calls = []

    def counting_eager(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    with torch.no_grad():
        expected = switched(**inputs).last_hidden_state
        switched.set_attn_implementation("eager")
        assert switched.config._attn_implementation == "eager"
        assert all(block.attn.config._attn_implementation == "eager" for block in switched.encoder.blocks)
        assert max_abs_diff(switched(**inputs).last_hidden_state, expected) <= 1e-5
        ALL_ATTENTION_FUNCTIONS["dasheng_test_counting"] = counting_eager
        try:
            switched.config._attn_implementation = "dasheng_test_counting"
            assert max_abs_diff(switched(**inputs).last_hidden_state, expected) <= 1e-5
        finally:
            del ALL_ATTENTION_FUNCTIONS["dasheng_test_counting"]
    # One call per block and per run of equal-length chunks: 3 x 252, 246, 13 and 1 tokens.
    assert [tuple(shape) for shape in calls[:4]] == [(3, 4, 252, 16), (1, 4, 246, 16), (1, 4, 13, 16), (1, 4, 1, 16)]
    assert calls[4:] == calls[:4]


def test_sdpa_runs_eager_kernel_for_cpu_bf16_training(tiny_pair, feature_extractor, monkeypatch):
    """
    `sdpa` in training mode on CPU with bf16 inputs runs the eager kernel (faster there); in float32 or float16, or
    in eval mode, SDPA runs. Gradients agree with SDPA's.
    """
    import dasheng_hf.modeling_dasheng_layers as layers

    model = DashengModel(tiny_config(attn_implementation="sdpa")).train()
    model.load_state_dict(tiny_pair[1].state_dict())
    inputs = feature_extractor(mixed_clips()[:2], sampling_rate=16000, return_tensors="pt")
    calls = {"eager": [], "sdpa": []}
    eager, sdpa = layers.eager_attention_forward, ALL_ATTENTION_FUNCTIONS["sdpa"]

    def counting_eager(module, query, *args, **kwargs):
        calls["eager"].append(query.dtype)
        return eager(module, query, *args, **kwargs)

    def counting_sdpa(module, query, *args, **kwargs):
        calls["sdpa"].append(query.dtype)
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(layers, "eager_attention_forward", counting_eager)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", counting_sdpa)

    def kernels_of(dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Gradients of a training step under autocast to `dtype` (None: float32); `calls` holds the kernels."""
        calls["eager"].clear()
        calls["sdpa"].clear()
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(**inputs).pooler_output.float().square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)
    assert set(calls["sdpa"]) == {torch.bfloat16} and not calls["eager"]
    model.train()
    kernels_of(None)
    assert set(calls["sdpa"]) == {torch.float32} and not calls["eager"]
    kernels_of(torch.float16)
    assert set(calls["sdpa"]) == {torch.float16} and not calls["eager"]
    eager_gradients = kernels_of(torch.bfloat16)
    assert set(calls["eager"]) == {torch.bfloat16} and not calls["sdpa"]
    monkeypatch.setattr(layers, "_is_cpu_bf16_training", lambda module, query: False)
    sdpa_gradients = kernels_of(torch.bfloat16)
    assert set(calls["sdpa"]) == {torch.bfloat16} and not calls["eager"]
    for name, grad in eager_gradients.items():
        scale = sdpa_gradients[name].abs().max().clamp_min(1e-6)
        assert max_abs_diff(grad, sdpa_gradients[name]) / scale <= 0.05, name


def test_variable_length_entry_gets_cu_seqlens(tiny_pair, feature_extractor):
    """FlashAttention backends get all chunks in one call with `cu_seqlens`; emulated here with SDPA per sequence."""
    _, model = tiny_pair
    received = []

    def varlen_reference(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, **kwargs):
        received.append((cu_seq_lens_q.tolist(), max_length_q))
        bounds = cu_seq_lens_q.tolist()
        outputs = [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=kwargs["scaling"]
            )
            for start, end in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outputs, dim=2).transpose(1, 2), None

    inputs = feature_extractor(mixed_clips(), sampling_rate=16000, return_tensors="pt")
    flash = DashengModel(tiny_config()).eval()
    flash.load_state_dict(model.state_dict())
    ALL_ATTENTION_FUNCTIONS["flash_dasheng_test"] = varlen_reference
    try:
        flash.config._attn_implementation = "flash_dasheng_test"
        with torch.no_grad():
            result = flash(**inputs).last_hidden_state
    finally:
        del ALL_ATTENTION_FUNCTIONS["flash_dasheng_test"]
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    assert max_abs_diff(result, expected) <= 1e-5
    chunks = [252, 252, 252, 246, 13, 1]  # 750 = 2 x 252 + 246 tokens, 13, 252, 1
    expected_bounds = torch.tensor([0] + chunks).cumsum(0).tolist()
    assert received == [(expected_bounds, 252)] * 2


def test_returned_hidden_states_and_attentions_receive_gradients(tiny_pair, feature_extractor):
    """As Transformers' common test_retain_grad_hidden_states_attentions: the returned tensors are on the path."""
    _, model = tiny_pair
    trained = DashengModel(tiny_config()).train()
    trained.load_state_dict(model.state_dict())
    for clips in (0.1 * torch.randn(16000), mixed_clips()):
        inputs = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
        outputs = trained(**inputs, output_hidden_states=True, output_attentions=True)
        hidden, attentions = outputs.hidden_states[0], outputs.attentions[0]
        hidden.retain_grad()
        attentions.retain_grad()
        outputs.last_hidden_state.flatten()[0].backward()
        assert hidden.grad is not None and attentions.grad is not None
        assert attentions.shape[2:] == (4, 252, 252)


def test_compiled_model_has_no_graph_break_on_unpadded_input(tiny_pair, feature_extractor):
    _, model = tiny_pair
    inputs = feature_extractor(
        [0.1 * torch.randn(samples_for_frames(1300))] * 2, sampling_rate=16000, return_tensors="pt"
    )
    inputs.pop("attention_mask", None)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        result = compiled(**inputs).last_hidden_state
        assert max_abs_diff(result, model(**inputs).last_hidden_state) <= 1e-5
