"""Soak: many clients mixing searches, upserts, queries/pages and mining runs against one
server for minutes, reporting latency percentiles per operation and the server's memory
over time.

A server is started in this process (``start_server(ServerConfig(data=tmp, port=0))``);
``--clients`` threads (default 16), each with its own :class:`service.client.Client`,
loop for ``--minutes`` (default 5) over a weighted mix of operations on one collection
(``--rows`` initial rows of ``--dim``-d vectors, a 4-class model's probabilities, a few
fields):

* ``search``: k=10 nearest neighbours of a random vector, half of them with the prefilter
  ``split = 'pool'``;
* ``upsert``: a batch of ``--batch`` rows, half new ids and half updates of existing ones
  (concurrent writers of the same ids: merge on the declared primary key);
* ``query``: a count, a filtered scan with a limit, or two pages of a paged scan;
* ``mine``: a ``margin`` run of size 20 on the unlabeled rows, waited for, results read.

Every failure is counted as an error (there should be none). At the end: every inserted
id is there once (``count`` = initial rows + rows acknowledged as inserted).

How to read the table
---------------------
Per operation: p50 and p99 latency over the whole run (``assay``), and the p50 of the
last ``--window`` seconds against the p50 of the first (``reference``, same run): the
ratio (first / last) below 1 means the operation got slower as the collection and the
process aged. Memory: the process RSS (server and clients share it) at the end against
its value after setup; ``RSS over time`` lists the samples. Absolute figures depend on
the (shared, noisy) machine.

Options that change the run:

* ``--mix writes`` (every client only upserts: the group-commit goal is ≥ 20× the rows/s
  of one commit per write, p50 ≤ 200 ms with 16 clients; the reference is measured in the
  same run: as many threads writing the same batches straight into a LanceDB table, one
  ``merge_insert`` commit per write, for up to a minute) or weights such as
  ``--mix search=1,upsert=1``; the default is the mix above.
* ``--server process`` (the default) runs ``assay serve`` as its own process, so the RSS is
  the server's alone; ``--server thread`` runs it in this process (RSS then includes the
  clients).
* ``--write-log``: the server acknowledges small upserts from its write-ahead log
  (``assay serve --write-log``) and applies them right after; with ``--kill-at`` the
  restart applies what the log held.
* ``--kill-at S`` (process mode): SIGKILL the server S seconds in, start it again on the
  same data, and go on; at the end every *acknowledged* row must be there exactly once and
  every batch in flight at the kill all there or not at all.

Over time it prints the server's RSS, the collection's fragments and its versions (read
from the data folder), the memory the server's store holds by holder (its
``assay_memory_bytes`` gauges: LanceDB's caches, exact search's vectors, ...; the table ends
with each holder's growth since the first minute), so a service that ages shows it and
what grows is told apart, and every operation's p50 per ``--window``.

The collection grows during the run (half of every upsert is new rows: 20k rows became
218k-242k in 30 minutes in the README's runs F, G and H), and some operations cost more
on a larger table whatever the server's age (a mining run scores every pool row). So runs
of 10 minutes or more end with a same-size reference (``--fresh-reference``): a new
server, a collection loaded with as many rows and optimised, the same mix for one window.
The last window's p50 against it is the service's ageing alone; against the first window,
ageing and growth together.

Vectors (``--vectors``): by default rows and queries lie around 64 seeded centres, as real
embeddings do. ``gaussian`` draws them isotropic, which no vector index helps: on 50k such
64-d rows an IVF index needs 160 of its 223 lists probed to reach recall 0.95, so search
stays a scan of the table.

Usage::

    uv run python bench/soak.py [--minutes 5] [--clients 16] [--rows 20000] [--dim 64]
        [--batch 20] [--window 30] [--mix default|writes|op=w,...] [--server process|thread]
        [--kill-at S] [--write-log] [--vectors clustered|gaussian] [--[no-]fresh-reference] [--quick]
        [--json PATH]

``tests/test_load.py`` runs the same workload for a few seconds (``run_load``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

# Run as a script, this file's folder (bench/) comes first on sys.path, where service.py
# would shadow the ``service`` package: put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

from bench.common import Report, ServerProcess, free_port, machine, pct, render  # noqa: E402
from service.client import AssayClientError, Client  # noqa: E402

OPS = ("search", "upsert", "query", "mine")
WEIGHTS = {"search": 0.45, "upsert": 0.25, "query": 0.25, "mine": 0.05}
CLASSES = ["a", "b", "c", "d"]
COLLECTION = "soak"
SPACE = "v"
MODEL = "m"
VECTORS = ("clustered", "gaussian")
CLUSTERS = 64  # clustered vectors: centres ~ N(0, I), rows = a centre + CLUSTER_NOISE * N(0, I)
CLUSTER_NOISE = 0.6


def rss_bytes() -> int:
    """This process's resident set size (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
    return int(psutil.Process().memory_info().rss)


