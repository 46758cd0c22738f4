"""Testers in the style of Transformers' own model tests: tiny configs and inputs for its common suites.

`DashengModelTester` builds a tiny `DashengConfig` and log-mel inputs in one of three layouts (`LAYOUTS`): one chunk
of 252 tokens (10.08 s), a right-padded batch with a frame mask, and 2.5 chunks. `DashengFeatureExtractionTester`
builds the `(frames, features)` items the sequence feature-extraction mixin pads; `FramesFirstFeatureExtractor`
hands them to `DashengFeatureExtractor.pad` in its `(features, frames)` layout and its output back.
`require_suite` skips a test module, with one line saying how to fetch them, when the suites are not there.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from dasheng_hf import DashengConfig, DashengFeatureExtractor
from transformers import BatchFeature

__all__ = [
    "CHUNK_TOKENS",
    "FRAMES_PER_TOKEN",
    "LAYOUTS",
    "DashengFeatureExtractionTester",
    "DashengModelTester",
    "FramesFirstFeatureExtractor",
    "require_suite",
]

FRAMES_PER_TOKEN = 4
CHUNK_TOKENS = 252  # 10.08 s
CHUNK_FRAMES = CHUNK_TOKENS * FRAMES_PER_TOKEN

# Frames of each clip in a batch of two, and whether the batch carries a frame mask.
LAYOUTS = {
    "one_chunk": {"frames": (CHUNK_FRAMES, CHUNK_FRAMES), "mask": False},
    "padded": {"frames": (CHUNK_FRAMES, 604), "mask": True},  # 252 and 151 tokens, right padding
    "long": {"frames": (CHUNK_FRAMES * 5 // 2, CHUNK_FRAMES * 5 // 2), "mask": False},  # 630 tokens: 2.5 chunks
}


def require_suite() -> None:
    """Skip the calling test module unless `transformers_tests` (fetched by fetch_suite.py) is importable."""
    if importlib.util.find_spec("transformers_tests") is None:
        import transformers
        from fetch_suite import FETCH_COMMAND, suite_dir

        pytest.skip(
            f"transformers {transformers.__version__}'s own test suites are not in {suite_dir()}: run "
            f"`{FETCH_COMMAND}` to fetch them.",
            allow_module_level=True,
        )


class DashengModelTester:
    """Tiny Dasheng configs and `(batch, 64, frames)` log-mel inputs for `ModelTesterMixin`."""

    def __init__(
        self,
        parent,
        layout: str = "one_chunk",
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 64,
        num_labels: int = 3,
        num_mel_bins: int = 64,
        is_training: bool = True,
        for_pretraining: bool = False,
        mask_ratio: float = 0.75,
        seed: int = 0,
    ):
        self.parent = parent
        self.layout = layout
        self.frames = LAYOUTS[layout]["frames"]
        self.use_mask = LAYOUTS[layout]["mask"]
        self.batch_size = len(self.frames)
        self.num_frames = max(self.frames)
        self.seq_length = self.num_frames // FRAMES_PER_TOKEN  # tokens: what hidden states hold
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_labels = num_labels
        self.num_mel_bins = num_mel_bins
        self.is_training = is_training
        self.mask_ratio = mask_ratio
        self.seed = seed
        if for_pretraining:
            # DashengForPreTraining's encoder sees the visible tokens of each chunk: its hidden states and attention
            # weights are (sequences, visible, ...), as ViTMAE's testers set them.
            self.encoder_seq_length = max(1, int(min(self.seq_length, CHUNK_TOKENS) * (1 - mask_ratio)))

    def get_config(self) -> DashengConfig:
        return DashengConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            num_labels=self.num_labels,
            decoder_hidden_size=self.hidden_size,
            decoder_num_hidden_layers=self.num_hidden_layers,
            decoder_num_attention_heads=self.num_attention_heads,
            decoder_intermediate_size=self.intermediate_size,
            mask_ratio=self.mask_ratio,
        )

    def prepare_config_and_inputs(self) -> tuple[DashengConfig, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        # Log-mel values in dB around the levels of real audio.
        input_values = torch.randn(self.batch_size, self.num_mel_bins, self.num_frames, generator=generator) * 15 - 40
        attention_mask = None
        if self.use_mask:
            frame = torch.arange(self.num_frames)
            attention_mask = (frame[None, :] < torch.tensor(self.frames)[:, None]).long()
            input_values = input_values.masked_fill(attention_mask[:, None, :] == 0, -100.0)
        labels = torch.randint(0, self.num_labels, (self.batch_size,), generator=generator)
        return self.get_config(), input_values, attention_mask, labels

    def prepare_config_and_inputs_for_common(self) -> tuple[DashengConfig, dict[str, torch.Tensor]]:
        config, input_values, attention_mask, _ = self.prepare_config_and_inputs()
        inputs_dict = {"input_values": input_values}
        if attention_mask is not None:
            inputs_dict["attention_mask"] = attention_mask
        return config, inputs_dict

    def valid_tokens(self) -> list[int]:
        return [frames // FRAMES_PER_TOKEN for frames in self.frames]

    def create_and_check_model(self, config, input_values, attention_mask, labels) -> None:
        from dasheng_hf import DashengModel

        model = DashengModel(config).eval()
        with torch.no_grad():
            result = model(input_values, attention_mask=attention_mask)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))
        for row, tokens in enumerate(self.valid_tokens()):  # padded tokens are zeros, the mean is over real ones
            padding = result.last_hidden_state[row, tokens:]
            torch.testing.assert_close(padding, torch.zeros_like(padding))
            torch.testing.assert_close(result.pooler_output[row], result.last_hidden_state[row, :tokens].mean(0))

    def create_and_check_for_audio_classification(self, config, input_values, attention_mask, labels) -> None:
        from dasheng_hf import DashengForAudioClassification

        model = DashengForAudioClassification(config).eval()
        result = model(input_values, attention_mask=attention_mask, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertEqual(result.loss.shape, ())

    def create_and_check_for_pretraining(self, config, input_values, attention_mask, labels) -> None:
        from dasheng_hf import DashengForPreTraining

        model = DashengForPreTraining(config).eval()
        result = model(input_values, attention_mask=attention_mask)
        patch = config.patch_size[0] * config.patch_size[1]
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, patch))
        self.parent.assertEqual(result.mask.shape, (self.batch_size, self.seq_length))
        # The removed share of each clip's real tokens is the mask ratio (rounded down to visible tokens).
        for row, tokens in enumerate(self.valid_tokens()):
            chunks = [min(CHUNK_TOKENS, tokens - start) for start in range(0, tokens, CHUNK_TOKENS)]
            kept = sum(max(1, int(n * (1 - config.mask_ratio))) for n in chunks)
            self.parent.assertEqual(int(result.mask[row, :tokens].sum()), tokens - kept)


class DashengFeatureExtractionTester:
    """Items `(frames, 64)` of growing lengths for `SequenceFeatureExtractionTestMixin`, as other testers write them."""

    def __init__(
        self,
        parent,
        batch_size: int = 7,
        min_seq_length: int = 40,
        max_seq_length: int = 200,
        feature_size: int = 64,
        padding_value: float = 0.0,
        sampling_rate: int = 16000,
        return_attention_mask: bool = True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.min_seq_length = min_seq_length
        self.max_seq_length = max_seq_length
        self.seq_length_diff = (max_seq_length - min_seq_length) // (batch_size - 1)
        self.feature_size = feature_size
        self.padding_value = padding_value
        self.sampling_rate = sampling_rate
        self.return_attention_mask = return_attention_mask

    def prepare_feat_extract_dict(self) -> dict:
        return {
            "feature_size": self.feature_size,
            "padding_value": self.padding_value,
            "sampling_rate": self.sampling_rate,
            "return_attention_mask": self.return_attention_mask,
        }

    def prepare_inputs_for_common(self, equal_length: bool = False, numpify: bool = False) -> list:
        generator = np.random.default_rng(0)
        if equal_length:
            lengths = [self.max_seq_length] * self.batch_size
        else:
            lengths = [self.min_seq_length + index * self.seq_length_diff for index in range(self.batch_size)]
        items = [(generator.standard_normal((length, self.feature_size)) * 15 - 40) for length in lengths]
        return [item.astype(np.float32) for item in items] if numpify else [item.tolist() for item in items]


def _frames_last(value):
    """One item, or a batch of them, from `(..., frames, features)` to `(..., features, frames)` and back."""
    if isinstance(value, torch.Tensor):
        return value.transpose(-1, -2)
    return np.swapaxes(np.asarray(value), -1, -2)


class FramesFirstFeatureExtractor(DashengFeatureExtractor):
    """
    `DashengFeatureExtractor` for the sequence feature-extraction mixin, whose items are `(frames, features)`:
    `pad` hands them to Dasheng's `pad` as `(features, frames)` and swaps the padded features back. Only the layout
    changes hands; padding, truncation, masks and padding values are Dasheng's.
    """

    def pad(self, processed_features, *args, **kwargs) -> BatchFeature:
        name = self.model_input_names[0]
        swapped = dict(processed_features)
        swapped[name] = [_frames_last(item) for item in processed_features[name]]
        padded = super().pad(BatchFeature(swapped), *args, **kwargs)
        values = padded[name]
        if isinstance(values, (torch.Tensor, np.ndarray)) and values.dtype != object:
            padded[name] = _frames_last(values)
        else:
            padded[name] = [_frames_last(item) for item in values]
        return padded
