"""Transformers' `SequenceFeatureExtractionTestMixin`, from the installed version's own source, run on Dasheng.

The mixin writes its feature items as `(frames, features)`; Dasheng's are `(features, frames)`. The tests that pad
such items run through `FramesFirstFeatureExtractor`, which only swaps the two axes on the way in and out of
`DashengFeatureExtractor.pad`; the others (saving, loading, properties) use `DashengFeatureExtractor` itself.
"""

from __future__ import annotations

import unittest

import numpy as np
from dasheng_testers import DashengFeatureExtractionTester, FramesFirstFeatureExtractor, require_suite
from transformers import BatchFeature

require_suite()

from dasheng_hf import DashengFeatureExtractor  # noqa: E402
from transformers_tests.test_sequence_feature_extraction_common import (  # noqa: E402
    SequenceFeatureExtractionTestMixin,
)

# Tests of the mixin that pad `(frames, features)` items: they get the adapter.
PADDING_TESTS = (
    "test_padding_from_list",
    "test_padding_from_array",
    "test_truncation_from_list",
    "test_truncation_from_array",
    "test_padding_accepts_tensors_pt",
    "test_attention_mask",
    "test_attention_mask_with_truncation",
)


LONGER_THAN_MAX_LENGTH = (
    "padding='max_length' with a clip longer than max_length and truncation=False raises, saying to pass "
    "truncation=True, where Transformers returns that clip longer than max_length (a ragged batch)."
)


class DashengFeatureExtractionTest(SequenceFeatureExtractionTestMixin, unittest.TestCase):
    feature_extraction_class = DashengFeatureExtractor
    # Test name -> why it does not apply (the contract and why).
    not_applicable = {
        "test_truncation_from_list": LONGER_THAN_MAX_LENGTH,
        "test_truncation_from_array": LONGER_THAN_MAX_LENGTH,
    }

    def setUp(self):
        reason = self.not_applicable.get(self._testMethodName)
        if reason is not None:
            self.skipTest(reason)
        self.feat_extract_tester = DashengFeatureExtractionTester(self)
        if self._testMethodName in PADDING_TESTS:
            self.feature_extraction_class = FramesFirstFeatureExtractor

    def test_adapter_only_swaps_axes(self):
        # The adapter's output is DashengFeatureExtractor.pad's own, axes swapped: same values, same mask.
        items = self.feat_extract_tester.prepare_inputs_for_common(numpify=True)
        ours = DashengFeatureExtractor(**self.feat_extract_dict).pad(
            [{"input_values": item.T} for item in items], padding="longest", return_tensors="np"
        )
        adapted = FramesFirstFeatureExtractor(**self.feat_extract_dict).pad(
            {"input_values": items}, padding="longest", return_tensors="np"
        )
        np.testing.assert_array_equal(adapted["input_values"], ours["input_values"].transpose(0, 2, 1))
        np.testing.assert_array_equal(adapted["attention_mask"], ours["attention_mask"])

    def test_truncation_where_it_applies(self):
        # The mixin's truncation checks that hold for Dasheng (see LONGER_THAN_MAX_LENGTH for the one that does not).
        feat_extract = FramesFirstFeatureExtractor(**self.feat_extract_dict)
        items = self.feat_extract_tester.prepare_inputs_for_common(numpify=True)
        batch = BatchFeature({"input_values": items})
        for max_length in (len(items[0]), len(items[1])):
            padded = feat_extract.pad(
                batch, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
            )["input_values"]
            self.assertEqual(padded.shape, (len(items), max_length, self.feat_extract_tester.feature_size))
            for row, item in zip(padded, items):
                np.testing.assert_allclose(row[: len(item)], item[:max_length], atol=1e-5)
        rounded = feat_extract.pad(
            batch, padding="max_length", max_length=len(items[0]), pad_to_multiple_of=12, truncation=True
        )["input_values"]
        self.assertEqual({len(row) for row in rounded}, {-(-len(items[0]) // 12) * 12})
        for kwargs in ({"truncation": True}, {"padding": "longest", "truncation": True}):
            with self.assertRaises(ValueError):
                feat_extract.pad(batch, **kwargs)
        with self.assertRaisesRegex(ValueError, "truncation=True"):
            feat_extract.pad(batch, padding="max_length", max_length=len(items[0]))
