"""When a vector index is worth building: exact search from memory against IVF_RQ, by size
and dimension, and what an index's delta segments cost a search.

What is measured
----------------
1. **Exact against indexed**, for each ``--sizes ROWSxDIM``: a collection (``Store`` with
   automatic maintenance off, the space's ``threshold_rows`` out of reach) gets clustered
   cosine vectors in 16 upserts — 16 fragments — with a ``split`` field that passes 30 % of
   the rows to the filter ``split = 'pool'``. CPU time of a single-query k=10
   ``Collection.search`` (``time.process_time``, mean over ``--queries`` queries: stored
   vectors plus noise; a warm-up first, which loads the held vectors), without the filter
   and with it: first exact (``indexing.flat_search``: vectors held in memory), then through
   the IVF_RQ index that ``Collection.build_index`` builds and tunes to the policy's target
   recall. ``index/exact`` > 1 means the exact search is the cheaper one. Recall@10 of the
   indexed search is measured against the exact answers.
2. **Delta segments** (``--segments-size``): an indexed collection gets ``--deltas`` rounds
   of 500 new rows, each added to the index as a delta segment of its own
   (``optimize_indices(num_indices_to_merge=0)``, what Lance's update does between merges),
   then the index's segments are merged (``indexing.maintenance.update_indexes``). CPU of an
   indexed search over the segments against the same search once merged.

CPU, not wall time: on a loaded server a query's CPU is what the others wait for; the
machine is shared and noisy, so compare the figures of one run.

Usage::

    uv run --frozen python bench/index_threshold.py [--sizes 100000x64,200000x64,...]
        [--queries 40] [--segments-size 100000x64] [--deltas 8] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.maintenance import update_indexes
from indexing.schema import IndexPolicy
from indexing.store import Collection, Store

SPACE = "v"
FILTER = "split = 'pool'"
FRAGMENTS = 16
K = 10


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).standard_normal((64, dim)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def load(store: Store, name: str, rows: int, dim: int) -> Collection:
    col = store.create_collection(name, spaces={SPACE: {"dim": dim, "index": {"threshold_rows": 10**9}}},
                                  fields={"split": pa.string()})
    step = -(-rows // FRAGMENTS)
    for i, lo in enumerate(range(0, rows, step)):
        n = min(step, rows - lo)
        split = np.where(np.random.default_rng([i, 1]).random(n) < 0.3, "pool", "train")
        col.upsert({"id": [f"r{j}" for j in range(lo, lo + n)], "split": split.tolist(),
                    "emb_" + SPACE: clustered(n, dim, seed=i)})
    return col


def queries_of(col: Collection, rows: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(42)
    ids = [f"r{i}" for i in rng.choice(rows, size=count, replace=False)]
    stored = np.stack(col.take(ids, ["emb_" + SPACE]).column(0).to_numpy(zero_copy_only=False)).astype(np.float32)
    return stored + rng.normal(0, 0.01, stored.shape).astype(np.float32)


def cpu_ms(search: Callable[[np.ndarray], pa.Table], queries: np.ndarray) -> tuple[float, list[list[str]]]:
    """Mean CPU ms of one search, after a warm-up call; and each query's ids."""
    search(queries[0])
    start = time.process_time()
    ids = [search(q).column("id").to_pylist() for q in queries]
    return (time.process_time() - start) / len(queries) * 1e3, ids


def recall(got: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(got, truth, strict=True)]))


def exact_against_indexed(root: Path, rows: int, dim: int, n_queries: int) -> dict[str, Any]:
    store = Store(str(root / f"x{rows}_{dim}"), optimize_every=0)
    col = load(store, "t", rows, dim)
    queries = queries_of(col, rows, n_queries)
    out: dict[str, Any] = {"rows": rows, "dim": dim, "elements_M": rows * dim / 1e6,
                           "auto_threshold": IndexPolicy().threshold_for(dim)}
    truth = {}
    for label, where in (("none", None), ("filter", FILTER)):
        out[f"exact_{label}"], truth[label] = cpu_ms(
            lambda q, w=where: col.search(SPACE, q, k=K, where=w, columns=["id"], exact=True), queries)
    start = time.process_time()
    col.build_index(SPACE)
    out["build_cpu_s"] = time.process_time() - start
    out["nprobes"] = col.space(SPACE).index.nprobes
    for label, where in (("none", None), ("filter", FILTER)):
        out[f"index_{label}"], ids = cpu_ms(lambda q, w=where: col.search(SPACE, q, k=K, where=w, columns=["id"]),
                                            queries)
        out[f"recall_{label}"] = recall(ids, truth[label])
    store.close()
    return out


