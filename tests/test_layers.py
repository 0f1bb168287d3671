"""``service/`` is layered one way: a package imports only the packages below it, and the
top-level modules (the shared vocabulary) import no package. docs/design.md lists the order."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"

# Lowest first, as in docs/design.md's table.
LAYERS = [
    "db",
    "access",
    "store",
    "onnx",
    "gallery",
    "outbound",
    "matching",
    "catalogue",
    "jobs",
    "models",
    "api",
    "cli",
]
TOP = ["client"]  # above everything


def _imports(path: Path) -> set[str]:
    """The service modules ``path`` imports, at any depth (function-local imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "service":
                found |= {f"service.{a.name}" for a in node.names}
            elif node.module.startswith("service."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("service.")}
    return found


def _unit(module: str) -> str:
    """The package a module belongs to, or the top-level module's own name."""
    return module.split(".")[1]


def _rank(unit: str) -> int:
    if unit in LAYERS:
        return 1 + LAYERS.index(unit)
    if unit in TOP:
        return 1 + len(LAYERS)
    return 0  # a top-level module


def test_every_package_imports_only_the_ones_below_it() -> None:
    wrong = []
    for path in sorted(SERVICE.rglob("*.py")):
        parts = path.relative_to(SERVICE.parent).with_suffix("").parts
        me = _unit(".".join(parts)) if len(parts) > 1 else "service"
        for module in _imports(path):
            other = _unit(module)
            if other == me or other in {"__version__"}:
                continue
            if _rank(other) >= _rank(me) and not (_rank(me) == 0 and _rank(other) == 0):
                wrong.append(f"{path.relative_to(SERVICE.parent)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_layers_cover_every_package() -> None:
    packages = {p.parent.name for p in SERVICE.glob("*/__init__.py")}
    assert packages == set(LAYERS)


def test_the_service_imports_no_migrations_training_or_export() -> None:
    """``migrations/env.py`` imports ``service``; the service finds the migration scripts as
    data (``service.db.migrate.script_location``) and never imports them, nor TensorFlow's side."""
    wrong = []
    for path in sorted(SERVICE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] in {"migrations", "training", "model_export", "tensorflow"}:
                    wrong.append(f"{path.relative_to(SERVICE.parent)} imports {name}")
    assert not wrong, "\n".join(wrong)


# Modules that training (and the bench) import without the service's database, index or store:
# each imports only top-level modules, so ``import service.catalogue.csv_file`` pulls in no layer.
STANDALONE = ["catalogue/csv_file.py", "outbound/redact.py"]


def test_the_standalone_modules_import_no_package() -> None:
    wrong = []
    for name in STANDALONE:
        path = SERVICE / name
        assert path.exists(), name
        assert not _imports(path.parent / "__init__.py"), f"{path.parent}/__init__.py imports"
        for module in _imports(path):
            if _rank(_unit(module)) != 0:
                wrong.append(f"{name} imports {module}")
    assert not wrong, "\n".join(wrong)
