"""The live rows kept per filter and fragment (indexing.live_rows) against Lance's own
filtered scan and count on the same table version, through writes, deletes, tags and a
compaction."""

from __future__ import annotations

import numpy as np
import pytest

from indexing.live_rows import LiveRows, by_fragment, cacheable
from indexing.store import Store

FILTERS = [
    None,
    "split = 'pool'",
    "n >= 100 AND n < 700 AND label IS NULL",
    "id IN ('r3', 'r450', 'r1999', 'nope')",  # through the BTREE on id
    "id >= 'r5'",
    "array_has_any(tags, ['hard'])",  # through the LabelList index on tags
    "label = 'it''s'",
]


class ScanRecorder:
    """A Lance dataset that records each scan's filter and the fragments it was asked about."""

    def __init__(self, dataset) -> None:
        self.dataset, self.scanned = dataset, []

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def scanner(self, **kwargs):
        self.scanned.append((kwargs["filter"], sorted(f.fragment_id for f in kwargs["fragments"])))
        return self.dataset.scanner(**kwargs)


def lance_addresses(dataset, where: str | None) -> np.ndarray:
    return dataset.scanner(columns=[], filter=where, with_row_address=True).to_table().column("_rowaddr").to_numpy()


def written(store: Store):
    col = store.create_collection("c", spaces={"v": 4})
    rng = np.random.default_rng(0)
    for s in range(0, 2000, 400):
        ids = [f"r{i}" for i in range(s, s + 400)]
        col.upsert({"id": ids, "emb_v": rng.standard_normal((400, 4)).tolist(), "n": list(range(s, s + 400)),
                    "split": ["pool" if i % 3 else "train" for i in range(s, s + 400)],
                    "label": [None if i % 5 else ("it's" if i % 2 else "cat") for i in range(s, s + 400)]})
    return col


def assert_same_as_lance(store: Store, col) -> None:
    dataset = col.read_dataset()
    for where in FILTERS:
        got = store.flat_vectors.live_rows.addresses(dataset, "c", where)
        np.testing.assert_array_equal(got, lance_addresses(dataset, where), err_msg=str(where))
        assert col.count(where) == col.table.count_rows(where), where


def test_live_rows_equal_lances_scan_through_writes_and_compaction(tmp_path):
    store = Store(str(tmp_path / "data"), optimize_every=0)
    col = written(store)
    assert len(col.table.to_lance().get_fragments()) == 5
    assert_same_as_lance(store, col)
    assert store.flat_vectors.live_rows.nbytes > 0
    # updates (rows move to a new fragment, the old copies are deleted), deletes, tags
    col.upsert({"id": ["r3", "r401", "r1200", "new1"], "n": [150, 151, 152, 153], "split": ["pool"] * 4})
    col.delete(where="n % 97 = 0")
    col.tag_rows(ids=["r5", "r6", "r1999", "new1"], add=["hard"])
    assert_same_as_lance(store, col)
    col.optimize()
    assert len(col.table.to_lance().get_fragments()) == 1
    assert_same_as_lance(store, col)


