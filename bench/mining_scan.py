"""Streaming uncertainty mining at scale: rows/s against the scan floor, and peak memory.

    uv run python bench/mining_scan.py [--rows 5000000] [--classes 10] [--size 1000] [--quick]

Builds a collection of ``--rows`` rows with ``pred_m.probs`` (C = ``--classes``), then in
the same run measures

* the floor: the time to scan the probability column alone (LanceDB, the same chunk
  size), and the time to scan exactly what the runner reads (probs, logits, row id);
* ``margin`` and ``entropy`` runs through :func:`miners.runner.run_mining` (top 1000);

and reports rows/s and the ratio mining / floor (target ≥ 0.5), plus the process's peak
RSS growth during mining (sampled from /proc every 20 ms): the runner must stay in
O(size + chunk) memory, so a 10M-row pool mines well within 24 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexing.store import Store  # noqa: E402
from miners.runner import CHUNK_ROWS, run_mining, validate_request  # noqa: E402
from miners.runs import RunSpec  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Sample RSS in a thread; ``peak - start`` is the growth during the block."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def build(root: str, rows: int, classes: int) -> Any:
    store = Store(root, optimize_every=0)
    col = store.create_collection("pool", models={"m": [f"c{i}" for i in range(classes)]})
    rng = np.random.default_rng(0)
    step = 500_000
    t0 = time.perf_counter()
    for start in range(0, rows, step):
        n = min(step, rows - start)
        probs = rng.dirichlet(np.full(classes, 0.5), n).astype(np.float32)
        pred = pa.StructArray.from_arrays(
            [pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * classes, classes, dtype=np.int32)),
                                      pa.array(probs.ravel()))], names=["probs"])
        batch = pa.table({"id": pa.array([f"r{i:09d}" for i in range(start, start + n)]), "pred_m": pred})
        # bare lancedb add (the rows are known-good): this benchmark is about mining, not ingest
        col.table.add(batch.cast(pa.schema([col.schema.field("id"),
                                            pa.field("pred_m", pa.struct([pa.field("probs", pa.list_(pa.float32()))]))])))
    col.optimize(cleanup=False)
    print(f"  built {rows:,} rows x {classes} classes in {time.perf_counter() - t0:.1f}s", flush=True)
    return col


def scan_floor(col: Any, projection: dict[str, str], with_row_id: bool) -> float:
    t0 = time.perf_counter()
    n = 0
    q = col.table.search().select(projection).limit(None)
    if with_row_id:
        q = q.with_row_id(True)
    for batch in q.to_batches(CHUNK_ROWS):
        n += batch.num_rows
    return time.perf_counter() - t0


def mine(col: Any, miner: str, size: int) -> tuple[float, float, dict[str, float]]:
    req = RunSpec(collection="pool", miner=miner, size=size, model="m")
    _, params = validate_request(col, req)
    rec = replace(req, run_id="bench", version=col.version, params=params)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        out = run_mining(col, rec)
        seconds = time.perf_counter() - t0
    assert len(out.ids) == size
    return seconds, mem.growth_mb, out.timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="500k rows, 1 repeat")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.repeats = 500_000, 1
    print("# assay streaming mining benchmark\n")
    print(f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, python {platform.python_version()}, "
          f"lancedb {lancedb.__version__}, numpy {np.__version__}")
    print(f"- {args.rows:,} rows, C = {args.classes}, top {args.size}, chunk {CHUNK_ROWS:,} rows, "
          f"median of {args.repeats}\n")
    with tempfile.TemporaryDirectory() as root:
        col = build(root, args.rows, args.classes)
        probs_only = {"probs": "pred_m.probs"}
        runner_proj = {"probs": "pred_m.probs", "logits": "pred_m.logits"}
        figures: dict[str, Any] = {}
        rows_ = []
        floor = float(np.median([scan_floor(col, probs_only, False) for _ in range(args.repeats)]))
        floor_full = float(np.median([scan_floor(col, runner_proj, True) for _ in range(args.repeats)]))
        figures["scan_probs_s"], figures["scan_runner_columns_s"] = floor, floor_full
        for miner in ("margin", "entropy"):
            runs = [mine(col, miner, args.size) for _ in range(args.repeats)]
            seconds = float(np.median([r[0] for r in runs]))
            growth = max(r[1] for r in runs)
            figures[miner] = {"seconds": seconds, "rows_per_s": args.rows / seconds, "peak_rss_growth_mb": growth,
                              "timings": runs[-1][2]}
            rows_.append((f"{miner}: rows/s (ref: scan of pred_m.probs alone)", args.rows / seconds,
                          args.rows / floor, floor / seconds))
            rows_.append((f"{miner}: rows/s (ref: scan of what the runner reads: probs, logits, row id)",
                          args.rows / seconds, args.rows / floor_full, floor_full / seconds))
            rows_.append((f"{miner}: peak RSS growth while mining, MB", growth, None, None))
        print("| measure | assay | reference | ratio |\n|---|---:|---:|---:|")
        for name, a, ref, ratio in rows_:
            ref_s = "–" if ref is None else f"{ref:,.0f}"
            ratio_s = "–" if ratio is None else f"{ratio:.2f}"
            print(f"| {name} | {a:,.0f} | {ref_s} | {ratio_s} |")
        print(f"\ntarget: mining at >= 0.5 of the scan floor; runner timings (last run): "
              f"{json.dumps({k: round(v, 2) for k, v in figures['margin']['timings'].items()})}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
