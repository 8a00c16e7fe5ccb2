"""One run record: RunSpec is the request, the persisted record (the `_runs` schema is
derived from it), each chain stage and the protobuf mapping; data roots written before it
open unchanged, and integer parameters stay integers end to end."""

from __future__ import annotations

import json
import time
from dataclasses import fields

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from conftest import lance_operations

from indexing.errors import NotFound
from indexing.settings import (
    RUNS_MAINTAIN_EVERY,
    SYSTEM_INDEX_CACHE_BYTES,
    SYSTEM_METADATA_CACHE_BYTES,
)
from indexing.store import Store
from miners.runs import REQUEST_FIELDS, RUNS_SCHEMA, STAGE_FIELDS, RunSpec, RunStore
from protos.assay.v1 import mining_pb2
from service.client import Client
from service.client.rpc import rpc_rerun, rpc_start_mining, run_to_dict
from service.mining import run_from_request, run_to_proto
from service.server import ServerConfig, start_server

# `_runs` as main wrote it before RunSpec (miners/runs.py `_RUNS_SCHEMA`, commit ca7b095),
# written out here so that a change of RunSpec that would need a migration shows up.
MAIN_RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("job_id", pa.string()),
    pa.field("collection", pa.string()),
    pa.field("miner", pa.string()),
    pa.field("model", pa.string()),
    pa.field("space", pa.string()),
    pa.field("where", pa.string()),
    pa.field("reference_where", pa.string()),
    pa.field("size", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("reverse", pa.bool_()),
    pa.field("params", pa.string()),
    pa.field("version", pa.int64()),
    pa.field("state", pa.string()),
    pa.field("progress", pa.float64()),
    pa.field("rows_scanned", pa.int64()),
    pa.field("rows_skipped", pa.int64()),
    pa.field("results", pa.int64()),
    pa.field("error", pa.string()),
    pa.field("timings", pa.string()),
    pa.field("created_at", pa.float64()),
    pa.field("finished_at", pa.float64()),
    pa.field("graph", pa.string()),
])
GRAPH = {"pool": {"method": "faiss-ivf-flat nlist=64 nprobe=8", "k": 20, "recall": 0.97, "recall_sample": 500,
                  "target_recall": 0.95, "below_target": False, "rows": 5000, "queries": 5000, "nlist": 64,
                  "nprobe": 8, "build_s": 0.5, "recall_s": 0.1, "search_s": 0.7, "device": "cpu", "cached": False,
                  "radius": 0.0, "exact_query_s": 2e-4, "ivf_query_s": 1e-4}}


def _main_row(run_id: str, **over) -> dict:
    """A `_runs` row exactly as main's RunRecord.to_row wrote it (params and graph as sorted
    JSON, timings as JSON, every column set)."""
    row = dict(run_id=run_id, job_id="j1", collection="c", miner="lof", model="", space="v", where="label IS NULL",
               reference_where="", size=10, seed=3, reverse=False, version=4, state="SUCCEEDED", progress=1.0,
               rows_scanned=100, rows_skipped=2, results=10, error="", created_at=10.0, finished_at=12.0,
               params=json.dumps({"k": 20, "stochastic": "none", "temperature": 1.0}, sort_keys=True),
               timings=json.dumps({"load_s": 0.1, "total_s": 0.4}), graph=json.dumps(GRAPH, sort_keys=True))
    row.update(over)
    return row


# Fields added since (issue 21: SEALS candidates, the miner's stats; issue 19: the object
# filter of runs over box embeddings): nullable, so an existing `_runs` gains them as null
# columns (in RunSpec's order) and old records read back with the defaults.
ADDED_FIELDS = [pa.field("candidates", pa.string()), pa.field("candidates_k", pa.int64()),
                pa.field("objects_where", pa.string()), pa.field("stats", pa.string())]


def test_the_runs_schema_is_derived_and_extends_the_one_main_wrote():
    by_name = {f.name: f for f in RUNS_SCHEMA}
    assert set(by_name) == set(MAIN_RUNS_SCHEMA.names) | {f.name for f in ADDED_FIELDS}
    for f in [*MAIN_RUNS_SCHEMA, *ADDED_FIELDS]:
        assert by_name[f.name] == f, f.name
    assert [f.name for f in fields(RunSpec)] == RUNS_SCHEMA.names


