"""Retrieval from the embedding, offline (issue 26, item 5): what the re-ID literature uses on
small catalogues, measured one at a time on the quality bench's split (``bench/quality_split``,
seed 0, every query) with the service's own embedder and kNN head.

``embed`` decodes and embeds a set's gallery and queries once with the service's embedder
(``service.imaging.decode_photo`` / ``to_model_input`` / ``service.onnx.embedder.Embedder``),
in several views for test-time augmentation (none mirrored: a flipped left flank looks like a
right one), and caches them in ``SCRATCH/SET/NAME.npz``. ``eval`` answers every query from the
cache with ``service.knn`` (``head_order``, ``place_new_individual``) and the model's k and
ranking, the cutoff fitted on the gallery as ``service.models.openset`` fits it (the same sample,
grid and expected MAP@5 at ``p_new`` 0.2), and scores with ``map_at_5``.

Variants:

- ``plain``: the service's head as it is.
- ``kr``: k-reciprocal re-ranking (Zhong et al. 2017), query against the gallery.
- ``aqe``: alpha query expansion (Radenovic et al.) over the gallery; ``dba``: database-side
  augmentation of the gallery; ``dba+aqe``: both.
- ``tta-*``: the views' embeddings averaged (gallery and queries alike; cutoff refitted).
- ``enc-fuse``: each query answered, then its encounter's answers fused as the encounter route
  does (``service.matching.encounters.fuse``, similarity_sum); ``enc-mean``: the encounter's
  query embeddings averaged and answered once.

Re-ranking variants change only the order of the candidates: each candidate keeps the cosine
distance of its nearest photo, so ``new_individual`` goes exactly where the plain head puts it
(first exactly when the nearest photo is farther than the cutoff) and the cutoff fitted for the
plain head stands.

    PYTHONPATH=$PWD nice .venv/bin/python bench/retrieval.py embed --set orl_faces \\
        --model /work/scratch/qtrain/orl_faces/runs/frozen/model.onnx --name frozen
    PYTHONPATH=$PWD nice .venv/bin/python bench/retrieval.py eval --set orl_faces --name frozen
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import setup_logging, shared_data  # noqa: E402
from bench.quality_data import REAL_SETS, DataSet, Photo  # noqa: E402
from bench.quality_split import SEED, Split, split  # noqa: E402
from service.contract import Ranking  # noqa: E402
from service.imaging import decode_photo, to_model_input  # noqa: E402
from service.knn import (  # noqa: E402
    CUTOFF_GRID,
    NEW,
    NEW_INDIVIDUAL,
    Neighbour,
    RankedCandidate,
    head_order,
    map_at_5,
    place_new_individual,
)
from service.matching.encounters import Fusion, fuse  # noqa: E402
from service.matching.identify import AnsweredCandidate  # noqa: E402
from service.models.openset import HEAD, Asked, fit_decision, sample_gallery  # noqa: E402
from service.onnx.embedder import Embedder, l2_normalise  # noqa: E402

log = logging.getLogger("bench.retrieval")

MAX_PIXELS = 60_000_000
P_NEW = 0.2
OPEN_SET_QUERIES = 400
OPEN_SET_PER_INDIVIDUAL = 3

# Views for test-time augmentation: (name, crop box as fractions of the photo). No flip.
VIEWS: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("full", (0.0, 0.0, 1.0, 1.0)),
    ("c90", (0.05, 0.05, 0.95, 0.95)),
    ("c80", (0.1, 0.1, 0.9, 0.9)),
    ("tl85", (0.0, 0.0, 0.85, 0.85)),
    ("br85", (0.15, 0.15, 1.0, 1.0)),
)


def crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    if box == (0.0, 0.0, 1.0, 1.0):
        return image
    w, h = image.size
    return image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))


def load_split(key: str, scratch: Path) -> tuple[DataSet, Split]:
    data = REAL_SETS[key](shared_data() / key, scratch)
    return data, split(data, SEED, None)


def embed_photos(
    embedder: Embedder, data: DataSet, photos: Sequence[Photo], views: int = len(VIEWS)
) -> np.ndarray:
    """(photos, views, dim): every photo decoded as the service decodes it, in the first
    ``views`` views."""
    spec = embedder.contract.preprocessing
    out = np.zeros((len(photos), views, embedder.dim), np.float32)
    for i, p in enumerate(photos):
        image = decode_photo(
            (data.images / p.image).read_bytes(),
            max_pixels=MAX_PIXELS,
            target_size=spec.input_size,
        ).image
        batch = np.stack([to_model_input(crop(image, box), spec) for _, box in VIEWS[:views]])
        out[i] = embedder.embed(batch)
        if i % 200 == 0:
            log.info("embedded %d / %d", i, len(photos))
    return out


def cmd_embed(args: argparse.Namespace) -> None:
    data, s = load_split(args.set, args.scratch)
    embedder = Embedder(args.model, threads=args.threads)
    target = args.scratch / args.set / f"{args.name}.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    gallery = embed_photos(embedder, data, s.gallery, args.views)
    queries = embed_photos(embedder, data, s.queries, args.views)
    head = embedder.contract.head
    np.savez(
        target,
        gallery=gallery,
        queries=queries,
        head=json.dumps({"k": head.k, "cutoff": head.cutoff, "ranking": str(head.ranking)}),
        model=str(args.model),
    )
    log.info("%s: %s in %.0f s", args.set, target, time.perf_counter() - started)


# ---------------------------------------------------------------- re-ranking (order only)


def kreciprocal(
    q: np.ndarray, g: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3
) -> np.ndarray:
    """k-reciprocal re-ranked distances (Zhong et al. 2017) of each query against the gallery;
    each query is re-ranked on its own against the gallery (one query at a time, as served).
    The gallery's reciprocal sets are computed among the gallery photos."""
    n = len(g)
    k1 = min(k1, n - 1)
    k2 = min(k2, n)
    dgg = np.maximum(0.0, 1.0 - g @ g.T)
    rank_g = np.argsort(dgg, axis=1, kind="stable")  # includes itself first
    kth = dgg[np.arange(n), rank_g[:, k1]]  # a point is within g's k1 if closer than this

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank_g[i, : k + 1]
        back = rank_g[forward, : k + 1]
        return forward[np.any(back == i, axis=1)]

    v_g = np.zeros((n, n), np.float32)
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = r
        for c in r:
            half = reciprocal(int(c), int(round(k1 / 2)))
            if len(np.intersect1d(half, r)) > 2 / 3 * len(half):
                expanded = np.union1d(expanded, half)
        w = np.exp(-dgg[i, expanded])
        v_g[i, expanded] = w / w.sum()
    if k2 > 1:
        v_g = np.stack([v_g[rank_g[i, :k2]].mean(axis=0) for i in range(n)])
    dqg = np.maximum(0.0, 1.0 - q @ g.T)
    out = np.zeros_like(dqg)
    for j in range(len(q)):
        d = dqg[j]
        order = np.argsort(d, kind="stable")
        forward = order[:k1]
        r = forward[d[forward] <= kth[forward]]  # the query is within their k1 too
        expanded = r
        for c in r:
            half = reciprocal(int(c), int(round(k1 / 2)))
            if len(np.intersect1d(half, r)) > 2 / 3 * len(half):
                expanded = np.union1d(expanded, half)
        v = np.zeros(n, np.float32)
        if len(expanded):
            w = np.exp(-d[expanded])
            v[expanded] = w / w.sum()
        if k2 > 1:
            v = (v + v_g[order[: k2 - 1]].sum(axis=0)) / k2
        inter = np.minimum(v[None, :], v_g).sum(axis=1)
        union = np.maximum(v[None, :], v_g).sum(axis=1)
        jaccard = 1.0 - inter / np.maximum(union, 1e-12)
        out[j] = (1.0 - lam) * jaccard + lam * d
    return out


