"""bench/quality.py: the split (encounters never straddle the gallery and the queries, unseen
individuals have no gallery photo, the caps and the seed hold), the commands each mode runs (the
trained modes with a fake command line: train on the gallery, export, reuse or resume the run),
and the doc's rendering of old and new results."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bench.quality import build_parser, selected_modes, train_options
from bench.quality_cli import CommandFailed, Done
from bench.quality_data import DataSet, Photo, bursts, without_duplicates
from bench.quality_measure import run_mode
from bench.quality_modes import (
    MODES,
    Case,
    ModeUnavailable,
    TrainOptions,
    prepare_fused,
    prepare_local,
)
from bench.quality_report import render
from bench.quality_split import split


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


class TrainingCli(FakeCli):
    """Also answers ``whaleid-train train`` (a summary.json in the run folder), the export (the
    ONNX file) and ``models list`` (the registered model's row)."""

    def __init__(self) -> None:
        super().__init__()
        self.python_calls: list[tuple[str, ...]] = []

    def whaleid(self, *args: str, timeout: float = 600) -> Done:
        if args[:2] == ("models", "list"):
            self.calls.append(args)
            return Done("2\tactive\tlite0\tbench\tdim=256\tk=10\tcutoff=0.5\tvote\n", "", 0.1)
        return super().whaleid(*args, timeout=timeout)

    def python(self, *args: str, timeout: float = 600, interpreter: Path | None = None) -> Done:
        self.python_calls.append(args)
        if args[:3] == ("-m", "training", "train"):
            sets = dict(a.split("=", 1) for a in args if "=" in a)
            summary: dict[str, Any] = {
                "epochs": 3,
                "train_seconds_last_session": 1.5,
                "head": {"k": 10, "cutoff": 0.5, "ranking": "vote"},
                "validation": {"best": {"map5": 0.75}},
                "data": {"train_photos": 8, "train_individuals": 4},
            }
            Path(sets["output"], "summary.json").write_text(json.dumps(summary))
        elif args[:2] == ("-m", "model_export"):
            Path(args[args.index("--out") + 1]).write_bytes(b"x" * 2000)
        return Done("", "", 2.0)


def trained_case(
    tmp_path: Path, calibration: Path | None, gallery_rows: str = ""
) -> tuple[Case, TrainingCli]:
    cli = TrainingCli()
    data = catalogue(individuals=5, encounters=2, photos=1)
    gallery = tmp_path / "gallery.csv"
    gallery.write_text("image,species,individual_id\n" + gallery_rows)
    config = tmp_path / "config.yaml"
    config.write_text("epochs: 3\n")
    python = tmp_path / "python"
    python.touch()
    train = TrainOptions({"*": config}, ("epochs=3",), python)
    features = {"model": True, "verification": True}
    runs = tmp_path / "runs"
    case = Case(data, cli, 1, gallery, Path("q.csv"), calibration, features, runs, train)  # type: ignore[arg-type]
    return case, cli


def test_trained_modes_train_on_the_gallery_export_and_reuse_the_run(tmp_path: Path) -> None:
    case, cli = trained_case(tmp_path, Path("cal.csv"))
    prepared = MODES["fused-finetuned"].prepare(case)
    assert prepared.evaluate_args == ("--verification", "rerank", "--model", "2")
    train, export = cli.python_calls
    run = tmp_path / "runs" / "finetuned"
    assert train[:3] == ("-m", "training", "train")
    assert f"catalogue={tmp_path / 'runs' / 'gallery.csv'}" in train
    assert f"output={run}" in train
    assert train[-2:] == ("--set", "epochs=3")
    assert export[:4] == ("-m", "model_export", str(run / "model.keras"), "--out")
    assert ("models", "add", str(run / "model.onnx"), "--activate") in cli.calls
    assert cli.calls[-2:] == [
        ("models", "calibrate", "2", "cal.csv", "--images", "."),
        ("models", "verify", "2", "--mode", "rerank"),
    ]
    t = case.training
    assert (t["cached"], t["epochs"], t["best_val_map5"], t["model_mb"]) == (False, 3, 0.75, 0.002)
    assert (t["train_wall_s"], t["export_s"]) == (2.0, 2.0)

    # The same config, overrides and gallery: the finished run is reused, times and all.
    again, cli = trained_case(tmp_path, None)
    assert MODES["finetuned"].prepare(again).evaluate_args == ("--model", "2")
    assert cli.python_calls == []
    assert again.training["cached"] and again.training["train_wall_s"] == 2.0

    # Another gallery: trained again.
    changed, cli = trained_case(tmp_path, None, "a.png,s,x\n")
    MODES["finetuned"].prepare(changed)
    assert len(cli.python_calls) == 2 and not changed.training["cached"]


def test_a_timed_out_training_is_resumed_and_its_time_counted(tmp_path: Path) -> None:
    case, cli = trained_case(tmp_path, None)

    def timed_out(*args: str, timeout: float = 600, interpreter: Path | None = None) -> Done:
        time.sleep(0.05)
        raise CommandFailed(["whaleid-train", "train"], "ran past 1 s", "")

    cli.python = timed_out  # type: ignore[method-assign]
    with pytest.raises(CommandFailed):
        MODES["scratch"].prepare(case)
    run = tmp_path / "runs" / "scratch"
    assert run.is_dir()  # kept, for the trainer to resume

    again, cli = trained_case(tmp_path, None)
    MODES["scratch"].prepare(again)
    assert cli.python_calls[0][:3] == ("-m", "training", "train")
    t = again.training
    assert t["resumed_after_s"] >= 0.05
    assert t["train_wall_s"] == pytest.approx(t["resumed_after_s"] + 2.0)


def test_trained_mode_without_its_config_is_not_run(tmp_path: Path) -> None:
    case, _ = trained_case(tmp_path, None)
    case.train = TrainOptions({"frozen": tmp_path / "missing.yaml"}, (), case.train.python)
    with pytest.raises(ModeUnavailable, match="missing.yaml"):
        MODES["frozen"].prepare(case)


def test_a_gallery_of_one_individual_is_not_trained_on(tmp_path: Path) -> None:
    data = catalogue(individuals=1, encounters=4, photos=1)
    data.unseen_fraction = 0.0
    s = split(data, seed=0, max_queries=None)
    result = run_mode(MODES["scratch"], data, s, tmp_path, {}, timed=0)
    assert result.status == "not run"
    assert "1 individual(s)" in result.reason
    assert not (tmp_path / "data").exists()  # nothing was set up


def test_mode_and_training_flags() -> None:
    assert [m.name for m in selected_modes("frozen, finetuned")] == ["frozen", "finetuned"]
    with pytest.raises(SystemExit):
        selected_modes("frozen,bogus")
    args = build_parser().parse_args(
        [
            "--train-config",
            "demo/config.json",
            "--train-config",
            "frozen=f.yaml",
            "--train-set",
            "epochs=2",
        ]
    )
    options = train_options(args)
    assert options.configs["*"].name == "config.json"
    assert options.configs["frozen"].name == "f.yaml"
    assert options.extra == ("epochs=2",)
    with pytest.raises(SystemExit):
        train_options(build_parser().parse_args(["--train-config", "bogus=f.yaml"]))


def _results(modes: list[dict[str, Any]], requested: list[str]) -> dict[str, Any]:
    counts = {
        "gallery_photos": 4,
        "gallery_individuals": 2,
        "known_queries": 2,
        "known_query_individuals": 2,
        "unseen_queries": 1,
        "unseen_query_individuals": 1,
        "calibration_photos": 0,
    }
    summary = {
        "map5": 0.5,
        "map5_known": 0.6,
        "map5_unseen": 0.3,
        "unseen_flagged_new": 1,
        "unseen_queries": 1,
        "known_flagged_new": 0,
        "known_queries": 2,
        "errors": 0,
    }
    for m in modes:
        m.setdefault("summary", summary)
    s = {
        "key": "toy",
        "title": "Toy",
        "protocol": [],
        "reading": "",
        "species_filter": False,
        "counts": counts,
        "chance": 0.2,
        "all_new": 0.3,
        "modes": modes,
        "setup_s": 1.0,
    }
    env = {"date": "today", "cpu": "cpu", "python": "3", "commit": "abc", "load": "0"}
    return {
        "env": env,
        "features": {"model": True, "verification": True},
        "modes_requested": requested,
        "seed": 0,
        "command": "bench",
        "sets": [s],
        "wall_min": 1.0,
    }


def test_the_doc_renders_old_results_and_trained_modes() -> None:
    base = {
        "status": "ran",
        "reason": "",
        "notes": [],
        "setup_s": 1.0,
        "evaluate_s": 1.0,
        "wall_s": 2.0,
        "latency_ms": {},
    }
    # Results written before the trained modes existed: no `training` key, no such modes.
    old = render(_results([{"mode": "global", **base}], ["global"]))
    assert "| **0.500** (0.600 / 0.300) | not run | not run |" in old
    assert "### Training" not in old
    training = {
        "recipe": "finetuned",
        "cached": True,
        "train_wall_s": 61.0,
        "train_seconds_last_session": 50.0,
        "epochs": 7,
        "kept_epoch": 3,
        "best_val_map5": 0.8125,
        "best_val_queries": 16,
        "head": {"k": 10, "cutoff": 0.52, "ranking": "vote"},
        "export_s": 9.0,
        "model_mb": 13.4,
        "data": {"train_photos": 120, "train_individuals": 25},
    }
    new = render(
        _results(
            [
                {"mode": "finetuned", **base, "training": training},
                {"mode": "scratch", **base, "status": "not run", "reason": "1 individual(s)"},
            ],
            ["scratch", "finetuned"],
        )
    )
    assert (
        "| Toy | finetuned | 61 (50), reused | 7 (kept 3) | 0.812 (16 queries) | 10 / 0.52 / vote "
        "| 9 | 13.4 | 120 / 25 |" in new
    )
    assert "| Toy | scratch | not run |" in new


def test_a_mode_fitted_on_the_gallery_shows_what_it_expected_beside_what_it_measured() -> None:
    base = {
        "status": "ran",
        "reason": "",
        "notes": [],
        "setup_s": 1.0,
        "evaluate_s": 1.0,
        "wall_s": 2.0,
        "latency_ms": {},
    }
    summary = {
        "map5": 0.5,
        "map5_known": 0.6,
        "map5_unseen": 0.3,
        "unseen_flagged_new": 1,
        "unseen_queries": 1,
        "known_flagged_new": 0,
        "known_queries": 2,
        "known_top1": 1,
        "known_top5": 2,
        "errors": 0,
    }
    fitted = {"expected_map5": 0.44, "map5_known": 0.4, "map5_unseen": 0.7}
    doc = render(
        _results(
            [{"mode": "local-fitted", **base, "summary": summary, "fitted": fitted}],
            ["local-fitted"],
        )
    )
    # Known 2, unseen 1: the expectation at this set's share is 2/3 * 0.4 + 1/3 * 0.7 = 0.5.
    assert (
        "| local-fitted | **0.500** | 0.600 | 0.300 | 1/2 / 2/2 | 1/1 / 0/2 | 0.440 (0.500) |"
        in doc
    )
