"""Transformers' `ModelTesterMixin` and `ConfigTester`, from the installed version's own source, run on Dasheng.

One test class per model family and input layout (`dasheng_testers.LAYOUTS`): one chunk, a padded batch with a
frame mask, and 2.5 chunks. A test that does not apply to Dasheng is skipped by name below with its reason: the
contract Dasheng keeps on purpose (README, "Compatibility"), or what the model does not have.
"""

from __future__ import annotations

import unittest
from unittest import mock

import torch
import transformers
from dasheng_testers import FRAMES_PER_TOKEN, DashengModelTester, require_suite

require_suite()

from dasheng_hf import (  # noqa: E402
    DashengConfig,
    DashengForAudioClassification,
    DashengForPreTraining,
    DashengModel,
)
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)
from transformers_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_tests.test_modeling_common import ModelTesterMixin  # noqa: E402

# Why a test of the common suite does not apply to Dasheng; each class maps the names it skips to one of these.
NO_TOKENS = "Dasheng reads log-mel frames (input_values): it has no token vocabulary or input embedding matrix."
FRAME_MASK = (
    "Dasheng takes a (batch, frames) frame mask of right padding, not a (batch, tokens) token mask, and never "
    "computes padding; this test passes a token mask (and left padding)."
)
ENCODER_PREFIX = (
    "base_model_prefix is 'encoder', the shared DashengEncoder module (an nn.Module without save_pretrained), "
    "so that the legacy Hub folders' encoder.* weights load into every Dasheng class."
)
HIDDEN_STATES = (
    "DashengModel's hidden_states is the last hidden state unless output_hidden_states=True (the first Hub port's "
    "contract), so asking for all of them adds no output field."
)
CHUNK_ATTENTION = (
    "Attention runs per 10.08 s chunk: weights are (batch, chunks, heads, 252, 252), not (batch, heads, tokens, "
    "tokens), for inputs longer than one chunk."
)
NO_MULTIMODAL = "Dasheng is one audio encoder: it has no vision, text or other sub-model to dispatch to."
NO_ROPE = "Dasheng has learned time and frequency position embeddings, no rotary embeddings to scale."
PATCH_EMBEDDING = (
    "get_input_embeddings() is the patch embedding module (its Conv2d is .proj), not an embedding matrix with "
    ".weight; PEFT's input gradients under gradient checkpointing are tested in tests/model/test_peft.py."
)
SQUARE_NOISE = (
    "The mixin draws ForPreTraining noise for square images (model_tester.image_size); Dasheng's noise is one value "
    "per pair of tokens. Eager and SDPA pretraining are compared with the original in test_pretraining_model.py."
)
NO_HEAD_PRUNING = "Dasheng has no head pruning and no head_mask input (Transformers 5 removed both from its models)."
ZERO_SIZES = (
    "Transformers 4's ConfigTester builds DashengConfig(hidden_size=0), which DashengConfig refuses: configs "
    "validate their fields (the other ConfigTester checks run in test_config)."
)
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
MASKED_SDPA_TESTS = sorted(
    name
    for name in dir(ModelTesterMixin)
    if name.startswith("test_eager_matches_sdpa_inference_")
    and ("pad_left" in name or "pad_right" in name)
    and "no_attn_mask" not in name
)
ROPE_TESTS = sorted(name for name in dir(ModelTesterMixin) if name.startswith("test_") and "rope" in name)
ALL_SDPA_TESTS = sorted(name for name in dir(ModelTesterMixin) if name.startswith("test_eager_matches_sdpa_inference_"))


