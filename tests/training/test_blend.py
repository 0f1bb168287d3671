"""Ensemble blending (§3.10): rank scores, penalties and coordinate ascent of the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.knn import NEW_INDIVIDUAL, map_at_5
from training.blend import (
    RANK_SCORES,
    Candidates,
    blend,
    learn_weights,
    run_blend,
)


def test_rank_scores_and_penalties() -> None:
    models = [{"q": ["a", "b", "c", NEW_INDIVIDUAL, "d"]}, {"q": ["b", "a"]}]
    c = Candidates.build(models, ["q"], {"a": 10, "b": 0})
    row = dict(zip(c.labels, c.scores.tolist(), strict=True))
    assert row["a"] == [10.0, 6.5] and row["b"] == [6.5, 10.0] and row["d"] == [2.7, 0.0]
    assert row[NEW_INDIVIDUAL] == [2.9 / 4, 0.0]  # down-weighted at rank 4
    penalty = dict(zip(c.labels, c.penalty.tolist(), strict=True))
    assert penalty["a"] == pytest.approx(0.33) and penalty["b"] == 0.0
    # a: 16.5 - 0.33 = 16.17 < b: 16.5
    assert c.top5(__import__("numpy").ones(2))[0][:2] == ["b", "a"]


def test_new_individual_keeps_its_score_in_first_or_second_place() -> None:
    c = Candidates.build([{"q": ["x", NEW_INDIVIDUAL]}], ["q"], {})
    assert (
        dict(zip(c.labels, c.scores[:, 0].tolist(), strict=True))[NEW_INDIVIDUAL] == RANK_SCORES[1]
    )


def synthetic_models(n: int = 60) -> tuple[list[dict[str, list[str]]], dict[str, str]]:
    """Three models, each wrong on a different third of the images (the truth third then): any
    two outvote the third, so the blend beats every single model."""
    truth = {f"img{i}": f"ind{i % 7}" for i in range(n)}
    models: list[dict[str, list[str]]] = [{}, {}, {}]
    for i, (image, t) in enumerate(truth.items()):
        for j, m in enumerate(models):
            wrong = f"ind{(i + 1 + j) % 7}"
            m[image] = [wrong, f"x{j}", t] if i % 3 == j else [t, wrong]
    return models, truth


def test_the_blend_beats_every_model() -> None:
    models, truth = synthetic_models()
    result = learn_weights(models, truth)
    assert result.model_map5 == pytest.approx([7 / 9] * 3)
    assert result.blend_map5 == 1.0
    blended = blend(models, result.weights)
    assert map_at_5([blended[i] for i in sorted(truth)], [truth[i] for i in sorted(truth)]) == 1.0


def test_coordinate_ascent_moves_the_weights() -> None:
    truth = {f"i{n}": f"t{n}" for n in range(20)}
    good = {i: [t] for i, t in truth.items()}
    bad = {i: ["wrong"] for i in truth}
    result = learn_weights([bad, good], truth)  # equal weights tie: the bad model's label first
    assert result.history[0] == 0.5 and result.blend_map5 == 1.0
    assert result.weights[1] > result.weights[0]
    assert all(b - a >= 1e-3 for a, b in zip(result.history, result.history[1:], strict=False))
    assert result.sweeps == 2  # one sweep that gained, one that did not


def test_cli_writes_a_report(tmp_path: Path) -> None:
    models, truth = synthetic_models(21)
    paths = []
    for n, m in enumerate(models):
        path = tmp_path / f"m{n}.csv"
        path.write_text(
            "image,predictions\n" + "".join(f"{i},{' '.join(p)}\n" for i, p in m.items())
        )
        paths.append(path)
    (tmp_path / "truth.csv").write_text(
        "image,individual_id\n" + "".join(f"{i},{t}\n" for i, t in truth.items())
    )
    (tmp_path / "train.csv").write_text("image,species,individual_id\nx.jpg,s,ind1\n")
    run_blend(
        paths,
        truth_csv=tmp_path / "truth.csv",
        catalogue_csv=tmp_path / "train.csv",
        out=tmp_path / "blend.json",
        blended_csv=tmp_path / "blended.csv",
    )
    report = json.loads((tmp_path / "blend.json").read_text())
    assert [m["map5"] for m in report["models"]] == pytest.approx([7 / 9] * 3)
    assert report["blend_map5"] == 1.0
    assert (tmp_path / "blended.csv").read_text().startswith("image,predictions\n")