def test_a_runs_table_written_by_main_opens_and_takes_new_runs(tmp_path):
    db = lancedb.connect(str(tmp_path))
    table = db.create_table("_runs", schema=MAIN_RUNS_SCHEMA)
    table.add(pa.Table.from_pylist([_main_row("old1"), _main_row("old2", graph=None, state="FAILED",
                                                                   error="boom", results=0)],
                                   schema=MAIN_RUNS_SCHEMA))
    runs = RunStore(Store(str(tmp_path)))
    old = runs.get("old1")
    assert old.params == {"k": 20, "stochastic": "none", "temperature": 1.0}
    assert isinstance(old.params["k"], int) and isinstance(old.params["temperature"], float)
    assert (old.graph, old.timings, old.version, old.where) == (GRAPH, {"load_s": 0.1, "total_s": 0.4}, 4,
                                                                "label IS NULL")
    assert runs.get("old2").graph == {} and runs.get("old2").error == "boom"
    new = runs.new_run(RunSpec(collection="c", miner="margin", size=5, model="m", version=4, params={"k": 3}))
    runs.update(new, state="SUCCEEDED", graph=GRAPH)
    assert runs.get(new.run_id).graph == GRAPH and runs.get(new.run_id).params == {"k": 3}
    assert {r.run_id for r in runs.list("c")} == {"old1", "old2", new.run_id}
    # nothing rewritten: the new fields were appended as null columns
    assert lancedb.connect(str(tmp_path)).open_table("_runs").schema == pa.schema([*MAIN_RUNS_SCHEMA,
                                                                                   *ADDED_FIELDS])
    assert old.seed == 3 and old.stats == {} and old.candidates == "" and old.candidates_k == 0 and old.objects_where == ""


def test_a_new_run_field_reaches_an_existing_root_as_a_null_column(tmp_path):
    """What adding a (defaulted) RunSpec field does to a data root: `system_table` adds the
    column, old rows read back with the default, and records keep being written."""
    store = Store(str(tmp_path))
    runs = RunStore(store)
    first = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
    newer = pa.schema([*RUNS_SCHEMA, pa.field("new_field", pa.string())])
    store.system_table("_runs", newer, "run_id")  # as a version of RunSpec with `new_field` would open it
    assert "new_field" in lancedb.connect(str(tmp_path)).open_table("_runs").schema.names
    runs = RunStore(Store(str(tmp_path)))  # this version: the extra column is kept and left null
    assert runs.get(first.run_id) == first
    second = runs.new_run(RunSpec(collection="c", miner="entropy", size=3, version=1))
    assert runs.get(second.run_id).miner == "entropy"
    rows = lancedb.connect(str(tmp_path)).open_table("_runs").to_arrow()
    assert rows.column("new_field").null_count == 2


def test_the_request_and_the_record_are_the_proto_messages_by_name():
    request = {f.name for f in mining_pb2.StartMiningRequest.DESCRIPTOR.fields}
    record = {f.name for f in mining_pb2.MiningRun.DESCRIPTOR.fields}
    spec = {f.name for f in fields(RunSpec)}
    assert request == set(REQUEST_FIELDS)
    # MiningRun: every RunSpec field but the job id (the message carries the whole job) and
    # progress (the job's), plus the job and params_json
    assert spec - record == {"job_id", "progress"} and record - spec == {"job", "params_json"}
    assert set(STAGE_FIELDS) < set(REQUEST_FIELDS)


def test_a_record_goes_to_the_proto_and_back_to_the_same_request():
    rec = RunSpec(run_id="r1", collection="c", miner="novelty", size=12, model="m", space="v", where="label IS NULL",
                  reference_where="split = 'train'", seed=9, reverse=True, version=7, state="SUCCEEDED",
                  params={"k": 20, "method": "lof", "temperature": 1.0, "stages": [{"size": 3}]}, rows_scanned=90,
                  rows_skipped=1, results=12, timings={"load_s": 0.25, "total_s": 1.0}, created_at=5.0,
                  finished_at=6.0, graph=GRAPH)
    run = run_to_dict(run_to_proto(rec, jobs=None))
    for name in set(REQUEST_FIELDS) | {"run_id", "state", "rows_scanned", "rows_skipped", "results", "timings",
                                       "created_at", "finished_at", "graph"}:
        assert run[name] == getattr(rec, name), name
    assert type(run["params"]["k"]) is int and type(run["params"]["temperature"]) is float
    assert type(run["params"]["stages"][0]["size"]) is int
    again = run_from_request(rpc_rerun(run).request)
    assert {n: getattr(again, n) for n in REQUEST_FIELDS} == {n: getattr(rec, n) for n in REQUEST_FIELDS}


