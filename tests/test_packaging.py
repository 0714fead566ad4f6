"""Every third-party module mmtx imports is a core dependency, or a package of an extra imported through
`mmtx.errors.optional` inside the function that needs it (whose error names the extra). A lean install
(`pip install .`, no extras) is exercised for real by scripts/lean_install_check.py in .ci/run."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from mmtx.errors import MissingError, optional

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


CORE = {_name(r) for r in PYPROJECT["dependencies"]}
EXTRAS = {extra: {_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()}


DISTRIBUTIONS = packages_distributions()


def _distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in DISTRIBUTIONS.get(module, [])}


def _imports():
    """(file:line, top-level module, at module level?) of every absolute import under mmtx/."""
    for path in sorted((ROOT / "mmtx").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                yield f"{path.relative_to(ROOT)}:{node.lineno}", name.split(".")[0], id(node) not in in_function


def _third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module not in ("mmtx", "__future__")


def test_every_direct_import_is_a_core_dependency():
    undeclared = []
    for where, module, _ in _imports():
        if _third_party(module) and not _distributions(module) & CORE:
            undeclared.append(f"{where}: {module} ({', '.join(sorted(_distributions(module))) or 'not installed'})")
    assert not undeclared, ("imported directly but not in pyproject's dependencies (declare it, or import it with "
                            "mmtx.errors.optional(module, extra, purpose) inside the function that needs it):\n"
                            + "\n".join(undeclared))


def _optional_calls():
    for path in sorted((ROOT / "mmtx").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "optional":
                args = [a.value for a in node.args[:2] if isinstance(a, ast.Constant)]
                yield f"{path.relative_to(ROOT)}:{node.lineno}", args


def test_every_optional_import_names_the_extra_that_installs_it():
    calls = list(_optional_calls())
    assert len(calls) >= 8  # wandb (3), datasets (4 sources), onnx, transformers
    for where, args in calls:
        assert len(args) == 2, f"{where}: optional() takes the module and the extra as literals"
        module, extra = args
        assert extra in EXTRAS, f"{where}: extra {extra!r} is not in pyproject's optional-dependencies"
        dists = _distributions(module)
        assert dists & EXTRAS[extra], f"{where}: {module} ({dists}) is not installed by mmtx[{extra}]"
        assert not dists & CORE, f"{where}: {module} is a core dependency; import it directly"


def test_the_all_extra_holds_every_user_extra():
    listed = re.search(r"\[(.*)\]", PYPROJECT["optional-dependencies"]["all"][0]).group(1).split(",")
    assert set(listed) == set(EXTRAS) - {"all", "dev", "docs"}


def test_dev_installs_test_tools_only():
    # moto: a local S3 for the streaming tests; import-linter: the layers contract (lint-imports)
    assert EXTRAS["dev"] == {"pytest", "pytest-xdist", "moto", "import-linter"}


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    with pytest.raises(MissingError, match=r"logger=wandb needs wandb, which is not installed: "
                                           r"pip install 'mmtx\[wandb\]'"):
        monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
        from mmtx.training.loggers import wandb

        wandb(save_dir=str(tmp_path))
    with pytest.raises(MissingError, match=r"pip install 'mmtx\[onnx\]'"):
        optional("no_such_module_for_mmtx", "onnx", "mmtx.export format=onnx")
