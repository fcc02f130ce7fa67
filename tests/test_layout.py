"""The layout shows the architecture (docs/design.md): core ← integrations (hf, sklearn) ← training ← cli.

Every import is read from the source, those inside functions (lazy ones) included, so that a lazy import
cannot bring back a cycle or an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import l0sparse

PACKAGE = Path(l0sparse.__file__).parent

#: what each tier may import from the package besides itself
ALLOWED = {
    "core": set(),
    "hf": {"core"},
    "sklearn": {"core"},
    "training": {"core", "hf"},
    "cli": {"core", "hf", "sklearn", "training"},
    "__init__": {"core"},
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The l0sparse modules that ``path`` imports, anywhere in it, as absolute names."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("l0sparse"):
                found.add(target)
                # `from . import x` / `from .pkg import module` name modules too
                found.update(f"{target}.{alias.name}" for alias in node.names
                             if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("l0sparse"))
    return found - {name}


def _tier(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_sits_in_a_tier():
    assert {_tier(name) for name in GRAPH} <= set(ALLOWED)


def test_imports_flow_one_way_between_tiers():
    wrong = sorted(f"{source} imports {target}" for source, targets in GRAPH.items() for target in targets
                   if _tier(target) != _tier(source) and _tier(target) not in ALLOWED[_tier(source)] and target != "l0sparse")
    assert wrong == []


def test_nothing_imports_the_command_line():
    assert sorted(source for source, targets in GRAPH.items() if "l0sparse.cli" in targets) == ["l0sparse.__main__"]


def test_the_package_has_no_import_cycle():
    """Package __init__ files re-export their modules, so an edge into a package is an edge into its __init__ only."""
    def reaches(start: str, goal: str, seen: frozenset) -> bool:
        for name in GRAPH.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    assert [name for name in GRAPH if reaches(name, name, frozenset())] == []


def test_the_harness_is_not_imported_by_what_it_reports_on():
    assert "l0sparse.training.train" not in GRAPH["l0sparse.core.report"] | GRAPH["l0sparse.training.runs"]


#: the longest a function in src may be, from ``def`` to its last line (docstring included); McCabe 15 is ruff's C901
MAX_FUNCTION_LINES = 60


def test_no_function_in_src_is_longer_than_the_limit():
    """Long functions are where the bugs hid (issue #24); a justified exception says ``# long: why`` on its def line."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and "# long:" not in lines[node.lineno - 1]:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert too_long == []