def expand(x: np.ndarray, g: np.ndarray, n: int, alpha: float, skip_self: bool) -> np.ndarray:
    """alpha-weighted expansion of each row of ``x`` by its ``n`` nearest gallery rows."""
    sims = x @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")
    start = 1 if skip_self else 0
    out = x.copy()
    for i in range(len(x)):
        nn = order[i, start : start + n]
        w = np.maximum(sims[i, nn], 0.0) ** alpha
        out[i] = x[i] + (w[:, None] * g[nn]).sum(axis=0)
    return l2_normalise(out)


def aqe(q: np.ndarray, g: np.ndarray, n: int = 2, alpha: float = 3.0) -> np.ndarray:
    return np.asarray(1.0 - expand(q, g, n, alpha, False) @ g.T)


def dba(q: np.ndarray, g: np.ndarray, n: int = 2, alpha: float = 3.0) -> np.ndarray:
    return np.asarray(1.0 - q @ expand(g, g, n, alpha, True).T)


def dba_aqe(q: np.ndarray, g: np.ndarray, n: int = 2, alpha: float = 3.0) -> np.ndarray:
    g2 = expand(g, g, n, alpha, True)
    return np.asarray(1.0 - expand(q, g2, n, alpha, False) @ g2.T)


Reorder = Callable[[np.ndarray, np.ndarray], np.ndarray]
REORDERS: dict[str, Reorder] = {
    "kr": kreciprocal,
    "kr-k1-10": lambda q, g: kreciprocal(q, g, k1=10, k2=3),
    "aqe": aqe,
    "aqe-n1": lambda q, g: aqe(q, g, n=1),
    "dba": dba,
    "dba-n1": lambda q, g: dba(q, g, n=1),
    "dba+aqe": dba_aqe,
}


