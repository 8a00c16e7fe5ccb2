"""Scale: ingest, index build and every miner on a large pool, through the client, with the
server as its own process (issue 17).

    uv run --frozen python bench/scale.py [--n 10000000] [--dim 384] [--classes 10]
        [--labeled 0.01] [--data DIR] [--collection NAME] [--miners a,b,...] [--size 1000]
        [--skip-ingest] [--ingest-only] [--max-ingest-rows M] [--batch 50000]
        [--bare-rows 1000000] [--with samples,logits,loss,epoch_logits]
        [--miner-timeout 3600] [--no-faiss] [--faiss-nlist N] [--faiss-factory "IVF{nlist},Flat"]
        [--recall-sample 1000]
        [--json PATH] [--quick]

What it does
------------
1. Starts ``python -m service.cli serve --data DIR`` as a child process and samples its
   memory (``/proc/<pid>/status``: VmRSS and RssAnon of the server and its children every
   0.1 s, plus VmHWM after resetting it through ``/proc/<pid>/clear_refs`` at each step):
   every step reports the **peak server RSS** (anonymous memory in brackets: a memory-mapped
   pool counts in RSS as file pages the kernel may drop).
2. Generates ``--n`` rows, deterministically from ``--seed`` in blocks of 10,000 rows (never
   all at once: 10M × 384 float32 is 15 GB): unit vectors around ``--clusters`` centres of
   uneven popularity (a cosine space ``v``), 0.1 % planted near-duplicates, the class
   probabilities of a model ``m`` (``pred_m.probs``, C = ``--classes``) loosely tied to the
   cluster, ``label`` on ``--labeled`` of the rows (the rest, ``label IS NULL``, is the
   unlabeled pool) and ``split`` ('train' for labeled rows, 'pool' otherwise). ``--with``
   adds ``pred_m.samples`` (8 MC-dropout passes), ``logits``, ``loss`` and ``epoch_logits``
   (5 epochs) so the miners that read them run too (they cost ingest bytes: off by default,
   the issue measures vectors + probs).
3. **Ingest** through :class:`service.client.Client` (``create_collection``, one
   ``col.upsert`` per ``--batch``-row batch), timed over the upsert calls only (generation
   excluded). It resumes: rows ``0 .. count-1`` already in the collection are not sent
   again (batches are written in order and each is atomic), so a 10M table can be filled
   over several sessions (``--max-ingest-rows``, ``--ingest-only``).
4. **Index build**: an explicit ``col.optimize()`` job, waited for: it compacts what the
   ingest left (small fragments; bulk batches stay as they are) and builds the vector index
   the space's policy asks for. The server starts no compaction or index build while a
   bulk ingest goes on (they wait for a quiet moment), so the ingest row is the ingest with
   its background work included.
5. **Reference**: a bare LanceDB ``add`` of the same Arrow batches (the first
   ``--bare-rows`` rows, regenerated) into a table outside the server's data root, in
   this run; ratio = assay rows/s / bare rows/s (the issue's goal: ≥ 0.5). Then the same
   vector index (IVF_RQ, √rows partitions, the policy's bits) built on the bare table:
   "to an indexed collection" compares ingest + optimize with bare add + that build.
6. **FAISS reference** for the k-NN graph (when ``import faiss`` works): the pool's vectors
   read back from the table in chunks into a memory-mapped file, ``IVF<nlist>,Flat``
   trained on 100k rows, nprobe the smallest of the graph engine's ladder that reaches its
   recall target (0.95) on the ``--recall-sample`` check rows (chosen untimed), then the
   timed k=20 graph of every pool row (self excluded) and its recall@20 on those rows. nlist is 4096 from about 1M
   rows up (the issue's IVF4096), a power of two near 4·√N below.
7. **Every miner** the server lists (``client.miners()``; ``--miners`` for a subset), with
   its defaults: size ``--size``, ``where`` = the unlabeled rows, ``reference_where`` = the
   labeled rows where the miner reads a reference set, ``knn`` seeded with 5 labeled ids,
   ``chain`` = margin top 10·size → coreset to size, ``select`` = margin + diversity 0.5,
   ``aum``, ``label_issues`` and ``labeled_outliers`` on the labeled rows (they flag
   mislabeled ones), ``duplicate_leaks`` on every row. ``job`` progress is polled; a run that exceeds
   ``--miner-timeout`` is cancelled (the time the cancel took is reported); a failing miner
   is reported (state, error) and the script goes on. Miners whose inputs the generated
   pool lacks (``samples`` without ``--with samples``, detection ``boxes``) are listed as
   skipped. Per miner: wall time, peak server RSS, rows scanned and rows/s, and the graph
   the run record names (method, k, recall@k on a sample: ``run["graph"]`` once the graph
   engine records it; "-" until then). Graph miners are compared with the FAISS graph
   (ratio = FAISS build + graph seconds / the miner's wall seconds: ≥ 1 is the goal).

The table is printed at the end (``--json`` writes it as data, with the progress trace
of every run). ``--quick`` is the issue's quick size, 1M rows; the default is 10M.
``python -m bench.run_all --benches scale --skip soak,soak_writes,al --script-args "..."`` runs it
under ``make bench`` (see the README); it is not in the default list (too long).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# Run as a script, this file's folder (bench/) comes first on sys.path, where service.py
# would shadow the ``service`` package: put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

from bench.common import Report, ServerProcess, machine  # noqa: E402
from miners import knn  # noqa: E402
from service.client import (  # noqa: E402
    AssayClientError,
    Client,
    DeadlineExceededError,
)

ROOT = Path(_HERE).parent
SPACE = "v"
MODEL = "m"
GEN_BLOCK = 10_000            # rows per generation block (one RNG stream each)
SAMPLES_K = 8                 # MC-dropout passes in pred_m.samples (--with samples)
EPOCHS = 5                    # epochs in pred_m.epoch_logits (--with epoch_logits)
EXTRAS = ("samples", "logits", "loss", "epoch_logits")
POOL_WHERE = "label IS NULL"
LABELED_WHERE = "label IS NOT NULL"
GRAPH_K = 20
FAISS_TRAIN_ROWS = 100_000
GIB = 2**30
# Inputs (as ListMiners names them) and what they need from the generated pool.
MODEL_INPUTS = {"probs": "probs", "samples": "samples", "loss": "loss", "aum": "epoch_logits"}
REFERENCE_INPUTS = {"query_graph", "reference_graph", "reference_vectors"}
GRAPH_INPUTS = {"pool_graph"}


def shared_graph_steps(steps: list[Step], pool_rows: int | None) -> list[Step]:
    """The graph miners that ran on the pool's own graph (``pool_rows`` rows, the FAISS
    reference's; None: the most common row count among them): one graph serves them all.
    Graph miners over other rows (duplicate_leaks: every row; labeled_outliers: the
    labeled rows) build graphs of their own and are compared one by one."""
    done = [s for s in steps if s.data.get("graph_miner") and s.state == "SUCCEEDED" and s.rows]
    if pool_rows is None and done:
        counts = Counter(s.rows for s in done)
        pool_rows = max(counts, key=lambda r: (counts[r], r))
    return [s for s in done if s.rows == pool_rows]


# -- the data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenConfig:
    """What the rows are generated from; stored beside the data so a resumed ingest sends
    the same rows."""

    n: int
    dim: int
    classes: int
    labeled: float
    clusters: int
    spread: float
    seed: int
    extras: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "extras": list(self.extras)}


def class_names(c: int) -> list[str]:
    return [f"c{i}" for i in range(c)]


class Generator:
    """Rows ``[start, stop)`` of the synthetic pool. Block ``b`` (rows ``b·GEN_BLOCK ..``)
    draws from its own RNG stream seeded by (seed, b), so any range regenerates alone."""

    def __init__(self, cfg: GenConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        self.centres = rng.standard_normal((cfg.clusters, cfg.dim)).astype(np.float32)
        # uneven cluster popularity, as in real pools
        self.weights = rng.dirichlet(np.full(cfg.clusters, 1.0))
        self.names = np.asarray(class_names(cfg.classes), dtype=object)

    def _block(self, b: int) -> dict[str, np.ndarray]:
        cfg = self.cfg
        start = b * GEN_BLOCK
        m = min(GEN_BLOCK, cfg.n - start)
        rng = np.random.default_rng([cfg.seed, 1, b])
        cluster = rng.choice(cfg.clusters, size=m, p=self.weights)
        x = self.centres[cluster] + np.float32(cfg.spread) * rng.standard_normal((m, cfg.dim), dtype=np.float32)
        # 0.1 % planted near-duplicates: a copy of an earlier row of the block plus a little noise
        dup = np.flatnonzero(rng.random(m) < 0.001)
        dup = dup[dup > 0]
        if len(dup):
            src = (rng.random(len(dup)) * dup).astype(np.int64)
            x[dup] = x[src] + np.float32(0.001) * rng.standard_normal((len(dup), cfg.dim), dtype=np.float32)
            cluster[dup] = cluster[src]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        # the model is right about the cluster's class more often when it is confident
        true = cluster % cfg.classes
        strength = rng.uniform(0.0, 5.0, m).astype(np.float32)
        logits = rng.standard_normal((m, cfg.classes), dtype=np.float32)
        logits[np.arange(m), true] += strength
        labeled = rng.random(m) < cfg.labeled
        out = {"x": x, "logits": logits, "true": true, "labeled": labeled, "start": np.asarray(start)}
        if "samples" in cfg.extras:
            out["samples"] = logits[:, None, :] + rng.standard_normal((m, SAMPLES_K, cfg.classes), dtype=np.float32)
        if "epoch_logits" in cfg.extras:
            ramp = (np.arange(1, EPOCHS + 1, dtype=np.float32) / EPOCHS)[None, :, None]
            out["epoch_logits"] = logits[:, None, :] * ramp + 0.5 * rng.standard_normal(
                (m, EPOCHS, cfg.classes), dtype=np.float32)
        return out

    def table(self, start: int, stop: int) -> pa.Table:
        """Rows ``[start, stop)`` as the Arrow table the client upserts (and the bare add
        writes): id, emb_v, pred_m, label, split."""
        blocks = [self._block(b) for b in range(start // GEN_BLOCK, (stop - 1) // GEN_BLOCK + 1)]
        first = int(blocks[0]["start"])
        cut = slice(start - first, stop - first)

        def cat(key: str) -> np.ndarray:
            return np.concatenate([blk[key] for blk in blocks])[cut]

        x, logits, labeled, true = cat("x"), cat("logits"), cat("labeled"), cat("true")
        n = len(x)
        probs = softmax(logits)
        children: dict[str, pa.Array] = {"probs": _lists(probs)}
        if "logits" in self.cfg.extras:
            children["logits"] = _lists(logits)
        if "samples" in self.cfg.extras:
            children["samples"] = _nested_lists(softmax(cat("samples")))
        if "loss" in self.cfg.extras:
            children["loss"] = pa.array(-np.log(np.maximum(probs[np.arange(n), true], 1e-6)).astype(np.float32))
        if "epoch_logits" in self.cfg.extras:
            children["epoch_logits"] = _nested_lists(cat("epoch_logits"))
        labels = np.where(labeled, self.names[true], None)
        return pa.table({
            "id": pa.array([f"r{i:010d}" for i in range(start, stop)], pa.string()),
            f"emb_{SPACE}": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
            f"pred_{MODEL}": pa.StructArray.from_arrays(list(children.values()), names=list(children)),
            "label": pa.array(labels, pa.string()),
            "split": pa.array(np.where(labeled, "train", "pool"), pa.string()),
        })


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _lists(m: np.ndarray) -> pa.Array:
    """(n, c) -> list<float32> with n entries (the schema's variable-length lists)."""
    n, c = m.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * c, c, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(m, np.float32).reshape(-1)))


