"""Mutation testing of the core modules: does the test suite notice small wrong changes?

Each mutant changes one thing in one module (a comparison, a boolean, a constant, a return value,
an arithmetic operator, or a statement dropped) in a copy of the repository, and runs the tests
that cover that module there (SQLite only, stopping at the first failure). A mutant the tests
kill is caught; one that survives is behaviour no test can fail for.

    .venv/bin/python scripts/mutation.py                 # 60 mutants, seed 0
    .venv/bin/python scripts/mutation.py --per-module 9  # 9 mutants of every module
    .venv/bin/python scripts/mutation.py --sample 0      # every mutant (days)
    .venv/bin/python scripts/mutation.py --module service/knn.py --sample 20 --report out.md
    .venv/bin/python scripts/mutation.py --per-module 8 --seed 1 --start 82  # resume at 82
    .venv/bin/python scripts/mutation.py --mutant "service/jobs/queue.py:254 compare" \
        --tests tests/service/jobs/test_jobs.py::test_the_new_one   # does a new test kill it?

Before any mutant, each module's tests are run once unmutated in the copy: they must pass there,
and the copy's ``service`` must be the one they import (PYTHONPATH puts it before an editable
install of the working tree). A mutant then gets a few times that run's length before it counts
as a timeout (an endless loop). Each outcome is logged as it comes, with the line as mutated.

The working tree is never modified. Too slow for CI; docs/reliability.md records a run.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mutation")
ROOT = Path(__file__).resolve().parent.parent

# Which tests cover which module (SQLite runs only; PostgreSQL adds nothing to a logic mutant).
# Each list is as short as still covers its module, the most telling file first: every mutant
# runs its module's list, stopping at the first failure.
COVERED_BY: dict[str, list[str]] = {
    "service/knn.py": [
        "tests/service/test_knn.py",
        "tests/service/matching/test_five_candidates.py",
        "tests/service/api/test_api.py",
    ],
    "service/gallery/sync.py": [
        "tests/service/gallery/test_gallery.py",
        "tests/service/gallery/test_gallery_replay.py",
        "tests/service/matching/test_five_candidates.py",
        "tests/service/gallery/test_live_gallery.py",
        "tests/service/test_rules.py",
        "tests/service/api/test_api.py",
        "tests/service/catalogue/test_curation.py",
    ],
    "service/catalogue/curation.py": [
        "tests/service/catalogue/test_curation.py",
        "tests/service/gallery/test_live_gallery.py",
        "tests/service/api/test_input_limits.py",
    ],
    "service/imaging.py": [
        "tests/service/test_photos.py",
        "tests/service/test_photo_geometry.py",
        "tests/service/test_operations.py",
        "tests/service/api/test_api.py",
    ],
    "service/access/auth.py": [
        "tests/service/api/test_guard.py",
        "tests/service/catalogue/test_curation.py",
        "tests/service/test_rules.py",
        "tests/service/api/test_api.py",
        "tests/service/test_operations.py",  # the last admin key
        "tests/service/access/test_tenants.py",  # callback hosts and secrets per key
    ],
    # Several partners on one service (issue 14): jobs, batches, archives, what a key reads,
    # and outgoing requests.
    "service/jobs/queue.py": [
        "tests/service/jobs/test_jobs.py",
        "tests/service/access/test_tenants.py",
        "tests/service/models/test_reindex.py",
    ],
    "service/jobs/batch/submit.py": [
        "tests/service/access/test_tenants.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/jobs/batch/chunks.py": [
        "tests/service/access/test_tenants.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/jobs/batch/results.py": [
        "tests/service/access/test_tenants.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/jobs/batch/closing.py": [
        "tests/service/access/test_tenants.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/api/routes/batch.py": [
        "tests/service/access/test_tenants.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/jobs/archives.py": [
        "tests/service/access/test_tenants.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/access/tenancy.py": [
        "tests/service/access/test_tenants.py",
    ],
    "service/outbound/redact.py": [
        "tests/service/outbound/test_outbound.py",
        "tests/service/access/test_tenants.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/outbound/callbacks.py": [
        "tests/service/outbound/test_outbound.py",
        "tests/service/jobs/test_batch.py",
        "tests/service/access/test_tenants.py",
    ],
    "service/outbound/fetch.py": [
        "tests/service/outbound/test_outbound.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/outbound/deadline.py": [
        "tests/service/outbound/test_outbound.py",
        "tests/service/jobs/test_batch.py",
    ],
    "service/store/retention.py": [
        "tests/service/store/test_storage.py",
        "tests/service/test_operations.py",
    ],
    # Identification, models and their switch.
    "service/matching/identify.py": [
        "tests/service/api/test_api.py",
        "tests/service/test_rules.py",
        "tests/service/gallery/test_gallery.py",
        "tests/service/gallery/test_gallery_replay.py",  # a gallery photo embedded by identify
        "tests/service/matching/test_encounters.py",
        "tests/service/models/test_switch.py",
    ],
    "service/matching/encounters.py": [
        "tests/service/matching/test_encounters.py",
    ],
    "service/matching/runtime.py": [
        "tests/service/models/test_switch.py",
        "tests/service/gallery/test_live_gallery.py",
    ],
    "service/matching/record.py": [
        "tests/service/api/test_api.py",
        "tests/service/gallery/test_gallery_replay.py",
    ],
    "service/matching/fusion.py": [
        "tests/service/matching/test_local_features.py",
        "tests/service/matching/test_toy_matcher.py",
    ],
    "service/matching/head.py": [
        "tests/service/api/test_api.py",
        "tests/service/matching/test_local_features.py",
        "tests/service/matching/test_toy_matcher.py",
    ],
    "service/matching/registry.py": [
        "tests/service/matching/test_local_features.py",
        "tests/service/matching/test_toy_matcher.py",
    ],
    "service/models/registry.py": [
        "tests/service/store/test_storage.py",
        "tests/service/models/test_reindex.py",
        "tests/service/models/test_switch.py",
    ],
    "service/models/reindex.py": [
        "tests/service/models/test_reindex.py",
        "tests/service/models/test_switch.py",
    ],
    "service/models/shadow.py": [
        "tests/service/models/test_shadow.py",
        "tests/service/models/test_reindex.py",
    ],
}

_SWAP_COMPARE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_SWAP_BINOP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
}


@dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    kind: str
    ordinal: int  # which site of this kind, in walk order, so it can be found again

    @property
    def label(self) -> str:
        return f"{self.module}:{self.line} {self.kind}"


def _sites(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """Every place a mutation operator applies, with the operator's name. Asserts are left
    alone: here they narrow types for mypy, and a mutant of one is rarely behaviour."""
    asserted = {id(n) for a in ast.walk(tree) if isinstance(a, ast.Assert) for n in ast.walk(a)}
    for node in ast.walk(tree):
        if id(node) in asserted:
            continue
        if isinstance(node, ast.Compare):
            yield node, "compare"
        elif isinstance(node, ast.BoolOp):
            yield node, "and-or"
        elif isinstance(node, ast.BinOp) and type(node.op) in _SWAP_BINOP:
            yield node, "arithmetic"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "drop-not"
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield node, "flip-bool"
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            yield node, "constant"
        elif isinstance(node, ast.Return) and node.value is not None:
            yield node, "return-none"
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.Expr):
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
                yield node, "drop-statement"  # docstrings are not statements worth dropping


def _skip(node: ast.AST, tree: ast.Module) -> bool:
    """Module-level assignments (imports, constants tables) and logging calls are not behaviour
    worth mutating; nor are type-only names."""
    if getattr(node, "col_offset", 1) == 0:
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func = node.value.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return func.value.id == "log"
    return False


def enumerate_mutants(module: str) -> list[Mutant]:
    tree = ast.parse((ROOT / module).read_text())
    counts: dict[str, int] = {}
    found = []
    for node, kind in _sites(tree):
        if _skip(node, tree):
            continue
        ordinal = counts.get(kind, 0)
        counts[kind] = ordinal + 1
        found.append(Mutant(module, getattr(node, "lineno", 0), kind, ordinal))
    return found


def _mutate(node: ast.AST, kind: str) -> ast.AST:
    if kind == "compare":
        assert isinstance(node, ast.Compare)
        node.ops[0] = _SWAP_COMPARE.get(type(node.ops[0]), ast.NotEq)()
    elif kind == "and-or":
        assert isinstance(node, ast.BoolOp)
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "arithmetic":
        assert isinstance(node, ast.BinOp)
        node.op = _SWAP_BINOP[type(node.op)]()
    elif kind == "drop-not":
        assert isinstance(node, ast.UnaryOp)
        return node.operand
    elif kind == "flip-bool":
        assert isinstance(node, ast.Constant)
        node.value = not node.value
    elif kind == "constant":
        assert isinstance(node, ast.Constant) and isinstance(node.value, int | float)
        node.value = node.value + 1
    elif kind == "return-none":
        assert isinstance(node, ast.Return)
        node.value = ast.Constant(None)
    elif kind == "drop-statement":
        return ast.Pass()
    return node


class _Apply(ast.NodeTransformer):
    def __init__(self, mutant: Mutant, tree: ast.Module) -> None:
        self.mutant = mutant
        self.target = [n for n, k in _sites(tree) if k == mutant.kind and not _skip(n, tree)][
            mutant.ordinal
        ]

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return ast.copy_location(_mutate(node, self.mutant.kind), node)
        visited: ast.AST = super().visit(node)
        return visited


def mutated_source(mutant: Mutant, root: Path = ROOT) -> str:
    """The module as mutated, from the tree at ``root``."""
    tree = ast.parse((root / mutant.module).read_text())
    new = _Apply(mutant, tree).visit(tree)
    return ast.unparse(ast.fix_missing_locations(new))


def _short(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 90 else text[:87] + "..."


def describe(mutant: Mutant) -> str:
    """The mutated code, before and after: ``a < b  →  a <= b``."""
    tree = ast.parse((ROOT / mutant.module).read_text())
    target = _Apply(mutant, tree).target
    before = _short(target)
    after = _mutate(deepcopy(target), mutant.kind)
    return f"{before}  →  {_short(after)}"


def _environment(copy: Path) -> dict[str, str]:
    # The copy first on the path: the venv's editable install points at the working tree, and
    # its finder comes after PYTHONPATH's entries. Servers the tests start inherit this.
    return {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "HOME": str(copy)}


def _pytest(copy: Path, tests: list[str], timeout: float, output: Path | None = None) -> int | None:
    """Run ``tests`` in the copy, stopping at the first failure; the exit status, or None when
    it ran past ``timeout`` (then it is killed with every process it started). ``output``:
    where its output goes (by default, nowhere)."""
    with open(output or os.devnull, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
            + ["-m", "not postgres", *tests],
            cwd=copy,
            env=_environment(copy),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout ends its servers too
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def run_mutant(mutant: Mutant, copy: Path, timeout: float, tests: list[str]) -> str:
    """'killed', 'survived', 'timeout' or 'invalid' (the mutant does not compile)."""
    source = mutated_source(mutant, copy)  # the copy's: the working tree may change meanwhile
    try:
        compile(source, mutant.module, "exec")
    except SyntaxError:
        return "invalid"
    target = copy / mutant.module
    original = target.read_text()
    target.write_text(source)
    try:
        status = _pytest(copy, tests, timeout)
    finally:
        target.write_text(original)
    if status is None:
        return "timeout"
    return "survived" if status == 0 else "killed"


def baseline(copy: Path, tests: dict[str, list[str]], timed: bool = True) -> dict[str, float]:
    """Seconds each module's tests take unmutated in the copy. Raises if the copy's ``service``
    is not the one imported there, or if a module's tests fail without any mutant: a mutant
    they "kill" would prove nothing. ``timed=False``: the import check only."""
    imported = subprocess.run(
        [sys.executable, "-c", "import service; print(service.__file__)"],
        cwd=copy,
        env=_environment(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(imported).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the tests would import {imported}, not the copy in {copy}")
    seconds: dict[str, float] = {}
    for module, module_tests in tests.items() if timed else ():
        started = time.monotonic()
        output = copy / "baseline.log"
        if _pytest(copy, module_tests, timeout=1800, output=output) != 0:
            tail = "\n".join(output.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"the tests of {module} fail without a mutant:\n{tail}")
        seconds[module] = time.monotonic() - started
        log.info("baseline %s: %.0f s", module, seconds[module])
    return seconds


def choose(mutants: list[Mutant], sample: int, per_module: int, seed: int) -> list[Mutant]:
    """A seeded sample: ``per_module`` of each module (all of a smaller one), or else
    ``sample`` of all of them (0: every mutant)."""
    rng = random.Random(seed)
    if per_module:
        chosen = []
        for module in dict.fromkeys(m.module for m in mutants):
            own = [m for m in mutants if m.module == module]
            chosen += own if len(own) <= per_module else rng.sample(own, per_module)
    elif sample and sample < len(mutants):
        chosen = rng.sample(mutants, sample)
    else:
        chosen = mutants
    return sorted(chosen, key=lambda m: (m.module, m.line, m.kind, m.ordinal))


def _copy_tree() -> Path:
    copy = Path(tempfile.mkdtemp(prefix="whaleid-mutants-"))
    # docs/: tests run the documentation's samples (docs/integration.md's verifier).
    for name in ("service", "migrations", "tests", "docs", "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / name)
    return copy


def report(
    results: list[tuple[Mutant, str, float]],
    total_sites: int,
    seconds: float,
    described: dict[Mutant, str],
) -> str:
    scored = [r for r in results if r[1] in ("killed", "survived", "timeout")]
    survived = [m for m, outcome, _ in results if outcome == "survived"]
    rate = len(survived) / len(scored) if scored else 0.0
    lines = [
        f"Mutants run: {len(results)} of {total_sites} sites; scored {len(scored)} "
        f"(invalid ones left out); survived {len(survived)} = {rate:.0%}; "
        f"took {seconds / 60:.1f} min.",
        "",
        "| module | mutants | killed | survived | timeout |",
        "|---|---|---|---|---|",
    ]
    for module in COVERED_BY:
        outcomes = [o for m, o, _ in results if m.module == module]
        if outcomes:
            lines.append(
                f"| `{module}` | {len(outcomes)} | {outcomes.count('killed')} "
                f"| {outcomes.count('survived')} | {outcomes.count('timeout')} |"
            )
    if survived:
        lines += ["", "Survivors (behaviour no test fails for):", ""]
        lines += [f"- `{m.label}`: `{described[m]}`" for m in survived]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(COVERED_BY))
    parser.add_argument("--sample", type=int, default=60, help="mutants to run (0: all)")
    parser.add_argument(
        "--per-module", type=int, default=0, help="mutants of each module instead of --sample"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout", type=float, help="seconds per mutant (default: 3 × the unmutated run + 60)"
    )
    parser.add_argument("--report", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--mutant",
        action="append",
        help='only the mutants of this label, e.g. "service/jobs/queue.py:254 compare" (to check '
        "that a new test kills a survivor); where a line has several of a kind, add the "
        'mutation as logged: "service/jobs/queue.py:254 compare | a == b  →  a != b"',
    )
    parser.add_argument(
        "--tests", nargs="+", help="run these tests (pytest node ids) instead of COVERED_BY's"
    )
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="no unmutated run first (with --timeout; only when these tests were just seen to "
        "pass, e.g. to recheck survivors against new tests)",
    )
    parser.add_argument(
        "--start",
        type=int,
        default=1,
        help="begin at this mutant of the plan, numbered as logged (to resume a run that was "
        "stopped: the same sources, --per-module/--sample and --seed give the same plan)",
    )
    args = parser.parse_args(argv)
    if args.skip_baseline and not args.timeout:
        parser.error("--skip-baseline needs --timeout")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    modules = args.module or list(COVERED_BY)
    mutants = [m for module in modules for m in enumerate_mutants(module)]
    if args.mutant:
        chosen = []
        for wanted in args.mutant:
            label, _, what = wanted.partition(" | ")
            found = [
                m for m in mutants if m.label == label and (not what or describe(m) == what.strip())
            ]
            if not found:
                parser.error(f"no such mutant: {wanted}")
            chosen += [m for m in found if m not in chosen]
    else:
        chosen = choose(mutants, args.sample, args.per_module, args.seed)
    log.info("%d mutants of %d sites in %d modules", len(chosen), len(mutants), len(modules))
    planned = len(chosen)
    chosen = chosen[args.start - 1 :]
    if args.start > 1:
        log.info("starting at mutant %d: %d to run", args.start, len(chosen))
    described = {m: describe(m) for m in chosen}
    copy = _copy_tree()
    results: list[tuple[Mutant, str, float]] = []
    started = time.monotonic()
    try:
        tests = {m.module: args.tests or COVERED_BY[m.module] for m in chosen}
        usual = baseline(copy, tests, timed=not args.skip_baseline)
        for n, mutant in enumerate(chosen, args.start):
            t0 = time.monotonic()
            limit = args.timeout or 3 * usual[mutant.module] + 60
            outcome = run_mutant(mutant, copy, limit, tests[mutant.module])
            results.append((mutant, outcome, time.monotonic() - t0))
            log.info(
                "[%d/%d] %s: %s (%.0f s)  %s",
                n,
                planned,
                mutant.label,
                outcome.upper() if outcome == "survived" else outcome,
                time.monotonic() - t0,
                described[mutant],
            )
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    text = report(results, len(mutants), time.monotonic() - started, described)
    log.info("%s", text)
    if args.report:
        args.report.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
