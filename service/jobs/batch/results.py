"""A batch job's answers: each photo's, in the order the photos were given, as JSON, as a
Kaggle-style ``results.csv``, and as the callback carries them."""

from __future__ import annotations

import csv
import io
from typing import Any

from service.db.tables import Job

# Spreadsheets run a cell that starts with one of these as a formula (OWASP: CSV injection).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def results(job: Job, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Each photo's answer (or error), in the order the photos were given, from ``offset``."""
    done = (job.result or {}).get("items", {})
    items = job.params.get("items", [])
    end = len(items) if limit is None else min(len(items), offset + limit)
    out = []
    for index in range(offset, end):
        entry = done.get(str(index))
        name = items[index]["name"]
        out.append(
            {"index": index, "image": name, "state": "pending"}
            if entry is None
            else {"index": index, "image": name, **entry}
        )
    return out


def spreadsheet_safe(cell: str) -> str:
    """A cell a spreadsheet shows as text: one that starts like a formula gets a quote."""
    return "'" + cell if cell.startswith(_FORMULA_PREFIXES) else cell


def results_csv(job: Job) -> str:
    """Kaggle-style: ``image,predictions`` with the five ids, best first, space-separated."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "predictions"])
    for row in results(job):
        ids = [c["individual_id"] for c in row.get("candidates", [])][:5]
        writer.writerow([spreadsheet_safe(row["image"]), spreadsheet_safe(" ".join(ids))])
    return buffer.getvalue()


def payload(job: Job, state: str) -> dict[str, Any]:
    """What the callback carries."""
    return {
        "job_id": job.id,
        "kind": job.kind,
        "state": state,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "errors": list(job.errors),
        "results": results(job),
    }