def test_unset_request_fields_keep_the_defaults():
    req = run_from_request(rpc_start_mining("c", "margin", 4, model="m").request)
    # seed None: the server records 0, or a fresh seed for a sampling miner (test_mining_select)
    assert (req.seed, req.version, req.params, req.where, req.reverse) == (None, None, {}, "", False)
    assert (req.candidates, req.candidates_k) == ("", 0)
    assert run_from_request(rpc_start_mining("c", "margin", 4, seed=0, version=0).request).version == 0


def test_integer_parameters_stay_integers_through_the_server(tmp_path):
    srv = start_server(ServerConfig(data=str(tmp_path), port=0, grace_s=1))
    try:
        with Client(srv.address) as client:
            col = client.create_collection("p", spaces={"v": {"dim": 3, "metric": "l2"}}, models={"m": ["a", "b"]})
            rng = np.random.default_rng(1)
            col.upsert([{"id": f"r{i}", "emb_v": rng.normal(size=3).tolist(),
                         "pred_m": {"probs": [p := float(rng.uniform()), 1 - p]}} for i in range(40)])
            job = col.mine("lof", 5, space="v", params={"k": 7})
            job.wait(timeout=60)
            params = job.run()["params"]
            assert params["k"] == 7 and type(params["k"]) is int
            assert type(params["temperature"]) is float
            assert [r["params"]["k"] for r in client.runs("p")] == [7]
            chain = col.mine("chain", 3, model="m", space="v", params={"stages": [
                {"miner": "margin", "size": 10}, {"miner": "coreset"}]})
            chain.wait(timeout=60)
            assert [type(s["size"]) for s in chain.run()["params"]["stages"]] == [int, int]
            lof = next(m for m in client.miners() if m["name"] == "lof")
            k = next(p for p in lof["params"] if p["name"] == "k")
            assert (k["default"], k["min"], k["max"]) == (20, 1, 1000) and type(k["default"]) is int
            assert job.rerun().wait(timeout=60).run()["params"] == params
    finally:
        srv.stop(1)


@pytest.mark.parametrize("bad", [{"nonsense": 1}, {"runid": "x"}])
def test_the_client_refuses_an_unknown_run_field(bad):
    from service.client import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
        rpc_start_mining("c", "margin", 3, **bad)


def test_a_runs_progress_is_held_in_memory_and_written_with_its_end(tmp_path):
    runs = RunStore(Store(str(tmp_path)))
    table = lancedb.connect(str(tmp_path)).open_table("_runs")

    def stored(run_id):
        table.checkout_latest()
        return {r["run_id"]: r for r in table.to_arrow().to_pylist()}[run_id], table.version

    rec = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
    row, written = stored(rec.run_id)
    assert row["state"] == "PENDING"
    # the job notes RUNNING; the request that started it notes the job id after that
    runs.note(rec, state="RUNNING", progress=0.0)
    runs.note(rec, job_id="j1")
    now = runs.get(rec.run_id)
    assert (now.state, now.job_id) == ("RUNNING", "j1")
    assert [(r.state, r.job_id) for r in runs.list("c")] == [("RUNNING", "j1")]
    row, version = stored(rec.run_id)
    assert row["state"] == "PENDING" and version == written  # nothing written meanwhile
    # a crash now: the next server finds it PENDING and marks it INTERRUPTED
    after_crash = RunStore(Store(str(tmp_path)))
    assert after_crash.get(rec.run_id).state == "PENDING"
    # the run's end writes what was noted with it, once
    done = runs.update(now, state="SUCCEEDED", results=5)
    row, version = stored(rec.run_id)
    assert (row["state"], row["job_id"], row["results"]) == ("SUCCEEDED", "j1", 5) and version == written + 1
    assert runs.get(rec.run_id) == done
    assert after_crash.mark_interrupted() == 0  # it ended before that server looked


