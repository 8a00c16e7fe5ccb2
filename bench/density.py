"""Benchmark of the density miners (``miners.density``): LOF on an embedding-like pool, and
the k-NN graph engine (``miners.knn``) against FAISS IVF-Flat (``--graph``).

What is measured
----------------
``--n`` float32 vectors of dimension ``--dim`` (default 100,000 x 384): 200 unit-norm
cluster centres of uneven popularity and uneven width, a shared 64-d within-cluster spread
plus a little isotropic noise, and ``--outliers`` (0.5 %) planted local outliers, each at
three cluster radii from its cluster's centre in a random direction (see ``make_data``).

* **assay** -- ``exact_knn_graph(x, k)`` (blocked exact k-NN: float32 score products on
  blocks of query rows, candidates re-ranked in float64 with a proven error bound, never
  ``N x N``) followed by ``lof_scores(indices, distances)``. The graph and the LOF step are
  also timed apart. (The approximate graphs of ``miners.knn`` are measured by ``--graph``.)
* **reference** -- scikit-learn's ``LocalOutlierFactor(n_neighbors=k).fit(x)`` on the same
  array, ``algorithm="auto"`` (what scikit-learn picks for ``d > 15`` is brute force: its
  chunked ``ArgKmin`` pairwise-distance reduction, which upcasts float32 chunks to float64).

Both sides use every core BLAS / OpenMP offers (2 on the reference machine); besides wall
time the process CPU time of each step (all threads) is reported, which a machine shared
with other jobs disturbs less. Peak memory
is the highest resident set size (``/proc/self/statm``, sampled every 10 ms) above the
resident size just before the step, so the input array itself is not counted.

Agreement: the overlap of the top 1 % most outlying rows by assay and by scikit-learn
(|A n B| / |A|; target >= 0.9), how many planted outliers each puts in its top
``--outliers``, the largest relative LOF difference, and the largest difference between the
k-NN distances of both (scikit-learn keeps them, cast to float32, in ``_distances_fit_X_``).

How to read the table
---------------------
``ratio`` is assay relative to the reference: for times and memory reference / assay (above 1
= assay faster or smaller), for recall-like figures assay / reference. Absolute times depend
on the (shared, noisy) machine; compare ratios.

The k-NN graph (``--graph``)
---------------------------
The same vectors, L2-normalised (as a cosine space is searched), k=20, a pool's own graph
(self excluded):

* **assay** -- ``miners.knn.knn_search(x, k)`` with its defaults: exact or FAISS IVF chosen
  from N, ``nprobe`` tuned on a 500-row sample for recall@k >= 0.95, the whole graph
  searched in blocks (what the lof / typicality / near_duplicates miners run);
* **reference** -- FAISS ``IndexIVFFlat`` with the engine's list count (``knn.nlist_for``:
  4096 at 1M rows) trained by FAISS itself (``index.train``, 10 Lloyd iterations) on a
  100,000-row sample, all rows added, ``nprobe`` the smallest of the engine's ladder that
  reaches recall@k >= 0.95 (``knn.TARGET_RECALL``) on the check rows below, then one
  ``search`` of all rows for k+1 neighbours (self dropped). That ``nprobe`` is an oracle's
  choice (chosen on the very rows its recall is measured on) and its tuning is not timed:
  the comparison is the engine at recall >= 0.95 against FAISS IVF-Flat at recall >= 0.95,
  with every doubt given to FAISS. (The ANCHORS.md figure, IVF4096 nprobe 16 on the issue's
  data, reached 0.998 there; on this script's data nprobe 16 gives ~0.94 at 1M.)

Both use both cores (``faiss.omp_set_num_threads``). Recall@k of each is measured by this
script against an exact search (``miners.knn.exact_search``) of 1,000 sampled rows (a
different sample from the engine's own), tie-aware (``miners.knn.recall_at_k``); the
engine's self-reported recall is printed too. Peak memory as above.

``--crossover`` times the exact pass against the IVF path at several N (how
``miners.knn.EXACT_MAX_PAIRS`` was set).

Usage::

    uv run python bench/density.py [--n 100000] [--dim 384] [--k 20] [--outliers 500]
        [--seed 0] [--ref-n N] [--quick] [--json PATH]
    uv run python bench/density.py --graph [--quick | --n 1000000] [--k 20]
    uv run python bench/density.py --crossover
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from common import Report, machine, render
from sklearn.neighbors import LocalOutlierFactor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import miners.density as density  # noqa: E402
from miners import knn  # noqa: E402
from miners.density import exact_knn_graph, lof_scores  # noqa: E402

CLUSTERS = 200
LATENT = 64


# -- data ---------------------------------------------------------------------------------


def make_data(n: int, dim: int, n_out: int, seed: int, latent: int = LATENT) -> np.ndarray:
    """Clustered float32 vectors; rows ``0 .. n_out-1`` are the planted outliers.

    Inliers: ``centre[c] + (g @ B) * w_c / sqrt(64) + noise``, unit-norm centres, a shared
    64-d spread ``B`` (rows of norm ~1), cluster radius ``w_c`` in [0.1, 0.4], isotropic
    noise of norm ~0.05. Outliers are *local*: ``centre[c] + 3 w_c u`` with ``u`` a random
    unit direction, so their neighbours are the dense members of one cluster (a far,
    uniform cloud of outliers would be a sparse cluster of its own, with LOF ~1).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    popularity = rng.pareto(1.5, size=CLUSTERS) + 1
    lab = rng.choice(CLUSTERS, size=n, p=popularity / popularity.sum())
    width = rng.uniform(0.1, 0.4, size=CLUSTERS)
    basis = rng.normal(size=(latent, dim)) / np.sqrt(dim)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 20_000):
        e = min(n, s + 20_000)
        z = rng.normal(size=(e - s, latent)) @ basis * (width[lab[s:e], None] / np.sqrt(latent))
        x[s:e] = centres[lab[s:e]] + z + (0.05 / np.sqrt(dim)) * rng.normal(size=(e - s, dim))
    u = rng.normal(size=(n_out, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x[:n_out] = centres[lab[:n_out]] + 3 * width[lab[:n_out], None] * u
    return x


# -- measuring -----------------------------------------------------------------------------


class PeakRSS:
    """Highest resident set size while the block runs, above the size at its start."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


CPU: dict[str, float] = {}


def timed(fn: Callable[[], Any], label: str | None = None) -> tuple[float, Any]:
    """Wall seconds of ``fn()``; its process CPU seconds (all threads) go to ``CPU[label]``."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    if label:
        CPU[label] = CPU.get(label, 0.0) + time.process_time() - c0
    return time.perf_counter() - t0, out


def top(scores: np.ndarray, m: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:m]


def run(args: argparse.Namespace, report: Report) -> None:
    n, dim, k, n_out = args.n, args.dim, args.k, args.outliers
    t, x = timed(lambda: make_data(n, dim, n_out, args.seed))
    print(f"data: {n:,} x {dim} float32, {n_out} planted outliers ({t:.1f}s)", flush=True)

    # assay: exact graph + LOF; count rows that needed the proven re-ranking fallback
    reranked = [0]
    orig = density._exact_scores

    def spy(xa, x_norm, q64, cand, metric):  # type: ignore[no-untyped-def]
        if cand.shape[0] == 1:
            reranked[0] += 1
        return orig(xa, x_norm, q64, cand, metric)

    density._exact_scores = spy  # type: ignore[assignment]
    try:
        with PeakRSS() as mem_a:
            t_graph, (idx, dist) = timed(lambda: exact_knn_graph(x, k), "assay")
            t_lof, lof_a = timed(lambda: lof_scores(idx, dist), "assay")
    finally:
        density._exact_scores = orig  # type: ignore[assignment]
    t_a = t_graph + t_lof
    print(f"assay: graph {t_graph:.1f}s + LOF {t_lof:.2f}s (CPU {CPU['assay']:.0f}s), "
          f"peak +{mem_a.extra_mb:.0f} MB, "
          f"{reranked[0]} rows re-ranked by the fallback", flush=True)

    ref_n = min(args.ref_n or n, n)
    if args.skip_sklearn:
        print("reference skipped (--skip-sklearn)")
        return
    xr = x[:ref_n]
    with PeakRSS() as mem_r:
        t_r, lof_model = timed(lambda: LocalOutlierFactor(n_neighbors=k).fit(xr), "sklearn")
    lof_r = -lof_model.negative_outlier_factor_
    print(f"scikit-learn ({lof_model._fit_method}, {ref_n:,} rows): {t_r:.1f}s "
          f"(CPU {CPU['sklearn']:.0f}s), peak +{mem_r.extra_mb:.0f} MB", flush=True)
    if ref_n != n:  # compare on the same rows: assay on the reference's subset
        CPU["assay"] = 0.0
        t_graph, (idx, dist) = timed(lambda: exact_knn_graph(xr, k), "assay")
        t_lof, lof_a = timed(lambda: lof_scores(idx, dist), "assay")
        t_a = t_graph + t_lof
        print(f"assay on {ref_n:,} rows: {t_a:.1f}s", flush=True)

    label = f"{ref_n:,} x {dim}, k={k}"
    report.add(f"LOF {label}: total s (ref: sklearn {lof_model._fit_method})", t_a, t_r,
               kind="cost", unit="s")
    report.add("  CPU s, all threads (less sensitive to a busy machine)", CPU["assay"],
               CPU["sklearn"], kind="cost", unit="s")
    report.add("  of which exact k-NN graph, s", t_graph, None, kind="info", unit="s")
    report.add("  of which LOF from the graph, s", t_lof, None, kind="info", unit="s")
    report.add("peak extra memory, MB (RSS above the input)", mem_a.extra_mb, mem_r.extra_mb,
               kind="cost", unit="MB")
    m = max(1, ref_n // 100)
    overlap = len(set(top(lof_a, m)) & set(top(lof_r, m))) / m
    report.add(f"top 1% outliers ({m:,}) overlap with sklearn (target >= 0.9)", overlap, 1.0,
               kind="recall")
    planted = min(n_out, ref_n)
    found_a = int(np.sum(top(lof_a, planted) < planted))
    found_r = int(np.sum(top(lof_r, planted) < planted))
    report.add(f"planted outliers in the top {planted}", found_a, found_r, kind="recall",
               unit="count")
    rel = float(np.max(np.abs(lof_a / lof_r - 1)))
    report.add("max relative LOF difference", rel, None, kind="info", unit="sci")
    ddiff = float(np.max(np.abs(dist - lof_model._distances_fit_X_.astype(np.float64))))
    report.add("max |k-NN distance difference| (sklearn's are float32)", ddiff, None,
               kind="info", unit="sci")
    report.add("rows re-ranked by the exact fallback", float(reranked[0]), None, kind="info",
               unit="count")
    report.details.update(t_graph=t_graph, t_lof=t_lof, t_sklearn=t_r, overlap=overlap,
                          sklearn_fit_method=lof_model._fit_method, ref_n=ref_n)


# -- the k-NN graph engine against FAISS IVF-Flat -----------------------------------------


REF_TRAIN = 100_000
CHECK_SAMPLE = 1000


def ref_nlist(n: int) -> int:
    """The engine's list count (``knn.nlist_for``: 2^round(log2(4 sqrt(n))), 4096 at 1M)."""
    return knn.nlist_for(n)


def _faiss_reference(x: np.ndarray, k: int, seed: int, rows: np.ndarray, ex_d: np.ndarray
                     ) -> tuple[float, float, int, float, np.ndarray, np.ndarray]:
    """IVF-Flat with the engine's list count, FAISS's own training (``index.train``: 10
    iterations) on a 100k sample, ``nprobe`` the smallest of the engine's ladder that reaches
    recall@k >= ``knn.TARGET_RECALL`` on the check rows (an oracle choice: that tuning is not
    timed), then one ``search`` of all rows: (build s, search s, nprobe, tuning s, indices,
    distances)."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    nlist = ref_nlist(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    train = x[np.sort(rng.choice(n, min(n, REF_TRAIN), replace=False))]
    index.train(np.ascontiguousarray(train))
    index.add(x)
    build = time.perf_counter() - t0

    def graph(q: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d2, idx = index.search(q, k + 1)
        # drop self (or the last one when self was not found), as the engine does
        idx, dist = knn._drop_self(idx.astype(np.int64), np.sqrt(np.maximum(d2, 0)).astype(np.float64),
                                   self_ids, k)
        return idx, np.where(idx >= 0, dist, np.inf)

    t1 = time.perf_counter()
    ladder = knn._ladder(nlist, hi=nlist)
    for nprobe in ladder:  # noqa: B007 -- the first that reaches the target is kept
        index.nprobe = nprobe
        if knn.recall_at_k(graph(x[rows], rows)[1], ex_d) >= knn.TARGET_RECALL:
            break
    tune = time.perf_counter() - t1
    t2 = time.perf_counter()
    idx, dist = graph(x, np.arange(n, dtype=np.int64))
    return build, time.perf_counter() - t2, int(nprobe), tune, idx, dist


def run_graph(args: argparse.Namespace, report: Report) -> None:
    import faiss

    n, dim, k = args.n, args.dim, args.k
    t, x = timed(lambda: make_data(n, dim, 0, args.seed, args.latent))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # a cosine space is searched on unit vectors
    print(f"data: {n:,} x {dim} unit vectors ({t:.1f}s); faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads", flush=True)
    rows = np.sort(np.random.default_rng(args.seed + 1).choice(n, min(n, CHECK_SAMPLE), replace=False))
    t, (_, ex_d) = timed(lambda: knn.exact_search(x, x[rows], k, self_ids=rows))
    print(f"exact neighbours of {len(rows):,} check rows: {t:.1f}s", flush=True)

    last = [0.0]

    def show(f: float, m: str) -> None:
        if time.monotonic() - last[0] > 10 or f >= 1.0:
            last[0] = time.monotonic()
            print(f"  [{f:5.1%}] {m}", flush=True)

    with PeakRSS() as mem_a:
        t_a, res = timed(lambda: knn.knn_search(x, k, progress=show), "assay")
    rec_a = knn.recall_at_k(res.distances[rows], ex_d)
    info = res.info
    print(f"assay: {t_a:.1f}s ({info.method}; build {info.build_s:.1f}s, recall check + tuning "
          f"{info.recall_s:.1f}s, search {info.search_s:.1f}s), recall@{k} {rec_a:.4f} "
          f"(self-reported {info.recall:.4f} on {info.recall_sample}), peak +{mem_a.extra_mb:.0f} MB",
          flush=True)
    del res
    with PeakRSS() as mem_r:
        t_r, (b_r, s_r, np_r, tune_r, _, dist_r) = timed(
            lambda: _faiss_reference(x, k, args.seed, rows, ex_d), "faiss")
    t_r -= tune_r  # the reference's nprobe is an oracle's choice: its tuning is not charged
    rec_r = knn.recall_at_k(dist_r[rows], ex_d)
    print(f"faiss IVF{ref_nlist(n)},Flat nprobe {np_r}: {t_r:.1f}s (build {b_r:.1f}s, search {s_r:.1f}s; "
          f"nprobe tuning {tune_r:.1f}s not counted), recall@{k} {rec_r:.4f}, peak +{mem_r.extra_mb:.0f} MB",
          flush=True)
    label = f"{n:,} x {dim}, k={k}"
    report.add(f"k-NN graph {label}: total s (ref: FAISS IVF{ref_nlist(n)},Flat nprobe {np_r})",
               t_a, t_r, kind="cost", unit="s")
    report.add("  CPU s, all threads", CPU["assay"], CPU["faiss"], kind="cost", unit="s")
    report.add("  build s (train + add)", info.build_s, b_r, kind="cost", unit="s")
    report.add("  recall check + nprobe tuning s", info.recall_s, None, kind="info", unit="s")
    report.add("  search s", info.search_s, s_r, kind="cost", unit="s")
    report.add(f"recall@{k} vs exact on {len(rows):,} sampled rows (target >= 0.95)", rec_a, rec_r,
               kind="recall")
    report.add(f"  self-reported recall@{k} ({info.recall_sample} rows)", info.recall, None, kind="info")
    report.add("peak extra memory, MB (RSS above the input)", mem_a.extra_mb, mem_r.extra_mb, kind="cost",
               unit="MB")
    report.details.update(method=info.method, engine=info.to_dict(), t_assay=t_a, t_faiss=t_r,
                          recall_assay=rec_a, recall_faiss=rec_r)


def run_crossover(args: argparse.Namespace, report: Report) -> None:
    """Exact pass vs IVF path (build, recall check, search) for a pool's own graph."""
    old = knn.MIN_IVF_ROWS
    knn.MIN_IVF_ROWS = 0
    try:
        for n in args.crossover_n:
            x = make_data(n, args.dim, 0, args.seed, args.latent)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            t_e, _ = timed(lambda x=x: knn.knn_search(x, args.k, method="exact"))
            t_i, res = timed(lambda x=x: knn.knn_search(x, args.k, method="ivf-flat"))
            print(f"n={n:,}: exact {t_e:.2f}s, IVF {t_i:.2f}s ({res.info.method}, recall "
                  f"{res.info.recall:.3f})", flush=True)
            report.add(f"{n:,} x {args.dim}, k={args.k}: IVF path s (ref: exact pass)", t_i, t_e, kind="cost",
                       unit="s")
    finally:
        knn.MIN_IVF_ROWS = old


# -- output --------------------------------------------------------------------------------


def _faiss_version() -> str:
    if importlib.util.find_spec("faiss") is None:
        return "not installed"
    import faiss

    return faiss.__version__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--outliers", type=int, default=None, help="planted outliers (0.5%% of n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-n", type=int, default=None,
                   help="run scikit-learn (and the compared assay run) on the first N rows only")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true",
                   help="20,000 rows (LOF) / 100,000 rows (--graph), for development")
    p.add_argument("--graph", action="store_true",
                   help="the k-NN graph engine against FAISS IVF-Flat at recall >= 0.95")
    p.add_argument("--crossover", action="store_true", help="exact pass vs IVF path at --crossover-n sizes")
    p.add_argument("--latent", type=int, default=LATENT,
                   help="dimension of the within-cluster spread (the data's intrinsic dimension; "
                        "real sentence embeddings have ~10-20 locally): 64 is hard for any IVF")
    p.add_argument("--crossover-n", type=int, nargs="+", default=[2000, 4000, 6000, 8000, 12000, 20000])
    args = p.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 100_000 if args.graph else 20_000)
    if args.outliers is None:
        args.outliers = max(1, args.n // 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(machine=machine(
        sklearn=sklearn.__version__,
        faiss=_faiss_version()), params={k: (str(v) if isinstance(v, Path) else v)
                                               for k, v in vars(args).items()})
    m = report.machine
    what = "k-NN graph" if args.graph else "exact vs IVF crossover" if args.crossover else "LOF"
    print(f"# assay density benchmark ({what})\n")
    print(f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, "
          f"{m['platform']}")
    print(f"- python {m['python']}, numpy {m['numpy']}, scikit-learn {m['sklearn']}, "
          f"faiss {m['faiss']}")
    planted = "" if args.graph or args.crossover else f", {args.outliers} planted outliers"
    print(f"- {args.n:,} x {args.dim} float32, k={args.k}{planted}, seed {args.seed}\n", flush=True)
    t0 = time.perf_counter()
    (run_graph if args.graph else run_crossover if args.crossover else run)(args, report)
    report.details["total_seconds"] = time.perf_counter() - t0
    print(f"\n## results (total {report.details['total_seconds']:.0f}s)\n")
    print(render(report))
    print("\nratio = assay relative to the reference (time, memory: ref/assay; recall-like: "
          "assay/ref); > 1 means assay is faster / smaller.")
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": report.machine, "params": report.params,
             "rows": [asdict(r) for r in report.rows], "details": report.details},
            indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
