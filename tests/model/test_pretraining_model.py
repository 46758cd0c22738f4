"""DashengForPreTraining against the original `AudioTransformerMAE` (dasheng==0.0.9) on real speech."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from unittest import mock

import pytest
import torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor, DashengForPreTraining
from helpers import concatenated_fsdd, hf_state_dict, make_reference_encoder, max_abs_diff, samples_for_frames
from safetensors.torch import save_file

TOLERANCE = 1e-5
TEN_SECONDS = 160000  # 1001 frames, 250 tokens: the training crop


def make_reference_mae(
    width: int = 64,
    depth: int = 2,
    heads: int = 4,
    decoder_width: int = 32,
    decoder_depth: int = 2,
    decoder_heads: int = 4,
    seed: int = 0,
):
    """The original MAE with group masking, every tensor perturbed (decoder, BatchNorm statistics and norms too)."""
    from dasheng.train.models import AudioTransformerMAE, AudioTransformerMAE_Decoder, AudioTransformerMAE_Encoder

    torch.manual_seed(seed)
    encoder = AudioTransformerMAE_Encoder(embed_dim=width, depth=depth, num_heads=heads, group_masking=True)
    decoder = AudioTransformerMAE_Decoder(
        input_dim=width,
        outputdim=256,
        embed_dim=decoder_width,
        depth=decoder_depth,
        num_heads=decoder_heads,
        num_patches=encoder.patch_embed.num_patches,
    )
    model = AudioTransformerMAE(encoder, decoder)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.startswith("encoder.front_end.") or not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 400 + 50)
            elif name.endswith("running_mean"):
                tensor.copy_(noise * 10 - 40)
            elif name.endswith("weight") and tensor.ndim == 1:
                tensor.copy_(1.0 + 0.2 * noise)
            else:
                tensor.add_(0.02 * noise)
    return model.eval()


def pretraining_config(width=64, depth=2, heads=4, decoder_width=32, decoder_depth=2, decoder_heads=4, **kwargs):
    return DashengConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        decoder_hidden_size=decoder_width,
        decoder_num_hidden_layers=decoder_depth,
        decoder_num_attention_heads=decoder_heads,
        **kwargs,
    )


def without_front_end(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state_dict.items() if not key.startswith("encoder.front_end.")}


@pytest.fixture(scope="module")
def mae_pair():
    """(original MAE, DashengForPreTraining with the same weights), both in eval mode."""
    reference = make_reference_mae()
    model = DashengForPreTraining(pretraining_config())
    result = model.load_state_dict(without_front_end(reference.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference, model.eval()


@pytest.fixture(scope="module")
def speech():
    """Two 10 s clips of real speech at 16 kHz, `(2, 160000)`."""
    return torch.stack([concatenated_fsdd(TEN_SECONDS, start=0), concatenated_fsdd(TEN_SECONDS, start=9)])


def run_reference(reference, waveforms: torch.Tensor, noise: torch.Tensor):
    """The original forward with `torch.rand` returning `noise`: (predictions, loss, mask, ids_restore)."""
    with mock.patch("torch.rand", lambda *args, **kwargs: noise.clone()):
        _, _, ids_restore = reference.encoder(waveforms)  # the same masking as in the forward below
        predictions, targets, mask = reference(waveforms)
    return predictions, reference.loss_fn(predictions, targets, mask), mask, ids_restore


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_original(mae_pair, speech, attn_implementation):
    reference, model = mae_pair
    model.config._attn_implementation = attn_implementation
    noise = torch.rand(2, 125, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predictions, loss, mask, ids_restore = run_reference(reference, speech, noise)
        outputs = model(reference.encoder.front_end(speech), noise=noise)
    model.config._attn_implementation = "sdpa"
    assert outputs.logits.shape == (2, 250, 256) and outputs.mask.shape == (2, 250)
    assert torch.equal(outputs.mask, mask) and torch.equal(outputs.ids_restore, ids_restore)
    assert int((outputs.mask == 0).sum(1).unique()) == 62  # int(250 * 0.25) visible tokens per clip
    assert max_abs_diff(outputs.logits, predictions) <= TOLERANCE
    assert abs(float(outputs.loss) - float(loss)) <= TOLERANCE
    assert outputs.loss.dtype == torch.float32


def test_training_step_matches_original(speech):
    """Train mode with batch statistics (the original's BatchNorm in training): loss and every gradient agree."""
    reference = make_reference_mae(seed=5).train()
    model = DashengForPreTraining(pretraining_config(use_batch_statistics=True)).train()
    model.load_state_dict(without_front_end(reference.state_dict()), strict=True)
    noise = torch.rand(2, 125, generator=torch.Generator().manual_seed(4))
    spectrogram = reference.encoder.front_end(speech).detach()
    with mock.patch("torch.rand", lambda *args, **kwargs: noise.clone()):
        loss = reference(speech, return_loss=True)
    outputs = model(spectrogram, noise=noise)
    assert abs(float(outputs.loss.detach()) - float(loss.detach())) <= TOLERANCE
    loss.backward()
    outputs.loss.backward()
    ours = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        assert torch.isfinite(ours[name].grad).all(), name
        if name.startswith("encoder.init_bn."):
            continue  # see below
        scale = float(parameter.grad.abs().max()) + 1e-8
        assert max_abs_diff(ours[name].grad, parameter.grad) <= 1e-4 * scale, name
    assert torch.allclose(model.encoder.init_bn[1].running_mean, reference.encoder.init_bn[1].running_mean)
    # The original's autograd gives its spectrogram BatchNorm gradients that disagree with finite differences of
    # its own loss (in float64 too); ours are checked against those finite differences.
    reference = reference.double()
    batch_norm, step = reference.encoder.init_bn[1], 1e-5
    for parameter, ours_grad in (
        (batch_norm.bias, ours["encoder.init_bn.1.bias"].grad),
        (batch_norm.weight, ours["encoder.init_bn.1.weight"].grad),
    ):
        for index in (0, 1):
            losses = []
            for sign in (1, -1):
                with torch.no_grad(), mock.patch("torch.rand", lambda *args, **kwargs: noise.double()):
                    parameter[index] += sign * step
                    losses.append(float(reference(speech.double(), return_loss=True)))
                    parameter[index] -= sign * step
            finite_difference = (losses[0] - losses[1]) / (2 * step)
            assert abs(float(ours_grad[index]) - finite_difference) <= 1e-3 * abs(finite_difference) + 1e-8


def test_base_width_matches_original(speech):
    """dasheng-base width (768, 12 heads) with the released 512/16 decoder, at two blocks each."""
    reference = make_reference_mae(768, 2, 12, 512, 2, 16, seed=7)
    model = DashengForPreTraining(pretraining_config(768, 2, 12, 512, 2, 16)).eval()
    model.load_state_dict(without_front_end(reference.state_dict()), strict=True)
    noise = torch.rand(1, 125, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        predictions, loss, mask, ids_restore = run_reference(reference, speech[:1], noise)
        outputs = model(reference.encoder.front_end(speech[:1]), noise=noise)
    assert torch.equal(outputs.mask, mask) and torch.equal(outputs.ids_restore, ids_restore)
    assert max_abs_diff(outputs.logits, predictions) <= TOLERANCE
    assert abs(float(outputs.loss) - float(loss)) <= TOLERANCE


def test_group_masking_by_hand():
    """Groups of two, an odd last token as its own group, the kept count per clip's real tokens, padding last."""
    model = DashengForPreTraining(pretraining_config(mask_ratio=0.5))
    noise = torch.tensor([[0.3, 0.9, 0.1, 0.5], [0.3, 0.9, 0.1, 0.0]])
    lengths = torch.tensor([7, 5])  # groups {0,1} {2,3} {4,5} {6} and {0,1} {2,3} {4}, then padding 5, 6
    ids_shuffle, ids_restore, num_keep, mask = model.masking(noise, lengths, 7)
    assert ids_shuffle.tolist() == [[4, 5, 0, 1, 6, 2, 3], [4, 0, 1, 2, 3, 5, 6]]
    assert num_keep.tolist() == [3, 2]  # int(7 * 0.5), int(5 * 0.5)
    assert mask.tolist() == [[0, 1, 1, 1, 0, 0, 1], [0, 1, 1, 1, 0, 1, 1]]
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(7).expand(2, 7))


def test_padded_batch_equals_clips_alone(mae_pair):
    """Each clip's outputs are the same alone and in a padded batch; padding is never visible, seen, or scored."""
    _, model = mae_pair
    extractor = DashengFeatureExtractor()
    # 10 s, 25 s (three chunks: 252 + 252 + 121 tokens) and 4.3 s (107 tokens: an odd last token).
    clips = [concatenated_fsdd(n, start=s) for n, s in ((TEN_SECONDS, 0), (25 * 16000, 3), (68800, 20))]
    batch = extractor(clips, sampling_rate=16000, return_tensors="pt")
    assert batch.input_values.shape == (3, 64, 2501)
    noise = torch.rand(3, 313, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        outputs = model(**batch, noise=noise)
        # Padded frames changed to anything: nothing real changes, so padding is never attended to or scored.
        garbage = torch.where(batch.attention_mask[:, None, :].bool(), batch.input_values, 1e4)
        outputs_garbage = model(garbage, batch.attention_mask, noise=noise)
    assert outputs.logits.shape == (3, 625, 256)
    assert max_abs_diff(outputs_garbage.logits, outputs.logits) <= 1e-6
    assert abs(float(outputs_garbage.loss) - float(outputs.loss)) <= 1e-6

    total_error, total_removed = 0.0, 0
    for index, clip in enumerate(clips):
        alone = extractor(clip, sampling_rate=16000, return_tensors="pt").input_values
        tokens = alone.shape[-1] // 4
        with torch.no_grad():
            single = model(alone, noise=noise[index : index + 1, : (tokens + 1) // 2])
        assert torch.equal(outputs.mask[index, :tokens], single.mask[0])
        assert torch.equal(outputs.ids_restore[index, :tokens], single.ids_restore[0])
        assert max_abs_diff(outputs.logits[index, :tokens], single.logits[0]) <= TOLERANCE
        assert bool((outputs.mask[index, tokens:] == 1).all()) and bool((outputs.logits[index, tokens:] == 0).all())
        removed = int(single.mask.sum())
        total_error += float(single.loss) * removed
        total_removed += removed
    # Per chunk of real audio: int(n * 0.25) visible tokens.
    assert (outputs.mask == 0).sum(1).tolist() == [62, 63 + 63 + 30, 26]
    assert abs(float(outputs.loss) - total_error / total_removed) <= TOLERANCE


def test_batch_statistics_come_from_real_frames(mae_pair):
    """
    In training with batch statistics (as pretraining runs), BatchNorm's mean and variance come from the real frames
    alone: they equal BatchNorm2d's over the real frames laid end to end, and padded frames change nothing.
    """
    _, trained = mae_pair
    model = DashengForPreTraining(pretraining_config(use_batch_statistics=True)).train()
    model.load_state_dict(trained.state_dict())
    clips = [concatenated_fsdd(n, start=s) for n, s in ((TEN_SECONDS, 0), (68800, 20))]
    batch = DashengFeatureExtractor()(clips, sampling_rate=16000, return_tensors="pt")
    real = batch.attention_mask.bool()
    noise = torch.rand(2, 125, generator=torch.Generator().manual_seed(3))
    bn = model.encoder.init_bn[1]
    start = {name: tensor.clone() for name, tensor in bn.state_dict().items()}

    def step(input_values):
        bn.load_state_dict(start)
        loss = model(input_values, batch.attention_mask, noise=noise).loss.detach()
        return loss, {name: tensor.clone() for name, tensor in bn.state_dict().items()}

    loss, statistics = step(batch.input_values)
    loss_garbage, statistics_garbage = step(torch.where(real[:, None, :], batch.input_values, 1e4))
    assert abs(float(loss) - float(loss_garbage)) <= 1e-6
    for name, tensor in statistics.items():
        assert torch.allclose(tensor, statistics_garbage[name], rtol=0, atol=1e-6), name

    expected = torch.nn.BatchNorm2d(64, eps=bn.eps, momentum=bn.momentum)
    expected.load_state_dict(start)
    end_to_end = torch.cat([clip[:, mask] for clip, mask in zip(batch.input_values, real)], dim=1)
    expected(end_to_end[None, :, None, :])
    assert int(statistics["num_batches_tracked"]) == int(start["num_batches_tracked"]) + 1
    assert max_abs_diff(statistics["running_mean"], expected.running_mean) <= 1e-4
    assert max_abs_diff(statistics["running_var"], expected.running_var) <= 1e-3
    assert not torch.allclose(statistics["running_mean"], start["running_mean"])


def test_batch_statistics_of_a_float16_model_are_finite():
    """A model cast to float16 still sums over many frames in float32: finite outputs and running statistics."""
    from dasheng_hf.modeling_dasheng_layers import DashengSpectrogramBatchNorm

    config = pretraining_config(use_batch_statistics=True)
    spectrogram = torch.randn(4, 64, 1, 1001, generator=torch.Generator().manual_seed(0)) * 10 - 50
    frame_mask = torch.arange(1001)[None, :] < torch.tensor([1001, 1001, 1001, 626])[:, None]
    exact = DashengSpectrogramBatchNorm(config).train()
    half = DashengSpectrogramBatchNorm(config).train().half()
    expected = exact(spectrogram, frame_mask)
    output = half(spectrogram.half(), frame_mask)
    assert output.dtype == torch.float16 and bool(torch.isfinite(output).all())
    real = frame_mask[:, None, None, :].expand_as(expected)
    assert max_abs_diff(output.float()[real], expected[real]) <= 0.05
    assert max_abs_diff(half.running_mean.float(), exact.running_mean) <= 0.05
    assert max_abs_diff(half.running_var.float(), exact.running_var) / float(exact.running_var.max()) <= 1e-2


def test_patchify_is_unfold_and_unpatchify_inverts_it(mae_pair):
    _, model = mae_pair
    spectrogram = torch.randn(2, 64, 1003)  # 250 whole patches and 3 frames the patch embedding drops
    patches = model.patchify(spectrogram)
    unfolded = torch.nn.functional.unfold(spectrogram[:, None], kernel_size=(64, 4), stride=(64, 4)).transpose(1, 2)
    assert patches.shape == (2, 250, 256) and torch.equal(patches, unfolded)
    assert torch.equal(model.unpatchify(patches), spectrogram[..., :1000])
    with pytest.raises(ValueError, match=r"patchify takes \(batch, mel bins, frames\), got shape \(64, 100\)"):
        model.patchify(spectrogram[0, :, :100])
    with pytest.raises(ValueError, match="unpatchify takes"):
        model.unpatchify(patches[..., :128])
    features = DashengFeatureExtractor()(concatenated_fsdd(TEN_SECONDS), sampling_rate=16000, return_tensors="pt")
    outputs = model(**features)
    assert model.unpatchify(outputs.logits).shape == (1, 64, 1000)


def test_long_input_is_chunked(mae_pair):
    """Inputs longer than 252 tokens: each chunk is masked, encoded and decoded as a sequence of its own."""
    _, model = mae_pair
    features = DashengFeatureExtractor()(
        concatenated_fsdd(samples_for_frames(2101), start=30), sampling_rate=16000, return_tensors="pt"
    ).input_values  # 525 tokens: 252 + 252 + 21
    noise = torch.rand(1, 263, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        whole = model(features, noise=noise, output_hidden_states=True, output_attentions=True)
    assert len(whole.hidden_states) == 3 and whole.hidden_states[-1].shape == (3, 63, 64)
    assert whole.attentions[0].shape == (3, 4, 63, 63)
    for start, end in ((0, 252), (252, 504), (504, 525)):
        with torch.no_grad():
            chunk = model(features[..., 4 * start : 4 * end], noise=noise[:, start // 2 : (end + 1) // 2])
        assert torch.equal(whole.mask[:, start:end], chunk.mask)
        assert torch.equal(whole.ids_restore[:, start:end], chunk.ids_restore)
        assert max_abs_diff(whole.logits[:, start:end], chunk.logits) <= TOLERANCE


def test_gradients_bf16_and_errors(mae_pair):
    _, model = mae_pair
    extractor = DashengFeatureExtractor()
    batch = extractor(
        [concatenated_fsdd(TEN_SECONDS, start=40), concatenated_fsdd(30000, start=50)],
        sampling_rate=16000,
        return_tensors="pt",
    )
    noise = torch.rand(2, 125)
    model.train()
    model(**batch, noise=noise).loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert all(grad is not None and torch.isfinite(grad).all() for grad in gradients.values())
    # Gradient checkpointing covers the decoder's blocks too, with the same gradients.
    checkpointed = DashengForPreTraining(model.config)
    checkpointed.load_state_dict(model.state_dict())
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    recomputed = []
    checkpointed.decoder.blocks[0].mlp.register_forward_pre_hook(lambda *args: recomputed.append(1))
    checkpointed.train()(**batch, noise=noise).loss.backward()
    assert len(recomputed) == 2
    for name, parameter in checkpointed.named_parameters():
        assert max_abs_diff(parameter.grad, gradients[name]) <= 1e-6, name
    model.eval()
    assert (
        float(gradients["decoder.mask_token"].abs().sum()) > 0
        and float(gradients["encoder.norm.weight"].abs().sum()) > 0
    )

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**batch, noise=noise).loss
    with torch.no_grad():
        full = model(**batch, noise=noise).loss
    assert low.dtype == torch.float32 and abs(float(low) - float(full)) <= 0.02 * float(full)

    with pytest.raises(ValueError, match=r"noise must have shape .*\(2, 125\)"):
        model(**batch, noise=torch.rand(2, 250))
    with pytest.raises(ValueError, match="DashengFeatureExtractor"):
        model(torch.randn(2, 16000))
    assert isinstance(model(**batch, return_dict=False), tuple)


def test_state_dicts_load_both_ways(mae_pair):
    reference, model = mae_pair
    ours = model.state_dict()
    assert set(ours) == set(without_front_end(reference.state_dict()))
    assert ours["decoder.pos_embed"].shape == (1, 253, 32)
    back = make_reference_mae(seed=11)
    front_end = {key: value for key, value in back.state_dict().items() if key.startswith("encoder.front_end.")}
    back.load_state_dict({**ours, **front_end}, strict=True)
    assert all(torch.equal(back.state_dict()[key], value) for key, value in ours.items())


def test_encoder_checkpoint_loads_with_decoder_message(tmp_path, caplog):
    """A Hub folder in the first port's layout (encoder only) loads the encoder; the fresh decoder is announced."""
    reference = make_reference_encoder(seed=12)
    config = {
        "architectures": ["DashengModel"],
        "encoder_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": [64, 4], "target_length": 1008},
        "model_type": "dasheng",
        "name": "dasheng-base",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(hf_state_dict(reference), str(tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        model, info = DashengForPreTraining.from_pretrained(
            tmp_path, decoder_num_hidden_layers=1, output_loading_info=True
        )
    assert "newly initialised" in caplog.text and "decoder" in caplog.text
    assert not info["unexpected_keys"] and all(key.startswith("decoder.") for key in info["missing_keys"])
    assert model.config.decoder_hidden_size == 512 and len(model.decoder.blocks) == 1
    for key, value in hf_state_dict(reference).items():
        assert torch.equal(model.state_dict()[key], value), key
    # The decoder starts as the original's does: zero positions, small weights.
    assert bool((model.decoder.pos_embed == 0).all()) and float(model.decoder.outputlayer.weight.detach().std()) < 0.03


# Only transformers imported: the saved folder's own code files build the model.
REMOTE_CODE_SNIPPET = """
import sys
import torch
from transformers import AutoModelForPreTraining

model = AutoModelForPreTraining.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    outputs = model(inputs["input_values"], noise=inputs["noise"])
torch.save({"logits": outputs.logits, "loss": outputs.loss}, sys.argv[3])
print(type(model).__module__)
"""


def test_auto_model_for_pretraining_from_saved_folder(tmp_path, mae_pair):
    _, model = mae_pair
    folder = tmp_path / "dasheng-pretraining"
    model.save_pretrained(folder)
    assert (folder / "modeling_dasheng_pretraining.py").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_dasheng_pretraining.DashengForPreTraining"
    features = torch.randn(1, 64, 1001) * 20 - 40
    noise = torch.rand(1, 125)
    torch.save({"input_values": features, "noise": noise}, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(REMOTE_CODE_SNIPPET)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("transformers_modules")
    with torch.no_grad():
        expected = model(features, noise=noise)
    loaded = torch.load(tmp_path / "out.pt")
    assert max_abs_diff(loaded["logits"], expected.logits) == 0.0 and float(loaded["loss"]) == float(expected.loss)