MIXES = {"default": WEIGHTS, "writes": {"upsert": 1.0}}


def parse_mix(text: str) -> dict[str, float]:
    """``default``, ``writes`` or ``op=weight,...`` (ops: search, upsert, query, mine)."""
    if text in MIXES:
        return dict(MIXES[text])
    mix = {}
    for part in text.split(","):
        op, _, w = part.partition("=")
        if op.strip() not in OPS:
            raise ValueError(f"unknown operation {op!r} in --mix (known: {', '.join(OPS)})")
        mix[op.strip()] = float(w or 1)
    return mix


@dataclass
class LoadResult:
    seconds: float
    clients: int
    latencies: dict[str, list[tuple[float, float]]]  # op -> (start offset s, seconds)
    errors: list[str]
    rss: list[tuple[float, int]]  # (offset s, bytes); the first is after setup
    inserted: int = 0
    initial_rows: int = 0
    final_rows: int = 0
    distinct_ids: int = 0
    samples: list[dict[str, float]] = field(default_factory=list)  # t, rss_mb, fragments, versions
    killed_errors: int = 0  # calls that failed while the server was down (--kill-at)
    lost_acknowledged: int = 0  # acknowledged new ids missing at the end (must be 0)
    torn_batches: int = 0  # batches in flight at the kill that landed in part (must be 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self, op: str, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        xs = [s for t, s in self.latencies[op] if since <= t < until]
        if not xs:
            return {"calls": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
        return {"calls": len(xs), "p50_ms": pct(xs, 50) * 1e3, "p99_ms": pct(xs, 99) * 1e3}

    @property
    def rss_growth(self) -> int:
        return max(b for _, b in self.rss) - self.rss[0][1]

    @property
    def consistent(self) -> bool:
        """Every id once, every acknowledged insert there, no batch in part."""
        return (self.final_rows == self.distinct_ids and self.lost_acknowledged == 0
                and self.torn_batches == 0 and self.final_rows >= self.initial_rows + self.inserted)

    def summary(self) -> str:
        lines = [f"{self.clients} clients for {self.seconds:.1f}s, {len(self.errors)} errors"
                 + (f" ({self.killed_errors} calls failed while the server was killed)" if self.killed_errors else "")]
        for op in OPS:
            s = self.stats(op)
            lines.append(f"  {op:7s} {s['calls']:6d} calls  p50 {s['p50_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms")
        lines.append(f"  RSS {self.rss[0][1] / 2**20:.0f} MB after setup, peak {max(b for _, b in self.rss) / 2**20:.0f}"
                     f" MB, end {self.rss[-1][1] / 2**20:.0f} MB (growth {self.rss_growth / 2**20:.0f} MB)")
        lines.append(f"  rows {self.initial_rows} + {self.inserted} acknowledged inserts; {self.final_rows} at the end "
                     f"({self.distinct_ids} distinct ids, {self.lost_acknowledged} acknowledged missing, "
                     f"{self.torn_batches} batches in part)")
        return "\n".join(lines)


class Workload:
    """The collection and the operations of the mix; ``op_*`` take a client and an RNG."""

    def __init__(self, *, rows: int = 5000, dim: int = 32, batch: int = 20, seed: int = 0,
                 vectors: str = "clustered") -> None:
        if vectors not in VECTORS:
            raise ValueError(f"vectors must be one of {', '.join(VECTORS)}, got {vectors!r}")
        self.rows, self.dim, self.batch, self.seed, self.vectors = rows, dim, batch, seed, vectors
        self._centres = np.random.default_rng([seed, 99]).standard_normal((CLUSTERS, dim)).astype(np.float32)
        self._next_id = 0
        self._ids_lock = threading.Lock()
        self.inserted = 0
        self.acknowledged: list[str] = []  # new ids the server acknowledged
        self.in_doubt: list[list[str]] = []  # new ids of batches that got no answer

    def _vectors(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Stored rows and search queries alike: around one of ``CLUSTERS`` seeded centres
        (``clustered``), or isotropic Gaussian (``gaussian``: no structure at all)."""
        noise = rng.standard_normal((n, self.dim)).astype(np.float32)
        if self.vectors == "gaussian":
            return noise
        return self._centres[rng.integers(CLUSTERS, size=n)] + CLUSTER_NOISE * noise

    def _rows(self, rng: np.random.Generator, ids: list[str]) -> dict[str, Any]:
        n = len(ids)
        probs = rng.dirichlet(np.ones(len(CLASSES)), n).astype(np.float32)
        probs /= probs.sum(axis=1, keepdims=True)
        labeled = rng.random(n) < 0.3
        return {
            "id": ids,
            "split": ["train" if x else "pool" for x in labeled],
            "label": [CLASSES[int(rng.integers(len(CLASSES)))] if x else None for x in labeled],
            "n": rng.integers(0, 1000, n),
            "emb_" + SPACE: self._vectors(rng, n),
            "pred_" + MODEL: pa.array([{"probs": p.tolist()} for p in probs]),
        }

    def new_ids(self, n: int) -> list[str]:
        with self._ids_lock:
            start, self._next_id = self._next_id, self._next_id + n
        return [f"n{i:09d}" for i in range(start, start + n)]

    def setup(self, client: Client) -> None:
        col = client.create_collection(COLLECTION, spaces={SPACE: self.dim}, models={MODEL: CLASSES})
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.rows, 10_000):
            ids = [f"i{i:09d}" for i in range(start, min(self.rows, start + 10_000))]
            col.upsert(self._rows(rng, ids))

    def op_search(self, client: Client, rng: np.random.Generator) -> None:
        where = "split = 'pool'" if rng.random() < 0.5 else None
        hits = client.collection(COLLECTION).search(
            SPACE, self._vectors(rng, 1)[0], k=10, where=where, columns=["id", "n"])
        assert hits.num_rows == 10, hits.num_rows

    def op_upsert(self, client: Client, rng: np.random.Generator) -> None:
        half = self.batch // 2
        old = [f"i{i:09d}" for i in rng.choice(self.rows, self.batch - half, replace=False)]
        new = self.new_ids(half)
        try:
            summary = client.collection(COLLECTION).upsert(self._rows(rng, new + old))
        except AssayClientError:
            with self._ids_lock:
                self.in_doubt.append(new)
            raise
        assert summary.inserted == half and summary.updated == self.batch - half, summary
        with self._ids_lock:
            self.inserted += summary.inserted
            self.acknowledged.extend(new)

    def op_query(self, client: Client, rng: np.random.Generator) -> None:
        col = client.collection(COLLECTION)
        kind = int(rng.integers(3))
        lo = int(rng.integers(0, 900))
        where = f"n >= {lo} AND n < {lo + 100}"
        if kind == 0:
            assert col.count(where) >= 0
        elif kind == 1:
            assert col.query(where, columns=["id", "n", "label"], limit=200).num_rows <= 200
        else:
            page = col.page(where, columns=["id", "n"], page_rows=100)
            if not page.last:
                col.page(where, columns=["id", "n"], page_rows=100, cursor=page.next_cursor)

    def op_mine(self, client: Client, rng: np.random.Generator) -> None:
        job = client.collection(COLLECTION).mine("margin", 20, model=MODEL, where="split = 'pool'",
                                                 seed=int(rng.integers(1 << 30)))
        job.wait(timeout=300)
        assert job.state == "SUCCEEDED", (job.state, job.error)
        assert job.results().num_rows == 20


def one_commit_per_write(folder: str, workload: Workload, *, clients: int, seconds: float,
                          seed: int = 0) -> dict[str, float]:
    """The group-commit reference, same machine and run: ``clients`` threads write the same
    batches (half new ids, half updates) straight into a LanceDB table, each write its own
    ``merge_insert`` commit (Lance retries the commits that race) — what every write cost
    before group commit, without gRPC or validation. Returns rows/s, p50/p99 (ms), errors."""
    import lancedb

    db = lancedb.connect(folder)
    rng0 = np.random.default_rng(seed)

    def batch(rng: np.random.Generator, ids: list[str]) -> pa.Table:
        rows = workload._rows(rng, ids)
        return pa.table({
            "id": rows["id"], "split": rows["split"], "label": pa.array(rows["label"], pa.string()),
            "n": pa.array(rows["n"], pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(rows["emb_" + SPACE].ravel(), workload.dim),
            "probs": pa.array([r["probs"] for r in rows["pred_" + MODEL].to_pylist()], pa.list_(pa.float32())),
        })

    table = db.create_table("reference", batch(rng0, [f"i{i:09d}" for i in range(workload.rows)]))
    next_id = iter(range(1 << 40))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def writer(k: int) -> None:
        rng = np.random.default_rng(seed + 1 + k)
        half = workload.batch // 2
        while time.monotonic() < deadline:
            with lock:
                new = [f"r{next(next_id):09d}" for _ in range(half)]
            old = [f"i{i:09d}" for i in rng.choice(workload.rows, workload.batch - half, replace=False)]
            data = batch(rng, new + old)
            t0 = time.perf_counter()
            try:
                (table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
                 .execute(data))
            except Exception as exc:  # noqa: BLE001 -- counted and reported, as the soak does
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    t_start = time.monotonic()
    threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t_start
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {"rows_per_s": len(latencies) * workload.batch / took, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "writes": len(latencies), "errors": len(errors)}


def fresh_server_p50(workload: Workload, rows: int, *, clients: int, seconds: float,
                     weights: dict[str, float], seed: int = 0) -> dict[str, float]:
    """The same-size reference for the last window: a new server on a new data root, a
    collection loaded with ``rows`` rows of the same workload and optimised (compacted,
    indexed as its policy asks), then the same mix for ``seconds``. Each operation's p50
    (ms), and the server's CPU per operation (``cpu_ms_per_op``). Against the soak's last
    window it separates ageing (versions, deleted rows, memory, background work a long run
    leaves behind) from the cost of a larger table."""
    fresh = Workload(rows=rows, dim=workload.dim, batch=workload.batch, seed=seed, vectors=workload.vectors)
    with tempfile.TemporaryDirectory(prefix="assay-soak-fresh-") as tmp:
        proc = ServerProcess(os.path.join(tmp, "data"), os.path.join(tmp, "logs"))
        proc.start()
        try:
            with Client(proc.address, timeout=300) as client:
                fresh.setup(client)
                job = client.collection(COLLECTION).optimize()
                job.wait(timeout=900)
            result = run_load(proc.address, fresh, clients=clients, seconds=seconds, seed=seed + 1,
                              weights=weights, sample_every=min(5.0, seconds / 4),
                              sample=lambda: {"rss": float(proc.rss_bytes()[0]), "cpu": proc.cpu_seconds()})
        finally:
            proc.stop()
    if result.errors:
        raise RuntimeError(f"the fresh-server reference had {len(result.errors)} errors: {result.errors[:3]}")
    out = {op: result.stats(op)["p50_ms"] for op in OPS if result.stats(op)["calls"]}
    return {**out, "cpu_ms_per_op": server_cpu(result, 0.0, result.seconds)["ms_per_op"]}


def server_cpu(result: LoadResult, since: float, until: float) -> dict[str, float]:
    """The server's CPU between the first and the last sample inside [since, until]: cores
    busy on average, and CPU ms per operation (all kinds) that started in that span. NaN
    without two samples there (a server in this process is not sampled: its CPU is the
    clients' too)."""
    inside = [row for row in result.samples if "cpu" in row and since <= row["t"] <= until]
    if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
        return {"cores": float("nan"), "ms_per_op": float("nan")}
    t0, t1 = inside[0]["t"], inside[-1]["t"]
    used = inside[-1]["cpu"] - inside[0]["cpu"]
    calls = sum(1 for op in OPS for t, _ in result.latencies[op] if t0 <= t < t1)
    return {"cores": used / (t1 - t0), "ms_per_op": used * 1e3 / calls if calls else float("nan")}


def p50_timeline(result: LoadResult, window: float) -> list[dict[str, float]]:
    """Every operation's p50 (ms) per ``window`` seconds of the run: where a drift starts
    (next to the fragment and version counts sampled over time)."""
    rows = []
    for start in np.arange(0.0, result.seconds - window / 2, window):  # no last sliver
        rows.append({"t": float(start), **{op: result.stats(op, start, start + window)["p50_ms"] for op in OPS},
                     **{f"server_{k}": v for k, v in server_cpu(result, start, start + window).items()}})
    return rows


def run_load(address: str | Callable[[], str], workload: Workload, *, clients: int = 16, seconds: float = 12.0,
             seed: int = 0, sample_every: float = 0.5, weights: dict[str, float] | None = None,
             sample: Callable[[], dict[str, float]] | None = None,
             on_sample: Callable[[float, dict[str, float]], None] | None = None,
             down: threading.Event | None = None) -> LoadResult:
    """``clients`` threads, each with its own Client, run the weighted mix for ``seconds``.

    ``address`` may be a callable (the server moves to a new port after a restart).
    ``sample()`` returns what to record every ``sample_every`` seconds (default: this
    process's RSS); calls that fail while ``down`` is set are counted apart, not as errors.
    """
    where = address if callable(address) else (lambda: address)
    ops = {op: getattr(workload, f"op_{op}") for op in OPS}
    mix = weights or WEIGHTS
    names = [op for op in OPS if mix.get(op, 0) > 0]
    probs = np.asarray([mix[n] for n in names], dtype=float)
    probs = probs / probs.sum()
    latencies: dict[str, list[tuple[float, float]]] = {op: [] for op in OPS}
    errors: list[str] = []
    killed = [0]
    lock = threading.Lock()
    sample = sample or (lambda: {"rss": float(rss_bytes())})
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    first_sample = sample()
    samples = [{"t": 0.0, **first_sample}]
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(sample_every):
            try:
                row = {"t": time.perf_counter() - t0, **sample()}
            except Exception:  # the server is being restarted
                continue
            samples.append(row)
            if on_sample is not None:
                on_sample(row["t"], row)

    def worker(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        first = True  # each client starts with a different operation: all of the mix is run
        addr = where()
        client = Client(addr, timeout=120, retries=0 if down is not None else 3)
        try:
            while (start := time.perf_counter()) < stop_at:
                op = names[i % len(names)] if first else names[int(rng.choice(len(names), p=probs))]
                first = False
                try:
                    ops[op](client, rng)
                except Exception as exc:  # every failure is reported, none is expected
                    with lock:
                        if down is not None and (down.is_set() or where() != addr):
                            killed[0] += 1
                        else:
                            errors.append(f"{op}: {type(exc).__name__}: {exc}"[:500])
                    if down is not None:
                        while down.is_set() and time.perf_counter() < stop_at:
                            time.sleep(0.05)
                        if where() != addr:
                            client.close()
                            addr = where()
                            client = Client(addr, timeout=120, retries=0)
                    continue
                with lock:
                    latencies[op].append((start - t0, time.perf_counter() - start))
        finally:
            client.close()

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    elapsed = time.perf_counter() - t0
    with contextlib.suppress(Exception):  # a server being restarted has no sample
        samples.append({"t": elapsed, **sample()})
    rss = [(row["t"], int(row.get("rss", 0))) for row in samples]
    result = LoadResult(seconds=elapsed, clients=clients, latencies=latencies, errors=errors, rss=rss,
                        inserted=workload.inserted, initial_rows=workload.rows, samples=samples,
                        killed_errors=killed[0])
    with Client(where(), timeout=300) as client:
        ids = client.collection(COLLECTION).query(columns=["id"]).column("id").to_pylist()
    present = set(ids)
    result.final_rows, result.distinct_ids = len(ids), len(present)
    result.lost_acknowledged = sum(1 for i in workload.acknowledged if i not in present)
    result.torn_batches = sum(1 for batch in workload.in_doubt if 0 < sum(i in present for i in batch) < len(batch))
    return result


# -- the benchmark ---------------------------------------------------------------------------


def group_commit_counters(metrics_url: str) -> dict[str, float]:
    """The server's group-commit counters for the soak collection (its Prometheus metrics:
    commits, writes, lingers, linger seconds) since it started."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    names = {"assay_group_commits": "commits", "assay_group_commit_writes": "writes",
             "assay_group_commit_lingers": "lingers", "assay_group_commit_linger_seconds": "linger_s"}
    return {names[f.name]: s.value for f in text_string_to_metric_families(body) if f.name in names
            for s in f.samples if s.name.endswith("_total") and s.labels.get("collection") == COLLECTION}


HOLDERS = ("lance_collections", "lance_system", "flat_vectors", "live_rows", "fragment_values", "id_indexes")


def memory_held(metrics_url: str) -> dict[str, float]:
    """The memory the server's store holds, by holder (its ``assay_memory_bytes`` gauges:
    LanceDB's caches, exact search's vectors and live rows, the miners' per-fragment scores,
    the id indexes), as ``held_<holder>`` bytes — beside the RSS, what grows is told apart."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    return {f"held_{s.labels['holder']}": s.value for f in text_string_to_metric_families(body)
            if f.name == "assay_memory_bytes" for s in f.samples}


def table_stats(data: str) -> dict[str, float]:
    """Fragments, versions and deleted rows of the soak collection, and how many of its
    vectors are outside the vector index (searched flat), read from the data folder."""
    import lancedb

    table = lancedb.connect(data).open_table(COLLECTION)
    ds = table.to_lance()
    frags = ds.get_fragments()
    deleted = sum(f.metadata.num_deletions for f in frags)
    out = {"fragments": float(len(frags)), "versions": float(len(ds.versions())), "deleted": float(deleted)}
    index = next((i for i in table.list_indices() if list(i.columns) == [f"emb_{SPACE}"]), None)
    if index is not None:
        stats = table.index_stats(index.name)
        out.update(indexed=float(stats.num_indexed_rows), unindexed=float(stats.num_unindexed_rows),
                   index_deltas=float(stats.num_indices or 1))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="how long the clients run")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rows", type=int, default=20_000, help="initial rows")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=20, help="rows per upsert")
    p.add_argument("--window", type=float, default=30.0,
                   help="seconds at the start and at the end compared (p50 drift)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between RSS/fragment samples")
    p.add_argument("--mix", default="default", help="default, writes, or op=weight,... (search, upsert, query, mine)")
    p.add_argument("--server", choices=("process", "thread"), default="process",
                   help="assay serve as its own process (RSS is the server's) or in this process")
    p.add_argument("--kill-at", type=float, default=None,
                   help="SIGKILL the server this many seconds in, restart it, check acknowledged rows (process mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-log", action="store_true",
                   help="the server acknowledges small upserts from its write-ahead log (assay serve --write-log)")
    p.add_argument("--vectors", choices=VECTORS, default="clustered",
                   help="clustered rows and queries (like real embeddings), or isotropic Gaussian (the worst "
                        "case for a vector index: no structure)")
    p.add_argument("--fresh-reference", action=argparse.BooleanOptionalAction, default=None,
                   help="after the run, load a new server with as many rows and run the mix for one window: "
                        "the last window's p50 against a fresh server of the same size (default: on for runs "
                        "of 10 minutes or more)")
    p.add_argument("--quick", action="store_true", help="30 seconds, 5k rows")
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.rows, args.window, args.sample = 0.5, 5_000, 10.0, 2.0
    if args.fresh_reference is None:
        args.fresh_reference = args.minutes >= 10 and args.kill_at is None and args.mix == "default"
    if args.kill_at is not None and args.server != "process":
        p.error("--kill-at needs --server process")
    return args


def main(argv: list[str] | None = None) -> int:
    from service.server import ServerConfig, start_server

    args = parse_args(argv)
    weights = parse_mix(args.mix)
    logging.getLogger().setLevel(logging.ERROR)
    report = Report(machine=machine(), params=dict(vars(args)))
    m = report.machine
    print("# assay soak\n")
    print(f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, {m['platform']}")
    print(f"- {args.clients} clients (threads of this process, each its own Client) for "
          f"{args.minutes:g} min against one server ({'its own process' if args.server == 'process' else 'in this process'})"
          f"; {args.rows:,} initial rows, dim {args.dim}, {args.batch}-row upserts; mix {weights}"
          + (f"; server SIGKILLed at {args.kill_at:g} s and restarted" if args.kill_at is not None else "") + "\n",
          flush=True)
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="assay-soak-") as tmp:
        data = os.path.join(tmp, "data")
        proc: ServerProcess | None = None
        server = None
        down = threading.Event() if args.kill_at is not None else None
        metrics_port = free_port()
        if args.server == "process":
            proc = ServerProcess(data, os.path.join(tmp, "logs"), extra_args=(
                "--metrics-port", str(metrics_port), *(("--write-log",) if args.write_log else ())))
            proc.start()
            address: Any = lambda: proc.address  # noqa: E731
        else:
            server = start_server(ServerConfig(data=data, port=0, grace_s=2, metrics_port=metrics_port,
                                               write_log=args.write_log))
            address = server.address

        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def sample() -> dict[str, float]:
            rss = proc.rss_bytes()[0] if proc is not None else rss_bytes()
            cpu = {"cpu": proc.cpu_seconds()} if proc is not None else {}
            return {"rss": float(rss), **cpu, **table_stats(data), **memory_held(metrics_url)}

        killer = None
        if args.kill_at is not None:
            def kill_and_restart() -> None:
                time.sleep(args.kill_at)
                down.set()
                proc.kill()
                print(f"  -- server killed at {args.kill_at:g} s; restarting", flush=True)
                proc.start()
                down.clear()
                print(f"  -- server back on {proc.address}", flush=True)

            killer = threading.Thread(target=kill_and_restart, daemon=True)
        try:
            workload = Workload(rows=args.rows, dim=args.dim, batch=args.batch, seed=args.seed,
                                vectors=args.vectors)
            with Client(address() if callable(address) else address, timeout=300) as client:
                workload.setup(client)
            print("over time (s, server RSS MB, fragments, versions, deleted rows; MB held by LanceDB's "
                  "caches of the collections and of assay's own tables, exact search's vectors, its live rows, "
                  "the miners' per-fragment scores, the id indexes; once the vector index exists, vectors "
                  "outside it and its delta indexes):", flush=True)
            if killer is not None:
                killer.start()
            result = run_load(address, workload, clients=args.clients, seconds=seconds, seed=args.seed,
                              sample_every=args.sample, weights=weights, sample=sample, down=down,
                              on_sample=lambda t, row: print(
                                  f"  {t:7.1f}  {row['rss'] / 2**20:8.1f}  {row['fragments']:6.0f}  "
                                  f"{row['versions']:7.0f}  {row['deleted']:7.0f}  "
                                  + " ".join(f"{row.get('held_' + h, float('nan')) / 2**20:6.1f}" for h in HOLDERS)
                                  + (f"  {row['unindexed']:7.0f}  {row['index_deltas']:3.0f}"
                                     if "unindexed" in row else ""), flush=True))
            # after a --kill-at restart: what the restarted server did
            result.extra["group_commit"] = group_commit_counters(metrics_url)
        finally:
            if killer is not None:
                killer.join(timeout=300)
            if proc is not None:
                proc.stop()
            if server is not None:
                server.stop(2)
        if result.errors and proc is not None:  # an INTERNAL error's details are in the server's log: keep it
            kept = tempfile.mkdtemp(prefix="assay-soak-logs-")
            shutil.copytree(proc.log_dir, kept, dirs_exist_ok=True)
            result.extra["server_logs"] = kept
    window = min(args.window, result.seconds / 2)
    for op in OPS:
        whole = result.stats(op)
        if not whole["calls"]:
            continue
        first, last = result.stats(op, 0, window), result.stats(op, result.seconds - window)
        report.add(f"{op} p50 (ms): run / first {window:.0f}s", whole["p50_ms"], first["p50_ms"], kind="info", unit="ms")
        report.add(f"{op} p99 (ms): run", whole["p99_ms"], None, kind="info", unit="ms")
        report.add(f"{op} p50 (ms): last {window:.0f}s / first {window:.0f}s", last["p50_ms"], first["p50_ms"],
                   kind="latency", unit="ms")
        report.add(f"{op} calls", whole["calls"], None, kind="info", unit="count")
    upserts = result.stats("upsert")["calls"]
    if upserts:
        report.add("upserted rows/s (all clients)", upserts * args.batch / result.seconds, None,
                   kind="info", unit="rows/s")
    mark = min(60.0, result.seconds / 2)  # after the first minute (half of a shorter run)
    at_mark = next((r for r in result.samples if r["t"] >= mark), result.samples[0])
    start_mb, minute_mb, end_mb = result.rss[0][1] / 2**20, at_mark["rss"] / 2**20, result.rss[-1][1] / 2**20
    report.add("server RSS (MB): end / after setup", end_mb, start_mb, kind="cost", unit="MB")
    report.add(f"server RSS (MB): end / at {mark:.0f}s", end_mb, minute_mb, kind="cost", unit="MB")
    report.add("server RSS (MB): peak", max(b for _, b in result.rss) / 2**20, None, kind="info", unit="MB")
    for h in HOLDERS:  # beside the RSS: which holder grew (the rest is Python, Arrow and Lance working memory)
        if f"held_{h}" in result.samples[-1] and f"held_{h}" in at_mark:
            report.add(f"held by {h} (MB): end / at {mark:.0f}s", result.samples[-1][f"held_{h}"] / 2**20,
                       at_mark[f"held_{h}"] / 2**20, kind="info", unit="MB")
    frags = [row["fragments"] for row in result.samples if "fragments" in row]
    vers = [row["versions"] for row in result.samples if "versions" in row]
    if frags:
        report.add("fragments: end / max", frags[-1], max(frags), kind="info", unit="count")
        report.add("versions: end / max", vers[-1], max(vers), kind="info", unit="count")
    cpu_first, cpu_last = server_cpu(result, 0, window), server_cpu(result, result.seconds - window, result.seconds)
    if not np.isnan(cpu_first["ms_per_op"]):
        report.add(f"server CPU ms per operation: last {window:.0f}s / first {window:.0f}s",
                   cpu_last["ms_per_op"], cpu_first["ms_per_op"], kind="cost", unit="ms")
        report.add(f"server cores busy: last {window:.0f}s / first {window:.0f}s", cpu_last["cores"],
                   cpu_first["cores"], kind="info", unit="cores")
    group = result.extra.get("group_commit", {})
    if group.get("commits"):
        report.add("writes a commit (the server's group-commit counters)", group["writes"] / group["commits"], None,
                   kind="info", unit="writes")
        report.add("commits that waited for answered writers (share)", group["lingers"] / group["commits"], None,
                   kind="info", unit="share")
    report.add("errors", len(result.errors), 0, kind="info", unit="count")
    writes_only = set(weights) == {"upsert"}
    if writes_only and upserts:
        ref_s = min(60.0, result.seconds)
        print(f"\nreference: {args.clients} threads, one LanceDB merge_insert commit per write, "
              f"{ref_s:.0f} s ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="assay-soak-ref-") as ref_tmp:
            ref = one_commit_per_write(ref_tmp, Workload(rows=args.rows, dim=args.dim, batch=args.batch,
                                                         seed=args.seed, vectors=args.vectors),
                                       clients=args.clients, seconds=ref_s, seed=args.seed)
        whole = result.stats("upsert")
        report.add("upserted rows/s: assay / one commit per write (bare LanceDB merge_insert)",
                   upserts * args.batch / result.seconds, ref["rows_per_s"], kind="speed", unit="rows/s")
        report.add("upsert p50 (ms): assay / one commit per write", whole["p50_ms"], ref["p50_ms"],
                   kind="latency", unit="ms")
        report.add("reference errors", ref["errors"], None, kind="info", unit="count")
    if args.kill_at is not None:
        report.add("calls failed while the server was down", result.killed_errors, None, kind="info", unit="count")
        report.add("acknowledged rows missing after the kill", result.lost_acknowledged, 0, kind="info", unit="count")
        report.add("batches in flight at the kill that landed in part", result.torn_batches, 0, kind="info",
                   unit="count")
    if args.fresh_reference:
        print(f"\nreference: a fresh server loaded with {result.final_rows:,} rows, optimised, the same mix for "
              f"{window:.0f} s ...", flush=True)
        fresh = fresh_server_p50(workload, result.final_rows, clients=args.clients, seconds=window,
                                 weights=weights, seed=args.seed)
        fresh_cpu = fresh.pop("cpu_ms_per_op")
        if not np.isnan(cpu_last["ms_per_op"]):
            report.add(f"server CPU ms per operation: last {window:.0f}s / a fresh server with as many rows",
                       cpu_last["ms_per_op"], fresh_cpu, kind="cost", unit="ms")
        for op, p50 in fresh.items():
            report.add(f"{op} p50 (ms): last {window:.0f}s / a fresh server with as many rows",
                       result.stats(op, result.seconds - window)["p50_ms"], p50, kind="latency", unit="ms")
    timeline = p50_timeline(result, window)
    print(f"\np50 (ms) per {window:.0f}-s window (start s: {', '.join(op for op in OPS)}; "
          "server cores busy, server CPU ms per operation):")
    for row in timeline:
        print(f"  {row['t']:7.0f}  " + "  ".join(f"{row[op]:8.1f}" for op in OPS)
              + f"  {row['server_cores']:5.2f}  {row['server_ms_per_op']:7.1f}")
    print(f"\n## results ({result.seconds:.0f}s)\n")
    print(render(report))
    print("\nratio: first-window p50 / last-window p50 (below 1: slower at the end); RSS: "
          "earlier / end (below 1: the server grew). " + result.summary().splitlines()[-1].strip())
    print("\ngoals: " + ("rows/s ≥ 20× one commit per write and upsert p50 ≤ 200 ms (16 clients, "
                          "20-row upserts)" if writes_only else
                          "every operation's p50 in the last window ≥ 0.8× the first, server RSS at "
                          "the end ≤ 1.5× its value at 60 s, fragments bounded (30-minute run); with the "
                          "fresh-server reference, the last window's p50 ≥ 0.8× a fresh server's with as many rows")
          + "; no errors.")
    if result.errors:
        print(f"\n{len(result.errors)} errors, the first: " + "\n  ".join(result.errors[:5]))
        if "server_logs" in result.extra:
            print(f"the server's log, kept: {result.extra['server_logs']}")
    ok = not result.errors and result.consistent
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": report.machine, "params": report.params, "rows": [asdict(r) for r in report.rows],
                       "samples": result.samples, "errors": result.errors,
                       "stats": {op: result.stats(op) for op in OPS}, "p50_timeline": timeline}, fh, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
