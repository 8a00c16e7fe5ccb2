"""A group commit's merge handed to LanceDB in its writers' chunks against as one record
batch, alone and beside busy Python threads, in one run, on the soak's rows.

A collection of ``--rows`` rows of ``bench/soak.py``'s workload is loaded through
``Collection.upsert`` and optimised (no background maintenance). Then ``--merges`` merges
of what a 16-writer group commit carries (16 upserts of 20 rows, 10 new ids and 10
existing ones each; validated, timestamped and joined as the group commit does) go to
LanceDB's ``merge_insert`` on ``id``, alternating between

* ``one batch``: the group's rows copied into one record batch (``indexing.store._one_batch``,
  what assay does up to ``ONE_BATCH_MAX_ROWS`` rows);
* ``chunks`` (the reference): the 16 chunks as they are.

This is repeated with ``--busy`` threads (default 0 and 1) running pure Python meanwhile,
as the server's handlers do while a commit runs (validating the next writes, searches).
It prints the median ms per merge of each and the ratio (chunks / one batch: above 1 one
batch is faster).

Usage::

    uv run --frozen python bench/group_batches.py [--rows 80000] [--merges 12] [--busy 0,1] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Report, machine, render  # noqa: E402
from bench.soak import CLASSES, COLLECTION, MODEL, SPACE, Workload  # noqa: E402
from indexing.store import Store, _one_batch  # noqa: E402

WRITERS = 16


def spin(stop: threading.Event) -> None:
    """Pure Python until ``stop``: a thread that wants the GIL whenever it can have it."""
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def measure(rows: int, merges: int, busy: int, *, seed: int = 0) -> dict[str, float]:
    """Median seconds per merge of a 16-writer group, each way, beside ``busy`` spinning
    threads; the ways alternate, so noise and the collection's growth hit both alike."""
    workload = Workload(rows=rows, dim=64, batch=20, seed=seed)
    rng = np.random.default_rng(seed)
    taken: dict[str, list[float]] = {"one batch": [], "chunks": []}
    with tempfile.TemporaryDirectory(prefix="assay-group-batches-") as tmp:
        store = Store(tmp, optimize_every=0)
        stop = threading.Event()
        spinners = [threading.Thread(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
        try:
            col = store.create_collection(COLLECTION, spaces={SPACE: 64}, models={MODEL: CLASSES})
            for start in range(0, rows, 10_000):
                col.upsert(workload._rows(rng, [f"i{i:09d}" for i in range(start, min(rows, start + 10_000))]))
            col.optimize()
            for t in spinners:
                t.start()
            for k in range(merges):
                way = list(taken)[k % 2]
                updated = rng.choice(rows, 10 * WRITERS, replace=False)
                parts = [col.prepare(workload._rows(rng, [f"i{i:09d}" for i in updated[10 * w:10 * w + 10]]
                                                    + workload.new_ids(10))).table for w in range(WRITERS)]
                joined = pa.concat_tables(parts)
                _, found, created = col._existing_ids(joined.column("id"))
                batch, _ = col._with_timestamps(joined, found, created)
                data = _one_batch(batch) if way == "one batch" else batch
                assert len(data.to_batches()) == (1 if way == "one batch" else WRITERS)
                t0 = time.perf_counter()
                col._merge().when_not_matched_insert_all().execute(data)
                taken[way].append(time.perf_counter() - t0)
        finally:
            stop.set()
            for t in spinners:
                t.join()
            store.close()
    return {way: statistics.median(times) for way, times in taken.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=80_000, help="rows in the collection")
    p.add_argument("--merges", type=int, default=12, help="merges per setting (half each way)")
    p.add_argument("--busy", default="0,1", help="busy Python threads beside the merges, comma-separated")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    report = Report(machine=machine(), params=dict(vars(args)))
    for busy in (int(b) for b in args.busy.split(",")):
        medians = measure(args.rows, args.merges, busy)
        report.add(f"merge of a {WRITERS}-writer group (320 rows, 160 updates) into {args.rows:,} rows beside "
                   f"{busy} busy Python thread(s), ms: one batch (ref: its {WRITERS} chunks)",
                   1e3 * medians["one batch"], 1e3 * medians["chunks"], kind="latency", unit="ms")
        print(f"busy {busy}: one batch {1e3 * medians['one batch']:.1f} ms, chunks {1e3 * medians['chunks']:.1f} ms",
              flush=True)
    print(f"\n{render(report)}")
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
