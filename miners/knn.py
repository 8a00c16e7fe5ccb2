"""The k-NN graph engine for whole pools: exact where that is cheaper, else IVF lists (FAISS).

What it computes
----------------
For queries ``Q`` (``M x d``) and base rows ``X`` (``N x d``, float32, possibly a read-only
memory map), the ``k`` base rows nearest to each query by Euclidean distance (cosine
spaces arrive as unit vectors, see :func:`miners.vectors.load_pool`), as ``(indices
(M, k) int64, distances (M, k) float64)``, ascending, ``-1`` / ``+inf`` padding when fewer
exist — the k-NN graph convention of :mod:`miners.density`. ``self_ids[i] = j`` leaves base
row ``j`` out of query ``i``'s list (a pool's own graph: ``self_ids = arange(N)``).

How (``plan``)
--------------
* **exact** — :func:`miners.density.exact_knn_graph` (blocked, float64 re-ranking with a
  proven error bound, never ``N x N``), run on blocks of queries so that progress and cancel
  happen between blocks. Chosen when ``M * N <= EXACT_MAX_PAIRS`` or ``N < MIN_IVF_ROWS``,
  and on the IVF path when the nprobe ladder's top misses the target (below), or, for
  queries against another set, when the exact search (timed on one tile of the full pass's
  size) takes less per query than the tuned index (a small base with many queries, such as
  a 1M-row pool against a 10k-row reference set);
  both per-query times are in the :class:`GraphInfo` (``exact_query_s``, ``ivf_query_s``;
  the run record and the gRPC ``GraphInfo`` carry them).
  The threshold comes from ``bench/density.py --crossover`` on this (shared, noisy) 2-core
  machine (384-d clustered unit vectors, k=20, a pool's own graph, target recall 0.95; the
  IVF time includes training, adding, the recall check and the search): 4,000 rows: exact
  1.11 s, IVF 1.28 s; 5,000: 1.49 s vs 1.99 s; 6,000: 2.19 s vs 1.86 s; 8,000: 3.19 s vs
  1.65 s (and, with the earlier sqrt(N) list rule, 20,000: 10.2 s vs 1.7 s; 60,000: 91 s
  vs 17 s) — the crossover is near ``N = 5,000``, hence ``EXACT_MAX_PAIRS = 5,000**2``. An
  exact graph reports recall 1.0 without measuring.
* **ivf-list-join** — a pool's own graph on the auto plan (:class:`ListJoin`): the rows are
  assigned to the nearest of the plan's ``nlist`` k-means centroids, and the rows of each
  list are searched exactly, one ``faiss.knn`` product per list (BLAS and FAISS's top-k),
  among the rows of the ``nprobe`` lists whose centroids are nearest that list's own
  (itself first); the ``k + 1 + JOIN_SLACK`` nearest are re-ranked by exact distances.
  Every row of a list shares its candidates, so the work is dense matrix products instead
  of a per-query list scan, and nothing but the list numbers is stored (no codes: 80 MB at
  10M rows). ``nprobe`` is tuned on the sample by list membership (a row's true neighbours
  inside its candidate lists are exactly those it finds). Measured (``uv run --frozen
  python`` on 1M x 384 rows of ``bench/scale.py``'s generator with 100 clusters and 819
  lists, the lists' size and rows per cluster of the 10M bench pool; 2 shared cores, another
  process building an index beside both): join 471.6 s (nprobe 7, recall@20 0.954) against
  ``IndexIVFFlat`` 589.6 s (nprobe 8, recall@20 0.952) — 1.25x. FAISS has no such join;
  it is written here. Explicit ``method="ivf-flat"`` / ``"ivf-sq8"`` keep the FAISS index.
* **faiss-ivf-flat** — ``faiss.IndexIVFFlat`` when the base fits comfortably in memory
  (``N d 4 <= FLAT_MAX_BYTES`` and at most a third of the available memory): the index holds
  a float32 copy of the base, inverted lists hold exact vectors, distances are exact float32.
* **faiss-ivf-sq8+rerank** — ``faiss.IndexIVFScalarQuantizer`` (8 bits per dimension, 4x
  smaller than float32) for larger bases: each query takes ``RERANK x k`` candidates from
  the compressed codes, and those are re-ranked by their exact float32 distance read from
  the base vectors (a memory map is fine: only the candidates' rows are read).

IVF settings, from ``N`` (the base rows):

* ``nlist = 2^round(log2(4 sqrt(N)))`` clamped to ``[16, 8192]`` and to ``N / 39`` (FAISS's
  guideline; 100k rows: 1024, 1M: 4096, 10M: 8192). Small lists fit the cache while
  consecutive queries scan them: at 1M x 384 (``bench/density.py --graph --latent 16``
  data), 4096 lists reached recall@20 0.958 with nprobe 20 in an estimated 232 s of search
  (+131 s to build, with the earlier 160k-row x 10-iteration training), 1024 lists 0.951 with nprobe 8 in 421 s (+9 s) — the coarse step's
  ``nlist`` distances per query are cheaper than the longer lists' scan. Above 8192 lists,
  training (``~ 39 nlist^2 d`` flops per iteration) would cost more than it saves.
* training: ``TRAIN_ITERATIONS`` = 6 Lloyd iterations on ``min(39 nlist, TRAIN_ROWS)``
  sampled rows (``TRAIN_ROWS`` = 100,000; 39 a list is FAISS's guideline; at 1M rows 4096
  lists train on 100k rows, 24 a list), run one iteration at a time so cancel is checked
  between iterations. The lists only route queries; ``nprobe`` is then tuned to the recall
  target, so cheaper lists cost a little more scanning, never recall: 100k rows x 6
  iterations is ~2.7x less training than the earlier 160k x 10 at 1M rows, and at 200k rows
  (the bench data, 2048 lists, 4,000 sampled queries) IVF-Flat at nprobe 16 reached
  recall@20 0.953 with these lists; ``bench/density.py --graph --n 200000``'s reference
  (FAISS's own training: 10 iterations on 100k rows) reached 0.955 at nprobe 16.
* ``nprobe`` is **tuned on a sample** of ``recall_sample`` query rows (default 500,
  seeded): the sample's exact neighbours are computed first (blocked exact search over the
  whole base, in 65,536-row chunks, so a memory-mapped base is streamed once), then the
  sample is searched with ``nprobe = 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...`` (steps
  of at most 25 %, from one list: well-separated data needs few — 1M x 384 in 1,000
  clusters reached recall@20 0.9998 at nprobe 16 of 4096, where the ladder used to start)
  until recall@k reaches ``target_recall`` (default 0.95). The whole graph
  is then searched once with that ``nprobe``; the graph's recall is measured on the same
  sample rows of the final graph. The ladder stops at ``nlist / 4``: a quarter of the base
  scanned per query costs about what the exact search does (at 1M x 10k, 384-d, nprobe 56
  of 255 lists took 1.4e-4 s a query, the exact pass 1.1-1.2e-4: counting 2 flops a
  multiply-add, ~13 GFLOP/s in the lists' scan against ~65 in the exact pass's matrix
  products). On the auto plan a graph that misses the target there
  is the exact one (the 9,967-row reference set of the 1M bench: recall@20 0.91 at the top)
  while the exact pass stays under ``EXACT_FALLBACK_MAX_MACS`` (about an hour on 2 cores);
  above it (a 10M pool's own graph would take weeks exact) the graph is searched at the
  smallest rung whose sample recall is within ``PLATEAU_RECALL`` of the best rung's — where
  recall stops rising with the lists scanned, as at an SQ8 index's quantisation ceiling —
  and reported below target;
  with an explicit ``method`` it is kept and reported with ``below_target = True`` (and said
  so in the progress message) rather than searched again.

Measured (``bench/density.py --graph --n 1000000 --k 20 --latent 16``, 2 shared cores,
2026-12-05; the reference is FAISS IVF4096,Flat trained by FAISS on 100k rows, nprobe the
smallest reaching recall >= 0.95, chosen untimed): engine 349.9 s (build 82 s, recall check
9 s, search 258 s, nprobe 20, recall@20 0.9535) vs FAISS 478.3 s (build 118 s, search 361 s,
nprobe 20, recall 0.9553): 1.37x, CPU 1.71x (load ~3-4). An earlier run under heavier load
(~9 during the engine's build, ~4-7 during the reference's): 744.2 s vs 713.6 s, 0.96x, CPU
1.39x. The engine's search is faster at the same nprobe because its queries follow the
inverted lists (cache reuse); its training is cheaper (100k rows x 6 iterations). These
runs predate ``parallel_mode = 3`` in :meth:`IvfIndex.search_block` (the list-ordered
search ran on one core); in ``bench/scale.py --quick`` after it (2026-12-05), LOF's whole
run took 303.7 s against the same run's FAISS graph of 329.6 s (1.09x), both at nprobe 16
(the ladder's start then); with both ladders from one list (nprobe 5, recall@20 0.963 and
0.965), 113.5 s against 164.1 s (1.45x; README, "Scale"); with the list join for a
pool's own graph, 85.6 s against 158.3 s (1.85x, recall@20 0.972 / 0.965), and at 10M rows
lof's graph (nlist 8192, nprobe 5, recall@20 0.969) took 1,616 s.

Recall@k of a query: the fraction of its ``k`` listed neighbours at a distance ``<=`` its
exact ``k``-th neighbour distance (``x (1 + 1e-5)``, so that ties and float32 rounding do not
count as misses); the graph's recall is the mean over the sample.

Search: queries in blocks sized to take about ``BLOCK_SECONDS`` each (from the tuning
timings), sorted by their nearest centroid inside a block (consecutive queries then scan
the same inverted lists while they are in cache: 2-2.5x faster here); for a pool's own
graph the blocks follow the inverted lists. ``check()`` runs between blocks and
``progress(fraction, message)`` reports rows done, rate and ETA. Both cores:
``faiss.omp_set_num_threads(os.cpu_count())``.

GPU: when ``device="auto"`` and torch sees CUDA, the graph is an exact blocked search on
the GPU (:func:`_torch_exact`: float32 matrix products, top-``k`` per block, final distances
recomputed in float64 on the host); the CPU path above is the tested default
(``_torch_exact`` itself is tested on the CPU).

Memory plan: a 10M x 384 pool, k = 20, in 24 GiB with the server
----------------------------------------------------------------
A pool's own graph (the list join) keeps no codes: list numbers and their order 2 x 76 MiB,
each list's nearest lists (8192 x 2048 int64, 128 MiB), the graph 3.0 GiB, per list its
gathered candidate rows (~12k rows x 1.5 KiB = 18 MiB at the bench pool's nprobe 7). The
plan below is that of queries against another large set (an IVF-SQ8 index):

* pool vectors, float32: 10M x 384 x 4 B = 14.3 GiB — a memory-mapped temp file
  (``load_pool`` above 4 GiB): page cache, reclaimed by the OS, not anonymous memory, and at
  most ``POOL_MAPPED_BUDGET_BYTES`` (4 GiB) of its pages stay mapped in the server
  (:mod:`miners.mapped`);
* 14.3 GiB > ``FLAT_MAX_BYTES`` (4 GiB), so IVF-SQ8: codes 10M x 384 B = 3.6 GiB + ids
  10M x 8 B = 76 MiB + 8192 centroids (12 MiB);
* training sample: 100k rows x 384 x 4 B = 146 MiB (freed after training);
* the graph: 10M x 20 x (8 + 8) B = 3.0 GiB (int64 indices, float64 distances);
* per block (<= 65,536 queries): coarse assignment 65,536 x nprobe x 12 B (<= 200 MiB at
  nprobe 256), 2k candidates 65,536 x 41 x 12 B = 31 MiB, re-ranking in sub-blocks of 2,048
  queries: 2,048 x 41 x 384 x 4 B = 123 MiB;
* recall sample: 500 queries x 65,536-row base chunks inside ``exact_knn_graph``: < 400 MiB;
* the index is released when the search ends, before the miner scores the graph.

Anonymous peak during the search: 3.7 (index) + 3.0 (graph) + ~0.5 (blocks) ≈ 7.2 GiB,
plus what ``load_pool`` holds (ids as Python strings, ~1 GiB at 10M) and the server
(~1 GiB): about 9–10 GiB, leaving ~14 GiB of the 24 GiB for the page cache that backs the
14.3 GiB vector file — most of it stays cached; re-ranking and query reads that miss the
cache are read from the local temp file.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from miners.density import exact_knn_graph

__all__ = [
    "EXACT_MAX_PAIRS",
    "GraphInfo",
    "IvfIndex",
    "KnnResult",
    "eta_text",
    "exact_search",
    "knn_search",
    "plan",
    "recall_at_k",
    "tuned_index",
]

#: exact pass while queries x base rows stay below this (measured crossover ~5,000 rows).
EXACT_MAX_PAIRS = 5_000 ** 2
#: never an IVF index over fewer base rows than this.
MIN_IVF_ROWS = 4096
#: IVF-Flat (a float32 copy of the base in the index) up to this many bytes of vectors.
FLAT_MAX_BYTES = 4 * 2**30
#: candidates per neighbour taken from SQ8 codes before the exact re-ranking.
RERANK = 2
#: ListJoin: candidates beyond k + 1 re-ranked exactly (near-ties of the float32 product)
JOIN_SLACK = 4
#: k-means of the IVF lists: Lloyd iterations, and at most TRAIN_ROWS sampled rows (39 a list
#: below that, FAISS's guideline)
TRAIN_ITERATIONS = 6
TRAIN_ROWS = 100_000
BASE_CHUNK = 65_536
BLOCK_SECONDS = 1.5
MAX_BLOCK = 65_536
RECALL_SAMPLE = 500
TARGET_RECALL = 0.95
#: the exact pass replaces an index that misses the target only up to this many
#: multiply-adds (queries x base rows x d): about an hour of the exact pass on 2 cores
#: (1M x 9,967 x 384 = 3.8e12 took 117 s, 3.3e10 a second, in ``bench/scale.py --quick``).
#: A 10M pool's own graph (3.8e16) would take weeks exact.
EXACT_FALLBACK_MAX_MACS = 1.2e14
#: above EXACT_FALLBACK_MAX_MACS, a graph that misses the target is searched at the
#: smallest rung whose sample recall is within this of the best rung's (recall that stops
#: rising with nprobe — an SQ8 index's quantisation ceiling — is not bought with more lists)
PLATEAU_RECALL = 0.01
#: the nprobe ladder: steps of at most 25 % from 4 on (a coarser step overshoots the target:
#: at 1M rows, 1024 lists, nprobe 8 gave < 0.95 and 12 gave 0.975 — 50 % more search time)
_LADDER = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128,
           160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048,
           2560, 3072, 3584, 4096)

Progress = Callable[[float, str], None]
Check = Callable[[], None]


def _noop_progress(fraction: float, message: str) -> None:
    pass


def _noop_check() -> None:
    pass


@dataclass
class GraphInfo:
    """How a graph was built and how good it is (kept in the run record)."""

    method: str
    k: int
    rows: int  # base rows searched
    queries: int
    recall: float | None  # recall@k on the sample (1.0 for exact graphs, not measured)
    recall_sample: int  # sample rows the recall was measured on (0: exact, not measured)
    target_recall: float
    nlist: int = 0
    nprobe: int = 0
    build_s: float = 0.0
    search_s: float = 0.0
    recall_s: float = 0.0
    device: str = "cpu"
    below_target: bool = False
    cached: bool = False
    #: a range (ball) graph's radius (``k`` = 0 there; ``recall``: of ball membership,
    #: :func:`miners.coldstart.ball_recall`); 0.0 for k-NN graphs
    radius: float = 0.0
    #: seconds per query, exact (the recall sample's search, or for queries against another
    #: set one tile of the full pass's size) and through the tuned index (the recall
    #: sample): the measured choice between the two (0.0 when the plan was exact from the start)
    exact_query_s: float = 0.0
    ivf_query_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recall"] = None if self.recall is None else round(float(self.recall), 6)
        for key in ("build_s", "search_s", "recall_s"):
            out[key] = round(float(out[key]), 4)
        return out


@dataclass
class KnnResult:
    indices: np.ndarray  # (M, k) int64, -1 = missing (trailing)
    distances: np.ndarray  # (M, k) float64, +inf = missing, ascending
    info: GraphInfo
    #: the recall sample: query rows, their exact neighbours (k columns) — lets a graph
    #: sliced to k' <= k report its own recall@k' (the first k' exact neighbours).
    sample: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def sliced(self, k: int) -> KnnResult:
        """The graph for ``k <= self.info.k``: the first ``k`` columns (each row is ascending, so
        they are its ``k`` nearest listed), with the recall recomputed at ``k``."""
        if k > self.info.k:
            raise ValueError(f"a graph built for k={self.info.k} cannot serve k={k}")
        if k == self.info.k:
            return self
        idx, dist = self.indices[:, :k], self.distances[:, :k]
        info = GraphInfo(**{**asdict(self.info), "k": k, "cached": True})
        sample = None
        if self.sample is not None:
            rows, ex_i, ex_d = self.sample
            sample = (rows, ex_i[:, :k], ex_d[:, :k])
            info.recall = recall_at_k(dist[rows], ex_d[:, :k])
            info.below_target = info.recall < info.target_recall
        return KnnResult(idx, dist, info, sample)


# ------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Plan:
    kind: str  # "exact", "ivf-flat", "ivf-sq8"
    nlist: int = 0
    train_rows: int = 0


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def nlist_for(n: int) -> int:
    """``2^round(log2(4 sqrt(n)))`` in [16, 8192]."""
    return int(min(8192, max(16, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))


def plan(n_base: int, n_queries: int, dim: int, *, method: str = "auto") -> Plan:
    """Exact or IVF (and which codes) for a search of ``n_queries`` among ``n_base`` rows."""
    if method not in ("auto", "exact", "ivf-flat", "ivf-sq8"):
        raise ValueError(f"method must be auto, exact, ivf-flat or ivf-sq8; got {method!r}")
    if method == "exact" or (method == "auto" and (n_base * n_queries <= EXACT_MAX_PAIRS
                                                     or n_base < MIN_IVF_ROWS)):
        return Plan("exact")
    return _ivf_plan(n_base, dim, method)


def train_rows_for(n: int, nlist: int) -> int:
    """Sampled k-means training rows: ``min(n, max(nlist, min(TRAIN_ROWS, 39 nlist)))``."""
    return int(min(n, max(nlist, min(TRAIN_ROWS, 39 * nlist))))


def _ivf_plan(n: int, dim: int, method: str) -> Plan:
    nlist = min(nlist_for(n), max(1, n // 39))
    train = train_rows_for(n, nlist)
    kind = method
    if method == "auto":
        size = n * dim * 4
        kind = "ivf-flat" if size <= FLAT_MAX_BYTES and 3 * size <= _available_bytes() else "ivf-sq8"
    return Plan(kind, nlist, train)


# ------------------------------------------------------------------------------- helpers


def eta_text(done: float, total: float, elapsed: float) -> str:
    """``", ETA 12 s"`` (minutes above 90 s, hours above 90 min) from the work done so far and
    the seconds it took; empty before any."""
    if done <= 0 or elapsed <= 0:
        return ""
    left = elapsed * (total - done) / done
    if left < 90:
        return f", ETA {left:.0f} s"
    if left < 5400:
        return f", ETA {left / 60:.1f} min"
    return f", ETA {left / 3600:.1f} h"


def _sub(progress: Progress, lo: float, hi: float) -> Progress:
    """``progress`` for a phase spanning [lo, hi] of the whole."""
    return lambda f, m: progress(lo + (hi - lo) * min(1.0, max(0.0, f)), m)


def _rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32, C-contiguous copy of ``x[rows]`` (rows sorted first: a memory map is read in
    file order)."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
    out[order] = x[rows[order]]
    return out


def _block(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(x[start:stop], dtype=np.float32)


def _drop_self(idx: np.ndarray, dist: np.ndarray, self_ids: np.ndarray | None, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """From ascending neighbour lists (``k + 1`` columns when the base has that many rows):
    drop each row's own id where listed, else the last column; order kept, ``k`` columns."""
    if self_ids is None:
        return idx[:, :k], dist[:, :k]
    own = (idx == self_ids[:, None]) & (self_ids[:, None] >= 0)
    if idx.shape[1] <= k:  # no spare column: blank the own entry and move it to the end
        idx = np.where(own, -1, idx)
        dist = np.where(own, np.inf, dist)
        order = np.argsort(own, axis=1, kind="stable")
        return np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1)
    col = np.where(own.any(axis=1), np.argmax(own, axis=1), idx.shape[1] - 1)
    keep = np.ones(idx.shape, dtype=bool)
    keep[np.arange(len(idx)), col] = False
    w = idx.shape[1] - 1
    return idx[keep].reshape(len(idx), w)[:, :k], dist[keep].reshape(len(idx), w)[:, :k]


