"""Test setup: offline Hub, import path for `helpers`, hypothesis profiles, small shared fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dasheng_hf import DashengFeatureExtractor, DashengModel  # noqa: E402
from helpers import DATA_DIR, FSDD_SOURCE, hf_state_dict, make_reference_encoder, tiny_config  # noqa: E402

# Property-based tests: `ci` (the default) keeps all property suites together to about 3 minutes on 2 CPU cores and
# is derandomized, so CI runs are reproducible; `deep` (`pytest --hypothesis-profile=deep`) tries many more inputs.
# Neither writes an example database (or the explain phase's patches) into the working tree. Hypothesis' pytest
# plugin loads the profile named by `--hypothesis-profile` after this module is imported, so that choice wins.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "deep",
    max_examples=1000,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


def pytest_report_header(config) -> str:
    """One line on the shared data: where it is looked for, and what happens without it."""
    fsdd = DATA_DIR / "fsdd"
    found = len(list(fsdd.glob("*.wav"))) if fsdd.is_dir() else 0
    if found:
        return f"test data: {DATA_DIR.resolve()} ({found} FSDD recordings)"
    return f"test data: none at {DATA_DIR} (DASHENG_TEST_DATA): tests that need recorded speech skip ({FSDD_SOURCE})"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def reference_tiny():
    """The original encoder at tiny size with perturbed weights."""
    return make_reference_encoder(embed_dim=64, depth=2, num_heads=4, seed=0)


@pytest.fixture(scope="session")
def tiny_pair(reference_tiny):
    """(reference, our DashengModel with the same weights) in eval mode."""
    model = DashengModel(tiny_config())
    model.load_state_dict(hf_state_dict(reference_tiny), strict=True)
    return reference_tiny, model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny DashengModel with seeded random weights, saved (for tools that take a model folder)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dasheng")
    DashengModel(tiny_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def feature_extractor():
    return DashengFeatureExtractor()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
