"""One writer's small upserts: the unary ``UpsertBatch`` call against an ``Upsert`` stream of
one message, in one run, through ``assay serve`` in its own process.

A collection of ``--rows`` rows of ``bench/soak.py``'s workload is loaded; then one client
sends ``--writes`` upserts of 20 rows (10 new ids, 10 existing), one at a time, alternating
in blocks of ten between the two ways the client can send them:

* ``unary``: a table in memory that fits one batch, which the client sends as one
  ``UpsertBatch`` call;
* ``stream`` (the reference): the same table behind an iterator, which the client always
  streams — what it sent for every upsert before ``UpsertBatch``.

For each it prints the median latency, the client's CPU (this process, gRPC's threads
included) and the server's CPU (``/proc``, background maintenance included: the two ways
alternate, so it falls on both alike, but in bursts — compare several runs) per upsert,
and the ratios (stream / unary: above 1 the unary call is cheaper).

Usage::

    uv run --frozen python bench/one_batch_upsert.py [--rows 20000] [--writes 400] [--json PATH]
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

from bench.common import Report, ServerProcess, machine, render  # noqa: E402
from bench.soak import COLLECTION, Workload  # noqa: E402
from service.client import Client  # noqa: E402
from service.client.convert import to_arrow  # noqa: E402

WAYS = ("unary", "stream")


def measure(rows: int, writes: int, *, block: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per way: median latency (s), client and server CPU (s) per 20-row upsert. The ways
    alternate in blocks of ``block`` upserts, CPU read around each block (the server's
    ``/proc`` counts in 10-ms ticks); the first two blocks warm both up."""
    workload = Workload(rows=rows, dim=64, batch=20, seed=seed)
    rng = np.random.default_rng(seed)
    taken: dict[str, dict[str, list[float]]] = {w: {"latency": [], "client": [], "server": []} for w in WAYS}
    with tempfile.TemporaryDirectory(prefix="assay-one-batch-") as tmp:
        server = ServerProcess(os.path.join(tmp, "data"), tmp)
        try:
            with Client(server.start(), timeout=60) as client:
                workload.setup(client)
                col = client.collection(COLLECTION)
                for b in range(2 + max(2, writes // block)):
                    way = WAYS[b % 2]
                    tables = [to_arrow(workload._rows(rng, [f"i{i:09d}" for i in rng.choice(rows, 10, replace=False)]
                                                      + workload.new_ids(10)))  # as the client converts a dict
                              for _ in range(block)]
                    latencies = []
                    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
                    for table in tables:
                        t0 = time.perf_counter()
                        result = col.upsert(table if way == "unary" else iter([table]))
                        latencies.append(time.perf_counter() - t0)
                        assert (result.inserted, result.updated, result.batches) == (10, 10, 1), result
                    if b >= 2:
                        taken[way]["latency"].extend(latencies)
                        taken[way]["client"].append((time.process_time() - client_cpu) / block)
                        taken[way]["server"].append((server.cpu_seconds() - server_cpu) / block)
        finally:
            server.stop()
    return {way: {"latency": statistics.median(t["latency"]), "client": statistics.fmean(t["client"]),
                  "server": statistics.fmean(t["server"])} for way, t in taken.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000, help="rows loaded before the writes")
    p.add_argument("--writes", type=int, default=400, help="upserts (half each way)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    report = Report(machine=machine(), params=dict(vars(args)))
    got = measure(args.rows, args.writes)
    unary, stream = got["unary"], got["stream"]
    report.add("20-row upsert, one writer: p50 latency, ms (ref: a stream of one message)",
               1e3 * unary["latency"], 1e3 * stream["latency"], kind="latency", unit="ms")
    report.add("client CPU per upsert, ms (ref: the stream)", 1e3 * unary["client"], 1e3 * stream["client"],
               kind="cost", unit="ms")
    report.add("server CPU per upsert, ms (ref: the stream)", 1e3 * unary["server"], 1e3 * stream["server"],
               kind="cost", unit="ms")
    print(f"\n{render(report)}")
    if args.json:
        report.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
