"""The reporting half of ``bench/quality.py``: docs/identification-quality.md from the raw figures
a run saved (``SCRATCH/results.json``), through ``quality.md.j2``; measures nothing, so a report
can be written again from saved results (``bench/quality.py --render-only``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE = Path(__file__).with_name("quality.md.j2")


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2))


def load_results(path: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads(path.read_text())
    return results


def render(results: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["f3"] = lambda v: "–" if v is None else f"{v:.3f}"
    return env.get_template(TEMPLATE.name).render(**results)
