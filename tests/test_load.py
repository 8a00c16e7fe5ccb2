"""Load: 16 clients (threads, each its own Client) mixing searches, upserts, queries/pages
and mining runs against one in-process server for a bounded time (``ASSAY_LOAD_SECONDS``,
default 12). No call may fail, every acknowledged insert is there once, and the process
(server and clients) may not grow by more than 1.5 GiB. The p50/p99 latency per operation
is printed (``pytest -s``) and attached to the test report (``record_property``).

The workload is :mod:`bench.soak`'s; ``python bench/soak.py`` runs it for minutes.
"""

from __future__ import annotations

import os

import pytest

from bench.soak import OPS, Workload, run_load
from service.client import Client
from service.server import ServerConfig, start_server

SECONDS = float(os.environ.get("ASSAY_LOAD_SECONDS", "12"))
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
