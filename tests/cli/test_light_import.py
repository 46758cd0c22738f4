"""`import dasheng_hf` and the converter's `--help` import neither torch nor transformers; the Auto classes still
learn about Dasheng, whichever is imported first."""

from __future__ import annotations

import subprocess
import sys

import dasheng_hf
import pytest

REGISTERED = (
    "from transformers import AutoConfig, AutoModel, AutoModelForAudioClassification, AutoModelForPreTraining\n"
    "from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING\n"
    "config = AutoConfig.for_model('dasheng', hidden_size=64, num_hidden_layers=1, num_attention_heads=4)\n"
    "for auto in (AutoModel, AutoModelForAudioClassification, AutoModelForPreTraining):\n"
    "    print(type(auto.from_config(config)).__name__)\n"
    "print(FEATURE_EXTRACTOR_MAPPING[type(config)].__name__)\n"
)


def run(code: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *options, "-c", code], capture_output=True, text=True, timeout=300)


def imported_modules(importtime_stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import")}


def test_package_import_is_light():
    result = run("import dasheng_hf", "-X", "importtime")
    assert result.returncode == 0, result.stderr
    heavy = imported_modules(result.stderr) & {"torch", "transformers", "numpy"}
    assert not heavy, f"import dasheng_hf imports {sorted(heavy)}"


def test_converter_help_imports_neither_torch_nor_transformers():
    result = run(
        "import sys; from dasheng_hf.convert_checkpoint import main; sys.exit(main(['--help']))", "-X", "importtime"
    )
    assert result.returncode == 0 and "--checkpoint" in result.stdout
    assert not imported_modules(result.stderr) & {"torch", "transformers"}


@pytest.mark.parametrize(
    "first",
    [
        "import dasheng_hf",  # the Auto classes are imported afterwards
        "import transformers.models.auto.modeling_auto\nimport dasheng_hf",  # ... beforehand
        "from dasheng_hf.modeling_dasheng import DashengModel",  # a Hub module on its own (as the tools import it)
    ],
    ids=["package-first", "transformers-first", "hub-module-first"],
)
def test_auto_classes_are_registered_whatever_comes_first(first):
    result = run(f"{first}\n{REGISTERED}")
    assert result.returncode == 0, result.stderr[-2000:]
    classes = ["DashengModel", "DashengForAudioClassification", "DashengForPreTraining", "DashengFeatureExtractor"]
    assert result.stdout.split() == classes


def test_public_names_load_on_first_use():
    assert set(dasheng_hf.__all__) <= set(dir(dasheng_hf))
    assert dasheng_hf.DashengModel.__name__ == "DashengModel"
    assert "DashengModel" in vars(dasheng_hf)  # cached after the first access
    with pytest.raises(AttributeError, match="has no attribute 'DashengNothing'"):
        dasheng_hf.DashengNothing  # noqa: B018
