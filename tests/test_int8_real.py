"""bench/int8_real.py: which refusal gets which override, each query's AP@5 from ``whaleid
evaluate``'s predictions (unseen individuals scored as new_individual), the paired figures and the
table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.int8_real import last_line, override_for, paired, query_aps, render, truths


def test_only_the_documented_refusals_have_an_override() -> None:
    assert override_for("int8 embeddings stray from fp32: cosine 0.87 < 0.98") == (
        "--int8-min-cosine",
        "0",
    )
    assert override_for("too few validation queries to judge int8's MAP@5: 17 < 100") == (
        "--int8-accept-unjudged",
    )
    assert override_for("int8 loses validation MAP@5: 0.5 against 0.6 fp32") is None


def test_last_line_takes_the_text_after_the_marker_of_the_last_match() -> None:
    text = "a not exported: first\nb INFO x\nc ERROR not exported: second one\n"
    assert last_line(text, "not exported:") == "second one"
    assert last_line(text, "int8 check:") == ""


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["image,species,individual_id,encounter"]
    lines += [f"{image},cow,{ind},e-{image}" for image, ind in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_query_aps_score_unseen_individuals_as_new(tmp_path: Path) -> None:
    gallery = _csv(tmp_path / "gallery.csv", [("g1.jpg", "anna"), ("g2.jpg", "bert")])
    queries = _csv(tmp_path / "queries.csv", [("q1.jpg", "anna"), ("q2.jpg", "zoe")])
    truth = truths(gallery, queries)
    assert truth == {"q1.jpg": "anna", "q2.jpg": "new_individual"}
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("image,predictions\nq1.jpg,bert anna\nq2.jpg,new_individual anna\n")
    assert query_aps(predictions, truth) == {"q1.jpg": 0.5, "q2.jpg": 1.0}


def test_paired_figures_and_the_table() -> None:
    fp32 = {f"q{i}": 1.0 for i in range(10)}
    int8 = {**fp32, "q0": 0.5, "q1": 0.0}
    m = paired(fp32, int8)
    assert m["queries"] == 10 and m["queries_answered_differently"] == 2
    assert m["fp32_map5"] == 1.0 and m["int8_map5"] == pytest.approx(0.85)
    assert m["drop"] == pytest.approx(0.15)
    low, high = m["drop_interval"]
    assert 0.0 <= low <= 0.15 <= high
    assert m["drop_verdict"].startswith("unjudged")  # 10 queries < the gate's 100
    row = {
        "set": "cows",
        "map5": m,
        "embed": {"fp32": {"p50_ms": 10.0}, "int8": {"p50_ms": 5.0}},
        "size_mb": {"fp32": 14.8, "int8": 4.1},
        "export": {"refused": "stray", "override": ["--int8-min-cosine", "0"]},
    }
    table = render([row], "cmd")
    assert "| cows | 10 | 1.000 | 0.850 | -0.150 " in table
    assert "10.0 / 5.0 ms (2.00x)" in table and "`--int8-min-cosine 0`" in table
    assert table.rstrip().endswith("Reproduce: `cmd`")
