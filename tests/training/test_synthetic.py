"""The synthetic catalogue: deterministic, Happywhale-style, individuals that stay themselves.

No TensorFlow needed: this also runs in the serving virtualenv (the demo gallery is written there).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from training.synthetic import (
    Renderer,
    individual_id,
    main,
    make_individual,
    render_body,
    write_catalogue,
)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_by_seed(tmp_path: Path) -> None:
    args = {"individuals": 3, "photos": 2, "size": 64, "queries": 1, "unseen": 1}
    write_catalogue(tmp_path / "a", seed=5, **args)
    write_catalogue(tmp_path / "b", seed=5, **args)
    write_catalogue(tmp_path / "c", seed=6, **args)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_happywhale_csv_and_held_out_queries(tmp_path: Path) -> None:
    main(
        [
            str(tmp_path),
            "--individuals",
            "4",
            "--photos",
            "3",
            "--queries",
            "2",
            "--unseen",
            "2",
            "--size",
            "80",
            "--species",
            "bottlenose_dolphin,humpback_whale",
            "--seed",
            "9",
        ]
    )
    with (tmp_path / "catalogue.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "species", "individual_id"]
    assert len(rows) == 12
    gallery_ids = {r["individual_id"] for r in rows}
    assert gallery_ids == {
        individual_id(s, 9, i) for i, s in enumerate(["bottlenose_dolphin", "humpback_whale"] * 2)
    }
    assert {r["species"] for r in rows} == {"bottlenose_dolphin", "humpback_whale"}
    with (tmp_path / "queries.csv").open() as f:
        queries = list(csv.DictReader(f))
    known = [q for q in queries if q["individual_id"] in gallery_ids]
    unseen = [q for q in queries if q["individual_id"] not in gallery_ids]
    assert len(known) == 4 * 2 and len(unseen) == 2 * 3
    assert not {q["image"] for q in queries} & {r["image"] for r in rows}  # held out
    for r in rows + queries:
        with Image.open(tmp_path / "images" / r["image"]) as image:
            assert image.format == "JPEG" and image.size == (80, 80)


def test_marks_are_stable_and_individual() -> None:
    a1, a2 = make_individual("humpback_whale", 1, 7), make_individual("humpback_whale", 1, 7)
    b = make_individual("humpback_whale", 1, 8)
    assert a1 == a2 and a1 != b
    assert a1.notches and a1.patches and a1.scars and a1.pattern
    body_a = render_body(a1, 96)
    body_b = render_body(b, 96)
    assert np.array_equal(render_body(a2, 96).rgb, body_a.rgb)
    assert np.abs(body_a.rgb - body_b.rgb).mean() > 5  # different animals look different
    assert 0.1 < body_a.alpha.mean() < 0.9  # a silhouette, not the whole frame


def test_photos_of_one_individual_vary() -> None:
    ind = make_individual("bottlenose_dolphin", 2, 0)
    renderer = Renderer(96)
    shots = [np.asarray(renderer.photo(ind, 2, 0, s), dtype=np.float32) for s in range(4)]
    for i in range(1, 4):
        assert np.abs(shots[0] - shots[i]).mean() > 5  # pose, light, background change
    assert renderer.jpeg(ind, 2, 0, 1) == Renderer(96).jpeg(ind, 2, 0, 1)


def test_same_individual_is_closer_than_another_in_canonical_frame() -> None:
    """The marks carry identity: the same animal's body textures match, others' do not."""
    inds = [make_individual("bottlenose_dolphin", 4, i) for i in range(6)]
    bodies = [render_body(i, 64).rgb.mean(axis=2) * render_body(i, 64).alpha for i in inds]
    again = render_body(inds[0], 64)
    same = np.abs(again.rgb.mean(axis=2) * again.alpha - bodies[0]).mean()
    others = [np.abs(bodies[0] - b).mean() for b in bodies[1:]]
    assert same == 0.0 and min(others) > 1.0