def test_only_the_fragments_written_since_are_scanned_again(tmp_path):
    store = Store(str(tmp_path / "data"), optimize_every=0)
    col = written(store)
    where = "split = 'pool'"
    before = {f.fragment_id for f in col.table.to_lance().get_fragments()}
    old_version = col.version
    first = ScanRecorder(col.read_dataset())
    store.flat_vectors.live_rows.addresses(first, "c", where)
    assert first.scanned == [(None, sorted(before)), (where, sorted(before))]
    col.upsert({"id": ["r1", "brand_new"], "n": [1, 2], "split": ["pool", "pool"]})  # r1 lives in the first fragment
    dataset = col.read_dataset()
    again = ScanRecorder(dataset)
    got = store.flat_vectors.live_rows.addresses(again, "c", where)
    new = {f.fragment_id for f in dataset.get_fragments()} - before
    # the live rows of the new fragment and of the one r1 was deleted from; the filter only
    # on the new fragment (its rows elsewhere are known to pass or not)
    assert again.scanned == [(None, sorted(new | {min(before)})), (where, sorted(new))]
    np.testing.assert_array_equal(got, lance_addresses(dataset, where))
    unchanged = ScanRecorder(dataset)
    store.flat_vectors.live_rows.addresses(unchanged, "c", where)
    assert unchanged.scanned == []  # nothing written since: no scan at all
    # A mask made at the new version does not know whether r1's old row passes; at the
    # version before, where that row is live, its fragment is scanned with the filter again.
    other = "n < 1000"
    store.flat_vectors.live_rows.addresses(dataset, "c", other)
    old = ScanRecorder(col.table.to_lance().checkout_version(old_version))
    np.testing.assert_array_equal(store.flat_vectors.live_rows.addresses(old, "c", other), lance_addresses(old.dataset, other))
    assert old.scanned == [(None, [min(before)]), (other, [min(before)])]


def test_a_filter_over_the_budget_or_not_a_function_of_the_rows_is_not_kept(tmp_path):
    store = Store(str(tmp_path / "data"), optimize_every=0)
    col = written(store)
    small = LiveRows(budget_bytes=1000)  # 2,000 rows need 8,000 bytes
    dataset = col.read_dataset()
    np.testing.assert_array_equal(small.addresses(dataset, "c", None), lance_addresses(dataset, None))
    assert small.nbytes == 0
    assert col.count("updated_at <= now()") == 2000 and store.flat_vectors.live_rows.nbytes == 0


@pytest.mark.parametrize(("where", "kept"), [
    (None, True), ("split = 'pool'", True), ("label = 'now()'", True), ("array_has_any(tags, ['a'])", True),
    ("updated_at > now() - INTERVAL '1 day'", False), ("random() < 0.5", False), ("created_at < CURRENT_DATE", False),
    ("id IN (" + ", ".join(f"'{i}'" for i in range(1000)) + ")", False),
])
def test_cacheable_filters(where, kept):
    assert cacheable(where) is kept


def test_a_filter_is_kept_from_its_second_use(tmp_path):
    store = Store(str(tmp_path / "data"), optimize_every=0)
    col = written(store)
    dataset = col.read_dataset()
    assert store.flat_vectors.live_rows.serves(dataset, "c", None)
    assert not store.flat_vectors.live_rows.serves(dataset, "c", "n < 5")  # once: Lance alone
    assert store.flat_vectors.live_rows.serves(dataset, "c", "n < 5") and store.flat_vectors.live_rows.serves(dataset, "c", "n < 5")
    assert not store.flat_vectors.live_rows.serves(dataset, "other", "n < 5")  # per collection
    assert not any(store.flat_vectors.live_rows.serves(dataset, "c", "random() < 2") for _ in range(3))
    q = [1.0, 0.0, 0.0, 0.0]
    first = col.search("v", q, k=3, where="n < 7", columns=["id"])
    assert store.flat_vectors.live_rows.nbytes == 0  # searched, but the filter's rows not kept
    assert col.search("v", q, k=3, where="n < 7", columns=["id"]) == first
    assert store.flat_vectors.live_rows.nbytes > 0  # kept from the second use


def test_addresses_are_grouped_by_fragment_in_the_order_given():
    addr = lambda fid, off: (fid << 32) | off  # noqa: E731
    together = np.array([addr(7, 0), addr(7, 3), addr(2, 1), addr(2, 4)], np.uint64)
    assert by_fragment(together) == (None, {7: (0, 2), 2: (2, 4)})  # fragment order kept, no sort
    split = np.array([addr(2, 0), addr(2, 1), addr(5, 0), addr(2, 2)], np.uint64)
    order, spans = by_fragment(split)
    assert order.tolist() == [0, 1, 3, 2] and spans == {2: (0, 3), 5: (3, 4)}
    assert by_fragment(np.zeros(0, np.uint64)) == (None, {})