# ---------------------------------------------------------------- the head


@dataclass
class Head:
    k: int
    ranking: Ranking
    cutoff: float


def ordered(
    labels: np.ndarray,
    d: np.ndarray,
    allowed: np.ndarray,
    k: int,
    ranking: Ranking,
    o: np.ndarray | None = None,
) -> list[RankedCandidate]:
    """The head's candidates for one query: its k nearest allowed photos by ``o`` (default the
    cosine distance ``d``); each candidate keeps its nearest photo's cosine distance."""
    key = d if o is None else o
    idx = np.flatnonzero(allowed)
    idx = idx[np.argsort(key[idx], kind="stable")]
    nb = [Neighbour(str(labels[j]), float(key[j]), int(j)) for j in idx[:k]]
    beyond = [Neighbour(str(labels[j]), float(key[j]), int(j)) for j in idx[k:]]
    out = head_order(nb, ranking=ranking, beyond=beyond)
    if o is None:
        return out
    nearest: dict[str, float] = {}
    for j in idx:
        lab = str(labels[j])
        if lab not in nearest or d[j] < nearest[lab]:
            nearest[lab] = float(d[j])
    return [replace(c, distance=nearest[c.label]) for c in out]


def answer(cands: Sequence[RankedCandidate], cutoff: float) -> list[str]:
    return [c.label for c in place_new_individual(cands, lambda c: c.distance, cutoff, NEW)]


def fit_cutoff(g: np.ndarray, labels: np.ndarray, encounters: np.ndarray, head: Head) -> float:
    """The cutoff ``service.models.openset.fit_on_gallery`` fits on this gallery (plain head)."""
    picked = sample_gallery(
        [str(x) for x in labels],
        seed=0,
        max_queries=OPEN_SET_QUERIES,
        per_individual=OPEN_SET_PER_INDIVIDUAL,
    )
    d_all = np.maximum(0.0, 1.0 - g[picked] @ g.T)
    asked = []
    for row, p in enumerate(picked):
        for unseen in (False, True):
            allowed = labels != labels[p] if unseen else encounters != encounters[p]
            if not unseen and not np.any(allowed & (labels == labels[p])):
                continue
            cands = ordered(labels, d_all[row], allowed, head.k, head.ranking)
            asked.append(Asked(p, str(labels[p]), unseen, lambda c, cands=cands: answer(cands, c)))
    values = sorted({*CUTOFF_GRID, round(head.cutoff, 4)})
    fit = fit_decision(asked, values, p_new=P_NEW, start=head.cutoff, mode=HEAD)
    return fit.value


