"""The repository's architecture, read from the code: what the root holds, who may import whom, no cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from dasheng_hf.configuration_dasheng import CODE_FILES

REPO = Path(__file__).resolve().parents[1]
HUB_FILES = frozenset(Path(name).stem for name in CODE_FILES)
SUBPACKAGES = ("audio", "cli", "conversion", "deployment", "embedding", "evaluation", "jobs", "pretraining")
# `cli` and `jobs` serve them all.
TOOLS = frozenset({"conversion", "deployment", "embedding", "evaluation", "pretraining", "convert_checkpoint"})
ROOT_ITEMS = {
    *CODE_FILES,
    "__init__.py",
    "convert_checkpoint.py",
    "README.md",
    "pyproject.toml",
    ".ci",
    ".gitignore",
    "benchmarks",
    "notebooks",
    "tests",
    *SUBPACKAGES,
}


def package_modules() -> dict[str, Path]:
    """Every module of `dasheng_hf` by dotted name relative to the package (`audio.datasets`, `modeling_dasheng`)."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for package in SUBPACKAGES:
        for path in (REPO / package).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    modules["__init__"] = modules.pop("__init__")
    return modules


def imports_of(name: str, path: Path) -> list[tuple[str, int, str]]:
    """(kind, line, target) for each import in a module: kind "internal" (a module of the package, dotted as in
    `package_modules`), "absolute" (`from dasheng_hf...` inside the package) or "external" (top-level name)."""
    package = [] if "." not in name and (path.parent == REPO) else [path.parent.name]
    found = []
    tree = ast.parse(path.read_text())
    script_only = {  # `if __name__ == "__main__" and not __package__:` sets the package for `python file.py` (PEP 366)
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "__package__" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in script_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                found.append(("absolute" if top == "dasheng_hf" else "external", node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top = (node.module or "").split(".")[0]
            found.append(("absolute" if top == "dasheng_hf" else "external", node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            assert node.level - 1 <= len(package), f"{path}:{node.lineno} imports above the package"
            target = [*base, *(node.module.split(".") if node.module else [])]
            if node.module is None or ".".join(target) in SUBPACKAGES:  # `from . import x`, `from ..audio import x`
                found += [("internal", node.lineno, ".".join([*target, alias.name])) for alias in node.names]
            else:
                found.append(("internal", node.lineno, ".".join(target)))
    return found


MODULES = package_modules()
GRAPH = {
    name: {target for kind, _, target in imports_of(name, path) if kind == "internal"} for name, path in MODULES.items()
}


def test_root_holds_only_the_hub_code_the_converter_and_the_project_files():
    tracked = {
        path.name for path in REPO.iterdir() if not path.name.startswith(".") or path.name in {".ci", ".gitignore"}
    }
    tracked -= {"__pycache__", "build", "dasheng_hf.egg-info", "dasheng_hf", "runs"}
    tracked = {name for name in tracked if not name.endswith(".egg-info") and not name.startswith(".venv")}
    assert tracked <= ROOT_ITEMS, f"not part of the layout at the root: {sorted(tracked - ROOT_ITEMS)}"
    assert {path.stem for path in REPO.glob("*.py")} == HUB_FILES | {"__init__", "convert_checkpoint"}


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_subpackage_says_what_lives_there_and_what_it_may_import(package):
    docstring = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text()))
    assert docstring and "May import" in docstring, f"{package}/__init__.py needs a docstring with 'May import'"
    for path in (REPO / package).glob("*.py"):
        if path.stem != "__init__":
            assert f"`{path.name}`" in docstring, f"{package}/__init__.py does not name {path.name}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_one_import_style_relative_inside_the_package(name):
    absolute = [
        f"line {line}: {target}" for kind, line, target in imports_of(name, MODULES[name]) if kind == "absolute"
    ]
    assert not absolute, f"{MODULES[name]} imports the package absolutely (use relative imports): {absolute}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_internal_imports_name_existing_modules(name):
    assert GRAPH[name] <= set(MODULES), f"{name} imports unknown modules: {sorted(GRAPH[name] - set(MODULES))}"


@pytest.mark.parametrize("name", sorted(HUB_FILES))
def test_hub_files_import_only_each_other_torch_numpy_transformers(name):
    external = {target.split(".")[0] for kind, _, target in imports_of(name, MODULES[name]) if kind == "external"}
    tree = ast.parse(MODULES[name].read_text())
    guarded = {
        node.lineno
        for handler in ast.walk(tree)
        if isinstance(handler, ast.Try)
        for statement in handler.body
        for node in ast.walk(statement)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    unguarded = {
        target.split(".")[0]
        for kind, line, target in imports_of(name, MODULES[name])
        if kind == "external" and line not in guarded
    }
    assert unguarded - set(sys.stdlib_module_names) <= {"torch", "numpy", "transformers"}, sorted(external)
    assert GRAPH[name] <= HUB_FILES, f"Hub file {name} imports {sorted(GRAPH[name] - HUB_FILES)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[0] == "audio"))
def test_audio_imports_no_tool(name):
    tools = {target for target in GRAPH[name] if target.split(".")[0] in TOOLS}
    assert not tools, f"the data layer ({name}) imports tools: {sorted(tools)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_tools_import_each_other_through_public_names(name):
    """A name imported from another subpackage must be in that module's `__all__`."""
    here = name.split(".")[0] if "." in name else None
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0 or node.module is None:
            continue
        target = next(t for k, line, t in imports_of(name, MODULES[name]) if k == "internal" and line == node.lineno)
        if target.split(".")[0] == here or target not in MODULES:
            continue
        exported = _all_of(MODULES[target])
        private = [alias.name for alias in node.names if alias.name not in exported]
        assert not private, f"{name} imports names outside {target}.__all__: {private}"


def _all_of(path: Path) -> set[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target in GRAPH and not state.get(target):
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if not state.get(module):
            visit(module)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    limit = 650 if name in HUB_FILES else 520
    assert lines <= limit, f"{MODULES[name]} has {lines} lines (at most about {limit}): split it by concern"
