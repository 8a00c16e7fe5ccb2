"""The active-learning simulation's bookkeeping (bench/al.py), on a tiny dataset through a
real server on loopback: labels counted right, no item labeled twice, the test set never
mined, the same seed giving the same picks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import al
from service.client import Client
from service.server import ServerConfig, start_server


def tiny_dataset(n: int = 90, d: int = 5, classes: int = 3, seed: int = 0) -> al.Dataset:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, d))
    y = np.arange(n) % classes
    X = (centres[y] + rng.normal(0, 1.5, (n, d))).astype(np.float32)
    return al.Dataset("tiny", X, y.astype(np.int64), [f"c{i}" for i in range(classes)], standardize=True)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("al")), host="127.0.0.1", port=0,
                                       grace_s=1.0))
    try:
        with Client(server.address, timeout=60) as c:
            yield c
    finally:
        server.stop()


CFG = al.SimConfig(initial_per_class=2, batch=4, budget=20, verify=True)


@pytest.mark.parametrize("strategy", ["margin", "coreset", "random"])
def test_simulation_bookkeeping(client, strategy):
    ds = tiny_dataset()
    split = al.make_split(ds, 3, CFG.test_size)
    r = al.simulate(client, ds, "logreg", al.STRATEGIES[strategy], 3, CFG)
    # labels counted right: 6 to start, batches of 4, the last one cut to the budget
    assert r["labels"] == [6, 10, 14, 18, 20]
    assert len(r["acc"]) == 5 and all(0.0 <= a <= 1.0 for a in r["acc"])
    assert [len(p) for p in r["picks"]] == [6, 4, 4, 4, 2]
    # no item labeled twice
    flat = [i for p in r["picks"] for i in p]
    assert len(flat) == len(set(flat)) == 20
    # the initial set has every class twice
    assert sorted(np.bincount(split.y_pool[r["picks"][0]]).tolist()) == [2, 2, 2]
    # the test set never enters the pool: pool rows and test rows are disjoint originals
    assert r["pool_size"] == len(split.y_pool) == 63 and r["test_size"] == 27
    assert not set(split.origin[flat].tolist()) & set(split.test_origin.tolist())
    assert set(i for p in r["pick_ids"] for i in p) <= set(al.pool_ids(r["pool_size"]))
    # the collection was dropped after the run
    assert al.collection_name("tiny", "logreg", strategy, 3) not in client.list_collections()


def test_collection_holds_only_pool_rows_and_labels(client):
    ds = tiny_dataset()
    cfg = al.SimConfig(initial_per_class=2, batch=4, budget=14, verify=True, keep=True)
    r = al.simulate(client, ds, "logreg", al.STRATEGIES["margin_coreset"], 1, cfg)
    col = client.collection(al.collection_name("tiny", "logreg", "margin_coreset", 1))
    try:
        assert col.count() == r["pool_size"]  # no test row was ever written
        assert sorted(col.query(columns=["id"])["id"].to_pylist()) == al.pool_ids(r["pool_size"])
        # the server holds every label but the last batch's (sent with the next round's upsert)
        assert col.count("label IS NOT NULL") == r["labels"][-1] - len(r["picks"][-1])
        runs = [x for x in client.runs(col.name) if x["collection"] == col.name]
        rounds = len(r["picks"]) - 1  # two mining runs per round: margin, then coreset on its picks
        assert sorted(x["miner"] for x in runs) == ["coreset"] * rounds + ["margin"] * rounds
    finally:
        client.drop_collection(col.name)


def test_same_seed_same_picks(client):
    ds = tiny_dataset()
    a = al.simulate(client, ds, "logreg", al.STRATEGIES["random"], 5, CFG)
    b = al.simulate(client, ds, "logreg", al.STRATEGIES["random"], 5, CFG)
    c = al.simulate(client, ds, "logreg", al.STRATEGIES["random"], 6, CFG)
    assert a["picks"] == b["picks"] and a["acc"] == b["acc"]
    assert a["picks"] != c["picks"]


def test_mlp_samples_and_embeddings_reach_the_miners(client):
    ds = tiny_dataset()
    cfg = al.SimConfig(initial_per_class=2, batch=3, budget=12, verify=True, mc_samples=4)
    r1 = al.simulate(client, ds, "mlp", al.STRATEGIES["batchbald"], 2, cfg)
    r2 = al.simulate(client, ds, "mlp", al.STRATEGIES["batchbald"], 2, cfg)
    assert r1["labels"] == [6, 9, 12]
    assert r1["picks"] == r2["picks"]  # torch training and the MC-dropout masks are seeded
    r3 = al.simulate(client, ds, "mlp", al.STRATEGIES["badge"], 2, cfg)  # penultimate layer + probs
    assert r3["labels"] == [6, 9, 12]


def test_main_writes_json_markdown_and_tables(tmp_path):
    ds = tiny_dataset()
    path = tmp_path / "tiny.npz"
    np.savez(path, X=ds.X, y=np.asarray(ds.classes)[ds.y])
    out = tmp_path / "out"
    assert al.main(["--datasets", "", "--dataset", str(path), "--learners", "logreg", "--strategies",
                    "random,margin", "--seeds", "2", "--batch", "5", "--budget", "16", "--out", str(out),
                    "--no-plots"]) == 0
    doc = json.loads((out / "al.json").read_text())
    assert doc["complete"] and len(doc["runs"]) == 4
    assert {(r["strategy"], r["seeds"] == [0, 1]) for r in doc["summary"]} == {("random", True), ("margin", True)}
    md = (out / "al.md").read_text()
    assert "### tiny, logreg (2 seeds)" in md and "| margin |" in md
    # --resume with nothing left to run re-renders from the JSON
    assert al.main(["--datasets", "", "--dataset", str(path), "--learners", "logreg", "--strategies",
                    "random,margin", "--seeds", "2", "--batch", "5", "--budget", "16", "--out", str(out),
                    "--no-plots", "--resume"]) == 0
    doc = json.loads((out / "al.json").read_text())
    assert len(doc["runs"]) == 4
    # --report-only re-renders without touching the runs, the command or the configuration
    assert al.main(["--report-only", "--out", str(out), "--no-plots"]) == 0
    again = json.loads((out / "al.json").read_text())
    assert again["runs"] == doc["runs"] and again["command"] == doc["command"]
    assert again["config"]["budget"] == 16 and again["summary"] == json.loads(json.dumps(doc["summary"]))


def test_a_failed_run_is_reported_not_fatal(tmp_path):
    ds = tiny_dataset()
    path = tmp_path / "tiny.npz"
    np.savez(path, X=ds.X, y=ds.y)
    out = tmp_path / "out"
    # nothing listens on port 1: every run fails (after the client's retries), none is lost silently
    assert al.main(["--datasets", "", "--dataset", str(path), "--learners", "logreg", "--strategies", "random",
                    "--seeds", "1", "--budget", "10", "--out", str(out), "--no-plots",
                    "--server", "127.0.0.1:1"]) == 1
    doc = json.loads((out / "al.json").read_text())
    assert not doc["complete"] and doc["runs"] == []
    assert [(f["strategy"], f["seed"]) for f in doc["failed"]] == [("random", 0)]
    assert "UnavailableError" in doc["failed"][0]["error"]
    assert "## failed runs" in (out / "al.md").read_text()


# -- pure helpers -----------------------------------------------------------------------------


def test_split_and_initial_labels():
    y = np.repeat(np.arange(4), 25)
    train, test = al.stratified_split(y, 0.3, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == 100
    assert np.bincount(y[test]).tolist() == [7, 8, 7, 8] or set(np.bincount(y[test])) <= {7, 8}
    init = al.initial_labels(y[train], 2, seed=1)
    assert np.bincount(y[train][init]).tolist() == [2, 2, 2, 2]
    assert np.array_equal(init, al.initial_labels(y[train], 2, seed=1))
    with pytest.raises(ValueError):
        al.initial_labels(y, 0, seed=0)


def test_repeated_split_keeps_the_test_set_clean_and_single():
    ds = al.load_dataset("repeated_digits")
    sp = al.make_split(ds, 0)
    assert len(sp.y_pool) == 3 * (len(ds.y) - len(sp.y_test))
    assert not set(sp.origin.tolist()) & set(sp.test_origin.tolist())
    assert np.array_equal(sp.X_test, ds.X[sp.test_origin])  # no noise on the test set
    n = len(sp.y_pool) // 3
    assert np.array_equal(sp.origin[:n], sp.origin[n:2 * n])
    assert not np.array_equal(sp.X_pool[:n], sp.X_pool[n:2 * n])  # each copy has its own noise


def test_ledger_refuses_bad_batches():
    led = al.Ledger(["a", "b", "c", "d"], [0])
    assert led.n_labeled == 1 and led.n_unlabeled == 3
    with pytest.raises(ValueError, match="already labeled"):
        led.label(["a"])
    with pytest.raises(ValueError, match="not a pool row"):
        led.label(["t0"])
    with pytest.raises(ValueError, match="twice"):
        led.label(["b", "b"])
    assert led.label(["c", "b"]).tolist() == [2, 1]
    assert led.order() == [0, 2, 1] and led.n_labeled == 3


def test_metrics():
    labels, acc = [20, 30, 40, 50], [0.5, 0.89, 0.9, 0.95]
    assert al.labels_to_reach(labels, acc, 0.9) == 40
    assert math.isinf(al.labels_to_reach(labels, acc, 0.96))
    assert al.acc_at(labels, acc, 45) == 0.9 and al.acc_at(labels, acc, 300) == 0.95
    assert al.acc_at(labels, acc, 10) is None
    assert al.aulc([0, 10], [0.5, 1.0]) == pytest.approx(0.75)
    assert al.quantile([10, 20, math.inf], 0.5) == 20
    assert math.isinf(al.quantile([10, math.inf, math.inf], 0.5))
    assert al.median_iqr([70, 70, 80, 80, 90]) == (80, 70, 80)


def test_npz_with_its_own_test_set(tmp_path):
    rng = np.random.default_rng(0)
    X, X_test = rng.normal(size=(40, 3)), rng.normal(size=(12, 3))
    y, y_test = np.array(["a", "b"] * 20), np.array(["b", "c"] * 6)  # a class only in the test set
    np.savez(tmp_path / "own.npz", X=X, y=y, X_test=X_test, y_test=y_test)
    ds = al.load_dataset(str(tmp_path / "own.npz"))
    assert ds.name == "own" and ds.classes == ["a", "b", "c"]
    sp = al.make_split(ds, seed=3)
    assert len(sp.y_pool) == 40 and len(sp.y_test) == 12  # the given test set, whatever the seed
    assert np.allclose(sp.X_pool.mean(axis=0), 0, atol=1e-5)  # standardised by the pool
    np.savez(tmp_path / "bad.npz", X=X, y=y, X_test=X_test)
    with pytest.raises(ValueError, match="both X_test and y_test"):
        al.load_dataset(str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("strategy", ["typiclust", "probcover", "select", "seals_margin"])
def test_issue21_strategies_run_through_the_server(client, strategy):
    ds = tiny_dataset()
    r = al.simulate(client, ds, "logreg", al.STRATEGIES[strategy], 1, CFG)
    assert r["labels"] == [6, 10, 14, 18, 20] and r["fallback_rounds"] == 0
    flat = [i for p in r["picks"] for i in p]
    assert len(flat) == len(set(flat)) == 20


def test_cold_start_from_zero_labels(client):
    ds = tiny_dataset()
    cfg = al.SimConfig(batch=4, budget=12, verify=True, initial=0)
    model_free = al.simulate(client, ds, "logreg", al.STRATEGIES["typiclust"], 2, cfg)
    assert model_free["labels"] == [0, 4, 8, 12] and model_free["fallback_rounds"] == 0
    needs_model = al.simulate(client, ds, "logreg", al.STRATEGIES["margin"], 2, cfg)
    # no model until two classes are labeled: the first round is random
    assert needs_model["labels"] == [0, 4, 8, 12] and needs_model["fallback_rounds"] >= 1
    assert needs_model["initial"] == 0 and len(needs_model["picks"][0]) == 0


def test_an_existing_collection_and_a_user_learner_with_paired_tests(tmp_path):
    """`--collection` reads the vectors and labels of a collection through the server (it is
    only read), `--learners module:Class` fits the user's class; the report carries the
    seeds and the paired test against random."""
    import pyarrow as pa

    ds = tiny_dataset()
    server = start_server(ServerConfig(data=str(tmp_path / "data"), host="127.0.0.1", port=0, grace_s=1.0))
    try:
        with Client(server.address, timeout=60) as c:
            col = c.create_collection("mine", spaces={"v": {"dim": 5, "metric": "l2", "normalized": False}})
            col.upsert(pa.table({"id": [f"x{i}" for i in range(len(ds.y))],
                                 "label": [ds.classes[v] for v in ds.y],
                                 "emb_v": pa.FixedSizeListArray.from_arrays(pa.array(ds.X.ravel()), 5)}))
            got = al.load_collection(c, "mine", "v")
            np.testing.assert_allclose(got.X, ds.X)
            assert [got.classes[v] for v in got.y] == [ds.classes[v] for v in ds.y]
            out = tmp_path / "out"
            assert al.main(["--collection", "mine", "--space", "v", "--server", server.address,
                            "--learners", "sklearn.naive_bayes:GaussianNB", "--strategies", "random,typiclust",
                            "--seeds", "3", "--batch", "4", "--budget", "14", "--out", str(out), "--no-plots"]) == 0
            assert c.collection("mine").count() == len(ds.y)  # read, not changed
    finally:
        server.stop()
    doc = json.loads((out / "al.json").read_text())
    assert doc["complete"] and len(doc["runs"]) == 6
    row = next(r for r in doc["summary"] if r["strategy"] == "typiclust")
    assert row["learner"] == "sklearn.naive_bayes:GaussianNB" and row["vs_random"]["seeds"] == [0, 1, 2]
    assert row["vs_random"]["aulc"]["n"] == 3
    assert "paired vs random" in (out / "al.md").read_text()
    with pytest.raises(SystemExit, match="fit"):
        al.main(["--datasets", "wine", "--learners", "json:JSONDecoder", "--out", str(tmp_path / "o2")])
