"""Fetch the common test suites of the installed transformers from its own source distribution.

`python tests/transformers_suite/fetch_suite.py` downloads the sdist of exactly the installed version from the package
index (`pip download --no-deps --no-binary :all: transformers==X`), extracts its `tests/` into
`~/.cache/dasheng-hf/transformers-tests/X/transformers_tests/` (or under `$DASHENG_TRANSFORMERS_TESTS_CACHE`) and
prints that folder. A folder already there is reused. The sdist ships only the top-level `tests/test_*common*.py`
files, not the helper modules they import from sub-packages; for those, and only those, it writes minimal stubs
(`STUBS`), each of which says in its docstring what it stands in for. The package is named `transformers_tests`, not
`tests`, so it never shadows this repository's `tests/` folder or another package's.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

__all__ = ["FETCH_COMMAND", "PACKAGE", "STUBS", "SUITES", "cache_root", "fetch", "is_fetched", "suite_dir"]

PACKAGE = "transformers_tests"
FETCH_COMMAND = "python tests/transformers_suite/fetch_suite.py"
# The suites Dasheng runs; their relative imports must resolve.
SUITES = ("test_modeling_common.py", "test_configuration_common.py", "test_sequence_feature_extraction_common.py")

# Helper modules that `tests/test_*common*.py` import but the sdist does not ship: a stand-in each.
STUBS = {
    "exporters/test_export.py": '''"""Stub: the sdist lacks tests/exporters/test_export.py (torch.export tests)."""


class ExportTesterMixin:
    """Stand-in for the missing mixin: no tests."""
''',
    "generation/test_utils.py": '''"""Stub: the sdist lacks tests/generation/test_utils.py (generation tests)."""


class GenerationTesterMixin:
    """Stand-in for the missing mixin: no tests (ModelTesterMixin only checks whether a class inherits it)."""
''',
    "utils/test_configuration_utils.py": '''"""Stub: the sdist lacks tests/utils/test_configuration_utils.py.

`config_common_kwargs`: arguments every `PretrainedConfig` of this transformers version accepts, each with a value
other than its default, for `ConfigTester.check_config_arguments_init`.
"""

from transformers import PretrainedConfig

_CANDIDATES = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "tie_word_embeddings": False,
    "architectures": ["DashengModel"],
    "finetuning_task": "audio-classification",
    "id2label": {0: "speech", 1: "music"},
    "label2id": {"speech": 0, "music": 1},
    "problem_type": "multi_label_classification",
    "is_encoder_decoder": True,
    "is_decoder": True,
    "add_cross_attention": True,
    "cross_attention_hidden_size": 32,
    "tokenizer_class": "BertTokenizerFast",
    "prefix": "Classify",
    "bos_token_id": 3,
    "pad_token_id": 5,
    "eos_token_id": 7,
    "sep_token_id": 11,
    "decoder_start_token_id": 13,
    "task_specific_params": {"audio-classification": {"top_k": 3}},
    "pruned_heads": {0: [1]},
    "torchscript": True,
    "use_bfloat16": True,
    "tf_legacy_loss": True,
}
_DEFAULTS = PretrainedConfig()
config_common_kwargs = {
    key: value
    for key, value in _CANDIDATES.items()
    if hasattr(_DEFAULTS, key) and getattr(_DEFAULTS, key) != value
}
''',
}


def cache_root() -> Path:
    """`$DASHENG_TRANSFORMERS_TESTS_CACHE`, else `~/.cache/dasheng-hf/transformers-tests`."""
    configured = os.environ.get("DASHENG_TRANSFORMERS_TESTS_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "dasheng-hf" / "transformers-tests"


def suite_dir(version: str | None = None) -> Path:
    """The folder to put on `sys.path` for `import transformers_tests` of `version` (default: the installed one)."""
    return cache_root() / (version or installed_version("transformers"))


def is_fetched(version: str | None = None) -> bool:
    """Whether the suites of `version` (default: the installed one) are in the cache."""
    return (suite_dir(version) / PACKAGE / "test_modeling_common.py").exists()


def _relative_imports(path: Path) -> set[str]:
    """Module paths (`generation/test_utils.py`) that a suite file imports relatively."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.replace(".", "/") + ".py")
    return found


def _extract(sdist: Path, version: str, destination: Path) -> None:
    """Write the sdist's `tests/` as package `PACKAGE` under `destination`, with stubs for missing helpers."""
    package = destination / PACKAGE
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if member.isfile() and member.name.startswith(prefix)]
        if not any(member.name == prefix + "test_modeling_common.py" for member in members):
            raise SystemExit(f"{sdist.name} has no tests/test_modeling_common.py: this version cannot be tested.")
        for member in members:
            target = package / member.name[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
    needed = set()
    for name in SUITES:
        needed |= _relative_imports(package / name)
    missing = sorted(path for path in needed if not (package / path).exists())
    unknown = [path for path in missing if path not in STUBS]
    if unknown:
        raise SystemExit(
            f"transformers {version}'s tests import {unknown}, which its sdist lacks and fetch_suite.py has no stub "
            f"for: add one to STUBS."
        )
    for path in missing:
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(STUBS[path])
    for folder in [package, *(path for path in package.rglob("*") if path.is_dir())]:
        (folder / "__init__.py").touch()


def fetch(version: str | None = None, quiet: bool = False) -> Path:
    """Download and extract the suites of `version` unless they are cached; returns the folder for `sys.path`."""
    version = version or installed_version("transformers")
    target = suite_dir(version)
    if is_fetched(version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{version}-") as scratch:
        download = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"transformers=={version}",
            "-d",
            scratch,
            *(["-q"] if quiet else []),
        ]
        subprocess.run(download, check=True)
        sdists = list(Path(scratch).glob("transformers-*.tar.gz"))
        if len(sdists) != 1:
            raise SystemExit(f"pip download left {[path.name for path in sdists]} instead of one transformers sdist.")
        staging = Path(scratch) / "suite"
        _extract(sdists[0], version, staging)
        try:  # a whole folder or none: an interrupted fetch leaves nothing behind
            staging.rename(target)
        except OSError:
            if not is_fetched(version):
                raise
            shutil.rmtree(staging)  # another process fetched it meanwhile
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="transformers version (default: the installed one)")
    parser.add_argument("--quiet", action="store_true", help="no pip output")
    parser.add_argument("--check", action="store_true", help="fetch nothing; exit 1 unless the suites are there")
    args = parser.parse_args(argv)
    if args.check:
        raise SystemExit(0 if is_fetched(args.version) else 1)
    print(fetch(args.version, quiet=args.quiet))


if __name__ == "__main__":
    main()