def _nested_lists(m: np.ndarray) -> pa.Array:
    """(n, k, c) -> list<list<float32>>."""
    n, k, c = m.shape
    inner = _lists(m.reshape(n * k, c))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)), inner)


# -- the server process and its memory ---------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, VmHWM of ``pid`` in bytes ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(p) for p in fh.read().split()]
    except (OSError, ValueError):
        return []
    return kids + [g for k in kids for g in _children(k)]


class MemorySampler:
    """Peak memory of a process tree per step: RSS and anonymous RSS summed over the process
    and its children, sampled every ``interval`` s, and the process's own VmHWM after a reset
    (``clear_refs`` 5) at the step's start, which no sampling gap can miss."""

    def __init__(self, pid: int, interval: float = 0.1, *, children: bool = True) -> None:
        self.pid, self.interval, self.children = pid, interval, children
        self.peak_rss = self.peak_anon = self.start_rss = 0
        self.hwm_reset = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> tuple[int, int]:
        rss = anon = 0
        for p in [self.pid, *(_children(self.pid) if self.children else [])]:
            s = _status(p)
            rss += s.get("VmRSS", 0)
            anon += s.get("RssAnon", 0)
        return rss, anon

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss, anon = self.sample()
            with self._lock:
                self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    def begin(self) -> None:
        """Start a step: the peaks restart from now."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        rss, anon = self.sample()
        self.start_rss = rss
        with self._lock:
            self.peak_rss, self.peak_anon = rss, anon

    def end(self) -> tuple[int, int]:
        """(peak RSS, peak anonymous RSS) in bytes since :meth:`begin`."""
        rss, anon = self.sample()
        hwm = _status(self.pid).get("VmHWM", 0) if self.hwm_reset else 0
        with self._lock:
            return max(self.peak_rss, rss, hwm), max(self.peak_anon, anon)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the report --------------------------------------------------------------------------------


@dataclass
class Step:
    """One line of the table."""

    step: str
    state: str = "ok"
    wall_s: float | None = None
    rss_peak: int | None = None          # bytes
    rss_start: int | None = None         # bytes, when the step began (what earlier steps left)
    anon_peak: int | None = None         # bytes
    rows: int | None = None
    rows_per_s: float | None = None
    graph: str = "-"                     # method (k) from the run record
    recall: float | None = None
    reference: str = "-"
    ratio: float | None = None
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def _gib(b: int | None) -> str:
    return "-" if not b else f"{b / GIB:.2f}"


def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def render_steps(steps: list[Step]) -> str:
    lines = ["| step | state | wall s | peak server RSS GiB (anon) | RSS at start | rows | rows/s | graph "
             "| recall@k | reference | ratio | note |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---|"]
    for s in steps:
        rss = "-" if not s.rss_peak else f"{_gib(s.rss_peak)} ({_gib(s.anon_peak)})"
        rows = "-" if s.rows is None else f"{s.rows:,}"
        rate = "-" if s.rows_per_s is None else f"{s.rows_per_s:,.0f}"
        recall = "-" if s.recall is None else f"{s.recall:.3f}"
        ratio = "-" if s.ratio is None else f"{s.ratio:.2f}×"
        note = s.note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {s.step} | {s.state} | {_num(s.wall_s)} | {rss} | {_gib(s.rss_start)} | {rows} | {rate} "
                     f"| {s.graph} | {recall} "
                     f"| {s.reference} | {ratio} | {note} |")
    return "\n".join(lines)


# -- ingest and its references -----------------------------------------------------------------


def batches(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


INGEST_CALL_ROWS = 500_000  # rows streamed per upsert call (generated beforehand, not timed)


def ingest(col: Any, gen: Generator, start: int, stop: int, batch: int, mem: MemorySampler) -> Step:
    """Upsert rows [start, stop) through the client: each call streams the batches of
    ``INGEST_CALL_ROWS`` rows (generated before the call: only the calls are timed), as a
    bulk ingest would; the server validates batch k+1 while batch k commits."""
    mem.begin()
    spent, done, t_print = 0.0, 0, time.perf_counter()
    for call_start in range(start, stop, INGEST_CALL_ROWS):
        call_stop = min(stop, call_start + INGEST_CALL_ROWS)
        tables = [gen.table(a, b) for a, b in batches(call_start, call_stop, batch)]
        t0 = time.perf_counter()
        col.upsert(iter(tables), batch_rows=batch)
        spent += time.perf_counter() - t0
        done += call_stop - call_start
        del tables
        if time.perf_counter() - t_print > 30 or call_stop == stop:
            t_print = time.perf_counter()
            rss, _ = mem.sample()
            print(f"  ingest: {call_stop:,}/{gen.cfg.n:,} rows, {done / spent:,.0f} rows/s, server RSS {rss / GIB:.2f} GiB",
                  flush=True)
    rss, anon = mem.end()
    return Step(f"ingest through the client ({batch:,}-row batches, streamed)", wall_s=spent, rss_peak=rss,
                anon_peak=anon, rss_start=mem.start_rss,
                rows=done, rows_per_s=done / spent if spent else None,
                note=f"rows {start:,}..{stop - 1:,}; upsert calls only (generation excluded)")


def bare_add(path: Path, gen: Generator, rows: int, batch: int) -> tuple[float, int, float]:
    """Seconds of a bare LanceDB ``add`` of the same batches (rows 0..rows-1) into a new
    table, then seconds of building the index the space policy would (IVF_RQ, √rows
    partitions) on it; (add seconds, rows, index seconds)."""
    import lancedb
    from lancedb.index import IvfRq

    from indexing.schema import IndexPolicy

    shutil.rmtree(path, ignore_errors=True)
    db = lancedb.connect(str(path))
    spent, table = 0.0, None
    for a, b in batches(0, rows, batch):
        data = gen.table(a, b)
        t0 = time.perf_counter()
        if table is None:
            table = db.create_table("bare", schema=data.schema)
        table.add(data)
        spent += time.perf_counter() - t0
    policy = IndexPolicy()
    t0 = time.perf_counter()
    table.create_index(f"emb_{SPACE}", config=IvfRq(distance_type="cosine", num_bits=policy.num_bits,
                                                     num_partitions=max(1, min(4096, int(math.sqrt(rows))))))
    return spent, rows, time.perf_counter() - t0


def wait_job(job: Any, timeout: float | None) -> tuple[str, str, float]:
    """Wait for a (non-mining) job; (state, error, seconds)."""
    t0 = time.perf_counter()
    try:
        job.wait(timeout=timeout)
    except DeadlineExceededError:
        return "TIMEOUT", f"still running after {timeout:.0f}s", time.perf_counter() - t0
    except AssayClientError as exc:
        return job.state or "FAILED", str(exc), time.perf_counter() - t0
    return job.state, "", time.perf_counter() - t0


def vector_index(desc: dict[str, Any]) -> str:
    for idx in desc.get("indices") or []:
        if f"emb_{SPACE}" in (idx.get("columns") or []):
            return str(idx.get("type") or idx.get("name"))
    return "none (flat)"


# -- the FAISS reference -----------------------------------------------------------------------


def faiss_nlist(n: int) -> int:
    """IVF lists: 4096 from about 1M rows up (the issue's reference), a power of two near
    4·sqrt(n) below (and at most n / 4, so small pools still train)."""
    target = 2 ** round(math.log2(max(4.0, 4 * math.sqrt(n))))
    return int(max(1, min(4096, target, n // 4)))


def read_pool(data: Path, collection: str, where: str, out: Path) -> np.memmap:
    """The vectors of the rows matching ``where``, read from the table in chunks into a
    memory-mapped float32 file (never all of them in RAM)."""
    import lancedb

    table = lancedb.connect(str(data)).open_table(collection)
    ds = table.to_lance()
    n = ds.count_rows(filter=where)
    dim = ds.schema.field(f"emb_{SPACE}").type.list_size
    mm = np.memmap(out, dtype=np.float32, mode="w+", shape=(max(n, 1), dim))
    pos = 0
    for batch in ds.scanner(columns=[f"emb_{SPACE}"], filter=where, batch_size=65_536).to_batches():
        col = batch.column(0)
        if col.null_count:
            col = col.drop_null()
        m = np.asarray(col.values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
        mm[pos:pos + len(m)] = m
        pos += len(m)
    mm.flush()
    return mm[:pos]


def exact_neighbours(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 32_768) -> np.ndarray:
    """Exact k nearest neighbours (inner product of unit vectors = cosine) of rows
    ``queries`` of ``x`` among all rows but themselves, streaming ``x`` in chunks."""
    q = np.asarray(x[queries], np.float32)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for a in range(0, len(x), chunk):
        block = np.asarray(x[a:a + chunk], np.float32)
        s = q @ block.T
        own = (queries >= a) & (queries < a + len(block))
        s[np.flatnonzero(own), queries[own] - a] = -np.inf
        m = min(k, s.shape[1])
        part = np.argpartition(-s, m - 1, axis=1)[:, :m]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + a], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, axis=1), np.take_along_axis(cand_i, top, axis=1)
    return best_i


def faiss_reference(data: Path, collection: str, k: int, nlist: int | None, sample: int, seed: int,
                    work: Path, factory: str = "IVF{nlist},Flat") -> dict[str, Any]:
    """The k-NN graph of the pool with FAISS IVF-Flat (the issue's reference), timed, and
    its recall@k against exact search on ``sample`` rows. Raises ImportError without faiss."""
    import faiss

    path = work / "faiss-pool.f32"
    t0 = time.perf_counter()
    x = read_pool(data, collection, POOL_WHERE, path)
    read_s = time.perf_counter() - t0
    try:
        n, d = x.shape
        nlist = nlist or faiss_nlist(n)
        rng = np.random.default_rng(seed)
        train_rows = np.sort(rng.choice(n, size=min(n, FAISS_TRAIN_ROWS), replace=False))
        sample_rows = np.sort(rng.choice(n, size=min(n, sample), replace=False))
        spec = factory.format(nlist=nlist)
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.train(np.ascontiguousarray(x[train_rows]))
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for a in range(0, n, 65_536):
            index.add(np.ascontiguousarray(x[a:a + 65_536]))
        add_s = time.perf_counter() - t0
        kk = min(k, n - 1)
        # nprobe: the smallest of the engine's ladder reaching the engine's recall target on
        # the check rows (an oracle's choice, untimed: every doubt given to FAISS); a fixed
        # nprobe 16 reached only ~0.94 on this data at 1M
        t0 = time.perf_counter()
        exact = exact_neighbours(x, sample_rows, kk)
        exact_s = time.perf_counter() - t0
        ivf = faiss.extract_index_ivf(index)
        t0 = time.perf_counter()
        for nprobe in knn._ladder(nlist, hi=nlist):  # noqa: B007
            ivf.nprobe = nprobe
            _, ids = index.search(np.ascontiguousarray(x[sample_rows]), kk + 1)
            order = np.argsort(ids == sample_rows[:, None], axis=1, kind="stable")[:, :kk]
            tried = np.take_along_axis(ids, order, axis=1)
            if np.mean([len(set(g) & set(e)) / kk for g, e in zip(tried, exact, strict=True)]) \
                    >= knn.TARGET_RECALL:
                break
        tune_s, nprobe = time.perf_counter() - t0, int(ivf.nprobe)
        got = np.full((len(sample_rows), kk), -1, np.int64)
        t0 = t_print = time.perf_counter()
        chunk = 16_384
        for a in range(0, n, chunk):
            q = np.ascontiguousarray(x[a:a + chunk])
            _, ids = index.search(q, kk + 1)
            rows = np.arange(a, a + len(q))
            # drop the row itself (or the last neighbour when the row did not find itself)
            order = np.argsort(ids == rows[:, None], axis=1, kind="stable")[:, :kk]
            graph = np.take_along_axis(ids, order, axis=1)
            lo, hi = np.searchsorted(sample_rows, [a, a + len(q)])
            got[lo:hi] = graph[sample_rows[lo:hi] - a]
            if time.perf_counter() - t_print > 30:
                t_print = time.perf_counter()
                print(f"  FAISS graph: {a + len(q):,}/{n:,} rows, {time.perf_counter() - t0:.0f}s", flush=True)
        graph_s = time.perf_counter() - t0
        threads = faiss.omp_get_max_threads()
        del index
        gc.collect()
        recall = float(np.mean([len(set(g) & set(e)) / kk for g, e in zip(got, exact, strict=True)]))
        return {"method": f"{spec} nprobe {nprobe}", "nprobe_tuning_s": tune_s, "rows": n, "dim": d, "k": kk,
                "nlist": nlist, "train_rows": len(train_rows), "read_s": read_s, "train_s": train_s,
                "add_s": add_s, "graph_s": graph_s, "total_s": train_s + add_s + graph_s,
                "recall": recall, "recall_sample": len(sample_rows), "exact_sample_s": exact_s,
                "threads": threads, "faiss": faiss.__version__}
    finally:
        del x
        gc.collect()
        path.unlink(missing_ok=True)


# -- the miners --------------------------------------------------------------------------------


@dataclass
class MinerPlan:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    skip: str = ""
    note: str = ""
    graph: bool = False  # reads a k-NN graph (pool or pool-vs-reference)


def plan_miner(info: dict[str, Any], cfg: GenConfig, size: int, seed_ids: list[str]) -> MinerPlan:
    """How a miner the server lists is run on the generated pool, from its declared inputs
    (so a miner added later runs without a change here): the model and space always, the
    reference filter where it reads a reference set."""
    name, inputs = info["name"], set(info.get("inputs") or [])
    have = {"probs", *cfg.extras}
    kw: dict[str, Any] = {"model": MODEL, "space": SPACE, "where": POOL_WHERE}
    plan = MinerPlan(name, kw, graph=bool(inputs & {"pool_graph", "query_graph", "reference_graph"}))
    for inp, child in MODEL_INPUTS.items():
        if inp in inputs and child not in have:
            plan.skip = f"the pool has no pred_{MODEL}.{child} (add --with {child})"
            return plan
    if "boxes" in inputs:
        plan.skip = "needs a detection model's boxes (the generated pool is classification)"
        return plan
    if inputs & REFERENCE_INPUTS or info.get("reference") in ("required", "optional"):
        kw["reference_where"] = LABELED_WHERE
    if "aum" in inputs:
        kw["where"] = LABELED_WHERE  # AUM flags likely mislabeled rows: it reads labeled ones
        plan.note = "on the labeled rows"
    if ("activation" in inputs or name == "activation") and "logits" not in have:
        # activation reads logits (source=energy, the default) or vectors (feature_norm)
        kw["params"] = {"source": "feature_norm"}
        plan.note = "source=feature_norm (no logits; --with logits for energy)"
    if name == "knn" or "seeds" in inputs:
        kw["params"] = {"seed_ids": seed_ids}
        plan.note = f"{len(seed_ids)} labeled seed ids"
    if name == "select":  # its defaults are a seeded random sample: give it the mix
        kw["params"] = {"objectives": [{"miner": "margin", "weight": 1.0}], "diversity": 0.5}
        kw.pop("reference_where", None)
        plan.note = "margin (weight 1) + diversity 0.5 among the picks"
    elif name == "chain" or "stages" in inputs:
        kw["params"] = {"stages": [{"miner": "margin", "size": 10 * size}, {"miner": "coreset"}]}
        plan.note = f"margin top {10 * size:,} -> coreset {size:,}"
    if "labels" in inputs:  # label issues, labeled outliers: about the labeled rows
        kw["where"] = LABELED_WHERE
        plan.note = "on the labeled rows"
    if "split_label" in inputs:  # near-duplicate pairs across splits: every row
        kw.pop("where", None)
        plan.note = "every row; pairs across split 'train' / 'pool' or with different labels"
    return plan


def _first(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if d.get(key) not in (None, "", [], {}):
            return d[key]
    return None


def graph_info(run: dict[str, Any]) -> dict[str, Any]:
    """The k-NN graph a run record describes (method, k, recall, sample size), read
    defensively: the graph engine adds ``graph`` to run records (a dict, a JSON string, or a
    list of graphs; a ball graph in ``stats``); older servers have none."""
    g = run.get("graph") or None  # an empty dict: no graph of the run's inputs
    if g is None:
        g = (run.get("timings") or {}).get("graph") or None
    if g is None:  # miners that build a graph of their own (probcover's ball graph, coreset's seeding) keep it in stats
        g = (run.get("stats") or {}).get("graph")
    if isinstance(g, str):
        try:
            g = json.loads(g)
        except ValueError:
            return {"method": g}
    if isinstance(g, dict) and "method" not in g and g and all(isinstance(v, dict) for v in g.values()):
        g = list(g.values())  # keyed by role, as run records hold them: {"pool": {...}, "query": {...}}
    graphs = g if isinstance(g, list) else [g] if isinstance(g, dict) else []
    graphs = [x for x in graphs if isinstance(x, dict)]
    if not graphs:
        return {}
    methods = [str(_first(x, "method", "kind", "engine") or "?") for x in graphs]
    ks = [x.get("k") for x in graphs if x.get("k") is not None]
    recalls = [float(r) for x in graphs
               if (r := _first(x, "recall", "recall_at_k", "recall@k")) is not None]
    samples = [int(s) for x in graphs
               if (s := _first(x, "sample", "sample_size", "recall_sample", "samples")) is not None]
    return {"method": " + ".join(dict.fromkeys(methods)), "k": max(ks) if ks else None,
            "recall": min(recalls) if recalls else None, "sample": min(samples) if samples else None,
            "raw": graphs}


def run_miner(col: Any, plan: MinerPlan, size: int, timeout: float | None, mem: MemorySampler) -> Step:
    """Start the run, wait (polling its progress), and describe it; a failure is a row of the
    table, never an exception."""
    step = Step(plan.name, note=plan.note)
    if plan.skip:
        step.state, step.note = "skipped", plan.skip
        return step
    mem.begin()
    t0 = time.perf_counter()
    trace: list[tuple[float, float, str]] = []
    try:
        job = col.mine(plan.name, size, seed=0, **plan.kwargs)
    except AssayClientError as exc:
        step.state, step.note = "refused", str(exc)
        step.rss_peak, step.anon_peak = mem.end()
        step.rss_start = mem.start_rss
        return step
    last, last_change, stall, t_print = None, t0, 0.0, t0
    timed_out = False
    while True:
        try:
            job.wait(timeout=2.0)
            break
        except DeadlineExceededError:
            pass
        except AssayClientError:
            break  # the run ended badly: its record says how
        now = time.perf_counter()
        key = (round(job.progress, 4), job.message)
        if key != last:
            stall, last_change, last = max(stall, now - last_change), now, key
            trace.append((round(now - t0, 1), key[0], key[1]))
        if now - t_print > 30:
            t_print = now
            print(f"  {plan.name}: {now - t0:.0f}s, progress {job.progress:.2f} {job.message}", flush=True)
        if timeout and now - t0 > timeout:
            timed_out = True
            break
    wall = time.perf_counter() - t0
    cancel_s = None
    at_progress, at_message = job.progress, job.message  # where it stood (a cancel rewrites them)
    if timed_out:
        t1 = time.perf_counter()
        with contextlib.suppress(AssayClientError):
            job.cancel()
        with contextlib.suppress(AssayClientError):
            job.wait(timeout=120)
        cancel_s = time.perf_counter() - t1
    step.rss_peak, step.anon_peak = mem.end()
    step.rss_start = mem.start_rss
    stall = max(stall, time.perf_counter() - last_change)
    try:
        run = job.run()
    except AssayClientError as exc:
        run = {"state": job.state, "error": str(exc)}
    step.state = run.get("state") or job.state
    step.wall_s = wall
    step.rows = int(run.get("rows_scanned") or 0) or None
    step.rows_per_s = step.rows / wall if step.rows and wall else None
    g = graph_info(run)
    if g:
        step.graph = g["method"] + (f" (k={g['k']})" if g.get("k") else "")
        step.recall = g.get("recall")
    timings = run.get("timings") or {}
    notes = [plan.note] if plan.note else []
    if timed_out:
        step.state = f"TIMEOUT→{step.state}"
        notes.append(f"cancelled after {timeout:.0f}s at progress {at_progress:.2f} ({at_message}); "
                     f"the cancel took {cancel_s:.1f}s")
    elif step.state != "SUCCEEDED":
        notes.append(f"error: {run.get('error') or job.error}")
    else:
        notes.append(f"{run.get('results', 0):,} results")
    if plan.graph and "graph_s" in timings:
        notes.append(f"graph {timings['graph_s']:.1f}s")
    if g.get("sample"):
        notes.append(f"recall on {g['sample']:,} rows")
    notes.append(f"longest progress stall {stall:.0f}s")
    step.note = "; ".join(notes)
    step.data = {"run": {k: v for k, v in run.items() if k not in ("params",)}, "params": plan.kwargs,
                 "graph": g, "progress_trace": trace, "longest_stall_s": stall, "cancel_s": cancel_s}
    return step


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/scale.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="rows (default 10,000,000; --quick: 1,000,000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--labeled", type=float, default=0.01, help="fraction of rows with a label")
    p.add_argument("--clusters", type=int, default=1000, help="cluster centres of the vectors")
    p.add_argument("--spread", type=float, default=0.3, help="within-cluster noise (per dimension)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with", dest="extras", default="",
                   help=f"extra prediction children to generate: {','.join(EXTRAS)} (or 'all')")
    p.add_argument("--data", type=Path, default=None,
                   help="data root to keep (and reuse) the collection in; default a temporary folder")
    p.add_argument("--collection", default=None, help="default scale_<n>x<dim>")
    p.add_argument("--batch", type=int, default=50_000, help="rows per upsert call")
    p.add_argument("--skip-ingest", action="store_true", help="use the collection as it is")
    p.add_argument("--ingest-only", action="store_true", help="stop after ingest and index build")
    p.add_argument("--max-ingest-rows", type=int, default=None, help="ingest at most this many rows now")
    p.add_argument("--bare-rows", type=int, default=1_000_000,
                   help="rows of the bare LanceDB add reference (0: skip it)")
    p.add_argument("--miners", default=None, help="comma-separated subset (default: every miner listed)")
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--miner-timeout", type=float, default=3600.0,
                   help="cancel a run after this many seconds (0: never)")
    p.add_argument("--no-faiss", action="store_true", help="skip the FAISS reference")
    p.add_argument("--faiss-nlist", type=int, default=None, help="IVF lists (default: see faiss_nlist)")
    p.add_argument("--faiss-factory", default="IVF{nlist},Flat",
                   help="FAISS index_factory string of the reference ({nlist} is filled in); IVF-Flat holds "
                        "every pool vector in RAM (15 GB at 10M × 384): 'IVF{nlist},SQ8' is 4× smaller")
    p.add_argument("--recall-sample", type=int, default=1000, help="rows the FAISS graph's recall is measured on")
    p.add_argument("--optimize-timeout", type=float, default=7200.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="the issue's quick size: 1,000,000 rows")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 1_000_000 if args.quick else 10_000_000
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    if extras == ["all"]:
        extras = list(EXTRAS)
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        p.error(f"--with: unknown {', '.join(unknown)} (choose from {', '.join(EXTRAS)})")
    args.extras = tuple(e for e in EXTRAS if e in extras)
    if args.n < 100 or args.dim < 2 or args.classes < 2 or not 0 < args.labeled < 1:
        p.error("need --n >= 100, --dim >= 2, --classes >= 2 and 0 < --labeled < 1")
    args.collection = args.collection or f"scale_{args.n}x{args.dim}"
    return args


def load_or_save_config(path: Path, cfg: GenConfig, skip_ingest: bool) -> GenConfig:
    """The generation settings of an existing collection must be the ones asked for (a
    resumed ingest sends the rows that follow); a new collection records them."""
    if path.exists():
        saved = json.loads(path.read_text())
        saved["extras"] = tuple(saved.get("extras") or ())
        old = GenConfig(**saved)
        if old != cfg and not skip_ingest:
            raise SystemExit(f"{path} records other generation settings ({old}); ask for the same ones, use "
                             "--skip-ingest to run the miners on the collection as it is, or another --collection")
        return old
    path.write_text(json.dumps(cfg.to_json(), indent=1))
    return cfg


def goals(steps: list[Step]) -> list[dict[str, Any]]:
    """The issue's goals, checked on this run's figures (they are stated for 1M and 10M)."""
    out = []
    ing = next((s for s in steps if s.step.startswith("ingest through")), None)
    if ing is not None and ing.ratio is not None:
        out.append({"goal": "ingest through gRPC >= 0.5x bare add", "value": round(ing.ratio, 3),
                    "met": ing.ratio >= 0.5})
    miners = [s for s in steps if s.data.get("run") is not None]
    if miners:
        slow = [s.step for s in miners if s.state != "SUCCEEDED" or (s.wall_s or 0) > 300]
        out.append({"goal": "every miner completes in <= 5 min (at 1M)", "value": ", ".join(slow) or "all",
                    "met": not slow})
    for s in steps:
        if s.data.get("graph_total") and s.ratio is not None:
            out.append({"goal": "graph miners on the pool's graph together no slower than one FAISS IVF-Flat graph",
                        "value": round(s.ratio, 2), "met": s.ratio >= 1.0})
    for s in miners:
        if s.data.get("graph_miner"):
            if s.recall is not None:
                out.append({"goal": f"{s.step}: graph recall@k >= 0.95", "value": round(s.recall, 3),
                            "met": s.recall >= 0.95})
            if s.ratio is not None:
                out.append({"goal": f"{s.step}: no slower than FAISS IVF-Flat (ratio >= 1)",
                            "value": round(s.ratio, 2), "met": s.ratio >= 1.0})
    peaks = [s.rss_peak for s in steps if s.rss_peak and not s.step.startswith("FAISS")]
    if peaks:
        out.append({"goal": "peak server RSS <= 20 GiB (at 10M)", "value": round(max(peaks) / GIB, 2),
                    "met": max(peaks) <= 20 * GIB})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A stopped benchmark (SIGTERM: kill, timeout) exits through its finally blocks, which
    # stop the server: left running, it would hold the data root's one-server lock.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t_start = time.perf_counter()
    cfg = GenConfig(n=args.n, dim=args.dim, classes=args.classes, labeled=args.labeled, clusters=args.clusters,
                    spread=args.spread, seed=args.seed, extras=args.extras)
    tmp = None
    if args.data is None:
        tmp = tempfile.mkdtemp(prefix="assay-bench-scale-")
        root = Path(tmp)
    else:
        root = args.data.resolve()
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    cfg = load_or_save_config(root / f"{args.collection}.scale.json", cfg, args.skip_ingest)
    gen = Generator(cfg)
    print(f"scale benchmark: {cfg.n:,} x {cfg.dim}, {cfg.classes} classes, {cfg.labeled:.1%} labeled, "
          f"{cfg.clusters} clusters, collection {args.collection} under {data}", flush=True)
    steps: list[Step] = []
    report = Report(machine=machine(**_versions()), params={k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(args).items()})
    server = ServerProcess(str(data), str(root / "logs"), grace_s=5)
    mem: MemorySampler | None = None
    faiss_ref: dict[str, Any] | None = None
    try:
        t0 = time.perf_counter()
        address = server.start()
        mem = MemorySampler(server.pid)
        rss, anon = mem.sample()
        steps.append(Step("server start", wall_s=time.perf_counter() - t0, rss_peak=rss, anon_peak=anon,
                          note=f"pid {server.pid}, log {server.log_path()}"))
        print(f"  server up at {address} in {steps[-1].wall_s:.1f}s", flush=True)
        with Client(address, timeout=120) as client:
            col = client.create_collection(
                args.collection, spaces={SPACE: {"dim": cfg.dim, "metric": "cosine"}},
                models={MODEL: class_names(cfg.classes)}, fields={"split": "string"}, if_not_exists=True)
            have = col.count()
            if args.skip_ingest and have == 0:
                raise SystemExit(f"--skip-ingest: collection {args.collection} under {data} is empty; ingest it "
                                 "first (leave out --skip-ingest)")
            ingested = 0
            if not args.skip_ingest and have < cfg.n:
                stop = cfg.n if args.max_ingest_rows is None else min(cfg.n, have + args.max_ingest_rows)
                if have:
                    print(f"  resuming ingest at row {have:,}", flush=True)
                step = ingest(col, gen, have, stop, args.batch, mem)
                steps.append(step)
                ingested = stop - have
                ingest_step = step
                # the index build: wait for the automatic optimize, compact, build the index
                mem.begin()
                state, error, opt_s = wait_job(col.optimize(), args.optimize_timeout)
                rss, anon = mem.end()
                desc = col.describe()
                steps.append(Step("optimize + index build (after ingest)", state=state, wall_s=opt_s, rss_peak=rss,
                                  anon_peak=anon, rss_start=mem.start_rss, note=(error + "; " if error else "") +
                                  f"vector index: {vector_index(desc)}"))
                total = ingest_step.wall_s + opt_s
                incl = Step("ingest + optimize: to an indexed collection", wall_s=total, rows=ingested,
                            rows_per_s=ingested / total if total else None,
                            note="the ingest's rows over upsert + optimize seconds")
                steps.append(incl)
                bare_rows = min(args.bare_rows, cfg.n)
                if bare_rows > 0:
                    print(f"  bare LanceDB add of {bare_rows:,} rows and its index (reference)", flush=True)
                    bare_s, _, bare_index_s = bare_add(root / "bare-reference", gen, bare_rows, args.batch)
                    shutil.rmtree(root / "bare-reference", ignore_errors=True)
                    bare_rate = bare_rows / bare_s
                    bare_indexed = bare_rows / (bare_s + bare_index_s)
                    ingest_step.reference = f"bare LanceDB add {bare_rate:,.0f} rows/s ({bare_rows:,} rows)"
                    ingest_step.ratio = ingest_step.rows_per_s / bare_rate if ingest_step.rows_per_s else None
                    incl.reference = (f"bare add + IVF_RQ build {bare_indexed:,.0f} rows/s "
                                      f"(build {bare_index_s:.0f} s)")
                    incl.ratio = incl.rows_per_s / bare_indexed if incl.rows_per_s else None
                    report.add("ingest through the client, rows/s", ingest_step.rows_per_s, bare_rate,
                               kind="speed", unit="rows/s", note="reference: bare LanceDB add, same batches")
                    report.add("to an indexed collection (ingest + optimize), rows/s", incl.rows_per_s,
                               bare_indexed, kind="speed", unit="rows/s",
                               note="reference: bare add + the same IVF_RQ build")
            else:
                why = "--skip-ingest" if args.skip_ingest else "the collection is complete"
                steps.append(Step("ingest", state="skipped", rows=have, note=f"{why}: {have:,} rows there"))
            rows_now = col.count()
            pool_rows = col.count(POOL_WHERE)
            labeled_rows = rows_now - pool_rows
            desc = col.describe()
            print(f"  collection: {rows_now:,} rows ({pool_rows:,} unlabeled, {labeled_rows:,} labeled), "
                  f"vector index {vector_index(desc)}", flush=True)
            report.details.update(rows=rows_now, pool_rows=pool_rows, labeled_rows=labeled_rows,
                                  ingested_now=ingested, vector_index=vector_index(desc))
            if args.ingest_only:
                print("  --ingest-only: stopping after the ingest", flush=True)
            else:
                if not args.no_faiss:
                    faiss_ref = run_faiss(args, root, data, steps)
                seed_ids = col.query(LABELED_WHERE, columns=["id"], limit=5).column("id").to_pylist()
                wanted = None if not args.miners else [m.strip() for m in args.miners.split(",") if m.strip()]
                infos = client.miners()
                known = {i["name"] for i in infos}
                for name in wanted or []:
                    if name not in known:
                        steps.append(Step(name, state="unknown", note=f"the server lists no miner '{name}'"))
                for info in infos:
                    if wanted is not None and info["name"] not in wanted:
                        continue
                    plan = plan_miner(info, cfg, args.size, seed_ids)
                    print(f"  miner {plan.name}" + (f": skipped ({plan.skip})" if plan.skip else ""), flush=True)
                    step = run_miner(col, plan, args.size, args.miner_timeout or None, mem)
                    step.data["graph_miner"] = bool(set(info.get("inputs") or []) & GRAPH_INPUTS)
                    if step.data["graph_miner"] and faiss_ref and step.state == "SUCCEEDED" and step.wall_s:
                        step.reference = f"FAISS {faiss_ref['total_s']:.1f}s, recall {faiss_ref['recall']:.3f}"
                        step.ratio = faiss_ref["total_s"] / step.wall_s
                        report.add(f"{plan.name}: wall s (FAISS graph as reference)", step.wall_s,
                                   faiss_ref["total_s"], kind="latency", unit="s")
                        if step.recall is not None:
                            report.add(f"{plan.name}: graph recall@k", step.recall, faiss_ref["recall"],
                                       kind="recall")
                    if step.wall_s is not None:
                        print(f"    {step.state} in {step.wall_s:.1f}s; {step.note}", flush=True)
                    steps.append(step)
                graph_steps = shared_graph_steps(steps, faiss_ref["rows"] if faiss_ref else None)
                if len(graph_steps) > 1:
                    # the server builds one graph of the pool and serves the next graph miners
                    # from it: the fair comparison with one FAISS graph is then their sum
                    total = sum(s.wall_s or 0.0 for s in graph_steps)
                    both = Step("graph miners together", wall_s=total,
                                note=" + ".join(s.step for s in graph_steps) + " (one graph of the pool's "
                                f"{graph_steps[0].rows:,} rows serves them all)", data={"graph_total": True})
                    if faiss_ref:
                        both.reference = f"FAISS {faiss_ref['total_s']:.1f}s"
                        both.ratio = faiss_ref["total_s"] / total if total else None
                        report.add("graph miners together: wall s (FAISS graph as reference)", total,
                                   faiss_ref["total_s"], kind="latency", unit="s")
                    steps.append(both)
    finally:
        if mem is not None:
            mem.close()
        server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report.targets = goals(steps)
    report.details["total_s"] = time.perf_counter() - t_start
    report.details["faiss"] = faiss_ref
    print_report(args, cfg, report, steps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": report.machine, "params": report.params, "config": cfg.to_json(),
            "steps": [asdict(s) for s in steps], "rows": [asdict(r) for r in report.rows],
            "targets": report.targets, "details": report.details}, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


def run_faiss(args: argparse.Namespace, root: Path, data: Path, steps: list[Step]) -> dict[str, Any] | None:
    """The FAISS reference as a step (skipped when faiss does not import)."""
    try:
        import faiss  # noqa: F401
    except ImportError as exc:
        steps.append(Step("FAISS k-NN graph (reference)", state="skipped",
                          note=f"import faiss failed ({exc}): the reference is skipped"))
        print("  FAISS reference skipped: faiss is not installed", flush=True)
        return None
    print("  FAISS reference: reading the pool's vectors, IVF-Flat graph", flush=True)
    own = MemorySampler(os.getpid(), children=False)  # the server is a child of this process
    own.begin()
    try:
        ref = faiss_reference(data, args.collection, GRAPH_K, args.faiss_nlist, args.recall_sample, args.seed, root,
                              args.faiss_factory)
    except Exception as exc:  # the reference must not stop the miners
        own.close()
        steps.append(Step("FAISS k-NN graph (reference)", state="FAILED", note=f"{type(exc).__name__}: {exc}"))
        return None
    rss, anon = own.end()
    own.close()
    steps.append(Step(
        f"FAISS {ref['method']} k-NN graph (reference)", wall_s=ref["total_s"], rss_peak=rss, anon_peak=anon,
        rss_start=own.start_rss,
        rows=ref["rows"], rows_per_s=ref["rows"] / ref["total_s"], graph=f"FAISS (k={ref['k']})",
        recall=ref["recall"],
        note=(f"train {ref['train_s']:.1f}s on {ref['train_rows']:,} rows + add {ref['add_s']:.1f}s + graph "
              f"{ref['graph_s']:.1f}s, {ref['threads']} threads; recall vs exact on {ref['recall_sample']:,} rows; "
              f"RSS is this (bench) process's; reading the vectors back took {ref['read_s']:.1f}s"),
        data=ref))
    print(f"    FAISS: {ref['total_s']:.1f}s, recall@{ref['k']} {ref['recall']:.3f}", flush=True)
    return ref


def _versions() -> dict[str, str]:
    import grpc
    import lancedb

    out = {"lancedb": lancedb.__version__, "grpcio": grpc.__version__}
    try:
        import faiss
        out["faiss"] = faiss.__version__
    except ImportError:
        out["faiss"] = "not installed"
    return out


def print_report(args: argparse.Namespace, cfg: GenConfig, report: Report, steps: list[Step]) -> None:
    from bench.common import render

    m = report.machine
    d = report.details
    print("\n# assay scale benchmark\n")
    print(f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, {m['platform']}; "
          f"python {m['python']}, numpy {m['numpy']}, lancedb {m['lancedb']}, grpcio {m['grpcio']}, "
          f"faiss {m['faiss']}")
    print(f"- pool: {cfg.n:,} × {cfg.dim} (cosine), {cfg.classes} classes, {cfg.labeled:.1%} labeled, "
          f"{cfg.clusters} clusters, seed {cfg.seed}" + (f", extras {','.join(cfg.extras)}" if cfg.extras else "")
          + f"; in the collection: {d.get('rows', 0):,} rows ({d.get('pool_rows', 0):,} unlabeled = the pool, "
          f"{d.get('labeled_rows', 0):,} labeled = the reference set); vector index {d.get('vector_index', '-')}")
    print(f"- miners: size {args.size}, where `{POOL_WHERE}`, reference_where `{LABELED_WHERE}`, timeout "
          f"{args.miner_timeout:.0f}s; total {d['total_s'] / 60:.1f} min")
    print("- server RSS: peak over the step of the `assay serve` process and its children (anonymous memory in "
          "brackets); ratio: ingest = assay / bare rows/s, graph miners = FAISS seconds / miner seconds "
          "(≥ 1: assay no slower)\n")
    print(render_steps(steps))
    if report.rows:
        print("\n## against the references (same run)\n")
        print(render(report))
    if report.targets:
        print("\n## the issue's goals on this run\n")
        print("| goal | value | met |\n|---|---|---|")
        for t in report.targets:
            print(f"| {t['goal']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")


if __name__ == "__main__":
    raise SystemExit(main())
