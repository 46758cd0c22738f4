"""Packaging: the console scripts are installed and every `python -m` module the README names exists."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("dasheng-convert", "--checkpoint"),
        ("dasheng-linear-probe", "--dataset"),
        ("dasheng-make-shards", "--shard"),
        ("dasheng-pretrain", "--train"),
    ],
)
def test_console_scripts(script, expected):
    path = shutil.which(script)
    assert path, f"{script} is not installed: run `pip install -e .`"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and expected in result.stdout


README_MODULES = sorted(set(re.findall(r"-m (dasheng_hf(?:\.\w+)+)", (REPO / "README.md").read_text())))


def test_the_readme_names_modules():
    assert "dasheng_hf.evaluation.linear_probe" in README_MODULES, README_MODULES


@pytest.mark.parametrize("module", README_MODULES)
def test_every_python_m_command_in_the_readme_names_a_runnable_module(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"README runs `python -m {module}`, which does not exist"
    source = open(spec.origin).read()
    assert 'if __name__ == "__main__":' in source, f"`python -m {module}` would do nothing"
