"""Small upserts into a big collection: the merge through the BTREE on ``id`` against the
merge by a scan of ``id``, in one run, on the soak's rows.

For each size in ``--rows``, a collection of that many rows of ``bench/soak.py``'s workload
(64-d vectors, a ``pred`` struct, tags; no stable row ids, as every new collection) is loaded
through ``Collection.upsert`` and optimised. Then ``--writes`` upserts of 20 rows (10 new
ids, 10 existing ones, only the soak's columns: ``tags`` is not sent) go through
``Collection.upsert``, alternating between the two ways of merging them:

* ``index``: the batch made whole (the columns it lacks read for the rows it updates by one
  ``id IN (...)`` lookup) and merged through the BTREE (``Collection._whole_rows``);
* ``scan`` (the reference): merged on ``id`` by a scan of that column (``Collection._merge``).

It prints the median ms per upsert of each and the ratio (scan / index: above 1 the index
is faster). ``INDEXED_MERGE_MIN_ROWS`` (below it, upserts take the scan) comes from these
figures.

Usage::

    uv run --frozen python bench/upsert_merge.py [--rows 140000,1000000] [--writes 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import indexing.store as store_module  # noqa: E402
from bench.common import Report, machine, render  # noqa: E402
from bench.soak import CLASSES, COLLECTION, MODEL, SPACE, Workload  # noqa: E402
from indexing.store import Store  # noqa: E402

PATHS = {"index": 0, "scan": 1 << 62}  # INDEXED_MERGE_MIN_ROWS that sends an upsert each way


def measure(rows: int, writes: int, *, seed: int = 0) -> dict[str, float]:
    """Median seconds per 20-row upsert (10 of them updates) of each path on a collection of
    ``rows`` rows; the paths alternate, so noise and the collection's growth hit both alike."""
    workload = Workload(rows=rows, dim=64, batch=20, seed=seed)
    rng = np.random.default_rng(seed)
    taken: dict[str, list[float]] = {path: [] for path in PATHS}
    threshold = store_module.INDEXED_MERGE_MIN_ROWS
    with tempfile.TemporaryDirectory(prefix="assay-upsert-merge-") as tmp:
        store = Store(tmp)
        try:
            col = store.create_collection(COLLECTION, spaces={SPACE: 64}, models={MODEL: CLASSES})
            for start in range(0, rows, 10_000):
                col.upsert(workload._rows(rng, [f"i{i:09d}" for i in range(start, min(rows, start + 10_000))]))
            col.optimize()
            for k in range(writes):
                path = list(PATHS)[k % 2]
                store_module.INDEXED_MERGE_MIN_ROWS = PATHS[path]
                ids = [f"i{i:09d}" for i in rng.choice(rows, 10, replace=False)] + workload.new_ids(10)
                batch = workload._rows(rng, ids)
                t0 = time.perf_counter()
                result = col.upsert(batch)
                taken[path].append(time.perf_counter() - t0)
                assert (result.inserted, result.updated) == (10, 10), result
        finally:
            store_module.INDEXED_MERGE_MIN_ROWS = threshold
            store.close()
    return {path: statistics.median(times) for path, times in taken.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="140000,1000000", help="collection sizes, comma-separated")
    p.add_argument("--writes", type=int, default=60, help="upserts per size (half each way)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    report = Report(machine=machine(), params=dict(vars(args)))
    for rows in (int(r) for r in args.rows.split(",")):
        medians = measure(rows, args.writes)
        report.add(f"20-row upsert (10 updates) into {rows:,} rows, ms: through the id index "
                   "(ref: merged by a scan of id)", 1e3 * medians["index"], 1e3 * medians["scan"],
                   kind="latency", unit="ms")
        print(f"{rows:,} rows: index {1e3 * medians['index']:.1f} ms, scan {1e3 * medians['scan']:.1f} ms",
              flush=True)
    print(f"\n{render(report)}\n\nINDEXED_MERGE_MIN_ROWS = {store_module.INDEXED_MERGE_MIN_ROWS:,}")
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
