"""The package's lazy names and its TYPE_CHECKING block list the same things, and each resolves."""

from __future__ import annotations

import ast
from pathlib import Path

import vessel_kit


def test_every_lazy_name_resolves_and_is_declared_for_type_checkers():
    tree = ast.parse(Path(vessel_kit.__file__).read_text())
    declared = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        if isinstance(statement, ast.ImportFrom)
        for alias in statement.names
    }
    assert declared == set(vessel_kit._LAZY)
    for name, module in vessel_kit._LAZY.items():
        value = getattr(vessel_kit, name)
        assert getattr(value, "__module__", f"vessel_kit.{module}").startswith("vessel_kit"), name


def test_module_level_imports_have_no_cycles():
    """Module-level ``from .x import`` edges between vessel_kit modules form no cycle (imports
    inside functions are the deliberate lazy ones)."""
    package = Path(vessel_kit.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                target = f"{anchor}.{node.module}" if node.module else anchor
                edges.add(target)
        graph[name] = edges
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 2 or module not in graph:
            return
        assert state.get(module) != 1, f"import cycle: {' -> '.join(trail + [module])}"
        state[module] = 1
        for target in graph[module]:
            visit(target, trail + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])


def test_inference_does_not_import_training_modules():
    import subprocess
    import sys

    code = ("import sys, vessel_kit.infer, vessel_kit.submit; "
            "print(sorted(m for m in sys.modules if m in ('vessel_kit.data', 'vessel_kit.training', 'vessel_kit.augment', 'albumentations')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
