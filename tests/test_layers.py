"""ARCHITECTURE.md's rule, enforced: a lower layer never imports a higher one.

Every module of ``adps`` must be assigned a layer here; a new subpackage or module fails this
test until it is placed, so the layering stays a decision rather than an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "adps"

# Layer of each top-level module or subpackage of adps (1 = physics and data ... 4 = interfaces).
LAYERS = {
    "__init__": 0,  # the package docstring and version only
    "config": 0,  # config-file loading; imports nothing of adps
    "mri": 1,
    "data": 1,
    "metrics": 2,
    "nn": 2,
    "orchestration": 3,
    "cli": 4,
    "demo": 4,
    "__main__": 4,
}
# Layers 1 and 2 run anywhere (a GPU benchmark imports them without Ray or MLflow).
FORBIDDEN_BELOW_ORCHESTRATION = {"ray", "mlflow"}


def top_level_part(module_path: Path) -> str:
    relative = module_path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imported_modules(source: Path) -> list[str]:
    tree = ast.parse(source.read_text(), filename=str(source))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_every_module_has_a_layer() -> None:
    unplaced = {top_level_part(p) for p in PACKAGE.rglob("*.py")} - set(LAYERS)
    assert not unplaced, f"assign a layer in tests/test_layers.py to: {sorted(unplaced)}"


def test_no_upward_imports() -> None:
    violations = []
    for source in PACKAGE.rglob("*.py"):
        own = LAYERS[top_level_part(source)]
        for name in imported_modules(source):
            parts = name.split(".")
            if parts[0] == "adps" and len(parts) > 1 and LAYERS.get(parts[1], 0) > own:
                violations.append(f"{source.relative_to(PACKAGE)} (layer {own}) imports {name}")
            if own in (1, 2) and parts[0] in FORBIDDEN_BELOW_ORCHESTRATION:
                violations.append(f"{source.relative_to(PACKAGE)} (layer {own}) imports {name}")
    assert not violations, "\n".join(violations)


def test_platform_is_not_a_package() -> None:
    # platform/__init__.py would shadow the standard library's `platform` module.
    assert not (PACKAGE.parent / "__init__.py").exists()
