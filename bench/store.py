"""Benchmark of the assay store (``indexing.store``) against bare LanceDB, in one run.

What is measured
----------------
1. **Upsert throughput.** ``--rows-upsert`` rows of clustered ``--dim``-d float32 vectors
   with metadata (``id``, ``uri``, ``text``, ``label``, ``tags``, user fields ``split`` and
   ``width``, ``emb_s`` and a ``pred_m`` struct whose ``probs`` sum to 1 over C=10 classes)
   go through ``Collection.upsert`` in batches of ``--batch`` rows into a fresh collection
   (default ``Store`` settings, so the automatic ``optimize`` every 20 writes is included).
   The reference writes the *same Arrow batches* to a fresh plain LanceDB table with
   ``tbl.add``; a second plain table takes them through an insert-only ``merge_insert`` to
   show how much of the gap is ``merge_insert`` itself. Then a second pass updates the same
   ids (new vectors and predictions) through ``Collection.upsert`` vs a bare
   ``merge_insert("id").when_matched_update_all().when_not_matched_insert_all()``.
   Batches of the three writers are interleaved (rotating order) so that machine noise
   hits all of them alike. Time inside ``Collection.upsert`` is split into validation
   (``prepare_upsert``), the ``created_at`` lookup (``_existing_ids``), automatic
   optimize, and the rest (``merge_insert`` itself).
2. **Filtered k-NN** on ``--rows-search`` clustered vectors (cosine, loaded through
   ``Collection.upsert``; its index policy's ``threshold_rows`` is set out of reach so
   that the automatic optimize never builds the index behind our back) with the filter ``split = 'pool' AND width > 100`` (about 30 % of
   the rows): p50/p95 latency of single-query k=10 search through ``Collection.search``,
   (a) exact (``exact=True``, before any index exists), (b) with the IVF index built by
   ``Collection.build_index`` at the policy's default ``nprobes`` and (c) after
   ``Collection.recall_check`` has tuned ``nprobes`` for that filter. Each is paired,
   query by query, with the same search issued directly on the same LanceDB table
   (``tbl.search(q, vector_column_name=...).where(f, prefilter=True).limit(10)`` with the
   same ``nprobes``/``refine_factor``), which shows assay's own overhead — except for (a):
   assay's exact search runs over the vectors it holds in memory (``indexing.flat_search``),
   LanceDB's decodes the vector column for every query. Recall@10 of the
   indexed search is measured against the exact filtered search on the same queries
   (stored vectors plus small Gaussian noise). Then one batched call with all queries
   (2-D array) is compared with the same number of single calls. Last, (a) again with a
   10-row update before each query (assay reads the live rows that pass the filter from
   what it keeps per fragment, ``indexing.live_rows``: the fragments an update wrote to
   are read again).

How to read the table
---------------------
``assay`` and ``reference`` are the figures measured side by side in this run; the
measure's name says which reference and which unit. ``ratio`` is always *assay speed
relative to the reference*: for throughputs (rows/s, queries/s) it is assay / reference,
for latencies (ms) it is reference / assay, for recall it is assay / reference. So a ratio
below 1 means assay is slower (or less accurate) than the reference, 0.5 means twice as
slow. Absolute figures depend on the (shared, noisy) machine; compare ratios.

Usage::

    uv run python bench/store.py [--rows-upsert 100000] [--rows-search 200000] [--dim 384]
        [--batch 10000] [--queries 100] [--json PATH] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lance
import lancedb
import numpy as np
import pyarrow as pa
from common import Report, machine, ms, pct, render, timed

import indexing.store as store_mod
from indexing.store import Collection, Store

SPACE = "s"
MODEL = "m"
CLASSES = [f"c{i}" for i in range(10)]
TAG_VOCAB = ["blurry", "night", "outdoor", "person", "vehicle", "indoor", "crowd", "rain"]
FILTER = "split = 'pool' AND width > 100"
RESULT_COLUMNS = ["id", "label", "split", "width"]
CLUSTERS = 200
LATENT = 64  # intrinsic dimension of the within-cluster spread
SPREAD = 0.16  # scale of the within-cluster spread (clusters overlap)
ISO_NOISE = 0.03


# -- data ----------------------------------------------------------------------------


class DataGen:
    """Clustered, embedding-like vectors plus item metadata, deterministic per batch.

    Vectors are ``center[c] + z @ B * spread + iso_noise``: 200 unit-norm cluster centres
    of uneven popularity, a shared low-rank (64-d) within-cluster spread and a little
    isotropic noise. Clusters overlap enough that IVF at the default ``nprobes`` does not
    reach 0.95 recall@10 (about 0.87 at 200k rows, like real text or image embeddings),
    so ``recall_check`` tuning has work to do; with tighter clusters every probe set holds
    the whole neighbourhood and recall is trivially 1.
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        centers = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
        self.centers = centers / np.linalg.norm(centers, axis=1, keepdims=True)
        basis = rng.standard_normal((LATENT, dim)).astype(np.float32)
        self.basis = basis / np.linalg.norm(basis, axis=1, keepdims=True)
        weights = rng.pareto(1.5, CLUSTERS) + 0.2
        self.weights = weights / weights.sum()
        self.dim = dim

    def vectors(self, rng: np.random.Generator, n: int) -> np.ndarray:
        assign = rng.choice(CLUSTERS, size=n, p=self.weights)
        z = rng.standard_normal((n, LATENT)).astype(np.float32)
        x = self.centers[assign] + (z @ self.basis) * np.float32(SPREAD)
        x += rng.standard_normal((n, self.dim)).astype(np.float32) * np.float32(ISO_NOISE)
        return x

    def table(self, start: int, n: int, seed: int) -> pa.Table:
        """Rows ``start .. start+n`` (ids ``item-%08d``); ``seed`` picks vectors and values."""
        rng = np.random.default_rng(seed)
        idx = np.arange(start, start + n)
        ids = [f"item-{i:08d}" for i in idx]
        vec = self.vectors(rng, n)
        split = rng.choice(np.array(["pool", "train", "val"]), size=n, p=[0.5, 0.35, 0.15])
        width = rng.integers(1, 251, size=n)  # width > 100 for 60 % of the rows
        label_idx = rng.integers(0, len(CLASSES), size=n)
        labels = [None if s == "pool" else CLASSES[j] for s, j in zip(split, label_idx, strict=True)]
        ntags = rng.integers(0, 4, size=n)
        tag_offsets = np.concatenate([[0], np.cumsum(ntags)]).astype(np.int32)
        tag_values = np.array(TAG_VOCAB)[rng.integers(0, len(TAG_VOCAB), size=int(ntags.sum()))]
        logits = rng.standard_normal((n, len(CLASSES))) * 2.0
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
        prob_offsets = np.arange(0, n * len(CLASSES) + 1, len(CLASSES), dtype=np.int32)
        pred = pa.StructArray.from_arrays(
            [pa.ListArray.from_arrays(pa.array(prob_offsets), pa.array(probs.ravel()))],
            names=["probs"],
        )
        columns: dict[str, pa.Array] = {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array([f"s3://bucket/images/{i:08d}.jpg" for i in idx], pa.string()),
            "text": pa.array([f"a photo, item {i}, batch {seed}" for i in idx], pa.string()),
            "label": pa.array(labels, pa.string()),
            "tags": pa.ListArray.from_arrays(
                pa.array(tag_offsets), pa.array(tag_values.tolist(), pa.string())
            ),
            "split": pa.array(split.tolist(), pa.string()),
            "width": pa.array(width, pa.int64()),
            f"emb_{SPACE}": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), self.dim),
            f"pred_{MODEL}": pred,
        }
        schema = pa.schema(
            [pa.field("id", pa.string(), nullable=False)]
            + [pa.field(k, v.type) for k, v in columns.items() if k != "id"]
        )
        return pa.Table.from_arrays(list(columns.values()), schema=schema)


