"""Versioned datasets on real LanceDB tables (indexing.datasets)."""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

from indexing import datasets as ds_mod
from indexing.datasets import Datasets, lance_tag
from indexing.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

LABELS = ["cat", "dog", "bird"]


def _rows(n: int, *, start: int = 0, label_shift: int = 0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(start, start + n):
        p = rng.dirichlet(np.ones(3)).astype(np.float32)
        p = (p / p.sum()).tolist()
        rows.append({
            "id": f"r{i:04d}",
            "label": LABELS[(i + label_shift) % 3],
            "split": "train" if i % 2 == 0 else "val",
            "emb_e": rng.standard_normal(4).astype(np.float32).tolist(),
            "pred_m": {"probs": p},
        })
    return rows


@pytest.fixture
def col(store):
    c = store.create_collection("items", spaces={"e": {"dim": 4, "metric": "l2"}}, models={"m": LABELS},
                                fields={"split": pa.string()})
    c.upsert(_rows(40))
    return c


@pytest.fixture
def dsets(store) -> Datasets:
    from miners.runs import RunStore

    return Datasets(store, run_ids=RunStore(store).result_ids)


def _ids(arr) -> set[str]:
    return set(arr.to_pylist())


def test_create_list_get_and_names(dsets, col):
    info = dsets.create("train-set", "items", "first")
    assert (info.name, info.collection, info.head, info.members) == ("train-set", "items", 0, 0)
    with pytest.raises(AlreadyExists):
        dsets.create("train-set", "items")
    with pytest.raises(InvalidArgument, match="dataset name"):
        dsets.create("../evil", "items")
    with pytest.raises(NotFound):
        dsets.create("other", "no-such-collection")
    dsets.create("b", "items")
    assert [d.name for d in dsets.list()] == ["b", "train-set"]
    assert [d.name for d in dsets.list("items")] == ["b", "train-set"]
    assert dsets.list("elsewhere") == []
    assert dsets.get("train-set").description == "first"
    with pytest.raises(NotFound):
        dsets.get("nope")


def test_add_by_ids_filter_remove_and_idempotence(dsets, col):
    dsets.create("d", "items")
    r = dsets.add("d", ids=["r0001", "r0002", "r0002"])
    assert (r.requested, r.changed, r.staged_adds) == (2, 2, 2)
    r = dsets.add("d", ids=["r0001", "r0003"])  # r0001 already a member: a no-op
    assert (r.changed, r.unchanged, r.staged_adds) == (1, 1, 3)
    assert dsets.members("d").to_pylist() == ["r0001", "r0002", "r0003"]
    dsets.add("d", where="split = 'train' AND label = 'cat'")  # i % 2 == 0 and i % 3 == 0
    expected = {"r0001", "r0002", "r0003"} | {f"r{i:04d}" for i in range(40) if i % 6 == 0}
    assert _ids(dsets.members("d")) == expected
    assert dsets.status("d").staged_adds == len(expected)
    c = dsets.commit("d", "first cut")
    assert (c.version, c.members, c.added, c.removed) == (1, len(expected), len(expected), 0)
    # Adding committed members again changes nothing and stages nothing.
    r = dsets.add("d", ids=["r0001", "r0000"])
    assert (r.changed, r.staged_adds, r.staged_removes) == (0, 0, 0)
    with pytest.raises(FailedPrecondition, match="nothing to commit"):
        dsets.commit("d", "again")

    r = dsets.remove("d", ids=["r0001", "r0005"])  # r0005 exists but is no member: a no-op
    assert (r.changed, r.unchanged, r.staged_removes) == (1, 1, 1)
    dsets.remove("d", where="label = 'cat'")
    expected2 = {i for i in expected if int(i[1:]) % 3 != 0} - {"r0001"}
    assert _ids(dsets.members("d")) == expected2 == {"r0002"}
    st = dsets.status("d")
    assert (st.staged_adds, st.staged_removes, st.members, st.head) == (0, len(expected) - 1, 1, 1)
    # Undoing a staged removal drops the staged row instead of stacking opposite ops.
    dsets.add("d", ids=["r0001"])
    assert dsets.status("d").staged_removes == len(expected) - 2
    # ... and undoing a staged add too.
    dsets.add("d", ids=["r0010"])
    dsets.remove("d", ids=["r0010"])
    assert dsets.status("d").staged_adds == 0
    assert _ids(dsets.members("d")) == {"r0001", "r0002"}
    assert _ids(dsets.members("d", 1)) == expected  # the commit is untouched


def test_unknown_ids_and_bad_arguments(dsets, col):
    dsets.create("d", "items")
    missing = [f"zz{i}" for i in range(7)]
    with pytest.raises(InvalidArgument) as err:
        dsets.add("d", ids=["r0001", *missing])
    msg = str(err.value)
    assert "7 id(s)" in msg and "'zz0'" in msg and "'zz4'" in msg and "'zz5'" not in msg and "2 more" in msg
    assert dsets.status("d").staged_adds == 0  # a rejected call writes nothing
    with pytest.raises(InvalidArgument, match="zz0"):
        dsets.remove("d", ids=["zz0"])
    with pytest.raises(InvalidArgument, match="exactly one"):
        dsets.add("d", ids=["r0001"], where="label = 'cat'")
    with pytest.raises(InvalidArgument, match="exactly one"):
        dsets.add("d")
    with pytest.raises(InvalidArgument):
        dsets.add("d", where="no_such_column = 1")
    with pytest.raises(InvalidArgument):
        dsets.add("d", ids="r0001")
    dsets.add("d", ids=["r0001"])
    with pytest.raises(InvalidArgument, match="message"):
        dsets.commit("d", "  ")
    with pytest.raises(NotFound):
        dsets.add("nope", ids=["r0001"])
    with pytest.raises(NotFound):
        dsets.members("d", 1)


def test_relabel_after_commit_checkout_returns_old_state(dsets, col, store):
    dsets.create("d", "items")
    dsets.add("d", ids=[f"r{i:04d}" for i in range(10)])
    c1 = dsets.commit("d", "v1", author="ann")
    assert c1.tag == lance_tag("d", 1) and store.collection("items").tags()[c1.tag] == c1.collection_version
    before = col.take([f"r{i:04d}" for i in range(10)], ["id", "label", "emb_e", "pred_m"])

    # Relabel everything, overwrite embeddings and predictions, add and delete rows.
    col.upsert(_rows(40, label_shift=1, seed=9))
    col.delete(ids=["r0003"])
    now = dsets.checkout("d", columns=["id", "label"])  # working state: current labels
    assert "r0003" not in now.column("id").to_pylist()
    assert now.column("label").to_pylist()[0] == LABELS[1]

    old = dsets.checkout("d", 1, columns=["id", "label", "emb_e", "pred_m"])
    assert old.column("id").to_pylist() == [f"r{i:04d}" for i in range(10)]
    assert old.column("label").to_pylist() == before.column("label").to_pylist()
    assert old.column("emb_e").to_pylist() == before.column("emb_e").to_pylist()
    assert old.column("pred_m").to_pylist() == before.column("pred_m").to_pylist()
    assert dsets.checkout("d", "HEAD", columns=["id", "label"]).equals(old.select(["id", "label"]))
    # Default columns: the light columns of that collection version.
    assert "label" in dsets.checkout("d", 1).column_names and "emb_e" not in dsets.checkout("d", 1).column_names
    pieces = list(dsets.checkout_batches("d", 1, ["label"], batch_size=3))
    assert max(p.num_rows for p in pieces) == 3
    streamed = pa.concat_tables(pieces)
    assert sorted(streamed.column("id").to_pylist()) == old.column("id").to_pylist()
    with pytest.raises(InvalidArgument, match="no_col"):
        dsets.checkout("d", 1, columns=["no_col"])

    # A commit with nothing staged may still pin the new labels when asked to.
    c2 = dsets.commit("d", "relabeled", allow_empty=True)
    assert (c2.version, c2.members, c2.added, c2.removed) == (2, 10, 0, 0)
    assert dsets.checkout("d", 2, ["label"]).column("label").to_pylist()[0] == LABELS[1]
    assert [h.version for h in dsets.history("d")] == [2, 1]
    assert dsets.history("d")[1].author == "ann"
    # A member whose row was deleted from the collection can still be removed by id.
    r = dsets.remove("d", ids=["r0003"])
    assert r.changed == 1 and "r0003" not in dsets.members("d").to_pylist()


def test_diff_exact_on_constructed_case(dsets, col):
    ids = [f"r{i:04d}" for i in range(40)]
    v1_members = set(ids[:20])
    dsets.create("d", "items")
    dsets.add("d", ids=sorted(v1_members))
    dsets.commit("d", "v1")
    labels_v1 = dict(zip(ids, [r["label"] for r in _rows(40)], strict=True))

    # v2: remove 5, add 7, relabel some kept members (two of them back and forth), a
    # removed one and a non-member.
    removed = set(ids[0:5])
    added = set(ids[25:32])
    dsets.remove("d", ids=sorted(removed))
    dsets.add("d", ids=sorted(added))
    relabel = {ids[6]: "dog", ids[7]: "zebra", ids[2]: "zebra", ids[35]: "zebra", ids[8]: None}
    col.upsert([{"id": i, "label": lab} for i, lab in relabel.items()])
    col.upsert([{"id": ids[9], "label": "zebra"}])
    col.upsert([{"id": ids[9], "label": labels_v1[ids[9]]}])  # changed, then changed back
    dsets.commit("d", "v2")

    v2_members = (v1_members - removed) | added
    labels_v2 = {**labels_v1, **relabel}
    kept = v1_members & v2_members
    expected_relabel = sorted((i, labels_v1[i], labels_v2[i]) for i in kept if labels_v1[i] != labels_v2[i])

    d = dsets.diff("d", 1, 2)
    assert _ids(d.added) == v2_members - v1_members == added
    assert _ids(d.removed) == v1_members - v2_members == removed
    got = list(zip(*(d.relabeled.column(c).to_pylist() for c in ("id", "label_before", "label_after")),
                   strict=True))
    assert got == expected_relabel
    assert (ids[8], labels_v1[ids[8]], None) in got  # a label cleared is a change

    # Reverse direction swaps the sets and the label columns.
    back = dsets.diff("d", 2, 1)
    assert _ids(back.added) == removed and _ids(back.removed) == added
    assert [(i, a, b) for i, b, a in got] == list(zip(
        *(back.relabeled.column(c).to_pylist() for c in ("id", "label_before", "label_after")), strict=True))

    # Against the working state: a staged add and a relabel after the commit.
    dsets.add("d", ids=[ids[39]])
    col.upsert([{"id": ids[10], "label": "owl"}])
    w = dsets.diff("d", 2)
    assert w.v2 is None and _ids(w.added) == {ids[39]} and len(w.removed) == 0
    assert w.relabeled.to_pylist() == [{"id": ids[10], "label_before": labels_v1[ids[10]], "label_after": "owl"}]
    assert dsets.diff("d", 2, "HEAD").to_dict()["relabeled"] == []

    # Version 0 is the empty dataset before the first commit.
    first = dsets.diff("d", 0, 1)
    assert (first.v1, first.v2) == (0, 1) and _ids(first.added) == v1_members and len(first.removed) == 0
    assert first.relabeled.num_rows == 0
    gone = dsets.diff("d", 2, 0)
    assert _ids(gone.removed) == v2_members and len(gone.added) == 0
    with pytest.raises(NotFound):
        dsets.diff("d", 3, 1)


def test_tags_resolve_wherever_a_version_does(dsets, col):
    dsets.create("d", "items")
    dsets.add("d", ids=["r0001", "r0002"])
    dsets.commit("d", "v1")
    dsets.add("d", ids=["r0003"])
    dsets.commit("d", "v2")
    assert dsets.tag("d", 1, "paper-v1") == 1
    assert dsets.tag("d", "HEAD", "latest") == 2
    assert dsets.tags("d") == {"paper-v1": 1, "latest": 2}
    assert dsets.members("d", "paper-v1").to_pylist() == ["r0001", "r0002"]
    assert dsets.checkout("d", "paper-v1", ["id"]).num_rows == 2
    assert dsets.diff("d", "paper-v1", "latest").added.to_pylist() == ["r0003"]
    assert [h.tags for h in dsets.history("d")] == [("latest",), ("paper-v1",)]
    assert dsets.get("d").tags == {"paper-v1": 1, "latest": 2}
    with pytest.raises(AlreadyExists):
        dsets.tag("d", 2, "paper-v1")
    for bad in ("1abc", "HEAD", "a b", ""):
        with pytest.raises(InvalidArgument):
            dsets.tag("d", 1, bad)
    with pytest.raises(NotFound):
        dsets.tag("d", 9, "later")
    with pytest.raises(NotFound, match="paper-v1"):
        dsets.members("d", "paper-v2")
    dsets.untag("d", "latest")
    assert dsets.tags("d") == {"paper-v1": 1}


def test_discard_and_delete_never_drop_changes_silently(dsets, col, store):
    dsets.create("d", "items")
    dsets.add("d", ids=["r0001", "r0002"])
    dsets.commit("d", "v1")
    dsets.add("d", ids=["r0003"])
    with pytest.raises(FailedPrecondition, match="uncommitted"):
        dsets.delete("d")
    assert dsets.members("d").to_pylist() == ["r0001", "r0002", "r0003"]  # still there
    assert dsets.discard("d") == 1
    assert dsets.members("d").to_pylist() == ["r0001", "r0002"]
    dsets.add("d", ids=["r0004"])
    dsets.delete("d", force=True)
    with pytest.raises(NotFound):
        dsets.get("d")
    assert not any(t.startswith("ds-d-") for t in store.collection("items").tags())
    for table in (ds_mod.CHANGES_TABLE, ds_mod.COMMITS_TABLE, ds_mod.TAGS_TABLE):
        assert store._db.open_table(table).count_rows("dataset = 'd'") == 0
    # The name can be used again, starting empty.
    dsets.create("d", "items")
    assert dsets.members("d").to_pylist() == [] and dsets.get("d").head == 0


def test_delete_keeps_other_datasets_tags(dsets, col, store):
    for name in ("a", "a-v1"):  # "ds-a-v1-v1" must not be taken for one of "a"'s tags
        dsets.create(name, "items")
        dsets.add(name, ids=["r0001"])
        dsets.commit(name, "v1")
    dsets.delete("a")
    assert list(store.collection("items").tags()) == [lance_tag("a-v1", 1)]
    assert dsets.checkout("a-v1", 1, ["id"]).num_rows == 1


def test_interrupted_commit_leaves_changes_staged(dsets, col, store):
    dsets.create("d", "items")
    dsets.add("d", ids=["r0001"])
    dsets.commit("d", "v1")
    dsets.add("d", ids=["r0002"])
    # Simulate a crash between moving the staged rows to version 2 and the commit row.
    store._db.open_table(ds_mod.CHANGES_TABLE).update(where="dataset = 'd' AND version = 0",
                                                      values={"version": 2})
    st = dsets.status("d")
    assert (st.head, st.staged_adds) == (1, 1)
    assert dsets.members("d").to_pylist() == ["r0001", "r0002"]
    assert dsets.members("d", 1).to_pylist() == ["r0001"]
    c = dsets.commit("d", "v2")
    assert (c.version, c.added, c.members) == (2, 1, 2)
    assert dsets.members("d", 2).to_pylist() == ["r0001", "r0002"]


def test_add_from_mining_run(dsets, col, store):
    from miners.runs import RunStore

    runs = RunStore(store)
    rec = runs.new_run(collection="items", miner="random", size=3, seed=0, version=col.version)
    dsets.create("d", "items")
    with pytest.raises(FailedPrecondition, match="PENDING"):
        dsets.add("d", run=rec.run_id)
    runs.write_results(rec, ["r0007", "r0003", "r0009"], np.array([0.9, 0.8, 0.7]))
    runs.update(rec, state="SUCCEEDED", results=3)
    r = dsets.add("d", run=rec.run_id)
    assert r.changed == 3 and dsets.members("d").to_pylist() == ["r0003", "r0007", "r0009"]
    store.create_collection("other")
    dsets.create("o", "other")
    with pytest.raises(InvalidArgument, match="collection"):
        dsets.add("o", run=rec.run_id)


def test_storage_grows_with_changes_not_members_times_versions(dsets, store):
    col = store.create_collection("big", fields={"n": pa.int64()})
    n = 1000
    col.upsert({"id": [f"b{i:05d}" for i in range(n + 50)], "label": ["x"] * (n + 50),
                "n": list(range(n + 50))})
    dsets.create("big", "big")
    changes = store._db.open_table(ds_mod.CHANGES_TABLE)
    dsets.add("big", where=f"n < {n}")
    dsets.commit("big", "v1")
    assert changes.count_rows("dataset = 'big'") == n
    for v in range(2, 5):  # each version: 5 removed, 5 added
        dsets.remove("big", ids=[f"b{(v * 5 + i):05d}" for i in range(5)])
        dsets.add("big", ids=[f"b{(n + v * 5 + i):05d}" for i in range(5)])
        c = dsets.commit("big", f"v{v}")
        assert (c.added, c.removed, c.members) == (5, 5, n)
        assert changes.count_rows("dataset = 'big'") == n + 10 * (v - 1)
        assert changes.count_rows(f"dataset = 'big' AND version = {v}") == 10
    assert len(dsets.members("big", 1)) == len(dsets.members("big", 4)) == n
    d = dsets.diff("big", 1, 4)
    assert len(d.added) == len(d.removed) == 15 and d.relabeled.num_rows == 0


def test_pinned_version_survives_cleanup_and_many_writes(dsets, col, store):
    dsets.create("d", "items")
    dsets.add("d", ids=[f"r{i:04d}" for i in range(0, 40, 2)])
    c1 = dsets.commit("d", "v1")
    want = col.take([f"r{i:04d}" for i in range(0, 40, 2)], ["id", "label", "pred_m"])
    for k in range(12):  # many later writes, then compaction + cleanup of every old version
        col.upsert(_rows(40, label_shift=k + 1, seed=k + 1))
    col.delete(ids=["r0000"])
    col.wait_for_maintenance()
    result = col.optimize(cleanup_older_than=timedelta(0))
    assert result.versions_removed > 0
    versions = {v["version"] for v in col.versions()}
    assert c1.collection_version in versions and c1.collection_version - 1 not in versions
    got = dsets.checkout("d", 1, ["id", "label", "pred_m"])
    assert got.equals(want)
    # Deleting the dataset gives the version up: the next cleanup reclaims it.
    dsets.delete("d")
    col.optimize(cleanup_older_than=timedelta(0))
    assert c1.collection_version not in {v["version"] for v in col.versions()}


def test_large_membership_uses_scan_path(dsets, store, monkeypatch):
    monkeypatch.setattr(ds_mod, "ID_CHUNK", 100)

    def no_lookups(ids):
        raise AssertionError("id IN (...) lookups where a filtered scan was due")

    col = store.create_collection("many")
    col.upsert({"id": [f"m{i:04d}" for i in range(1000)], "label": [str(i % 7) for i in range(1000)]})
    dsets.create("m", "many")
    monkeypatch.setattr(ds_mod, "ids_predicate", no_lookups)
    dsets.add("m", ids=[f"m{i:04d}" for i in range(0, 1000, 2)])  # existence check: scan path
    dsets.commit("m", "v1")
    col.upsert({"id": [f"m{i:04d}" for i in range(0, 1000, 4)], "label": ["new"] * 250})
    got = dsets.checkout("m", 1, ["id", "label"])  # 500 of 1000 rows: scan path
    assert got.column("id").to_pylist() == [f"m{i:04d}" for i in range(0, 1000, 2)]
    assert got.column("label").to_pylist() == [str(i % 7) for i in range(0, 1000, 2)]
    d = dsets.diff("m", 1)
    assert d.relabeled.column("id").to_pylist() == [f"m{i:04d}" for i in range(0, 1000, 4)]
    assert set(d.relabeled.column("label_after").to_pylist()) == {"new"}


@pytest.mark.filterwarnings("ignore:optimize\\(cleanup_older_than=0\\)")
def test_datasets_optimize_compacts_system_tables(dsets, col):
    dsets.create("d", "items")
    for i in range(5):
        dsets.add("d", ids=[f"r{i:04d}"])
    dsets.commit("d", "v1")
    dsets.optimize(cleanup_older_than=timedelta(0))
    assert dsets.members("d", 1).to_pylist() == [f"r{i:04d}" for i in range(5)]


def test_concurrent_adds_and_commit_lose_nothing(dsets, col, store):
    from concurrent.futures import ThreadPoolExecutor

    dsets.create("d", "items")
    other = Datasets(store)  # a second instance on the same store shares the write lock

    def work(k: int) -> None:
        api = dsets if k % 2 else other
        api.add("d", ids=[f"r{(k * 5 + i):04d}" for i in range(5)])
        if k == 3:
            api.commit("d", "mid-way")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(8)))
    assert len(dsets.members("d")) == 40
    st = dsets.status("d")
    assert st.members == 40 and st.head == 1
    assert dsets.history("d")[0].members + st.staged_adds == 40


def test_system_tables_are_compacted_in_the_background(dsets, store, monkeypatch):
    import indexing.datasets as datasets_module

    monkeypatch.setattr(datasets_module, "OPTIMIZE_EVERY", 5)
    store.create_collection("m").upsert({"id": [f"m{i}" for i in range(12)], "label": ["x"] * 12})
    dsets.create("d", "m")
    for i in range(9):  # with create: 10 writes, the last one triggers a compaction
        dsets.add("d", ids=[f"m{i}"])
    deadline = time.monotonic() + 30
    while len(dsets._changes.to_lance().get_fragments()) > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(dsets._changes.to_lance().get_fragments()) <= 2
    assert dsets.members("d").to_pylist() == sorted(f"m{i}" for i in range(9))
