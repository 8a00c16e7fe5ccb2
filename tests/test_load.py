"""Load: 16 clients (threads, each its own Client) mixing searches, upserts, queries/pages
and mining runs against one in-process server for a bounded time (``ASSAY_LOAD_SECONDS``,
default 12). No call may fail, every acknowledged insert is there once, and the process
(server and clients) may not grow by more than 1.5 GiB. The p50/p99 latency per operation
is printed (``pytest -s``) and attached to the test report (``record_property``).

The workload is :mod:`bench.soak`'s; ``python bench/soak.py`` runs it for minutes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from bench.common import ServerProcess
from bench.soak import OPS, LoadResult, Workload, run_load, server_cpu
from service.client import Client
from service.server import ServerConfig, start_server

SECONDS = float(os.environ.get("ASSAY_LOAD_SECONDS", "6"))
CLIENTS = 16
RSS_CEILING = int(1.5 * 2**30)

pytestmark = pytest.mark.slow


def test_sixteen_clients_mixing_search_upsert_query_and_mining(tmp_path, record_property):
    server = start_server(ServerConfig(data=str(tmp_path / "load"), port=0, grace_s=2))
    try:
        workload = Workload(rows=5000, dim=32, batch=20, seed=0)
        with Client(server.address, timeout=120) as client:
            workload.setup(client)
        result = run_load(server.address, workload, clients=CLIENTS, seconds=SECONDS, seed=1)
    finally:
        server.stop(2)
    print("\n" + result.summary())
    for op in OPS:
        stats = result.stats(op)
        for key, value in stats.items():
            record_property(f"{op}_{key}", round(value, 2))
    record_property("rss_after_setup_mb", round(result.rss[0][1] / 2**20))
    record_property("rss_growth_mb", round(result.rss_growth / 2**20))
    record_property("errors", len(result.errors))

    assert not result.errors, "\n".join(result.errors[:10])
    for op in OPS:
        assert result.stats(op)["calls"] > 0, f"no {op} completed in {SECONDS}s"
    assert result.final_rows == result.distinct_ids == result.initial_rows + result.inserted
    assert result.rss_growth < RSS_CEILING, f"RSS grew by {result.rss_growth / 2**20:.0f} MB"


def test_server_cpu_per_window_from_the_samples():
    # server_cpu: CPU between the first and last sample inside the span, per second and per
    # operation started between those two samples (direct computation on made-up samples).
    result = LoadResult(seconds=20.0, clients=1, errors=[], rss=[(0.0, 0)],
                        latencies={op: [] for op in OPS},
                        samples=[{"t": 0.0, "cpu": 1.0}, {"t": 5.0, "cpu": 2.0}, {"t": 10.0, "cpu": 6.0},
                                 {"t": 15.0, "cpu": 6.5}])
    result.latencies["search"] = [(t, 0.01) for t in np.linspace(5.0, 9.9, 40)]
    result.latencies["mine"] = [(6.0, 1.0), (12.0, 1.0)]
    got = server_cpu(result, 4.0, 11.0)  # samples at 5 and 10 s: 4 CPU-s over 5 s, 41 operations
    assert got["cores"] == pytest.approx(0.8)
    assert got["ms_per_op"] == pytest.approx(4000 / 41)
    assert np.isnan(server_cpu(result, 16.0, 20.0)["cores"])  # fewer than two samples


def test_server_process_cpu_seconds_reads_proc(tmp_path):
    # the reading of /proc/<pid>/stat, on this very process: it has used at least the CPU
    # burnt here, and no more than Python's own count of it
    proc = ServerProcess(str(tmp_path), str(tmp_path))
    assert proc.cpu_seconds() == 0.0  # not started
    proc.proc = types.SimpleNamespace(pid=os.getpid())
    sum(i * i for i in range(3_000_000))
    used, own = proc.cpu_seconds(), time.process_time()
    assert 0.05 < used <= own + 0.02


def test_a_benchmark_stopped_with_sigterm_stops_its_server(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The benchmark works in short steps, as benchmarks do: Python runs a signal handler
    # between bytecodes, so a SIGTERM landing between the print and one long time.sleep(300)
    # (the test sends it as soon as it reads the line) waited for the whole sleep.
    script = (f"import sys, time\nsys.path.insert(0, {root!r})\nfrom bench.common import ServerProcess\n"
              f"p = ServerProcess({str(tmp_path / 'data')!r}, {str(tmp_path / 'logs')!r})\np.start()\n"
              "print(p.pid, flush=True)\nfor _ in range(3000):\n    time.sleep(0.1)\n")
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root)
    server = None
    try:
        server = int(bench.stdout.readline())
        os.kill(server, 0)  # serving
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the benchmark
            os.kill(server, 0)
    finally:
        bench.kill()
        if server is not None:  # (left running when the test fails)
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)


def test_one_batch_upsert_bench_times_the_unary_call_against_the_stream(tmp_path):
    import json

    from bench import one_batch_upsert

    assert one_batch_upsert.main(["--rows", "200", "--writes", "4", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["measure"].split(",")[0] for r in rows] == ["20-row upsert", "client CPU per upsert",
                                                          "server CPU per upsert"]
    assert all(r["assay"] >= 0 and r["reference"] >= 0 for r in rows) and rows[0]["assay"] > 0


def test_group_batches_bench_times_both_ways(tmp_path):
    import json

    from bench import group_batches

    assert group_batches.main(["--rows", "3000", "--merges", "4", "--busy", "0",
                               "--json", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["assay"] > 0 and row["reference"] > 0 and row["ratio"] == row["reference"] / row["assay"]


def test_upsert_merge_bench_times_both_paths_and_restores_the_threshold(tmp_path):
    import json

    import indexing.store as store_module
    from bench import upsert_merge

    before = store_module.INDEXED_MERGE_MIN_ROWS
    assert upsert_merge.main(["--rows", "3000", "--writes", "4", "--json", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["assay"] > 0 and row["reference"] > 0 and row["ratio"] == row["reference"] / row["assay"]
    assert before == store_module.INDEXED_MERGE_MIN_ROWS
