"""docs/design.md names every module of ``service/``: a newcomer finds each one's home there."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_service_module_is_named_in_the_design_doc() -> None:
    doc = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    service = ROOT / "service"
    modules = [
        p.relative_to(service).as_posix()
        for p in service.rglob("*.py")
        if p.name not in {"__init__.py", "__main__.py"} or p.parent.name == "cli"
    ]
    # The CLI's __init__ holds main() and is named; its __main__ only runs it.
    modules = [m for m in modules if m != "cli/__main__.py"]
    unnamed = sorted(m for m in modules if f"`{m}`" not in doc)
    assert not unnamed, f"docs/design.md does not name {unnamed}: add a row to its module table"
    packages = sorted(
        p.relative_to(service).as_posix()
        for p in service.iterdir()
        if p.is_dir() and (p / "__init__.py").exists()
    )
    assert packages, "no packages found under service/"
    unnamed_packages = [p for p in packages if f"`{p}/" not in doc]
    assert not unnamed_packages, f"docs/design.md does not name the packages {unnamed_packages}"