def _sorted_rows(idx: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ascending by (distance, index); missing (-1) entries last."""
    d = np.where(idx >= 0, dist, np.inf)
    key_i = np.where(idx >= 0, idx, np.iinfo(np.int64).max)
    order = np.lexsort((key_i, d), axis=-1)
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(d, order, axis=1)


def recall_at_k(distances: np.ndarray, exact_distances: np.ndarray, rtol: float = 1e-5) -> float:
    """Mean over rows of the fraction of listed neighbours within the exact ``k``-th distance
    (``distances[i, j] <= exact[i, k-1] (1 + rtol)``): ties and rounding are not misses. Rows
    with fewer than ``k`` true neighbours count their available slots only."""
    exact = np.asarray(exact_distances, dtype=np.float64)
    got = np.asarray(distances, dtype=np.float64)
    if exact.size == 0:
        return 1.0
    listed = np.isfinite(exact)
    kth = np.where(listed, exact, -np.inf).max(axis=1)
    hits = (got <= kth[:, None] * (1 + rtol) + 1e-12) & np.isfinite(got)
    avail = listed.sum(axis=1)
    ok = avail > 0
    return float(np.mean(np.minimum(hits.sum(axis=1)[ok], avail[ok]) / avail[ok])) if ok.any() else 1.0


# --------------------------------------------------------------------------------- exact


def _exact_block(n: int, d: int) -> int:
    """Queries per tile of :func:`exact_search` over ``n`` base rows: ~2 d rows flops per
    query and tile, ~20 GFLOP/s on two cores with the selection, ~``BLOCK_SECONDS`` a tile."""
    return int(min(MAX_BLOCK, max(64, 20e9 * BLOCK_SECONDS / (2.0 * min(n, BASE_CHUNK) * d))))


def exact_search(x: np.ndarray, queries: np.ndarray, k: int, *, self_ids: np.ndarray | None = None,
                 progress: Progress = _noop_progress, check: Check = _noop_check,
                 what: str = "exact k-NN") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest base rows of each query: ``exact_knn_graph`` on (base chunk of
    ``BASE_CHUNK`` rows) x (query block of ~``BLOCK_SECONDS``) tiles, the tiles' lists merged
    by (distance, row) — the same lists as one ``exact_knn_graph`` call, but a memory-mapped
    base is never copied whole and cancel is checked between tiles."""
    n, m = len(x), len(queries)
    kk = min(n, k + (1 if self_ids is not None else 0))
    if m == 0 or n == 0:
        return np.full((m, k), -1, dtype=np.int64), np.full((m, k), np.inf)
    chunks = [(s, min(n, s + BASE_CHUNK)) for s in range(0, n, BASE_CHUNK)]
    block = _exact_block(n, x.shape[1])
    blocks = [(s, min(m, s + block)) for s in range(0, m, block)]
    best_i = np.full((m, kk), -1, dtype=np.int64)
    best_d = np.full((m, kk), np.inf)
    t0 = time.perf_counter()
    done, total = 0, len(chunks) * len(blocks)
    for cs, ce in chunks:
        xc = x if len(chunks) == 1 else _block(x, cs, ce)
        for qs, qe in blocks:
            check()
            ci, cd = exact_knn_graph(xc, min(kk, ce - cs), queries=_block(queries, qs, qe), exclude_self=False)
            ci = np.where(ci >= 0, ci + cs, -1)
            if len(chunks) == 1:
                best_i[qs:qe, :ci.shape[1]], best_d[qs:qe, :ci.shape[1]] = ci, cd
            else:
                mi, md = _sorted_rows(np.concatenate([best_i[qs:qe], ci], axis=1),
                                      np.concatenate([best_d[qs:qe], cd], axis=1))
                best_i[qs:qe], best_d[qs:qe] = mi[:, :kk], md[:, :kk]
            done += 1
            rows = done * m / total
            progress(done / total, f"{what}: {rows:,.0f} of {m:,} rows"
                     f"{eta_text(done, total, time.perf_counter() - t0)}")
    idx, dist = _drop_self(best_i, best_d, self_ids, k)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.concatenate([idx, np.full((m, pad), -1, np.int64)], axis=1)
        dist = np.concatenate([dist, np.full((m, pad), np.inf)], axis=1)
    return idx, dist


# ----------------------------------------------------------------------------------- IVF


def _faiss() -> Any:
    import faiss

    faiss.omp_set_num_threads(max(1, os.cpu_count() or 1))
    return faiss


def _train_centroids(x: np.ndarray, nlist: int, *, train_rows: int | None, seed: int, progress: Progress,
                     check: Check) -> tuple[np.ndarray, np.ndarray]:
    """``nlist`` k-means centroids of a seeded sample of ``x`` (``TRAIN_ITERATIONS`` Lloyd
    iterations, one at a time so cancel is checked between them); returns them and the sample."""
    faiss = _faiss()
    n, d = x.shape
    rng = np.random.default_rng(seed)
    t = min(n, train_rows or train_rows_for(n, nlist))
    sample = _rows(x, np.sort(rng.choice(n, t, replace=False)) if t < n else np.arange(n))
    # min_points_per_centroid=1: fewer than 39 rows a list (above 2,564 lists) is chosen
    km = faiss.Kmeans(d, nlist, niter=1, seed=seed, max_points_per_centroid=1 << 30, min_points_per_centroid=1)
    centroids = None
    t0 = time.perf_counter()
    for it in range(TRAIN_ITERATIONS):
        check()
        km.train(sample, init_centroids=centroids)
        centroids = km.centroids.copy()
        km = faiss.Kmeans(d, nlist, niter=1, seed=seed + it + 1, max_points_per_centroid=1 << 30,
                          min_points_per_centroid=1)
        progress((it + 1) / TRAIN_ITERATIONS, f"training {nlist} IVF lists on {t:,} rows: iteration "
                 f"{it + 1}/{TRAIN_ITERATIONS}{eta_text(it + 1, TRAIN_ITERATIONS, time.perf_counter() - t0)}")
    return centroids, sample


def _exact_distances(x: np.ndarray, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Exact Euclidean distances (float32 differences, float64 result) of each query to its
    candidate base rows ``cand`` (``(m, c)``, -1: none -> inf)."""
    out = np.full(cand.shape, np.inf)
    step = max(1, (128 << 20) // max(1, cand.shape[1] * q.shape[1] * 4))
    for s in range(0, len(q), step):
        c = cand[s:s + step]
        ok = c >= 0
        flat = np.where(ok, c, 0).ravel()
        g = _rows(x, flat).reshape(c.shape[0], c.shape[1], -1)
        g -= q[s:s + step, None, :]
        d2 = np.einsum("bcd,bcd->bc", g, g).astype(np.float64)
        out[s:s + step] = np.where(ok, np.sqrt(np.maximum(d2, 0.0)), np.inf)
    return out


class IvfIndex:
    """A FAISS IVF index over ``x`` (``codes``: "flat" or "sq8"), trained on a seeded sample
    one Lloyd iteration at a time, filled in chunks; the base stays referenced for the exact
    re-ranking of SQ8 candidates."""

    def __init__(self, x: np.ndarray, nlist: int, codes: str = "flat", *, train_rows: int | None = None,
                 seed: int = 0, progress: Progress = _noop_progress, check: Check = _noop_check) -> None:
        faiss = _faiss()
        self.x, self.codes = x, codes
        n, d = x.shape
        self.nlist = nlist
        self.nprobe = 1
        centroids, sample = _train_centroids(x, nlist, train_rows=train_rows, seed=seed,
                                             progress=_sub(progress, 0.0, 0.3), check=check)
        self.quantizer = faiss.IndexFlatL2(d)
        self.quantizer.add(centroids)
        if codes == "flat":
            self.index = faiss.IndexIVFFlat(self.quantizer, d, nlist)
        elif codes == "sq8":
            self.index = faiss.IndexIVFScalarQuantizer(self.quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit)
        else:
            raise ValueError(f"codes must be 'flat' or 'sq8'; got {codes!r}")
        self.index.train(sample)  # the quantizer is trained: only the SQ ranges are fitted here
        del sample
        t0 = time.perf_counter()
        for start in range(0, n, BASE_CHUNK):
            check()
            stop = min(n, start + BASE_CHUNK)
            self.index.add(_block(x, start, stop))
            progress(0.3 + 0.7 * stop / n, f"adding rows to the IVF index: {stop:,} of {n:,}"
                     f"{eta_text(stop, n, time.perf_counter() - t0)}")

    def list_order(self) -> np.ndarray:
        """Base row ids in inverted-list order (a pool's own graph is searched in this order)."""
        faiss = _faiss()
        inv = self.index.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
                 for i in range(self.nlist) if inv.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    @property
    def method(self) -> str:
        name = "faiss-ivf-flat" if self.codes == "flat" else f"faiss-ivf-sq8+rerank{RERANK}x"
        return f"{name} nlist={self.nlist} nprobe={self.nprobe}"

    def search_block(self, q: np.ndarray, k: int, self_ids: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest base rows of the float32 queries ``q`` at the current nprobe."""
        n = self.index.ntotal
        extra = 1 if self_ids is not None else 0
        kk = min(n, k + extra)
        fetch = min(n, kk * RERANK) if self.codes == "sq8" else kk
        if len(q) == 0 or kk == 0:
            return np.full((len(q), k), -1, np.int64), np.full((len(q), k), np.inf)
        dq, iq = self.quantizer.search(q, self.nprobe)
        order = np.argsort(iq[:, 0], kind="stable")  # queries sharing lists one after another
        self.index.nprobe = self.nprobe
        # FAISS's default parallel_mode 0 splits the queries over threads in search() only:
        # search_preassigned in that mode runs on one core (a 1M-row graph took twice as long
        # on 2 cores). Mode 3 splits them inside it; range search (mode 0) is parallel as it is.
        self.index.parallel_mode = 3
        try:
            d, i = self.index.search_preassigned(np.ascontiguousarray(q[order]), fetch, iq[order], dq[order])
        finally:
            self.index.parallel_mode = 0
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        d, i = d[back], i[back].astype(np.int64)
        if self.codes == "sq8":
            d = _exact_distances(self.x, q, i)
        else:
            d = np.sqrt(np.maximum(d.astype(np.float64), 0.0))
        i, d = _sorted_rows(i, np.where(i >= 0, d, np.inf))
        i, d = i[:, :kk], d[:, :kk]
        i, d = _drop_self(i, d, self_ids, k)
        if i.shape[1] < k:
            pad = k - i.shape[1]
            i = np.concatenate([i, np.full((len(i), pad), -1, np.int64)], axis=1)
            d = np.concatenate([d, np.full((len(d), pad), np.inf)], axis=1)
        return i, d

    def rung(self, q: np.ndarray, k: int, self_ids: np.ndarray | None, exact_i: np.ndarray, exact_d: np.ndarray
             ) -> tuple[float, float]:
        """Recall@k of the sample queries ``q`` at the current nprobe against their exact
        neighbours, and the seconds a query took."""
        ts = time.perf_counter()
        _, got_d = self.search_block(q, k, self_ids)
        return recall_at_k(got_d, exact_d), (time.perf_counter() - ts) / max(1, len(q))

    def search(self, q: np.ndarray, k: int, self_ids: np.ndarray | None = None, *, block: int = 16_384,
               check: Check = _noop_check) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search_block` over query blocks (``check()`` between them)."""
        idx = np.full((len(q), k), -1, dtype=np.int64)
        dist = np.full((len(q), k), np.inf)
        for s in range(0, len(q), block):
            check()
            e = min(len(q), s + block)
            idx[s:e], dist[s:e] = self.search_block(_block(q, s, e), k, None if self_ids is None else self_ids[s:e])
        return idx, dist

class ListJoin:
    """A pool's own k-NN graph by joining inverted lists: the rows are assigned to their
    nearest of ``nlist`` k-means centroids, and the rows of each list are searched exactly,
    as one matrix product (``faiss.knn``: BLAS plus FAISS's top-k selection), among the rows
    of the ``nprobe`` lists whose centroids are nearest that list's centroid (the list itself
    first). The candidate lists are shared by every row of a list, so the distances are one
    dense product per list instead of FAISS's per-query list scan — 1.25x ``IndexIVFFlat``'s
    time at the same recall on the 10M pool's list geometry (module docstring) — and no
    codes are stored (a 10M pool needs only its 80 MB of list
    numbers beside the memory-mapped vectors). FAISS has no such join; this is the part
    written here. The ``k + 1 + JOIN_SLACK`` nearest candidates of the float32 product are
    re-ranked by their exact distances (float32 differences, float64 sums) and the query's
    own row is dropped (its exact copies stay).

    Interface of :class:`IvfIndex` as far as :func:`knn_search` uses it; ``search_block``
    takes the queries' own row numbers as ``self_ids`` (a pool's own graph)."""

    def __init__(self, x: np.ndarray, nlist: int, *, train_rows: int | None = None, seed: int = 0,
                 progress: Progress = _noop_progress, check: Check = _noop_check) -> None:
        faiss = _faiss()
        self.x = x
        n, d = x.shape
        self.nlist = nlist
        self.nprobe = 1
        centroids, _ = _train_centroids(x, nlist, train_rows=train_rows, seed=seed,
                                        progress=_sub(progress, 0.0, 0.3), check=check)
        self.centroids = centroids
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(centroids)
        self.assign = np.empty(n, dtype=np.int64)
        t0 = time.perf_counter()
        for start in range(0, n, BASE_CHUNK):
            check()
            stop = min(n, start + BASE_CHUNK)
            self.assign[start:stop] = quantizer.search(_block(x, start, stop), 1)[1][:, 0]
            progress(0.3 + 0.7 * stop / n, f"assigning rows to {nlist} IVF lists: {stop:,} of {n:,}"
                     f"{eta_text(stop, n, time.perf_counter() - t0)}")
        self.order = np.argsort(self.assign, kind="stable")
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(self.assign, minlength=nlist))])
        self.near = np.zeros((nlist, 0), np.int64)
        self.widen(_ladder(nlist)[-1])
        self._last: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def widen(self, probes: int) -> None:
        """Keep each list's ``probes`` nearest lists (clamped to ``nlist``) in ``near``: the
        list itself first (a duplicate centroid can tie with it), then the others by
        centroid distance. The constructor keeps the ladder's top (``nlist / 4``)."""
        top = min(self.nlist, max(1, int(probes)))
        if top <= self.near.shape[1]:
            return
        quantizer = _faiss().IndexFlatL2(self.centroids.shape[1])
        quantizer.add(self.centroids)
        near = quantizer.search(self.centroids, min(self.nlist, top + 1))[1]
        own = np.arange(self.nlist)[:, None]
        rest = np.where(near == own, -1, near)
        rest = np.stack([r[r >= 0][:top - 1] for r in rest]) if top > 1 else np.zeros((self.nlist, 0), np.int64)
        self.near = np.concatenate([own, rest], axis=1)

    def list_order(self) -> np.ndarray:
        return self.order

    @property
    def method(self) -> str:
        return f"ivf-list-join nlist={self.nlist} nprobe={self.nprobe}"

    def members(self, lists: np.ndarray) -> np.ndarray:
        """Row ids of the given lists, list by list (rows ascending within a list)."""
        return np.concatenate([self.order[self.offsets[c]:self.offsets[c + 1]] for c in lists])

    def rung(self, q: np.ndarray, k: int, self_ids: np.ndarray | None, exact_i: np.ndarray, exact_d: np.ndarray
             ) -> tuple[float, float]:
        """Recall@k at the current nprobe of the sample rows ``self_ids`` without searching:
        the join lists the nearest candidates (float32 product, the ``k + 1 + JOIN_SLACK``
        nearest re-ranked exactly), so a row's true neighbours inside its candidate lists are
        the ones it finds (ties at the k-th distance aside, which only raise the measured
        recall); and the modelled seconds a query costs (its
        candidates' ``2 d`` flops at the exact tiles' ~20 GFLOP/s)."""
        del q, exact_d
        cand_lists = self.near[self.assign[self_ids], :self.nprobe]
        listed = exact_i >= 0
        where = self.assign[np.where(listed, exact_i, 0)]
        inside = (where[:, :, None] == cand_lists[:, None, :]).any(axis=2) & listed
        avail = np.maximum(1, np.minimum(k, listed.sum(axis=1)))
        recall = float(np.mean(np.minimum(inside.sum(axis=1), avail) / avail))
        sizes = np.diff(self.offsets)
        rows = float(np.mean(sizes[cand_lists].sum(axis=1)))
        return recall, 2.0 * rows * self.x.shape[1] / 20e9

    def search_block(self, q: np.ndarray, k: int, self_ids: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest rows of the pool rows ``self_ids`` (their vectors ``q``), each without itself."""
        if self_ids is None or len(self_ids) != len(q):
            raise ValueError("ListJoin.search_block needs the queries' own row numbers as self_ids")
        faiss = _faiss()
        m = len(q)
        idx = np.full((m, k), -1, np.int64)
        dist = np.full((m, k), np.inf)
        lists = self.assign[self_ids]
        by_list = np.argsort(lists, kind="stable")
        bounds = np.flatnonzero(np.diff(lists[by_list])) + 1
        for group in np.split(by_list, bounds):
            if not len(group):
                continue
            key = (int(lists[group[0]]), self.nprobe)
            if self._last is None or self._last[0] != key:
                # a large list spans several blocks of the graph: its candidates are kept
                cand = self.members(self.near[key[0], :self.nprobe])
                self._last = (key, cand, _rows(self.x, cand))
            _, cand, xc = self._last
            kk = min(len(cand), k + 1 + JOIN_SLACK)
            qg = np.ascontiguousarray(q[group], dtype=np.float32)
            _, local = faiss.knn(qg, xc, kk)
            cd = _exact_distances(xc, qg, local)  # from the gathered rows, still in cache
            ci, cd = _sorted_rows(np.where(local >= 0, cand[np.maximum(local, 0)], -1), cd)
            ci, cd = _drop_self(ci, cd, self_ids[group], k)
            idx[group, :ci.shape[1]] = ci[:, :k]
            dist[group, :ci.shape[1]] = cd[:, :k]
        return idx, dist


# -------------------------------------------------------------------------------- search


def _pick_sample(m: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 7919)
    return np.sort(rng.choice(m, min(m, size), replace=False)) if m > size else np.arange(m)


def _ladder(nlist: int, hi: int | None = None) -> list[int]:
    """The nprobe rungs tried, 1 to ``hi`` (default ``nlist / 4``)."""
    hi = max(1, nlist // 4 if hi is None else min(hi, nlist))
    return [p for p in _LADDER if p <= hi] or [hi]


def _torch_device(device: str) -> str | None:
    """"cuda" when the GPU path applies (``device`` "auto" or "cuda" and torch sees CUDA)."""
    if device == "cpu":
        return None
    torch = sys.modules.get("torch")
    if torch is None and device == "cuda":
        import torch  # noqa: F811
    if torch is None:  # "auto": do not pay torch's import for a check
        return None
    try:
        available = bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install is "no GPU"
        available = False
    if device == "cuda" and not available:
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return "cuda" if available else None


def _torch_exact(x: np.ndarray, queries: np.ndarray, k: int, *, self_ids: np.ndarray | None, device: str,
                 progress: Progress = _noop_progress, check: Check = _noop_check,
                 block: int = 2048, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Exact blocked k-NN with torch on ``device``: ``|q|^2 - 2 q.x + |x|^2`` in float32 (TF32
    off) per (query block, base chunk), the top ``k + max(8, k/4)`` per block merged across
    chunks; those candidates' distances are recomputed on the host in float64 and the best
    ``k`` kept (float32 rounding then only matters for neighbours that many ranks apart).
    The base goes to the device once (10M x 384: 15 GB); one (block, chunk) score tile is
    2048 x 262,144 x 4 B = 2 GiB. Not run on a GPU in this project's CI (no GPU there); the
    same code is tested on the CPU."""
    import torch

    n, m = len(x), len(queries)
    kk = min(n, k + (1 if self_ids is not None else 0))
    idx = np.full((m, k), -1, dtype=np.int64)
    dist = np.full((m, k), np.inf)
    if not (n and m and kk):
        return idx, dist
    # float32 |q|^2 - 2 q.x + |x|^2 can swap near neighbours: keep spare candidates for the
    # float64 re-ranking on the host
    kc = min(n, kk + max(8, kk // 4))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        dev = torch.device(device)
        chunks = []
        for s in range(0, n, chunk):
            xc = torch.from_numpy(_block(x, s, min(n, s + chunk))).to(dev)
            chunks.append((s, xc, (xc * xc).sum(dim=1)))
        t0 = time.perf_counter()
        for start in range(0, m, block):
            check()
            stop = min(m, start + block)
            q = torch.from_numpy(_block(queries, start, stop)).to(dev)
            best_d = best_i = None
            for s, xc, x2 in chunks:
                d2 = x2[None, :] - 2.0 * (q @ xc.T)
                top = min(kc, xc.shape[0])
                dv, iv = torch.topk(d2, top, dim=1, largest=False)
                iv = iv + s
                if best_d is None:
                    best_d, best_i = dv, iv
                else:
                    cd, ci = torch.cat([best_d, dv], dim=1), torch.cat([best_i, iv], dim=1)
                    best_d, pos = torch.topk(cd, min(kc, cd.shape[1]), dim=1, largest=False)
                    best_i = torch.gather(ci, 1, pos)
            bi = best_i.cpu().numpy().astype(np.int64)
            qh = _block(queries, start, stop).astype(np.float64)
            g = _rows(x, bi.ravel()).reshape(bi.shape[0], bi.shape[1], -1).astype(np.float64)
            g -= qh[:, None, :]
            bd = np.sqrt(np.einsum("bcd,bcd->bc", g, g))
            bi, bd = _sorted_rows(bi, bd)
            bi, bd = bi[:, :kk], bd[:, :kk]
            bi, bd = _drop_self(bi, bd, None if self_ids is None else self_ids[start:stop], k)
            idx[start:stop, :bi.shape[1]] = bi
            dist[start:stop, :bi.shape[1]] = bd
            progress(stop / m, f"exact k-NN on {device}: {stop:,} of {m:,} rows"
                     f"{eta_text(stop, m, time.perf_counter() - t0)}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return idx, dist


@dataclass
class _Tuning:
    exact_i: np.ndarray  # the sample's exact neighbours
    exact_d: np.ndarray
    nprobe: int  # the last rung tried
    recall: float  # the sample's recall@k there
    ivf_query_s: float  # seconds per sample query there
    exact_query_s: float  # seconds per query of the exact search
    rungs: list[tuple[int, float, float]] = field(default_factory=list)  # (nprobe, recall, s/query) tried

    def plateau(self) -> tuple[int, float, float]:
        """The smallest rung tried whose recall is within ``PLATEAU_RECALL`` of the best."""
        best = max(r for _, r, _ in self.rungs)
        return next(rung for rung in self.rungs if rung[1] >= best - PLATEAU_RECALL)


def _tune(index: IvfIndex | ListJoin, q: np.ndarray, sample: np.ndarray, s_self: np.ndarray | None, k: int,
          target_recall: float, progress: Progress, check: Check, *, time_tile: bool = False) -> _Tuning:
    """Exact neighbours of the sample queries ``q[sample]`` (2/3 of the bar), then the nprobe
    ladder until recall@k reaches the target (module docstring); sets ``index.nprobe``.
    ``time_tile``: the exact search's time per query is taken on one tile of the size the
    full exact pass would use (queries against another set: the sample's short tile
    overstates it)."""
    sq = _rows(q, sample)
    te = time.perf_counter()
    ex_i, ex_d = exact_search(index.x, sq, k, self_ids=s_self, progress=_sub(progress, 0.0, 0.67), check=check,
                              what=f"recall check: exact k-NN of {len(sample):,} sample rows")
    exact_per_query = (time.perf_counter() - te) / max(1, len(sample))
    block = min(len(q), _exact_block(len(index.x), index.x.shape[1]))
    if time_tile and len(sample) < block <= len(q) // 20:
        # 10k x 384 clustered reference rows: 500 sample queries 1.47e-4 s a query, 50k
        # queries 1.0e-4; the tile costs at most 5 % of the queries' exact pass
        te = time.perf_counter()
        exact_search(index.x, _block(q, 0, block), k, check=check)
        exact_per_query = (time.perf_counter() - te) / block
    ladder = _ladder(index.nlist)
    recall, per_query, nprobe = 0.0, 0.0, ladder[0]
    rungs: list[tuple[int, float, float]] = []
    for step, nprobe in enumerate(ladder):  # noqa: B007 — the last one tried is kept
        check()
        index.nprobe = nprobe
        recall, per_query = index.rung(sq, k, s_self, ex_i, ex_d)
        rungs.append((int(nprobe), recall, per_query))
        progress(0.67 + 0.33 * (step + 1) / len(ladder),
                 f"tuning nprobe: {nprobe} of {index.nlist} lists gives recall@{k} {recall:.3f} "
                 f"(target {target_recall:g})")
        if recall >= target_recall:
            break
    return _Tuning(ex_i, ex_d, int(nprobe), recall, per_query, exact_per_query, rungs)


def tuned_index(x: np.ndarray, k: int, *, target_recall: float = TARGET_RECALL, recall_sample: int = RECALL_SAMPLE,
                method: str = "auto", seed: int = 0, progress: Progress = _noop_progress,
                check: Check = _noop_check) -> tuple[IvfIndex, GraphInfo]:
    """An IVF index over ``x`` for queries that arrive later (a stream), its ``nprobe`` tuned
    for recall@k on a sample of ``x``'s own rows, each leaving itself out (the closest
    stand-in for unseen queries). The info's recall is that sample's."""
    if method not in ("auto", "ivf-flat", "ivf-sq8"):
        raise ValueError(f"method must be auto, ivf-flat or ivf-sq8; got {method!r}")
    p = _ivf_plan(len(x), x.shape[1], method)
    t0 = time.perf_counter()
    index = IvfIndex(x, p.nlist, "flat" if p.kind == "ivf-flat" else "sq8", train_rows=p.train_rows, seed=seed,
                     progress=_sub(progress, 0.0, 0.6), check=check)
    build_s = time.perf_counter() - t0
    sample = _pick_sample(len(x), recall_sample, seed)
    t1 = time.perf_counter()
    tuning = _tune(index, x, sample, sample.astype(np.int64), k, target_recall, _sub(progress, 0.6, 1.0), check)
    nprobe, recall = tuning.nprobe, tuning.recall
    info = GraphInfo(method=index.method, k=k, rows=len(x), queries=0, recall=recall, recall_sample=len(sample),
                     target_recall=target_recall, nlist=index.nlist, nprobe=nprobe, build_s=build_s,
                     recall_s=time.perf_counter() - t1, below_target=recall < target_recall)
    return index, info


def knn_search(x: np.ndarray, k: int, *, queries: np.ndarray | None = None, exclude_self: bool | None = None,
               self_ids: np.ndarray | None = None, method: str = "auto", target_recall: float = TARGET_RECALL,
               recall_sample: int = RECALL_SAMPLE, seed: int = 0, device: str = "auto",
               progress: Progress = _noop_progress, check: Check = _noop_check) -> KnnResult:
    """The k-NN graph of ``queries`` (default: ``x`` itself) among the rows of ``x``.

    Args:
        x: ``(N, d)`` base vectors (float32; a read-only memory map is fine).
        k: neighbours per query (``>= 1``); rows with fewer available are padded (-1, +inf).
        queries: ``(M, d)`` query vectors; ``None``: ``x`` itself.
        exclude_self: with ``queries=None`` (default True there): query ``i`` does not list
            row ``i`` (exact duplicates stay, at distance 0).
        self_ids: ``(M,)`` base row each query must not list (-1: none); overrides
            ``exclude_self``.
        method: "auto" (:func:`plan`), "exact", "ivf-flat" or "ivf-sq8".
        target_recall: the recall@k the IVF path tunes ``nprobe`` for (module docstring).
        recall_sample: query rows the recall is measured (and ``nprobe`` tuned) on.
        device: "auto" (CUDA through torch when available), "cpu" or "cuda".
        progress: ``progress(fraction in [0, 1], message)`` between blocks.
        check: called between blocks; raise in it to cancel.

    Returns:
        :class:`KnnResult` — indices, distances and :class:`GraphInfo`.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1]; got {target_recall}")
    x = np.asarray(x) if not isinstance(x, np.memmap) else x
    if x.ndim != 2 or x.dtype != np.float32:
        raise ValueError(f"x must be a 2-D float32 array; got {x.dtype} {x.shape}")
    own = queries is None
    q = x if own else queries
    if q.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"queries must be (M, {x.shape[1]}); got {q.shape}")
    identity = self_ids is None and own and (exclude_self is None or exclude_self)
    if identity:
        self_ids = np.arange(len(x), dtype=np.int64)
    elif self_ids is not None:
        self_ids = np.asarray(self_ids, dtype=np.int64)
        if self_ids.shape != (len(q),):
            raise ValueError(f"self_ids must have one entry per query ({len(q)}); got {self_ids.shape}")
    n, m = len(x), len(q)
    k = int(k)
    p = plan(n, m, x.shape[1], method=method)
    gpu = _torch_device(device) if p.kind != "exact" or device == "cuda" else None
    t0 = time.perf_counter()
    if p.kind == "exact" or gpu is not None:
        if gpu is not None:
            idx, dist = _torch_exact(x, q, k, self_ids=self_ids, device=gpu, progress=progress, check=check)
        else:
            idx, dist = exact_search(x, q, k, self_ids=self_ids, progress=progress, check=check)
        info = GraphInfo(method="exact" if gpu is None else f"exact-torch-{gpu}", k=k, rows=n, queries=m,
                         recall=1.0, recall_sample=0, target_recall=target_recall,
                         search_s=time.perf_counter() - t0, device=gpu or "cpu")
        return KnnResult(idx, dist, info)

    # 1. index (15% of the progress bar), 2. exact neighbours of the sample (10%),
    # 3. nprobe tuning (5%), 4. the graph (70%)
    auto = method == "auto"
    if auto and identity:  # a pool's own graph: the list join, whatever the plan's codes
        index: IvfIndex | ListJoin = ListJoin(x, p.nlist, train_rows=p.train_rows, seed=seed,
                                              progress=_sub(progress, 0.0, 0.15), check=check)
    else:
        index = IvfIndex(x, p.nlist, "flat" if p.kind == "ivf-flat" else "sq8", train_rows=p.train_rows,
                         seed=seed, progress=_sub(progress, 0.0, 0.15), check=check)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    sample = _pick_sample(m, recall_sample, seed)
    tuning = _tune(index, q, sample, None if self_ids is None else self_ids[sample], k, target_recall,
                   _sub(progress, 0.15, 0.3), check, time_tile=auto and not own)
    ex_i, ex_d, nprobe = tuning.exact_i, tuning.exact_d, tuning.nprobe
    per_query, exact_per_query = tuning.ivf_query_s, tuning.exact_query_s
    recall_s = time.perf_counter() - t1
    exact_affordable = m * n * x.shape[1] <= EXACT_FALLBACK_MAX_MACS
    if auto and tuning.recall < target_recall and not exact_affordable:
        # too large for the exact pass: the cheapest rung that gets about the best recall the
        # ladder found, reported below target
        nprobe, _, per_query = tuning.plateau()
        index.nprobe = nprobe
        progress(0.3, f"k-NN graph: recall@{k} stays below {target_recall:g} up to nprobe {tuning.nprobe} of "
                      f"{p.nlist} and the exact pass is too large ({m:,} x {n:,} rows); searching at nprobe "
                      f"{nprobe}")
    elif auto and (tuning.recall < target_recall or (not own and exact_per_query < per_query)):
        # The exact pass: when the ladder's top (nlist / 4, where the index scans about what
        # the exact search costs) misses the target — the 1M bench's 10k-row reference set:
        # nprobe 56 of 255 lists gave recall@20 0.93 (pool -> reference) and 0.91 (its own
        # graph) at about the exact pass's time per query; a decision on the seeded sample's
        # recall, so the same request gets the same graph — or, for queries against another
        # set, when the exact search was measured cheaper per query than the tuned index (a
        # small base with many queries). Its graph is exact; the index built for the check
        # is dropped. A pool's own graph that reaches the target stays on the index even
        # when the sample measures exact cheaper: its search runs in list order, faster per
        # query than the sample measured (EXACT_MAX_PAIRS holds the crossover there).
        del index
        why = (f"measured cheaper than IVF at nprobe {nprobe}" if tuning.recall >= target_recall else
               f"IVF gave recall@{k} {tuning.recall:.3f} at the ladder's top, nprobe {nprobe} of {p.nlist}")
        t2 = time.perf_counter()
        idx, dist = exact_search(x, q, k, self_ids=self_ids, progress=_sub(progress, 0.3, 1.0), check=check,
                                 what=f"exact k-NN ({why})")
        info = GraphInfo(method="exact", k=k, rows=n, queries=m, recall=1.0, recall_sample=0,
                         target_recall=target_recall, nlist=p.nlist, nprobe=int(nprobe), build_s=build_s,
                         search_s=time.perf_counter() - t2, recall_s=recall_s,
                         exact_query_s=exact_per_query, ivf_query_s=per_query)
        return KnnResult(idx, dist, info)
    # 4. the graph, in blocks of ~BLOCK_SECONDS
    block = int(min(MAX_BLOCK, max(256, BLOCK_SECONDS / max(per_query, 1e-7))))
    order = index.list_order() if own else None
    idx = np.full((m, k), -1, dtype=np.int64)
    dist = np.full((m, k), np.inf)
    t2 = time.perf_counter()
    for start in range(0, m, block):
        check()
        stop = min(m, start + block)
        rows = order[start:stop] if order is not None else None
        qb = _rows(q, rows) if rows is not None else _block(q, start, stop)
        sid = None if self_ids is None else (self_ids[rows] if rows is not None else self_ids[start:stop])
        bi, bd = index.search_block(qb, k, sid)
        if rows is not None:
            idx[rows], dist[rows] = bi, bd
        else:
            idx[start:stop], dist[start:stop] = bi, bd
        el = time.perf_counter() - t2
        progress(0.3 + 0.7 * stop / m, f"k-NN graph ({index.method}): {stop:,} of {m:,} rows"
                 f"{eta_text(stop, m, el)}")
    search_s = time.perf_counter() - t2
    method_name = index.method
    del index  # release the codes before the caller scores the graph
    final = recall_at_k(dist[sample], ex_d)
    info = GraphInfo(method=method_name, k=k, rows=n, queries=m, recall=final, recall_sample=len(sample),
                     target_recall=target_recall, nlist=p.nlist, nprobe=int(nprobe),
                     build_s=build_s, search_s=search_s, recall_s=recall_s, below_target=final < target_recall,
                     exact_query_s=exact_per_query, ivf_query_s=per_query)
    if info.below_target:
        progress(1.0, f"k-NN graph recall@{k} {final:.3f} is below the target {target_recall:g} "
                      f"at nprobe {info.nprobe} (the ladder went to {tuning.nprobe})")
    return KnnResult(idx, dist, info, (sample, ex_i, ex_d))
