"""Layers import downward only, and one place chooses the engine: read from the syntax tree.

- No module of ``gft_kernels`` imports ``gft_train`` (an ``import``, a ``from ... import`` or an
  ``importlib.import_module`` of a literal name): the kernel package never reaches up to the
  trainer that uses it.
- No module imports an underscored name from another module of the project: a helper used
  across files has a public name.
- Outside the registry (``gft_kernels/engine.py``) no code compares a value with an engine's
  name: what an engine can do is asked of it (``engine.Capabilities``), never read from its name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE_NAMES = {"torch", "triton", "reference"}


def _modules(*packages, root=ROOT):
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _imported_names(tree):
    """(line, module name) of every import of the tree, relative ones made absolute by dots."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, "." * node.level + (node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _upward_imports(package, forbidden, root=ROOT):
    found = []
    for path, tree in _modules(package, root=root):
        for line, name in _imported_names(tree):
            if name == forbidden or name.startswith(forbidden + "."):
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def test_gft_kernels_imports_nothing_from_gft_train():
    assert _upward_imports("gft_kernels", "gft_train") == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself, on a package that does import upward (in each of the three forms)."""
    (tmp_path / "kern").mkdir()
    (tmp_path / "kern" / "a.py").write_text("import gft_train.trainer\n")
    (tmp_path / "kern" / "b.py").write_text("from gft_train.integrations import verl\n")
    (tmp_path / "kern" / "c.py").write_text("import importlib\nimportlib.import_module('gft_train.step')\n")
    assert len(_upward_imports("kern", "gft_train", root=tmp_path)) == 3


def test_no_underscored_name_is_imported_across_modules():
    found = []
    for path, tree in _modules("gft_kernels", "gft_train"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("gft_")):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
    assert found == []


def _name_tests(tree):
    """Lines where a value is compared with an engine's name (==, !=, in, not in)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(v, ast.Constant) and v.value in ENGINE_NAMES for v in values):
                yield node.lineno


def test_only_the_registry_tests_an_engines_name():
    found = []
    for path, tree in _modules("gft_kernels", "gft_train"):
        if path == ROOT / "gft_kernels" / "engine.py":
            continue
        found += [f"{path.relative_to(ROOT)}:{line}" for line in _name_tests(tree)]
    assert found == []
    assert list(_name_tests(ast.parse('if backend == "torch" or name in ("x", "triton"): pass'))) == [1, 1]
