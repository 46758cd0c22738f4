"""Without ../shared/data (a fresh clone), tests that need recorded speech skip with one line saying why and how."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest

TESTS = Path(__file__).resolve().parent


def test_missing_fsdd_skips_with_its_source_and_the_variable(monkeypatch, tmp_path):
    monkeypatch.setattr(helpers, "FSDD_DIR", tmp_path / "fsdd")
    with pytest.raises(pytest.skip.Exception) as skipped:
        helpers.fsdd_files()
    reason = str(skipped.value)
    assert "\n" not in reason
    assert "Jakobovski/free-spoken-digit-dataset" in reason and "CC BY-SA 4.0" in reason
    assert "DASHENG_TEST_DATA" in reason and str(tmp_path / "fsdd") in reason


def test_missing_label_table_skips_with_its_source(monkeypatch, tmp_path):
    monkeypatch.setattr(helpers, "LABELS_DIR", tmp_path)
    with pytest.raises(pytest.skip.Exception, match=r"YuanGongND/ast.*DASHENG_TEST_DATA"):
        helpers.labels_file("audioset_class_labels_indices.csv")


def test_a_full_fsdd_folder_gives_the_same_files(tmp_path):
    """A copy of FSDD's whole recordings/ folder (six speakers) gives the tests the same 1,000 recordings."""
    present = [Path(path).name for path in helpers.fsdd_files()]  # skips without the data
    folder = tmp_path / "fsdd"
    folder.mkdir()
    for name in present + ["0_theo_0.wav", "9_lucas_49.wav"]:
        (folder / name).touch()
    original, helpers.FSDD_DIR = helpers.FSDD_DIR, folder
    try:
        assert [Path(path).name for path in helpers.fsdd_files()] == present
    finally:
        helpers.FSDD_DIR = original


def test_a_clone_without_data_reports_skips_not_failures(tmp_path):
    """pytest with DASHENG_TEST_DATA pointing nowhere: a test that reads FSDD is skipped, its reason in the summary."""
    (tmp_path / "test_needs_speech.py").write_text(
        "from helpers import fsdd_clip\n\ndef test_speech():\n    assert fsdd_clip(0).numel() > 0\n"
    )
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "helpers.py").write_text((TESTS / "helpers.py").read_text())
    env = {**os.environ, "DASHENG_TEST_DATA": str(tmp_path / "nonexistent")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "DASHENG_TEST_DATA" in result.stdout and "Jakobovski" in result.stdout
    assert "test data: none at" in result.stdout