def test_run_records_are_read_once_then_served_from_memory(tmp_path):
    store = Store(str(tmp_path))
    rec = RunStore(store).new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
    runs = RunStore(Store(str(tmp_path)))  # a fresh server: not in its memory yet
    assert runs.get(rec.run_id) == rec
    lancedb.connect(str(tmp_path)).open_table("_runs").delete("true")  # behind its back
    assert runs.get(rec.run_id) == rec
    with pytest.raises(NotFound):
        RunStore(Store(str(tmp_path))).get(rec.run_id)


def test_recent_results_are_served_from_memory_as_the_table_gives_them(tmp_path, monkeypatch):
    import miners.runs as runs_module

    monkeypatch.setattr(runs_module, "RESULTS_HELD", 2)
    monkeypatch.setattr(runs_module, "RESULTS_HELD_ROWS", 3)
    runs = RunStore(Store(str(tmp_path)))
    recs = [runs.new_run(RunSpec(collection="c", miner="margin", size=3, version=1)) for _ in range(4)]
    # ranks written in rank order; one run with related ids and boxes, one of 4 picks (not held)
    runs.write_results(recs[0], ["a", "b", "c"], np.array([0.9, 0.5, 0.1]))
    runs.write_results(recs[1], ["d", "e"], np.array([0.7, 0.6]), related=["x", None], boxes=[2, 0])
    runs.write_results(recs[2], ["f", "g", "h", "i"], np.array([4.0, 3.0, 2.0, 1.0]))
    runs.write_results(recs[3], ["j"], np.array([0.3]))
    held = {rec.run_id: runs.results(rec.run_id) for rec in recs}
    assert list(runs._held_results) == [recs[1].run_id, recs[3].run_id]  # the newest 2 of at most 3 picks
    # what a fresh server reads from the table is what was served, for every run
    fresh = RunStore(Store(str(tmp_path)))
    for rec in recs:
        assert fresh.results(rec.run_id).equals(held[rec.run_id])
    lancedb.connect(str(tmp_path)).open_table("_run_results").delete(
        f"run_id IN ('{recs[1].run_id}', '{recs[3].run_id}')")  # behind its back: served from memory
    assert runs.results(recs[1].run_id).equals(held[recs[1].run_id])
    assert runs.results(recs[3].run_id).num_rows == 1
    assert held[recs[0].run_id].column_names == ["id", "rank", "score"]
    assert held[recs[1].run_id].to_pydict() == {"id": ["d", "e"], "rank": [1, 2], "score": [0.7, 0.6],
                                                "related_id": ["x", None], "box": [2, 0]}
    assert RunStore(Store(str(tmp_path))).results(recs[1].run_id).num_rows == 0  # deleted: from memory
    assert held[recs[2].run_id]["id"].to_pylist() == ["f", "g", "h", "i"]


def _wait_for_maintenance(runs: RunStore) -> None:
    """The run tables' maintenance runs in a background thread: wait until it has ended."""
    for _ in range(400):
        if not runs._maintaining:
            return
        time.sleep(0.05)
    raise AssertionError("the maintenance of the run tables did not end")


def test_run_tables_use_their_own_bounded_cache_not_the_collections(tmp_path):
    """Every compaction of ``_runs``/``_run_results`` re-indexes their BTREE, and each index
    version left pages in LanceDB's cache: in one cache shared with the collections (bounded
    at 1 GiB for vector indexes) they piled up run after run. Assay's own tables now have a
    cache of their own, bounded small; the collections' cache does not see them."""
    store = Store(str(tmp_path), index_cache_bytes=1 << 30)
    runs = RunStore(store)
    shared_before = store.session.size_bytes
    for i in range(3 * RUNS_MAINTAIN_EVERY):  # several compactions and re-indexings
        rec = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
        runs.write_results(rec, [f"r{i}-{j}" for j in range(5)], np.arange(5, dtype=float))
        runs.update(rec, state="SUCCEEDED")
        assert runs.get(rec.run_id).state == "SUCCEEDED"
    _wait_for_maintenance(runs)
    assert runs._runs.list_indices(), "the maintenance gave _runs its BTREE"
    assert runs.results(rec.run_id).num_rows == 5
    assert store.session.size_bytes == shared_before, (shared_before, store.session.size_bytes)
    assert 0 < store.system_session.size_bytes <= SYSTEM_INDEX_CACHE_BYTES + SYSTEM_METADATA_CACHE_BYTES


