"""Mining runs through the scores kept per fragment (miners.held_scores,
indexing.fragment_values) against the same runs reading the whole pool (a store with
MINING_SCORE_CACHE_BYTES 0 on the same data) and against the scores' definition, through
inserts, updates, deletes, rows without predictions, a compaction and a pinned older version."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.filters import any_row
from indexing.fragment_values import KNOWN, NO_VALUE, NOT_KNOWN, FragmentRowValues, FragmentValues
from indexing.store import Store
from miners.runner import run_mining, validate_request
from miners.runs import RunSpec

CLASSES = ["a", "b", "c", "d"]
CASES = [  # (miner, where, params, reverse)
    ("margin", "split = 'pool'", {}, False),
    ("entropy", None, {}, False),
    ("least_confidence", "n >= 100 AND n < 1500", {"logits_temperature": 2.0}, False),
    ("least_confidence", "n >= 100 AND n < 1500", {}, False),  # other scores for the rows with logits
    ("ratio", "split = 'pool'", {"stochastic": "power", "temperature": 0.5}, False),
    ("margin", "split = 'pool' AND n < 1000", {}, True),
]


def _rows(rng: np.random.Generator, ids: list[str], n0: int) -> pa.Table:
    """Rows with probabilities (most), logits only (every 7th) or no prediction (every 11th)."""
    k = len(ids)
    probs = rng.dirichlet(np.full(len(CLASSES), 0.6), k).astype(np.float32)
    logits = rng.standard_normal((k, len(CLASSES))).astype(np.float32)
    kind = [(n0 + i) % 77 for i in range(k)]
    pred = pa.array([None if j % 11 == 0 else
                     {"logits": logits[i].tolist()} if j % 7 == 0 else {"probs": probs[i].tolist()}
                     for i, j in enumerate(kind)],
                    type=pa.struct([("probs", pa.list_(pa.float32())), ("logits", pa.list_(pa.float32()))]))
    return pa.table({"id": ids, "n": list(range(n0, n0 + k)),
                     "split": ["pool" if (n0 + i) % 3 else "train" for i in range(k)], "pred_m": pred})


def _run(col, miner: str, where: str | None, params: dict, reverse: bool, version: int | None = None):
    spec = RunSpec(collection=col.name, miner=miner, model="m", where=where or "", size=25, seed=3,
                   reverse=reverse, params=params, version=version)
    _, checked = validate_request(col, spec)
    return run_mining(col, RunSpec(collection=col.name, miner=miner, model="m", where=where or "", size=25,
                                   seed=3, reverse=reverse, params=checked,
                                   version=col.version if version is None else version))


class ScoringScans:
    """A Lance dataset that records the fragments of each scoring scan (one that projects
    columns; the live rows' scans project none)."""

    def __init__(self, dataset, scanned: list[list[int]]) -> None:
        self.dataset, self.scanned = dataset, scanned

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def scanner(self, **kwargs):
        if kwargs.get("columns"):
            self.scanned.append(sorted(f.fragment_id for f in kwargs["fragments"]))
        return self.dataset.scanner(**kwargs)


def _record_scoring_scans(col, monkeypatch) -> list[list[int]]:
    scanned: list[list[int]] = []
    real = col.read_dataset
    monkeypatch.setattr(col, "read_dataset", lambda version=None: ScoringScans(real(version), scanned))
    return scanned


def _same(got, want) -> None:
    assert got.ids == want.ids
    np.testing.assert_array_equal(got.scores, want.scores)
    assert (got.rows_scanned, got.rows_skipped) == (want.rows_scanned, want.rows_skipped)


@pytest.fixture
def stores(tmp_path):
    held = Store(str(tmp_path), optimize_every=0)
    whole = Store(str(tmp_path), optimize_every=0, mining_score_cache_bytes=0)
    col = held.create_collection("c", models={"m": CLASSES})
    rng = np.random.default_rng(0)
    for s in range(0, 2000, 400):
        col.upsert(_rows(rng, [f"r{i}" for i in range(s, s + 400)], s))
    return held, whole, col, rng


def test_held_runs_equal_whole_pool_runs_through_writes(stores):
    held, whole, col, rng = stores

    def check(step: str, version: int | None = None) -> None:
        for miner, where, params, reverse in CASES:
            want = _run(whole.collection("c"), miner, where, params, reverse, version)
            for _ in range(2):  # a filter's first use reads the whole pool; later ones the kept scores
                _same(_run(col, miner, where, params, reverse, version), want)
            assert want.rows_skipped > 0, (step, miner)  # rows without a prediction are counted

    check("written")
    assert held.fragment_values.nbytes > 0
    first = col.version
    col.upsert(_rows(rng, [f"r{i}" for i in range(0, 2000, 37)], 5000))  # updates: deletes + a new fragment
    col.delete(where="n >= 600 AND n < 650")
    col.upsert(_rows(rng, [f"s{i}" for i in range(300)], 7000))
    check("updated")
    col.optimize(cleanup=False)
    check("compacted")
    check("pinned", version=first)


def test_only_fragments_with_unknown_rows_are_read(stores, monkeypatch):
    held, whole, col, rng = stores
    case = ("margin", "split = 'pool'", {}, False)
    for _ in range(2):
        _run(col, *case)
    read = _record_scoring_scans(col, monkeypatch)
    _same(_run(col, *case), _run(whole.collection("c"), *case))
    assert read == []  # nothing new: every score kept
    before = {f.fragment_id for f in col.read_dataset().get_fragments()}
    col.upsert(_rows(rng, [f"r{i}" for i in range(0, 2000, 97)] + ["new1", "new2"], 9000))
    _same(_run(col, *case), _run(whole.collection("c"), *case))
    new = sorted({f.fragment_id for f in col.read_dataset().get_fragments()} - before)
    assert read == [new]  # only the fragment the update wrote; the ones it deleted from are not read
    read.clear()
    _same(_run(col, "margin", "split = 'train'", {}, False), _run(whole.collection("c"), "margin", "split = 'train'",
                                                                   {}, False))
    _same(_run(col, "margin", "split = 'train'", {}, False), _run(whole.collection("c"), "margin", "split = 'train'",
                                                                   {}, False))
    assert len(read) == 1 and len(read[0]) == len(col.read_dataset().get_fragments())  # other rows: not known yet


def test_scores_equal_their_definition(stores):
    held, _, col, _ = stores
    for _ in range(2):
        got = _run(col, "margin", "split = 'pool'", {}, False)
    table = col.table.to_arrow()
    rows = table.filter(pa.compute.equal(table["split"], "pool")).to_pylist()
    ids, scores = [], []
    for r in rows:
        pred = r["pred_m"]
        if pred is None:
            continue
        p = np.asarray(pred["probs"], np.float64) if pred["probs"] is not None else None
        if p is None:
            z = np.asarray(pred["logits"], np.float64)
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        top = np.sort(p)[::-1]
        ids.append(r["id"])
        scores.append(1 - (top[0] - top[1]))
    order = np.argsort(-np.asarray(scores), kind="stable")[:25]
    assert got.ids == [ids[i] for i in order]
    np.testing.assert_allclose(got.scores, np.asarray(scores)[order], rtol=1e-6)


def test_runs_that_are_not_row_local_read_the_whole_pool(stores):
    held, whole, col, _ = stores
    spec = RunSpec(collection="c", miner="margin", model="m", where="", size=25, seed=3,
                   params={"balance": "equal"})
    _, checked = validate_request(col, spec)
    for _ in range(2):
        run_mining(col, RunSpec(collection="c", miner="margin", model="m", size=25, seed=3, params=checked,
                                version=col.version))
    assert held.fragment_values.nbytes == 0  # class balance needs each row's class: not kept


def test_a_pool_whose_scores_would_not_fit_is_scanned_whole(stores, monkeypatch):
    _, whole, col, _ = stores
    small = Store(col.store.root, optimize_every=0, mining_score_cache_bytes=9 * 1999)  # 2,000 rows
    capped = small.collection("c")
    scored = _record_scoring_scans(capped, monkeypatch)
    for _ in range(2):
        _same(_run(capped, "margin", None, {}, False), _run(whole.collection("c"), "margin", None, {}, False))
    assert scored == [] and small.fragment_values.nbytes == 0  # the whole pool's scan, not the held one


def test_a_bad_row_fails_the_run_as_the_whole_pool_read_does(stores):
    held, whole, col, _ = stores
    _run(col, "margin", None, {}, False)  # every fragment's scores kept
    bad = pa.table({"id": ["bad"], "n": [1], "split": ["pool"],
                    "pred_m": pa.array([{"probs": [0.5, 0.5], "logits": None}],
                                       type=col.table.schema.field("pred_m").type)})
    col.table.add(bad)  # written straight to the table (as another tool may), past assay's checks
    for c in (col, whole.collection("c")):
        with pytest.raises(InvalidArgument, match="margin"):
            _run(c, "margin", None, {}, False)


def test_fragment_values_budget_and_forget():
    kept = FragmentValues(budget_bytes=9 * 100)
    a, b = FragmentRowValues.empty(60), FragmentRowValues.empty(60)
    a.set(np.array([1, 2]), np.array([0.5, 0.25]))
    a.set(np.array([3]), None)
    assert a.state[:5].tolist() == [NOT_KNOWN, KNOWN, KNOWN, NO_VALUE, NOT_KNOWN]
    kept.keep("c", "x", {(0, ("f0",)): a})
    assert kept.take("c", "x", [(0, ("f0",))])[(0, ("f0",))] is a
    kept.keep("c", "y", {(0, ("f0",)): b})  # both do not fit: the least recently used goes
    assert kept.take("c", "x", [(0, ("f0",))]) == {}
    assert kept.nbytes == b.nbytes
    assert kept.take("c", "y", [(1, ("f1",))]) == {}  # a fragment gone from the table is dropped
    assert kept.nbytes == 0
    kept.keep("c", "y", {(0, ("f0",)): b})
    kept.keep("c", "z", {(0, ("f0",)): FragmentRowValues.empty(101)})  # alone over the budget: not kept
    assert kept.take("c", "z", [(0, ("f0",))]) == {}
    kept.forget("c")
    assert kept.nbytes == 0


def test_the_pool_check_reads_the_kept_rows_and_sees_every_write(tmp_path, monkeypatch):
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("c", models={"m": CLASSES})
    col.upsert(_rows(np.random.default_rng(0), [f"r{i:05d}" for i in range(600)], 0))
    where = "split = 'pool' AND n < 30"
    scans = []  # the existence checks that scanned the table for the pool filter
    real_any_row = any_row
    monkeypatch.setattr("indexing.store.any_row", lambda table, w: scans.append(w) or real_any_row(table, w))
    for _ in range(3):  # the second run keeps the filter's rows; from then on no scan
        _run(col, "margin", where, {}, False)
    checked = col.validate_filter(where)
    assert scans == [checked, checked]
    assert col.store.flat_vectors.live_rows.holds(col.read_dataset(), "c", checked)
    before = col.version
    # A delete and an update later the kept rows still say what a scan says: the update's
    # new fragment is read, the delete's deletion file applied.
    col.delete(where="n < 10")
    col.upsert(_rows(np.random.default_rng(1), [f"r{i:05d}" for i in range(10, 20)], 10))
    assert col.any_match(col.table, checked) and real_any_row(col.table, checked)
    col.delete(where="n < 30")
    assert not col.any_match(col.table, checked) and not real_any_row(col.table, checked)
    with pytest.raises(FailedPrecondition, match="matches no rows"):
        _run(col, "margin", where, {}, False)
    assert len(scans) == 2  # answered from the kept rows each time
    # the version before the deletes still has them (answered from the kept rows too)
    assert col.any_match(col.at_version(before), checked) and len(scans) == 2