# -- timing helpers --------------------------------------------------------------------


class Timers:
    """Accumulated seconds per label, filled by wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


@contextmanager
def instrumented(col: Collection, timers: Timers) -> Iterator[None]:
    """Time the parts of ``Collection.upsert`` without touching its code."""
    orig_prepare = store_mod.prepare_upsert
    store_mod.prepare_upsert = timers.wrap("validate (prepare_upsert)", orig_prepare)
    col._existing_ids = timers.wrap("created_at lookup (_existing_ids)",  # type: ignore[method-assign]
                                    col._existing_ids)
    col.compact_tiers = timers.wrap("compaction under load (compact_tiers)",  # type: ignore[method-assign]
                                    col.compact_tiers)
    try:
        yield
    finally:
        store_mod.prepare_upsert = orig_prepare
        del col._existing_ids
        del col.compact_tiers


# -- 1. upserts ------------------------------------------------------------------------


def bench_upsert(args: argparse.Namespace, gen: DataGen, tmp: Path, report: Report) -> None:
    n, bs = args.rows_upsert, args.batch
    starts = list(range(0, n, bs))
    t_gen, (first, second) = timed(lambda: (
        [gen.table(s, min(bs, n - s), seed=1000 + i) for i, s in enumerate(starts)],
        [gen.table(s, min(bs, n - s), seed=5000 + i) for i, s in enumerate(starts)],
    ))
    print(f"  generated 2 x {n:,} rows in {t_gen:.1f}s", flush=True)
    schema = first[0].schema

    store = Store(str(tmp / "assay"))
    col = store.create_collection(
        "upsert", spaces={SPACE: args.dim}, models={MODEL: CLASSES},
        fields={"split": pa.string(), "width": pa.int64()},
    )
    db = lancedb.connect(str(tmp / "bare"))
    t_add = db.create_table("add", schema=schema)
    t_merge = db.create_table("merge", schema=schema)

    def assay_write(b: pa.Table) -> None:
        col.upsert(b)

    def bare_add(b: pa.Table) -> None:
        t_add.add(b)

    def bare_merge_into(tbl: lancedb.table.Table) -> Callable[[pa.Table], None]:
        def write(b: pa.Table) -> None:
            (tbl.merge_insert("id").when_matched_update_all()
             .when_not_matched_insert_all().execute(b))
        return write

    profiler = cProfile.Profile() if args.profile else None
    timers = Timers()

    def run_pass(writers: dict[str, Callable[[pa.Table], None]],
                 batches: list[pa.Table]) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {k: [] for k in writers}
        names = list(writers)
        for i, b in enumerate(batches):
            for name in names[i % len(names):] + names[:i % len(names)]:
                if profiler is not None and name == "assay":
                    profiler.enable()
                t, _ = timed(lambda w=writers[name], b=b: w(b))
                if profiler is not None and name == "assay":
                    profiler.disable()
                times[name].append(t)
        return times

    with instrumented(col, timers):
        ins = run_pass({"assay": assay_write, "add": bare_add, "merge": bare_merge_into(t_merge)},
                       first)
        ins_parts = timers.take()
        upd = run_pass({"assay": assay_write, "merge": bare_merge_into(t_add)}, second)
        upd_parts = timers.take()

    # Sanity: every writer holds n rows, and the update pass wrote the second values.
    assert col.count() == n and t_add.count_rows() == n and t_merge.count_rows() == n
    probe = second[0].column("id")[0].as_py()
    w_assay = col.take([probe], ["width"]).column("width")[0].as_py()
    w_bare = t_add.search().where(f"id = '{probe}'").select(["width"]).to_arrow()["width"][0]
    assert w_assay == second[0].column("width")[0].as_py() == w_bare.as_py()

    def rate_median(ts: list[float]) -> float:
        return bs / statistics.median(ts)

    def rate_total(ts: list[float]) -> float:
        return n / sum(ts)

    report.add("insert pass, rows/s, median batch (ref: bare tbl.add)",
               rate_median(ins["assay"]), rate_median(ins["add"]), kind="speed", unit="rows/s")
    report.add("insert pass, rows/s, total wall (ref: bare tbl.add)",
               rate_total(ins["assay"]), rate_total(ins["add"]), kind="speed", unit="rows/s")
    report.add("insert pass, rows/s, median batch (ref: bare merge_insert, insert only)",
               rate_median(ins["assay"]), rate_median(ins["merge"]), kind="speed", unit="rows/s")
    report.add("update pass, rows/s, median batch (ref: bare merge_insert)",
               rate_median(upd["assay"]), rate_median(upd["merge"]), kind="speed", unit="rows/s")
    report.add("update pass, rows/s, total wall incl. auto optimize (ref: bare merge_insert)",
               rate_total(upd["assay"]), rate_total(upd["merge"]), kind="speed", unit="rows/s")
    opt = upd_parts.get("compaction under load (compact_tiers)", 0.0)
    report.add("update pass, rows/s, total wall excl. auto optimize (ref: bare merge_insert)",
               n / (sum(upd["assay"]) - opt), rate_total(upd["merge"]), kind="speed",
               unit="rows/s")
    report.add("update pass, slowest single write call, ms (ref: bare merge_insert)",
               ms(max(upd["assay"])), ms(max(upd["merge"])), kind="latency", unit="ms")
    report.details["upsert"] = {
        "batch_seconds": {"insert": ins, "update": upd},
        "assay_split_seconds": {"insert": ins_parts, "update": upd_parts},
        "assay_fragments_after": len(col.table.to_lance().get_fragments()),
        "assay_indices_after": [i.index_type + ":" + ",".join(i.columns)
                                for i in col.table.list_indices()],
    }
    for label, parts, total in (("insert", ins_parts, sum(ins["assay"])),
                                ("update", upd_parts, sum(upd["assay"]))):
        parts = dict(parts)
        parts["merge_insert + rest"] = total - sum(parts.values())
        report.details["upsert"]["assay_split_seconds"][label] = parts
        split = ", ".join(f"{k} {v:.2f}s ({100 * v / total:.0f}%)" for k, v in parts.items())
        print(f"  assay {label} pass {total:.2f}s: {split}", flush=True)
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
        report.details["upsert_profile"] = buf.getvalue()
        print(buf.getvalue())


# -- 2. filtered k-NN ---------------------------------------------------------------------


def paired(fns: dict[str, Callable[[np.ndarray], pa.Table]], queries: np.ndarray,
           warmup: int = 3) -> tuple[dict[str, list[float]], dict[str, list[list[str]]]]:
    """Run every function on every query, interleaved (rotating order), timing each call."""
    names = list(fns)
    for w in range(min(warmup, len(queries))):
        for name in names:
            fns[name](queries[w])
    times: dict[str, list[float]] = {k: [] for k in names}
    ids: dict[str, list[list[str]]] = {k: [] for k in names}
    for i, q in enumerate(queries):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t, res = timed(lambda f=fns[name], q=q: f(q))
            times[name].append(t)
            ids[name].append(res.column("id").to_pylist())
            if i == 0:
                check_filter(res)
    return times, ids


def after_writes(fns: dict[str, Callable[[np.ndarray], pa.Table]], queries: np.ndarray,
                 write: Callable[[int], None]) -> dict[str, list[float]]:
    """Like :func:`paired`, with ``write(i)`` (not timed) before each query's calls; the
    functions must find as many hits."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i, q in enumerate(queries):
        answers = []
        write(i)
        for name in names[i % len(names):] + names[:i % len(names)]:
            t, res = timed(lambda f=fns[name], q=q: f(q))
            times[name].append(t)
            answers.append(res.num_rows)
        assert len(set(answers)) == 1, answers
    return times


