"""The package's dependencies point downward: a lower layer never imports a higher one.

Every import counts, lazy ones inside functions too (they are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"

TRAINER = ("training.recipe", "training.worker", "training.tracking", "training.packing", "training.resume")

# layer -> the parts of tunelab it must not import
FORBIDDEN = {
    "data": ("api", "ui", "serving", "training", "evals", "models", "store"),
    "store": ("api", "ui", "serving", "training", "evals", "models"),
    "models": ("api", "ui", "serving", "training", "evals"),
    "serving": ("api", "ui", "training", "evals"),
    # Evals sample through the serving engine and never import the trainer or the API.
    "evals": ("api", "ui", "training"),
    # The API and the console never import the trainer: jobs are rows a worker claims. The pure
    # modules that describe a job (its hyperparameters, the hooks' values) are allowed.
    "api": TRAINER,
    "ui": TRAINER,
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n.removeprefix("tunelab.") for n in names if n.startswith("tunelab.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_upward_import(layer: str):
    found = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in imports_of(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                found.append(f"{path.relative_to(PACKAGE)} imports tunelab.{name}")
    assert found == []


def test_the_check_can_fail(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tunelab.serving.engine import Engine\n")
    assert "serving.engine" in imports_of(module)
