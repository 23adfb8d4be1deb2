"""The package's layers import one way, from the top down (docs/architecture.md, Layout)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rag_assets"
# Highest first: a module may import from its own layer and the ones below it.
LAYERS = ["defs", "top", "index", "nlp", "ingest", "common"]


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def imported_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rag_assets"):
            if node.module == "rag_assets":
                found.extend(f"rag_assets.{alias.name}" for alias in node.names)
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("rag_assets"))
    return found


def test_imports_flow_from_the_top_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module == "rag_assets.definitions":  # the code location names defs/ by path only
            continue
        mine = LAYERS.index(layer_of(module))
        for target in imported_modules(path):
            if LAYERS.index(layer_of(target)) < mine:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_each_layer_is_a_folder() -> None:
    for layer in LAYERS:
        if layer != "top":
            assert (PACKAGE / layer / "__init__.py").exists(), layer
