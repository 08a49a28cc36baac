"""The package layering is a checked contract, not a convention: import-linter's layers (pyproject.toml
[tool.importlinter]), no private name used across modules, every subpackage installed, and calq installable beside
PyPI's `kernels` package (Hugging Face's hub kernels), whose import name the kernels/ folder would otherwise shadow."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def lint_imports() -> int:
    from importlinter.cli import lint_imports as run

    return run(config_filename=str(PYPROJECT), no_cache=True)


def test_layers_hold():
    assert lint_imports() == 0


@pytest.mark.parametrize("low,high", [("quant/data/probe_layering.py", "quant.pipeline"),
                                      ("quant/methods/step.py", "quant.methods.table"),
                                      ("kernels/probe_layering.py", "quant.errors")])
def test_a_lower_layer_importing_a_higher_one_fails(low, high):
    """Plant one upward import; the contract must catch it."""
    path = ROOT / low
    original = path.read_text() if path.exists() else None
    try:
        path.write_text((original or "") + f"\nimport {high}  # noqa: F401,E402\n")
        assert lint_imports() == 1
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_text(original)


def _private_uses(path: Path) -> list[str]:
    """`from m import _x` and `m._x` where m is another calq module."""
    tree = ast.parse(path.read_text())
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name.split(".")[0] in ("quant", "calq_kernels")}
    modules |= {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] in ("quant", "calq_kernels") for alias in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(("quant", "calq")):
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    uses = {str(p.relative_to(ROOT)): _private_uses(p) for folder in ("quant", "kernels", "benchmarks")
            for p in sorted((ROOT / folder).rglob("*.py"))}
    assert {k: v for k, v in uses.items() if v} == {}


def test_the_check_sees_private_uses(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from quant.checks import evaluation\nfrom quant.files import _default_permissions\n"
                     "evaluation._reduce_kind\n")
    assert _private_uses(probe) == ["from quant.files import _default_permissions", "evaluation._reduce_kind"]


def test_every_subpackage_is_installed():
    packages = set(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quant").rglob("__init__.py")}
    assert on_disk | {"calq_kernels"} == packages


def test_calq_installs_beside_the_kernels_package(tmp_path):
    """Outside the checkout (as a user has it): `kernels` is Hugging Face's package, `calq_kernels` ours, and
    transformers, which imports `kernels` when present, still loads."""
    code = ("import kernels, calq_kernels, transformers.integrations.hub_kernels, quant.methods;"
            "print(kernels.__file__); print(calq_kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    hub, ours = out.stdout.split()
    assert "site-packages" in hub and Path(ours).parent == ROOT / "kernels"


def test_top_level_names_are_the_exported_objects_after_every_subpackage_is_imported():
    """Importing a subpackage sets it as an attribute of `quant`; a subpackage named like an exported function
    would then shadow it (`from quant import evaluate` gave a module)."""
    code = ("import importlib, pkgutil, quant\n"
            "for m in pkgutil.walk_packages(quant.__path__, 'quant.'): importlib.import_module(m.name)\n"
            "bad = [n for n in quant.__all__ if getattr(quant, n) is not quant.__getattr__(n)]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
