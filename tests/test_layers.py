"""ARCHITECTURE.md's rule, enforced: a lower layer never imports a higher one.

Every module of ``adps`` must be assigned a layer here; a new subpackage or module fails this
test until it is placed, so the layering stays a decision rather than an accident.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "adps"

# Layer of each top-level module or subpackage of adps (1 = physics and data ... 4 = interfaces).
LAYERS = {
    "__init__": 0,  # the package docstring and version only
    "config": 0,  # config-file loading; imports nothing of adps
    "mri": 1,
    "data": 1,
    "images": 1,  # natural-image operators (section 3.1 of the paper)
    "linear_operator": 1,  # the one operator interface of both studies
    "metrics": 2,
    "perceptual": 2,  # LPIPS and FID; local weights only, no download
    "crossover": 2,  # the cross-over analysis of a results table (numpy only)
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


def _lazy_facade_imports(tree: ast.Module) -> set[int]:
    """Ids of import nodes inside the package ``__getattr__`` (PEP 562): the one sanctioned way
    for ``adps/__init__.py`` to expose a higher layer (``adps.load_model``) without importing it
    when the package loads (checked by :func:`test_importing_adps_loads_no_ray_or_mlflow`)."""
    lazy: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            lazy.update(id(inner) for inner in ast.walk(node))
    return lazy


def imported_modules(source: Path) -> list[str]:
    tree = ast.parse(source.read_text(), filename=str(source))
    lazy = _lazy_facade_imports(tree) if source == PACKAGE / "__init__.py" else set()
    names = []
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
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


def test_importing_adps_loads_no_ray_or_mlflow() -> None:
    # What a GPU benchmark imports must work where neither Ray nor MLflow is installed.
    code = (
        "import sys, adps, adps.nn, adps.mri, adps.data.dataset, adps.metrics; "
        "loaded = sorted(m for m in ('ray', 'mlflow') if m in sys.modules); "
        "assert not loaded, loaded; assert callable(adps.load_model)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
