"""The split of bench/quality.py: encounters never straddle the gallery and the queries, unseen
individuals have no gallery photo, and the caps and the seed hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.quality import (
    Case,
    DataSet,
    Done,
    ModeUnavailable,
    Photo,
    bursts,
    prepare_fused,
    prepare_local,
    split,
    without_duplicates,
)


def catalogue(individuals: int, encounters: int, photos: int) -> DataSet:
    rows = [
        Photo(f"i{i}/e{e}/p{p}.png", f"ind-{i}", "bottlenose_dolphin", f"ind-{i}/e{e}")
        for i in range(individuals)
        for e in range(encounters)
        for p in range(photos)
    ]
    return DataSet("toy", "toy", Path("."), rows, [], "", calibration=True)


def test_no_encounter_on_two_sides_and_unseen_never_in_the_gallery() -> None:
    data = catalogue(individuals=20, encounters=6, photos=3)
    s = split(data, seed=0, max_queries=None)
    sides = [s.gallery, s.queries, s.calibration]
    encounters = [{p.encounter for p in side} for side in sides]
    assert not encounters[0] & encounters[1]
    assert not encounters[0] & encounters[2]
    assert not encounters[1] & encounters[2]
    assert len(s.unseen) == 4  # 20 % of 20
    assert not s.unseen & {p.individual_id for p in s.gallery}
    assert s.unseen <= {q.individual_id for q in s.queries}
    # Known: 3 of 6 encounters in the gallery, 1 calibration, 2 queries.
    assert len(s.gallery) == 16 * 3 * 3
    assert s.counts()["known_queries"] == 16 * 2 * 3


def test_caps_and_seed() -> None:
    data = catalogue(individuals=20, encounters=6, photos=4)
    data.gallery_per_encounter, data.queries_per_encounter = 2, 1
    s = split(data, seed=0, max_queries=25)
    assert len(s.queries) == 25
    assert len(s.gallery) == 16 * 3 * 2
    again = split(data, seed=0, max_queries=25)
    assert (again.gallery, again.queries) == (s.gallery, s.queries)
    assert split(data, seed=1, max_queries=25).unseen != s.unseen


def test_conflicting_duplicates_are_both_dropped() -> None:
    rows = [
        {"image": "a/x.jpg", "individual_id": "A", "exact_duplicate_of": ""},
        {"image": "b/x.jpg", "individual_id": "B", "exact_duplicate_of": "a/x.jpg"},
        {"image": "a/y.jpg", "individual_id": "A", "exact_duplicate_of": ""},
        {"image": "a/z.jpg", "individual_id": "A", "exact_duplicate_of": "a/y.jpg"},
    ]
    kept, notes = without_duplicates(rows)
    assert [r["image"] for r in kept] == ["a/y.jpg"]
    assert len(notes) == 2


def test_bursts_join_close_frames_of_one_camera() -> None:
    frames = {
        "DSCN0100.jpg": ("DSCN", 100),
        "DSCN0110.jpg": ("DSCN", 110),
        "DSCN0200.jpg": ("DSCN", 200),
        "DSC_0105.jpg": ("DSC_", 105),
        "odd.png": None,
    }
    got = bursts(frames, "seal")
    assert got["DSCN0100.jpg"] == got["DSCN0110.jpg"] == "seal/DSCN0100"
    assert got["DSCN0200.jpg"] == "seal/DSCN0200"
    assert got["DSC_0105.jpg"] == "seal/DSC_0105"
    assert got["odd.png"] == "seal/odd"


class FakeCli:
    """Records ``whaleid`` commands; answers as the command line will once modes 2-3 exist."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def whaleid(self, *args: str, timeout: float = 600) -> Done:
        self.calls.append(args)
        stderr = "INFO whaleid: registered model local-features 1 as id 2\n"
        return Done("", stderr if args[:2] == ("models", "add") else "", 0.1)


def case(calibration: Path | None, features: dict[str, bool]) -> tuple[Case, FakeCli]:
    cli = FakeCli()
    data = catalogue(individuals=5, encounters=2, photos=1)
    q = Path("q.csv")
    return Case(data, cli, 1, Path("g.csv"), q, calibration, features), cli  # type: ignore[arg-type]


def test_local_and_fused_modes_invoke_the_command_line_as_documented() -> None:
    both = {"model": True, "verification": True}
    local, cli = case(None, both)
    assert prepare_local(local).evaluate_args == ("--model", "2")
    assert cli.calls == [("models", "add", "builtin:local-features"), ("models", "activate", "2")]
    local, cli = case(Path("cal.csv"), both)
    prepare_local(local)
    assert cli.calls[-1] == ("models", "calibrate", "2", "cal.csv", "--images", ".")

    fused, cli = case(Path("cal.csv"), both)
    prepared = prepare_fused(fused)
    assert prepared.evaluate_args == ("--verification", "rerank", "--model", "1")
    assert cli.calls == [
        ("models", "calibrate", "1", "cal.csv", "--images", "."),
        ("models", "verify", "1", "--mode", "rerank"),
    ]


def test_fused_is_not_run_without_evaluate_verification() -> None:
    fused, _ = case(None, {"model": False, "verification": False})
    with pytest.raises(ModeUnavailable):
        prepare_fused(fused)
