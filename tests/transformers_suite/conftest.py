"""Puts the installed transformers' own test suites (fetched by fetch_suite.py) on `sys.path`, when fetched."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetch_suite import PACKAGE, suite_dir  # noqa: E402

if (suite_dir() / PACKAGE / "test_modeling_common.py").exists():
    sys.path.insert(0, str(suite_dir()))


def pytest_configure(config):
    # Markers the suites use (registered in Transformers' own conftest, which the sdist does not ship).
    markers = ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "torch_export_test")
    for marker in markers:
        config.addinivalue_line("markers", f"{marker}: marker of Transformers' common tests")
