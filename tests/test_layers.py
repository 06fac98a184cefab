"""Imports point one way (docs/design.md, "The layers"): each package imports only those to
its left, and decode and io not each other. Read from the source, so a new upward import fails
here before it becomes a circle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minipara"
FLOOR = {"errors": 0, "checks": 0, "cli": 0, "model": 1, "methods": 2, "io": 3, "decode": 3, "train": 4, "api": 5}
TOP = 6  # serve, bench, commands, __main__, the package's __init__


def floor(module: str) -> tuple[str, int]:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return name, FLOOR.get(name, TOP)


def test_imports_point_one_way():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here, level = floor("minipara." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minipara":
                target = node.module if node.module != "minipara" else f"minipara.{node.names[0].name}"
                there, to = floor(target)
                if to > level or {here, there} == {"io", "decode"}:
                    upward.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {here} imports {there}")
    assert not upward, "\n".join(upward)
