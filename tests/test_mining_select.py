"""Issue 21's miners end to end — a real gRPC server on loopback, the Python client, real
LanceDB tables — each against the pure function it wraps called directly on the same
arrays: ``select``, ``label_issues``, ``exact_duplicates``, ``semdedup``,
``duplicate_leaks``, ``probcover``; a chain passing the run's reference filter to its
coreset stage; SEALS candidates (``candidates="knn_of_labeled"``); and ``random`` without
a seed drawing a fresh one that the run records."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from indexing import measures
from miners import dedup
from miners.coldstart import probcover_select
from miners.diversity import kcenter_greedy
from miners.label_issues import find_label_issues
from miners.select import Objective, seals_candidates, select
from service.client import Client, FailedPreconditionError, InvalidArgumentError
from service.server import ServerConfig, start_server

CLASSES = [str(c) for c in range(10)]
N_TRAIN, N_TEST, N_POOL = 150, 50, 300
COPIES = [220, 260, 300, 340, 380]  # pool rows copied exactly at the end of the table


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("sel")), port=0, grace_s=2))
    with Client(srv.address, timeout=120) as c:
        yield c
    srv.stop(1)


@pytest.fixture(scope="module")
def data(client):
    """Digits in table order: 150 labeled train rows (10 labels flipped), 50 test rows, 300
    pool rows, exact copies of 5 pool rows, and one test row that is a near copy of train
    row 0 (a leak). Train probabilities are out-of-sample (5-fold)."""
    d = load_digits()
    n = N_TRAIN + N_TEST + N_POOL
    x = (d.data[:n] / 16.0).astype(np.float32)
    y = d.target[:n].copy()
    rng = np.random.default_rng(21)
    flipped = rng.choice(N_TRAIN, 10, replace=False)
    y_given = y.copy()
    y_given[flipped] = (y[flipped] + 1 + rng.integers(0, 9, 10)) % 10
    train = np.arange(N_TRAIN)
    clf = LogisticRegression(max_iter=1000)
    probs = np.zeros((n, 10))
    probs[train] = cross_val_predict(clf, x[train], y_given[train], cv=5, method="predict_proba")
    probs[N_TRAIN:] = clf.fit(x[train], y_given[train]).predict_proba(x[N_TRAIN:])
    leak = x[0] + np.float32(1e-4)
    x = np.vstack([x, x[COPIES], leak[None]]).astype(np.float32)
    probs = np.vstack([probs, probs[COPIES], probs[:1]]).astype(np.float32)
    probs = probs / probs.sum(axis=1, keepdims=True, dtype=np.float32)
    m = len(x)
    split = ["train"] * N_TRAIN + ["test"] * N_TEST + ["pool"] * N_POOL + ["pool"] * len(COPIES) + ["test"]
    label = [str(v) for v in y_given[train]] + [None] * (m - N_TRAIN)
    ids = [f"r{i:04d}" for i in range(m)]
    col = client.create_collection("sel", spaces={"px": {"dim": 64, "metric": "l2"}}, models={"lr": CLASSES})
    col.upsert(pa.table({
        "id": ids, "split": split, "label": label,
        "emb_px": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64),
        "pred_lr": pa.StructArray.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), 10).cast(pa.list_(pa.float32()))],
            ["probs"]),
    }))
    # what the server decodes: float32 probabilities as float64
    return col, x, probs.astype(np.float64), y_given, np.asarray(ids), flipped


def _run(col, miner, size, **kw):
    job = col.mine(miner, size=size, **kw)
    job.wait(timeout=300)
    return job


def test_select_equals_the_greedy_pass_called_directly(data):
    col, x, probs, _, ids, _ = data
    unl = np.arange(N_TRAIN, len(x))
    lab = np.arange(N_TRAIN)
    job = _run(col, "select", 12, model="lr", space="px", where="label IS NULL", reference_where="label IS NOT NULL",
               seed=5, params={"objectives": [{"miner": "margin", "weight": 1.0, "normalize": "rank"},
                                              {"miner": "entropy", "weight": 0.5, "normalize": "minmax"}],
                               "diversity": 1.0})
    want = select(12, objectives=[Objective(measures.margin_scores(probs[unl]), 1.0, "rank"),
                                  Objective(measures.entropy_scores(probs[unl]), 0.5, "minmax")],
                  vectors=x[unl], reference=x[lab], diversity=1.0, seed=5)
    got = job.results()
    assert got["id"].to_pylist() == ids[unl[want.rows]].tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), want.score, rtol=1e-9)
    assert job.run()["stats"]["stopped"] == "size"


def test_select_thresholds_and_targets(data):
    col, x, probs, _, ids, _ = data
    unl = np.arange(N_TRAIN, len(x))
    pool_only = unl[np.arange(len(unl)) >= N_TEST]  # split = 'pool' (copies included)
    pool_only = pool_only[pool_only != len(x) - 1]
    pred = probs.argmax(axis=1)
    ent = measures.entropy_scores(probs[pool_only])
    margin = measures.margin_scores(probs[pool_only])
    job = _run(col, "select", 9, model="lr", where="label IS NULL", seed=3, params={
        "objectives": [{"miner": "margin"}],
        "thresholds": [{"field": "split", "in": ["pool"]}, {"miner": "entropy", "min": 0.1}],
        "targets": {"field": "predicted_class", "values": {"3": 2, "5": 2}, "fill": True}})
    groups = np.where(pred[pool_only] == 3, 0, np.where(pred[pool_only] == 5, 1, 2))
    want = select(9, objectives=[Objective(margin, 1.0, "rank")], eligible=ent >= 0.1, groups=groups,
                  targets=[2, 2, 0], seed=3)
    assert job.results()["id"].to_pylist() == ids[pool_only[want.rows]].tolist()
    counts = job.run()["stats"]["group_counts"]
    assert counts == {"3": int(want.group_counts[0]), "5": int(want.group_counts[1])}
    assert counts["3"] <= 2 and counts["5"] <= 2


def test_select_refuses_a_batch_miner_and_a_bad_field(data):
    col = data[0]
    with pytest.raises(InvalidArgumentError, match=r"objectives\[0\].*coreset"):
        col.mine("select", 5, space="px", params={"objectives": [{"miner": "coreset"}]})
    with pytest.raises(InvalidArgumentError, match="thresholds"):
        col.mine("select", 5, params={"thresholds": [{"field": "split; drop", "in": ["x"]}]})


def test_label_issues_equal_confident_learning_called_directly(data):
    col, _, probs, y_given, ids, flipped = data
    lab = np.arange(N_TRAIN)
    job = _run(col, "label_issues", 15, model="lr", params={"rank_by": "normalized_margin"})
    want = find_label_issues(y_given[lab], probs[lab], rank_by="normalized_margin")
    got = job.results()
    assert got["id"].to_pylist() == ids[want.rows[:15]].tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), want.score[want.rows[:15]], rtol=1e-9)
    stats = job.run()["stats"]
    assert stats["flagged"] == len(want.rows) and stats["labeled_rows"] == N_TRAIN
    np.testing.assert_array_equal(np.asarray(stats["confident_joint"]), want.confident_joint)
    # the flipped labels are what it should find first
    assert len(set(want.rows[:10].tolist()) & set(flipped.tolist())) >= 5


def test_exact_duplicates_drop_list_names_the_kept_rows(data):
    col, x, _, _, ids, _ = data
    job = _run(col, "exact_duplicates", 50, space="px")
    groups = dedup.exact_duplicates(dedup.hash_vectors(x), priority=np.arange(len(x), dtype=np.float64))
    assert sorted(job.results()["id"].to_pylist()) == sorted(ids[groups.dropped].tolist())
    assert len(groups.dropped) == len(COPIES)
    related = dict(zip(job.results()["id"].to_pylist(), job.results()["related_id"].to_pylist(), strict=True))
    assert related == {ids[N_TRAIN + N_TEST + N_POOL + i]: ids[c] for i, c in enumerate(COPIES)}
    keep = _run(col, "exact_duplicates", len(x), space="px", params={"output": "keep"}).results()
    assert len(keep) == len(x) - len(COPIES) and not set(keep["id"].to_pylist()) & set(related)


def test_semdedup_equals_the_function_called_directly(data):
    col, x, _, _, ids, _ = data
    job = _run(col, "semdedup", 100, space="px", seed=2, params={"eps": 0.002, "clusters": 8})
    want = dedup.semdedup(x, eps=0.002, n_clusters=8, seed=2)
    dropped = want.dropped[np.lexsort((want.dropped, -want.similarity[want.dropped]))]
    got = job.results()
    assert got["id"].to_pylist() == ids[dropped].tolist()
    assert got["related_id"].to_pylist() == ids[want.duplicate_of[dropped]].tolist()
    # the planted copies (and the leak, a near copy of train row 0) are among the dropped
    planted = set(ids[N_TRAIN + N_TEST + N_POOL:].tolist()) | set(ids[COPIES].tolist()) | {ids[0]}
    assert len(set(got["id"].to_pylist()) & planted) >= len(COPIES) + 1
    assert job.run()["stats"]["dropped"] == len(want.dropped)


def test_duplicate_leaks_finds_the_test_row_copied_from_train(data):
    col, _, _, _, ids, _ = data
    job = _run(col, "duplicate_leaks", 10, space="px", params={"threshold": 0.01, "report": "cross_split"})
    got = job.results()
    assert got["id"].to_pylist() == [ids[-1]] and got["related_id"].to_pylist() == [ids[0]]
    # the exact copies sit in the same split, unlabeled: no leak, no conflict
    every = _run(col, "duplicate_leaks", 10, space="px", params={"threshold": 0.01, "report": "all"}).results()
    assert set(every["id"].to_pylist()) == {ids[-1], *ids[N_TRAIN + N_TEST + N_POOL:-1].tolist()}


def test_probcover_reports_its_radius(data):
    col, x, _, _, ids, _ = data
    unl, lab = np.arange(N_TRAIN, len(x)), np.arange(N_TRAIN)
    job = _run(col, "probcover", 10, space="px", model="lr", where="label IS NULL",
               reference_where="label IS NOT NULL", seed=4)
    want = probcover_select(x[unl], 10, labeled=x[lab], n_classes=10, seed=4)
    assert job.results()["id"].to_pylist() == ids[unl[want.rows]].tolist()
    run = job.run()
    assert run["params"]["classes"] == 10  # the model's classes
    assert run["stats"]["delta"] == pytest.approx(want.delta) and run["stats"]["delta_rule"] == "purity"
    assert run["stats"]["purity"] >= 0.95
    # how the ball graph was built, recorded like the k-NN graphs of select / label_issues
    assert run["stats"]["graph"]["method"] == "exact" and run["stats"]["graph"]["recall"] == 1.0


def test_chain_passes_the_reference_filter_to_its_coreset_stage(data):
    col, x, probs, _, ids, _ = data
    unl, lab = np.arange(N_TRAIN, len(x)), np.arange(N_TRAIN)
    job = _run(col, "chain", 8, model="lr", space="px", where="label IS NULL", reference_where="label IS NOT NULL",
               params={"stages": [{"miner": "margin", "size": 40}, {"miner": "coreset"}]})
    margin = measures.margin_scores(probs[unl])
    top = np.sort(unl[np.argsort(-margin, kind="stable")[:40]])  # the stage sees them in table order
    picks, _ = kcenter_greedy(x[top], 8, reference=x[lab])
    assert job.results()["id"].to_pylist() == ids[top[picks]].tolist()
    stages = job.run()["params"]["stages"]
    assert stages[0]["reference_where"] == "" and stages[1]["reference_where"] == "label IS NOT NULL"
    unseeded, _ = kcenter_greedy(x[top], 8)
    assert ids[top[unseeded]].tolist() != job.results()["id"].to_pylist()  # the reference mattered


def test_random_without_a_seed_draws_a_fresh_one_and_records_it(data):
    col = data[0]
    a, b = _run(col, "random", 20), _run(col, "random", 20)
    seed_a, seed_b = a.run()["seed"], b.run()["seed"]
    assert seed_a != seed_b and a.results()["id"].to_pylist() != b.results()["id"].to_pylist()
    again = _run(col, "random", 20, seed=seed_a)
    assert again.results()["id"].to_pylist() == a.results()["id"].to_pylist()
    assert _run(col, "margin", 3, model="lr").run()["seed"] == 0  # a ranking miner keeps 0


def test_seals_candidates_restrict_the_pool_to_the_labeled_sets_neighbours(data):
    col, x, probs, _, ids, _ = data
    unl, lab = np.arange(N_TRAIN, len(x)), np.arange(N_TRAIN)
    job = _run(col, "margin", 10, model="lr", space="px", where="label IS NULL", candidates="knn_of_labeled",
               candidates_k=3)
    cand = unl[seals_candidates(x[unl], x[lab], 3)]
    margin = measures.margin_scores(probs[cand])
    want = cand[np.lexsort((cand, -margin))[:10]]
    assert job.results()["id"].to_pylist() == ids[want].tolist()
    seals = job.run()["stats"]["seals"]
    assert (seals["candidates"], seals["k"], seals["labeled"]) == (len(cand), 3, N_TRAIN)
    assert len(cand) < len(unl)
    # a chain restricted once, its stages on the candidates
    chain = _run(col, "chain", 5, model="lr", space="px", where="label IS NULL", candidates="knn_of_labeled",
                 candidates_k=3, params={"stages": [{"miner": "margin", "size": 20}, {"miner": "coreset"}]})
    assert set(chain.results()["id"].to_pylist()) <= set(ids[cand].tolist())
    with pytest.raises(InvalidArgumentError, match="space="):
        col.mine("margin", 5, model="lr", candidates="knn_of_labeled")
    with pytest.raises(InvalidArgumentError, match="candidates"):
        col.mine("margin", 5, model="lr", space="px", candidates="everything")
    with pytest.raises(FailedPreconditionError, match="labeled set"):
        col.mine("margin", 5, model="lr", space="px", candidates="knn_of_labeled", reference_where="split = 'x'")


def test_typiclust_equals_the_function_called_directly(data):
    from miners.coldstart import typiclust_select

    col, x, _, _, ids, _ = data
    unl, lab = np.arange(N_TRAIN, len(x)), np.arange(N_TRAIN)
    job = _run(col, "typiclust", 6, space="px", where="label IS NULL", reference_where="label IS NOT NULL", seed=9)
    want = typiclust_select(x[unl], 6, labeled=x[lab], seed=9)
    assert job.results()["id"].to_pylist() == ids[unl[want.rows]].tolist()
    np.testing.assert_allclose(job.results()["score"].to_numpy(), want.typicality, rtol=1e-9)
    assert job.run()["stats"]["clusters"] == want.n_clusters


def test_labeled_outliers_rank_the_labeled_rows_only(data):
    from miners.label_issues import labeled_outliers

    col, x, _, _, ids, _ = data
    lab = np.arange(N_TRAIN)
    job = _run(col, "labeled_outliers", 5, space="px", params={"k": 10})
    want = labeled_outliers(x[lab], k=10)
    order = lab[np.lexsort((lab, -want))[:5]]
    assert job.results()["id"].to_pylist() == ids[order].tolist()
    np.testing.assert_allclose(job.results()["score"].to_numpy(), want[order - lab[0]], rtol=1e-6)


def test_select_with_a_graph_miner_objective_and_a_stop_distance(data):
    from miners.density import exact_knn_graph, typicality_scores

    col, x, _, _, ids, _ = data
    unl = np.arange(N_TRAIN, len(x))
    job = _run(col, "select", 10, space="px", where="label IS NULL", seed=1, params={
        "objectives": [{"miner": "typicality", "params": {"k": 10}}], "stop_distance": 1.5})
    _, dist = exact_knn_graph(x[unl], 10)
    want = select(10, objectives=[Objective(typicality_scores(dist), 1.0, "rank")], vectors=x[unl],
                  stop_distance=1.5, seed=1)
    got = job.results()["id"].to_pylist()
    assert got == ids[unl[want.rows]].tolist()
    picked = x[unl[want.rows]].astype(np.float64)
    gaps = np.sqrt(((picked[:, None] - picked[None]) ** 2).sum(-1))[np.triu_indices(len(picked), 1)]
    assert gaps.min() >= 1.5 - 1e-6  # no two picks closer than the stop distance


def test_exact_duplicates_of_text_and_of_file_content(tmp_path):
    """Content hashes: equal texts, and files with equal bytes under different names."""
    from indexing.errors import InvalidArgument
    from indexing.store import Store
    from miners.runner import run_mining, validate_request
    from miners.runs import RunSpec

    files = []
    for i, body in enumerate([b"cat", b"dog", b"cat", b"bird", b"dog"]):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(body)
        files.append(str(path))
    store = Store(str(tmp_path / "data"), optimize_every=0)
    col = store.create_collection("t")
    col.upsert([{"id": f"i{i}", "text": t, "uri": files[i]}
                for i, t in enumerate(["a", "b", "a", "a", None])])

    def run(**params):
        req = RunSpec(collection="t", miner="exact_duplicates", size=10, params=params)
        _, validated = validate_request(col, req)
        return run_mining(col, RunSpec(collection="t", miner="exact_duplicates", size=10, params=validated,
                                       version=col.version))

    text = run(of="text")
    assert text.ids == ["i2", "i3"] and text.related == ["i0", "i0"]  # i4 has no text: not compared
    assert text.stats["groups"] == 1 and text.rows_skipped == 1
    content = run(of="file", output="groups")
    assert dict(zip(content.ids, content.related, strict=True)) == {"i0": "i0", "i2": "i0", "i1": "i1",
                                                                   "i4": "i1"}
    np.testing.assert_array_equal(content.scores, [2, 2, 2, 2])
    with pytest.raises(InvalidArgument, match="'of'"):
        run(of="pixels")
