"""Selection at scale: Cluster-Margin with batches of 100k, SemDeDup and exact duplicates,
`select` (lazy against eager greedy), confident learning, TypiClust and ProbCover.

    python bench/selection.py [--n 1000000] [--dim 384] [--only cluster_margin,semdedup,...]
                              [--quick] [--json PATH]

Data: ``--n`` clustered unit vectors (200 clusters of different sizes and spreads,
``bench/diversity.py``'s generator), float32. Every figure is wall time on this machine
(numbers from a shared 2-core machine vary with its load: the report prints the load
average before and after each measure). Where a reference exists it is measured in the
same run:

* ``cluster_margin``: ``miners.diversity.cluster_margin_select`` on all ``n`` rows as
  candidates, batch ``--batch`` (100,000), default clusters (``CLUSTER_MARGIN_MAX_CLUSTERS``),
  k-means on a 20,000-row sample then exact assignment; and ``method="hac"`` (average
  linkage on 8,000 rows). Quality: distinct clusters in the batch, mean margin of the batch
  against the top-``batch`` margins.
* ``semdedup``: ``miners.dedup.semdedup`` with 10 % planted near-copies (Gaussian noise of
  0.2 % of the norm); recall of the planted copies, rows dropped that are not copies.
* ``exact``: ``hash_vectors`` + ``exact_duplicates`` with 5 % planted exact copies.
* ``select``: 1,000 picks by two objectives + diversity against 1,000 reference rows;
  the lazy greedy (``mode="auto"``) against the eager one on its first 50 picks (the
  eager pass costs the same per pick, so the ratio is per pick).
* ``confident``: ``find_label_issues`` on ``n`` rows x 10 classes with 10 % flipped labels
  (precision and recall of the flips).
* ``typiclust`` / ``probcover``: 100 picks from ``--typiclust-rows`` (100,000) /
  ``--probcover-rows`` (20,000; the ball graph is exact, ``O(N^2 d)``) rows; ``--quick``:
  20,000 / 5,000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import Report, machine, render  # noqa: I001 — run as bench/selection.py
from diversity import clustered_low_dim

ALL = ("cluster_margin", "semdedup", "exact", "select", "confident", "typiclust", "probcover")


def load() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def timed(label: str, fn: Any) -> tuple[float, Any]:
    before = load()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    print(f"  {label}: {dt:.1f} s (load average before {before}, after {load()})", flush=True)
    return dt, out


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_cluster_margin(args: argparse.Namespace, x: np.ndarray, report: Report) -> None:
    from miners.diversity import cluster_margin_select

    rng = np.random.default_rng(1)
    margin = rng.random(len(x))
    b = min(args.batch, len(x))
    for method in ("kmeans", "hac"):
        dt, picks = timed(f"cluster_margin {method} {len(x):,} candidates, batch {b:,}",
                          lambda m=method: cluster_margin_select(x, margin, b, seed=0, method=m))
        assert len(np.unique(picks)) == b
        report.add(f"Cluster-Margin ({method}), {len(x):,} candidates -> batch {b:,}", dt, None,
                   kind="info", unit="s")
        top = np.sort(margin)[::-1][:b].mean()
        report.details[f"cluster_margin_{method}"] = {
            "seconds": dt, "batch_mean_margin": float(margin[picks].mean()), "top_b_mean_margin": float(top)}


def run_semdedup(args: argparse.Namespace, x: np.ndarray, report: Report) -> None:
    from miners.dedup import semdedup

    rng = np.random.default_rng(2)
    n = len(x)
    m = n // 10
    src = rng.choice(n - m, m, replace=False)
    y = x.copy()
    y[n - m:] = x[src] + rng.standard_normal((m, x.shape[1]), dtype=np.float32) * np.float32(0.002 / np.sqrt(x.shape[1]))
    planted = np.zeros(n, bool)
    planted[n - m:] = True
    dt, r = timed(f"semdedup {n:,} rows", lambda: semdedup(y, eps=args.eps, seed=0))
    dropped = ~r.keep
    # a planted pair counts as found when one of its two rows is dropped
    found = dropped[n - m:] | dropped[src]
    report.add(f"SemDeDup, {n:,} rows, {r.n_clusters:,} clusters, eps {args.eps:g}", dt, None, kind="info", unit="s")
    report.details["semdedup"] = {"seconds": dt, "cluster_s": r.stats["cluster_s"], "dropped": int(dropped.sum()),
                                  "planted": int(m), "planted_pairs_found": float(found.mean()),
                                  "n_clusters": r.n_clusters, "largest_cluster": int(r.cluster_sizes.max())}
    print(f"    dropped {int(dropped.sum()):,}; planted pairs found {found.mean():.4f}", flush=True)


def run_exact(args: argparse.Namespace, x: np.ndarray, report: Report) -> None:
    from miners.dedup import exact_duplicates, hash_vectors

    rng = np.random.default_rng(3)
    n = len(x)
    m = n // 20
    y = x.copy()
    y[n - m:] = x[rng.choice(n - m, m, replace=False)]
    dt, g = timed(f"exact duplicates {n:,} rows", lambda: exact_duplicates(hash_vectors(y)))
    assert len(g.dropped) >= m * 0.99
    report.add(f"exact duplicates (vector hashes), {n:,} rows", dt, None, kind="info", unit="s")
    report.details["exact"] = {"seconds": dt, "dropped": int(len(g.dropped)), "planted": int(m)}


def run_select(args: argparse.Namespace, x: np.ndarray, report: Report) -> None:
    from miners.select import Objective, select

    rng = np.random.default_rng(4)
    n = len(x)
    objs = [Objective(rng.random(n), 1.0), Objective(rng.standard_normal(n), 0.3, "minmax")]
    ref = x[rng.choice(n, 1000, replace=False)]
    b = min(1000, n)
    dt, r = timed(f"select lazy {n:,} rows, {b} picks",
                  lambda: select(b, objectives=objs, vectors=x, reference=ref, diversity=0.5, seed=0))
    de, e = timed(f"select eager {n:,} rows, 50 picks",
                  lambda: select(50, objectives=objs, vectors=x, reference=ref, diversity=0.5, seed=0, mode="eager"))
    assert r.rows[:50].tolist() == e.rows.tolist()
    dl, _ = timed(f"select lazy {n:,} rows, 50 picks",
                  lambda: select(50, objectives=objs, vectors=x, reference=ref, diversity=0.5, seed=0))
    report.add(f"select: {b} picks of {n:,} (2 objectives + diversity, 1,000 reference rows), lazy", dt, None,
               kind="info", unit="s")
    report.add("select: first 50 picks, lazy vs eager (O(N d) per pick)", dl, de, kind="latency", unit="s")
    report.details["select"] = {"lazy_s": dt, "mode": r.stats["mode"], "visits": r.stats["visits"],
                                "eager_50_s": de, "lazy_50_s": dl}


def run_confident(args: argparse.Namespace, x: np.ndarray, report: Report) -> None:
    from miners.label_issues import find_label_issues

    rng = np.random.default_rng(5)
    n, c = len(x), 10
    true = rng.integers(0, c, n)
    logits = rng.standard_normal((n, c)) * 1.5
    logits[np.arange(n), true] += 3.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    flip = rng.random(n) < 0.1
    given = np.where(flip, (true + rng.integers(1, c, n)) % c, true)
    dt, r = timed(f"confident learning {n:,} x {c}", lambda: find_label_issues(given, p))
    prec = float(flip[r.mask].mean()) if r.mask.any() else 0.0
    rec = float(r.mask[flip].mean())
    report.add(f"confident learning (PBNR), {n:,} rows x {c} classes", dt, None, kind="info", unit="s")
    report.details["confident"] = {"seconds": dt, "precision": prec, "recall": rec, "flagged": int(r.mask.sum())}
    print(f"    precision {prec:.3f}, recall {rec:.3f}", flush=True)


def run_coldstart(args: argparse.Namespace, x: np.ndarray, report: Report, which: str) -> None:
    from miners.coldstart import probcover_select, typiclust_select

    if which == "typiclust":
        sub = x[: min(len(x), args.typiclust_rows)]
        dt, r = timed(f"typiclust {len(sub):,} rows, 100 picks", lambda: typiclust_select(sub, 100, seed=0))
        report.add(f"TypiClust, 100 picks of {len(sub):,}", dt, None, kind="info", unit="s")
        report.details["typiclust"] = {"seconds": dt, "rows": len(sub)}
    else:
        sub = x[: min(len(x), args.probcover_rows)]
        dt, r = timed(f"probcover {len(sub):,} rows, 100 picks",
                      lambda: probcover_select(sub, 100, n_classes=10, seed=0))
        report.add(f"ProbCover (delta by purity), 100 picks of {len(sub):,}", dt, None, kind="info", unit="s")
        report.details["probcover"] = {"seconds": dt, "rows": len(sub), "delta": r.delta, "purity": r.purity,
                                       "covered": r.covered, "edges": r.n_edges}
        print(f"    delta {r.delta:.4f} purity {r.purity:.3f} covered {r.covered:.3f}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--eps", type=float, default=0.001, help="SemDeDup eps")
    p.add_argument("--only", default=",".join(ALL))
    p.add_argument("--typiclust-rows", type=int, default=100_000, help="rows TypiClust picks from")
    p.add_argument("--probcover-rows", type=int, default=20_000,
                   help="rows ProbCover picks from (its ball graph is exact: O(N^2 d))")
    p.add_argument("--quick", action="store_true",
                   help="100,000 rows, batch 10,000; TypiClust on 20,000 rows, ProbCover on 5,000")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.batch = 100_000, 10_000
        args.typiclust_rows, args.probcover_rows = 20_000, 5_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import faiss
    import sklearn

    report = Report(machine(faiss=faiss.__version__, sklearn=sklearn.__version__),
                    {k: v for k, v in vars(args).items() if k != "json"})
    t0 = time.perf_counter()
    x = unit(clustered_low_dim(args.n, args.dim, seed=0, spread=0.2, noise=0.02))
    print(f"data: {args.n:,} x {args.dim} in {time.perf_counter() - t0:.1f} s", flush=True)
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        if name not in ALL:
            raise SystemExit(f"--only: unknown {name!r}; choose from {', '.join(ALL)}")
        fn = {"cluster_margin": run_cluster_margin, "semdedup": run_semdedup, "exact": run_exact,
              "select": run_select, "confident": run_confident}.get(name)
        if fn is None:
            run_coldstart(args, x, report, name)
        else:
            fn(args, x, report)
    out = render(report)
    print(out)
    if args.json:
        args.json.write_text(json.dumps({"machine": report.machine, "params": report.params,
                                         "rows": [vars(r) for r in report.rows], "details": report.details},
                                        indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
