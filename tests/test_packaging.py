"""Packaging: the Hub code files import nothing a user may lack, and the console scripts are installed."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dasheng_hf.configuration_dasheng import CODE_FILES

REPO = Path(__file__).resolve().parents[1]
HUB_FILES = tuple(CODE_FILES)  # every file that save_pretrained copies into a Hub folder


@pytest.mark.parametrize("name", HUB_FILES)
def test_hub_files_import_only_torch_numpy_transformers(name):
    """trust_remote_code refuses a folder whose code imports a missing package, even inside a function."""
    tree = ast.parse((REPO / name).read_text())
    guarded = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for node in ast.walk(b)}
    imported = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):  # relative imports must stay among the Hub files
            assert f"{node.module}.py" in HUB_FILES, node.module
    assert imported - set(sys.stdlib_module_names) <= {"torch", "numpy", "transformers"}


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