def test_run_tables_compaction_leaves_big_fragments_and_drops_old_versions(tmp_path, monkeypatch):
    """The run tables are compacted by size tiers: the small fragments that run after run
    appends are merged, a big fragment (20,000 results of earlier runs) is never rewritten
    — compacting every fragment under 32,768 rows rewrote it at each maintenance, so a
    mining run's cost grew with the runs kept — and old versions go when the cleanup is due."""
    from indexing import maintenance

    runs = RunStore(Store(str(tmp_path)))
    runs._upkeep.cleanup_every_s = float("inf")  # no cleanup until the end, however slow the loop
    old = runs.new_run(RunSpec(collection="c", miner="margin", size=20_000, version=1))
    runs.write_results(old, [f"o{j:05d}" for j in range(20_000)], np.linspace(1, 0, 20_000))
    big = max(runs._results.to_lance().get_fragments(), key=lambda f: f.metadata.physical_rows)
    assert big.metadata.physical_rows == 20_000

    recs = []
    for i in range(2 * RUNS_MAINTAIN_EVERY):
        rec = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
        runs.write_results(rec, [f"r{i}-{j}" for j in range(5)], np.arange(5, dtype=float))
        recs.append(runs.update(rec, state="SUCCEEDED"))
        _wait_for_maintenance(runs)
    frags = runs._results.to_lance().get_fragments()
    kept = [f for f in frags if f.fragment_id == big.fragment_id]
    assert kept and kept[0].metadata.physical_rows == 20_000  # the same fragment, not rewritten
    assert len(frags) <= 1 + runs._upkeep.policy.fanout, len(frags)  # the small ones were merged
    assert len(runs._runs.to_lance().get_fragments()) <= runs._upkeep.policy.fanout
    assert runs.results(old.run_id).num_rows == 20_000
    assert all(runs.results(r.run_id).column("id").to_pylist() == [f"r{i}-{j}" for j in range(5)]
               for i, r in enumerate(recs))

    # old versions: kept until the cleanup is due, then only the retention window's
    versions = len(runs._results.to_lance().versions())
    assert versions > 2 * RUNS_MAINTAIN_EVERY  # every append and compaction is one
    monkeypatch.setattr(maintenance, "SYSTEM_TABLE_RETENTION", maintenance.timedelta(0))
    runs._upkeep.cleanup_every_s = 0.0
    runs._maintain()
    assert len(runs._results.to_lance().versions()) == 1
    assert runs.results(old.run_id).num_rows == 20_000


def test_a_new_runs_record_is_appended_and_its_later_ones_merged(tmp_path):
    """A run's first record is known to be new (a fresh run id): appended, not merged (a
    merge joins on run_id across the table); its end is a merge, one row per run."""
    runs = RunStore(Store(str(tmp_path)))
    table = lancedb.connect(str(tmp_path)).open_table("_runs")
    first = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
    second = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
    assert lance_operations(table, 2) == ["Append", "Append"]
    runs.update(first, state="SUCCEEDED", results=5)
    assert lance_operations(table, 1) == ["Update"]
    rows = {r["run_id"]: r["state"] for r in table.to_arrow().to_pylist()}
    assert rows == {first.run_id: "SUCCEEDED", second.run_id: "PENDING"}


def test_a_run_record_held_back_after_a_failed_write_is_merged_not_appended(tmp_path, monkeypatch):
    """A record that could not be saved goes with the next one; that write is a merge even
    for a new run's first record: one row per run, each in its newest state."""
    runs = RunStore(Store(str(tmp_path)))
    table = lancedb.connect(str(tmp_path)).open_table("_runs")
    rec = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
    original = runs._runs.merge_insert

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs._runs, "merge_insert", disk_full)
    kept = runs.update_or_keep(rec, state="SUCCEEDED", results=5)  # kept in memory
    monkeypatch.setattr(runs._runs, "merge_insert", original)
    other = runs.new_run(RunSpec(collection="c", miner="margin", size=5, version=1))
    assert lance_operations(table, 1) == ["Update"]  # with the held record: merged
    rows = {r["run_id"]: r["state"] for r in table.to_arrow().to_pylist()}
    assert rows == {rec.run_id: "SUCCEEDED", other.run_id: "PENDING"}
    assert runs.get(rec.run_id) == kept
