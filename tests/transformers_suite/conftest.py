"""Puts the installed transformers' own test suites (fetched by fetch_suite.py) on `sys.path`, when fetched."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetch_suite import is_fetched, suite_dir  # noqa: E402

if is_fetched():
    sys.path.insert(0, str(suite_dir()))
    # The suites mark torch.export (Transformers 4) and accelerator tests `slow`: on a CPU only the former runs, in
    # seconds for tiny configs, so they run unless RUN_SLOW says otherwise.
    os.environ.setdefault("RUN_SLOW", "yes")
    from transformers import testing_utils

    testing_utils._run_slow_tests = testing_utils.parse_flag_from_env("RUN_SLOW", default=False)


def pytest_configure(config):
    # Markers the suites use (registered in Transformers' own conftest, which the sdist does not ship).
    markers = ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "torch_export_test")
    for marker in markers:
        config.addinivalue_line("markers", f"{marker}: marker of Transformers' common tests")