@dataclass
class Scored:
    map5: float
    known: float
    unseen: float
    top1: float
    top5: float
    new_first: float
    cutoff: float
    raw1: float = 0.0  # the right animal first / in the first five of the head's order,
    raw5: float = 0.0  # new_individual left out (what retrieval alone gives)


def score(answers: Sequence[list[str]], truths: Sequence[str], cutoff: float) -> Scored:
    known = [(a, t) for a, t in zip(answers, truths, strict=True) if t != NEW_INDIVIDUAL]
    unseen = [(a, t) for a, t in zip(answers, truths, strict=True) if t == NEW_INDIVIDUAL]

    def m(pairs: list[tuple[list[str], str]]) -> float:
        return map_at_5([a for a, _ in pairs], [t for _, t in pairs])

    n = max(1, len(known))
    return Scored(
        m(list(zip(answers, truths, strict=True))),
        m(known),
        m(unseen),
        sum(a[:1] == [t] for a, t in known) / n,
        sum(t in a[:5] for a, t in known) / n,
        sum(a[:1] == [NEW_INDIVIDUAL] for a, _ in known) / n,
        cutoff,
    )


def evaluate(
    data: DataSet,
    s: Split,
    g: np.ndarray,
    q: np.ndarray,
    head: Head,
    variant: str,
    cutoff: float | None = None,
) -> Scored:
    labels = np.array([p.individual_id for p in s.gallery])
    encounters = np.array([p.encounter for p in s.gallery])
    g_species = np.array([p.species for p in s.gallery])
    if cutoff is None:
        cutoff = fit_cutoff(g, labels, encounters, head)
    truths = [NEW_INDIVIDUAL if x.individual_id in s.unseen else x.individual_id for x in s.queries]
    d = np.maximum(0.0, 1.0 - q @ g.T)
    o: np.ndarray | None = None
    if variant in REORDERS:
        o = np.zeros_like(d)
        groups = sorted({x.species for x in s.queries}) if data.species_filter else [None]
        for sp in groups:
            gi = np.flatnonzero(g_species == sp) if sp else np.arange(len(g))
            qi = [i for i, x in enumerate(s.queries) if sp is None or x.species == sp]
            if not qi or not len(gi):
                continue
            o_sub = np.full((len(qi), len(g)), np.inf, np.float32)
            o_sub[:, gi] = REORDERS[variant](q[qi], g[gi])
            o[qi] = o_sub
    cands = []
    for i, x in enumerate(s.queries):
        allowed = g_species == x.species if data.species_filter else np.ones(len(g), bool)
        cands.append(
            ordered(labels, d[i], allowed, head.k, head.ranking, None if o is None else o[i])
        )
    answers = [answer(c, cutoff) for c in cands]
    orders = [[c.label for c in cs] for cs in cands]
    if variant in ("enc-fuse", "enc-mean"):
        by_enc: dict[str, list[int]] = defaultdict(list)
        for i, x in enumerate(s.queries):
            by_enc[x.encounter].append(i)
        for members in by_enc.values():
            if len(members) < 2:
                continue
            if variant == "enc-fuse":
                per_photo = [
                    [
                        AnsweredCandidate(r, c.label, None, c.votes, c.distance, None, None)
                        for r, c in enumerate(
                            place_new_individual(cands[i], lambda c: c.distance, cutoff, NEW), 1
                        )
                    ]
                    for i in members
                ]
                fused = [
                    c.individual_id
                    for c in fuse(per_photo, cutoff=cutoff, fusion=Fusion.SIMILARITY_SUM)
                ]
            else:
                v = l2_normalise(q[members].mean(axis=0, keepdims=True))[0]
                x = s.queries[members[0]]
                allowed = g_species == x.species if data.species_filter else np.ones(len(g), bool)
                dv = np.maximum(0.0, 1.0 - g @ v)
                fused = answer(ordered(labels, dv, allowed, head.k, head.ranking), cutoff)
            for i in members:
                answers[i] = fused
                orders[i] = [x for x in fused if x != NEW_INDIVIDUAL]
    r = score(answers, truths, cutoff)
    known = [(o_, t) for o_, t in zip(orders, truths, strict=True) if t != NEW_INDIVIDUAL]
    r.raw1 = sum(o_[:1] == [t] for o_, t in known) / max(1, len(known))
    r.raw5 = sum(t in o_[:5] for o_, t in known) / max(1, len(known))
    return r


