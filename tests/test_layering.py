"""Lower packages never import higher ones (docs/architecture.md): read every import statement of
the package's source, eager or lazy, and check the rules that keep the layers apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sqakd"

#: package -> packages of sqakd it must never import
FORBIDDEN = {
    "engine": {"quant", "export", "pipeline", "cli", "bench", "demo"},
    "quant": {"export", "engine", "methods", "distill", "pipeline", "cli"},
    "distill": {"methods", "engine", "pipeline", "cli", "export"},
    "methods": {"engine", "pipeline", "cli", "export"},
    "models": {"quant", "engine", "methods", "export", "pipeline", "cli"},
    "data": {"quant", "engine", "methods", "export", "models", "pipeline", "cli"},
    "zeroshot": {"quant", "distill", "engine", "methods", "export", "models", "pipeline", "cli"},
}


def imported_packages(path: Path) -> set[str]:
    """The first-level sqakd packages that the file at ``path`` imports (relative or absolute)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("sqakd", "engine", "x")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(module[: len(module) - node.level])
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [target] if node.module else [[*target, alias.name] for alias in node.names]
            else:
                names = [node.module.split(".")] if node.module else []
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        found |= {parts[1] for parts in names if len(parts) > 1 and parts[0] == "sqakd"}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_lower_package_imports_no_higher_one(package):
    offending = {
        str(path.relative_to(PACKAGE)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((PACKAGE / package).rglob("*.py"))
    }
    assert not {file: names for file, names in offending.items() if names}


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    assert imported_packages(PACKAGE / "pipeline.py") >= {"engine", "quant", "methods", "data"}
    assert "quant" in imported_packages(PACKAGE / "methods" / "base.py")