def delta_segments(root: Path, rows: int, dim: int, deltas: int, n_queries: int) -> dict[str, Any]:
    store = Store(str(root / "segments"), optimize_every=0)
    col = load(store, "t", rows, dim)
    col.build_index(SPACE)
    for d in range(deltas):
        lo = rows + d * 500
        col.upsert({"id": [f"r{j}" for j in range(lo, lo + 500)], "split": ["pool"] * 500,
                    "emb_" + SPACE: clustered(500, dim, seed=1000 + d)})
        ds = col.table.to_lance()
        ds.optimize.optimize_indices(num_indices_to_merge=0)
        col.table.checkout_latest()

    def segments() -> int:
        return max(len(d.segments) for d in col.table.to_lance().describe_indices() if d.name.startswith("emb_"))

    queries = queries_of(col, rows, n_queries)
    out: dict[str, Any] = {"rows": rows + deltas * 500, "dim": dim, "segments": segments()}
    out["piled_cpu_ms"], _ = cpu_ms(lambda q: col.search(SPACE, q, k=K, columns=["id"]), queries)
    start = time.process_time()
    update_indexes(col.table.to_lance())
    col.table.checkout_latest()
    out["merge_cpu_s"] = time.process_time() - start
    out["merged_segments"] = segments()
    out["merged_cpu_ms"], _ = cpu_ms(lambda q: col.search(SPACE, q, k=K, columns=["id"]), queries)
    store.close()
    return out


def size(text: str) -> tuple[int, int]:
    rows, dim = text.lower().split("x")
    return int(rows), int(dim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000x64,200000x64,300000x64,400000x32,100000x128,100000x384")
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--segments-size", default="100000x64")
    p.add_argument("--deltas", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="20k x 64 and 20k x 384, 20 queries")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.queries, args.segments_size = "20000x64,20000x384", 20, "20000x64"
    results: dict[str, Any] = {"exact_against_indexed": [], "delta_segments": None}
    with tempfile.TemporaryDirectory() as tmp:
        print("rows x dim (M elements; auto threshold): CPU ms a k=10 query, exact from memory / IVF_RQ "
              "(index/exact), no filter | filter passing 30 %; recall@10 of the index; build CPU", flush=True)
        for text in args.sizes.split(","):
            rows, dim = size(text)
            r = exact_against_indexed(Path(tmp), rows, dim, args.queries)
            results["exact_against_indexed"].append(r)
            print(f"  {rows:>9,} x {dim:<4d} ({r['elements_M']:5.1f}M; {r['auto_threshold']:,}): "
                  f"{r['exact_none']:6.1f} / {r['index_none']:6.1f} ({r['index_none'] / r['exact_none']:.2f}) | "
                  f"{r['exact_filter']:6.1f} / {r['index_filter']:6.1f} ({r['index_filter'] / r['exact_filter']:.2f}); "
                  f"recall {r['recall_none']:.3f} | {r['recall_filter']:.3f} at nprobes {r['nprobes']}; "
                  f"build {r['build_cpu_s']:.1f} s", flush=True)
        rows, dim = size(args.segments_size)
        s = delta_segments(Path(tmp), rows, dim, args.deltas, args.queries)
        results["delta_segments"] = s
        print(f"delta segments, {s['rows']:,} x {dim}: {s['segments']} segments {s['piled_cpu_ms']:.1f} ms of CPU "
              f"a search, merged into {s['merged_segments']} ({s['merge_cpu_s']:.2f} s of CPU) "
              f"{s['merged_cpu_ms']:.1f} ms ({s['piled_cpu_ms'] / s['merged_cpu_ms']:.2f}x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