def views_of(name: str) -> list[int]:
    """``tta-full+c90+c80`` -> the indices of those views; any other variant: the full view."""
    if not name.startswith("tta-"):
        return [0]
    names = [v for v, _ in VIEWS]
    return [names.index(v) for v in name[4:].split("+")]


def cmd_eval(args: argparse.Namespace) -> None:
    data, s = load_split(args.set, args.scratch)
    cache = np.load(args.scratch / args.set / f"{args.name}.npz")
    h = json.loads(str(cache["head"]))
    head = Head(int(h["k"]), Ranking(h["ranking"]), float(h["cutoff"]))
    if args.head_model:
        own = Embedder(args.head_model).contract.head
        head = Head(own.k, Ranking(own.ranking), own.cutoff)
    if args.k:
        head.k = args.k
    lines = []
    plain_cutoff: float | None = None
    for variant in args.variants.split(","):
        started = time.perf_counter()
        views = views_of(variant)
        g = l2_normalise(cache["gallery"][:, views].mean(axis=1))
        q = l2_normalise(cache["queries"][:, views].mean(axis=1))
        reuse = variant in REORDERS or variant.startswith("enc-")
        if args.cutoff == "model":
            cutoff = head.cutoff
        elif not reuse or plain_cutoff is None:
            labels = np.array([p.individual_id for p in s.gallery])
            encounters = np.array([p.encounter for p in s.gallery])
            cutoff = fit_cutoff(g, labels, encounters, head)
            if views == [0]:
                plain_cutoff = cutoff
        else:
            cutoff = plain_cutoff
        r = evaluate(data, s, g, q, head, variant, cutoff)
        line = (
            f"| {args.set} | {args.name} | {variant} | {r.map5:.3f} ({r.known:.3f} / "
            f"{r.unseen:.3f}) | {r.top1:.3f} / {r.top5:.3f} | {r.raw1:.3f} / {r.raw5:.3f} | "
            f"{r.new_first:.3f} | "
            f"k {head.k} {head.ranking} cutoff {r.cutoff:.2f} ({args.cutoff}) |"
        )
        log.info("%s (%.0f s)", line, time.perf_counter() - started)
        lines.append(line)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, default=Path("/work/scratch/retrieval"))
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--set", required=True, choices=sorted(REAL_SETS))
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--name", required=True)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--views", type=int, default=len(VIEWS), help="the first N views only")
    v = sub.add_parser("eval")
    v.add_argument("--set", required=True, choices=sorted(REAL_SETS))
    v.add_argument("--name", required=True)
    v.add_argument("--k", type=int, help="override the model's k")
    v.add_argument(
        "--head-model", type=Path, help="take k, ranking and cutoff from this ONNX model"
    )
    v.add_argument(
        "--cutoff",
        choices=("gallery", "model"),
        default="gallery",
        help="the cutoff fitted on the gallery (as service.models.openset), or the model's own",
    )
    v.add_argument(
        "--variants",
        default="plain,kr,aqe,dba,dba+aqe,tta-full+c90+c80,tta-full+tl85+br85,"
        "tta-full+c90+c80+tl85+br85,enc-fuse,enc-mean",
    )
    v.add_argument("--out", type=Path, help="append the rows to this markdown file")
    args = parser.parse_args(argv)
    setup_logging("%(asctime)s %(levelname)s %(message)s")
    args.scratch.mkdir(parents=True, exist_ok=True)
    {"embed": cmd_embed, "eval": cmd_eval}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