def check_filter(res: pa.Table) -> None:
    splits = set(res.column("split").to_pylist())
    assert splits <= {"pool"}, splits
    assert all(w > 100 for w in res.column("width").to_pylist())


def recall(got: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / max(1, len(b))
                          for a, b in zip(got, truth, strict=True)]))


def bench_search(args: argparse.Namespace, gen: DataGen, tmp: Path, report: Report) -> None:
    n, bs, k = args.rows_search, args.batch, 10
    store = Store(str(tmp / "search"))
    # threshold_rows out of reach: the automatic optimize compacts but never builds the
    # index on its own, so the build below is explicit and timed.
    col = store.create_collection(
        "knn",
        spaces={SPACE: {"dim": args.dim, "metric": "cosine", "index": {"threshold_rows": 10**9}}},
        models={MODEL: CLASSES},
        fields={"split": pa.string(), "width": pa.int64()},
    )
    t_load = 0.0
    for i, s in enumerate(range(0, n, bs)):
        b = gen.table(s, min(bs, n - s), seed=9000 + i)
        t, _ = timed(lambda b=b: col.upsert(b))
        t_load += t
    t_opt, _ = timed(col.optimize)
    matching = col.count(FILTER)
    print(f"  loaded {n:,} rows through Collection.upsert in {t_load:.1f}s, optimize "
          f"{t_opt:.1f}s; filter matches {matching:,} rows ({100 * matching / n:.1f}%)",
          flush=True)
    report.add("search table load through Collection.upsert (rows/s)", n / t_load, None,
               kind="info", unit="rows/s")
    report.add("filter selectivity (% of rows matching)", 100 * matching / n, None, kind="info",
               unit="%")

    rng = np.random.default_rng(42)
    qids = [f"item-{i:08d}" for i in rng.choice(n, size=args.queries, replace=False)]
    stored = col.take(qids, [f"emb_{SPACE}"]).column(f"emb_{SPACE}")
    base = np.stack(stored.to_numpy(zero_copy_only=False)).astype(np.float32)
    noise = rng.normal(0, 1e-2 * float(np.abs(base).mean()), base.shape).astype(np.float32)
    queries = base + noise

    tbl = col.table
    column = f"emb_{SPACE}"

    def assay_search(exact: bool) -> Callable[[np.ndarray], pa.Table]:
        return lambda q: col.search(SPACE, q, k=k, where=FILTER, columns=RESULT_COLUMNS,
                                    exact=exact)

    def bare_search(nprobes: int | None, refine: int | None) -> Callable[[np.ndarray], pa.Table]:
        def run(q: np.ndarray) -> pa.Table:
            b = (tbl.search(q, vector_column_name=column).distance_type("cosine")
                 .where(FILTER, prefilter=True).select([*RESULT_COLUMNS, "_distance"]).limit(k))
            if nprobes is None:
                b = b.bypass_vector_index()
            else:
                b = b.nprobes(nprobes).refine_factor(refine)
            return b.to_arrow()
        return run

    # (a) exact, no index yet
    times, ids = paired({"assay": assay_search(True), "bare": bare_search(None, None)}, queries)
    truth = ids["assay"]
    assert recall(ids["bare"], truth) > 0.99, "bare flat search disagrees with assay's"
    add_latency(report, "flat (exact) filtered k=10", times)

    # (b) IVF index at the policy's default nprobes
    t_build, kind = timed(lambda: col.build_index(SPACE))
    spec = col.space(SPACE)
    report.add(f"index build, {kind} (s)", t_build, None, kind="info", unit="s")
    times, ids = paired({"assay": assay_search(False),
                         "bare": bare_search(spec.index.nprobes, spec.index.refine_factor)},
                        queries)
    add_latency(report, f"indexed filtered k=10, default nprobes={spec.index.nprobes}", times)
    report.add(f"recall@10 vs exact, default nprobes={spec.index.nprobes}",
               recall(ids["assay"], truth), recall(ids["bare"], truth), kind="recall")

    # (c) after recall_check tuning
    t_tune, rep = timed(lambda: col.recall_check(SPACE, queries=50, k=k, where=FILTER, tune=True))
    spec = col.space(SPACE)
    report.add(f"recall_check tuning (s); tuned nprobes={rep.nprobes}, its recall "
               f"{rep.recall:.3f}", t_tune, None, kind="info", unit="s")
    times, ids = paired({"assay": assay_search(False),
                         "bare": bare_search(spec.index.nprobes, spec.index.refine_factor)},
                        queries)
    add_latency(report, f"indexed filtered k=10, tuned nprobes={spec.index.nprobes}", times)
    report.add(f"recall@10 vs exact, tuned nprobes={spec.index.nprobes}",
               recall(ids["assay"], truth), recall(ids["bare"], truth), kind="recall")

    # batch of all queries in one call vs as many single calls (indexed, tuned)
    single = assay_search(False)

    def singles() -> None:
        for q in queries:
            single(q)

    def batch() -> pa.Table:
        return col.search(SPACE, queries, k=k, where=FILTER, columns=RESULT_COLUMNS)

    bare_batch = bare_search(spec.index.nprobes, spec.index.refine_factor)
    t_batch: list[float] = []
    t_single: list[float] = []
    t_bare_batch: list[float] = []
    for _ in range(args.repeats):
        t, res = timed(batch)
        t_batch.append(t)
        t_single.append(timed(singles)[0])
        t_bare_batch.append(timed(lambda: bare_batch(queries))[0])
    got = [[] for _ in range(len(queries))]  # type: list[list[str]]
    for qi, i in zip(res.column("query_index").to_pylist(), res.column("id").to_pylist(),
                     strict=True):
        got[qi].append(i)
    nq = len(queries)
    report.add(f"batch search: {nq} queries in 1 call, queries/s (ref: {nq} single calls)",
               nq / statistics.median(t_batch), nq / statistics.median(t_single),
               kind="speed", unit="q/s")
    report.add(f"batch search: {nq} queries in 1 call, queries/s (ref: bare batch call)",
               nq / statistics.median(t_batch), nq / statistics.median(t_bare_batch),
               kind="speed", unit="q/s")
    report.add("recall@10 vs exact, batch call (ref: single calls)", recall(got, truth),
               recall(ids["assay"], truth), kind="recall")

    # (a) again, each query after a 10-row update (not timed): the live rows kept per
    # fragment (indexing.live_rows) are partly out of date at every query. Last, as the
    # updates change the table the recall figures above are measured on.
    def update(i: int) -> None:
        col.upsert(gen.table(int(rng.integers(0, n - 10)), 10, seed=7000 + i))

    times = after_writes({"assay": assay_search(True), "bare": bare_search(None, None)}, queries, update)
    add_latency(report, "flat (exact) filtered k=10, a 10-row update before each", times)

    # Where a single assay search spends its time besides the LanceDB query.
    costs: dict[str, float] = {}
    for label, fn in (
        ("Collection.space() (schema read + JSON)", lambda: col.space(SPACE)),
        ("Collection.validate_filter() (explain_plan)", lambda: col.validate_filter(FILTER)),
        ("Collection.vector_index() (list_indices)", lambda: col.vector_index(SPACE)),
        ("Collection._check_columns()", lambda: col._check_columns(RESULT_COLUMNS)),
        ("table.schema", lambda: tbl.schema),
    ):
        costs[label] = ms(statistics.median([timed(fn)[0] for _ in range(30)]))
    report.details["search_overhead_ms"] = costs
    print("  per-call costs inside Collection.search (median ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()), flush=True)


def add_latency(report: Report, what: str, times: dict[str, list[float]]) -> None:
    for q in (50, 95):
        report.add(f"{what}, p{q} ms (ref: bare lancedb)", ms(pct(times["assay"], q)),
                   ms(pct(times["bare"], q)), kind="latency", unit="ms")
    print(f"  {what}: assay p50 {ms(pct(times['assay'], 50)):.2f} ms, bare p50 "
          f"{ms(pct(times['bare'], 50)):.2f} ms", flush=True)


# -- output ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows-upsert", type=int, default=100_000)
    p.add_argument("--rows-search", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="repeats of the batch-search timing")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (20k upsert, 30k search, 50 queries) for development")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the assay upserts and print the top functions")
    p.add_argument("--skip-upsert", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rows_upsert, args.rows_search = 20_000, 30_000
        args.batch, args.queries = min(args.batch, 5_000), min(args.queries, 50)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(machine=machine(lancedb=lancedb.__version__, pylance=lance.__version__,
                                     pyarrow=pa.__version__), params={k: (str(v) if isinstance(v, Path) else v)
                                               for k, v in vars(args).items()})
    m = report.machine
    print("# assay store benchmark\n")
    print(f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, "
          f"{m['platform']}")
    print(f"- python {m['python']}, lancedb {m['lancedb']}, pylance {m['pylance']}, "
          f"pyarrow {m['pyarrow']}, numpy {m['numpy']}")
    print(f"- upsert {args.rows_upsert:,} rows, search {args.rows_search:,} rows, dim {args.dim}, "
          f"batch {args.batch:,}, {args.queries} queries, filter `{FILTER}`\n", flush=True)
    gen = DataGen(args.dim)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="assay-bench-") as tmp:
        if not args.skip_upsert:
            print("## upserts", flush=True)
            bench_upsert(args, gen, Path(tmp), report)
        if not args.skip_search:
            print("## filtered k-NN", flush=True)
            bench_search(args, gen, Path(tmp), report)
    report.details["total_seconds"] = time.perf_counter() - t0
    print(f"\n## results (total {report.details['total_seconds']:.0f}s)\n")
    print(render(report))
    print("\nratio = assay speed relative to the reference (throughput: assay/ref; latency: "
          "ref/assay; recall: assay/ref); < 1 means assay is slower.")
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": report.machine, "params": report.params,
             "rows": [asdict(r) for r in report.rows], "details": report.details},
            indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