class DashengSuiteMixin(ModelTesterMixin):
    """The settings and skips shared by every Dasheng model class."""

    layout = "one_chunk"
    for_pretraining = False
    test_resize_embeddings = False
    test_pruning = False  # Transformers 4 only
    test_head_masking = False  # Transformers 4 only
    test_can_init_all_missing_weights_before_2023 = True  # the mixin skips files without a copyright year
    test_resize_position_embeddings = False
    test_torch_exportable = True
    has_attentions = True
    is_encoder_decoder = False
    # Test name -> why it does not apply (the contract and why).
    not_applicable = {
        "test_model_get_set_embeddings": NO_TOKENS,
        "test_inputs_embeds": NO_TOKENS,
        "test_inputs_embeds_matches_input_ids": NO_TOKENS,
        "test_resize_tokens_embeddings": NO_TOKENS,
        "test_resize_embeddings_untied": NO_TOKENS,
        "test_correct_missing_keys": ENCODER_PREFIX,
        "test_sdpa_can_dispatch_composite_models": NO_MULTIMODAL,
        "test_enable_input_require_grads_with_gradient_checkpointing": PATCH_EMBEDDING,
        **dict.fromkeys(ROPE_TESTS, NO_ROPE),
        **dict.fromkeys(
            (
                "test_head_pruning",
                "test_head_pruning_integration",
                "test_head_pruning_save_load_from_config_init",
                "test_head_pruning_save_load_from_pretrained",
                "test_headmasking",
            ),
            NO_HEAD_PRUNING,
        ),
        **({"test_config_common_properties": ZERO_SIZES} if TRANSFORMERS_4 else {}),
        **dict.fromkeys(MASKED_SDPA_TESTS, FRAME_MASK),
    }

    def setUp(self):
        reason = self.not_applicable.get(self._testMethodName)
        if reason is not None:
            self.skipTest(reason)
        # Dasheng's classes where Transformers lists its own models' (remote-code models are not listed): the
        # mixin then treats DashengModel as a base model and gives DashengForAudioClassification labels.
        for mapping, name in (
            (MODEL_MAPPING_NAMES, "DashengModel"),
            (MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES, "DashengForAudioClassification"),
        ):
            patcher = mock.patch.dict(mapping, {"dasheng": name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = DashengModelTester(self, layout=self.layout, for_pretraining=self.for_pretraining)
        self.config_tester = ConfigTester(
            self,
            config_class=DashengConfig,
            has_text_modality=False,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )

    def test_config(self):
        # The common-properties step is test_config_common_properties, so that it can be skipped on its own.
        with mock.patch.object(self.config_tester, "create_and_test_config_common_properties"):
            self.config_tester.run_common_tests()

    def test_config_common_properties(self):
        self.config_tester.create_and_test_config_common_properties()


class DashengModelTestMixin(DashengSuiteMixin):
    """`DashengModel` and `DashengForAudioClassification` (encoder, pooling, head)."""

    all_model_classes = (DashengModel, DashengForAudioClassification)
    not_applicable = {**DashengSuiteMixin.not_applicable, "test_attention_outputs": HIDDEN_STATES}

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_audio_classification(self):
        self.model_tester.create_and_check_for_audio_classification(*self.model_tester.prepare_config_and_inputs())


class DashengPreTrainingTestMixin(DashengSuiteMixin):
    """`DashengForPreTraining`: the encoder on the visible tokens, the decoder, the loss."""

    all_model_classes = (DashengForPreTraining,)
    for_pretraining = True
    not_applicable = {**DashengSuiteMixin.not_applicable, **dict.fromkeys(ALL_SDPA_TESTS, SQUARE_NOISE)}

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # As Transformers' ViTMAE tests do: fixed noise, so that every call masks the same tokens.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        batch, _, frames = inputs_dict["input_values"].shape
        groups = -(-(frames // FRAMES_PER_TOKEN) // self.model_tester.get_config().mask_group_size)
        inputs_dict["noise"] = torch.rand(batch, groups, generator=torch.Generator().manual_seed(0))
        return inputs_dict

    def test_for_pretraining(self):
        self.model_tester.create_and_check_for_pretraining(*self.model_tester.prepare_config_and_inputs())


class DashengModelOneChunkTest(DashengModelTestMixin, unittest.TestCase):
    layout = "one_chunk"


class DashengModelPaddedTest(DashengModelTestMixin, unittest.TestCase):
    layout = "padded"


class DashengModelLongTest(DashengModelTestMixin, unittest.TestCase):
    layout = "long"
    not_applicable = {
        **DashengModelTestMixin.not_applicable,
        "test_attention_outputs": f"{HIDDEN_STATES} {CHUNK_ATTENTION}",
    }


class DashengForPreTrainingOneChunkTest(DashengPreTrainingTestMixin, unittest.TestCase):
    layout = "one_chunk"


class DashengForPreTrainingPaddedTest(DashengPreTrainingTestMixin, unittest.TestCase):
    layout = "padded"


class DashengForPreTrainingLongTest(DashengPreTrainingTestMixin, unittest.TestCase):
    layout = "long"
