"""Embedding-space miners end to end (server, client, real LanceDB tables), each checked
against a brute-force computation from its definition or an independent implementation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import LocalOutlierFactor

from service.client import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError
from service.server import ServerConfig, start_server

CLASSES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("emb")), port=0, grace_s=2))
    with Client(srv.address, timeout=120) as c:
        yield c
    srv.stop(1)


@pytest.fixture(scope="module")
def digits(client):
    """Digits: a reference ('train') set without any 9, and a pool holding the rest (9s too)."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target
    rng = np.random.default_rng(0)
    train = (rng.random(len(y)) < 0.4) & (y != 9)
    clf = LogisticRegression(max_iter=500).fit(x[train], y[train])
    probs = np.zeros((len(y), 10), dtype=np.float32)
    probs[:, clf.classes_] = clf.predict_proba(x)
    probs /= probs.sum(axis=1, keepdims=True)
    col = client.create_collection("digits", spaces={"px": {"dim": 64, "metric": "l2"}}, models={"lr": CLASSES})
    col.upsert(pa.table({
        "id": [f"d{i:04d}" for i in range(len(y))],
        "split": np.where(train, "train", "pool"),
        "digit": y.astype(str),
        "emb_px": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64),
        "pred_lr": pa.StructArray.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), 10).cast(pa.list_(pa.float32()))],
            ["probs"]),
    }))
    return col, x.astype(np.float64), y, train, probs.astype(np.float64)


def _run(col, miner, size, **kw):
    job = col.mine(miner, size=size, **kw)
    job.wait(timeout=300)
    return job


def _ids(rows) -> list[str]:
    return [f"d{i:04d}" for i in rows]


def test_knn_seeds_by_id_equal_brute_force(digits):
    col, x, y, train, _ = digits
    seeds = [3, 42]
    pool = np.flatnonzero(~train)
    job = _run(col, "knn", 8, space="px", where="split = 'pool'", params={"seed_ids": _ids(seeds)})
    got = job.results()
    dist = np.sqrt(((x[pool][:, None, :] - x[seeds][None]) ** 2).sum(-1))  # (pool, seeds)
    best = dist.min(axis=1)
    order = [p for p in pool[np.argsort(best, kind="stable")] if p not in seeds][:8]
    assert got["id"].to_pylist() == _ids(order)
    np.testing.assert_allclose(-got["score"].to_numpy(), np.sort(best[np.isin(pool, order)]), rtol=1e-5)
    nearest_seed = [_ids([seeds[int(np.argmin(dist[list(pool).index(p)]))]])[0] for p in order]
    assert got["related_id"].to_pylist() == nearest_seed
    rrf = _run(col, "knn", 8, space="px", where="split = 'pool'",
               params={"seed_ids": _ids(seeds), "aggregate": "rrf"}).results()
    assert len(rrf) == 8 and not set(rrf["id"].to_pylist()) & set(_ids(seeds))


def test_knn_by_vectors_and_by_text(client, digits):
    col, x, _, _, _ = digits
    by_vec = _run(col, "knn", 3, space="px", params={"seed_vectors": [x[7].tolist()]}).results()
    assert by_vec["id"].to_pylist()[0] == "d0007"  # a vector seed is not a stored row: it can match itself

    from indexing.embedders import TextEmbedder
    from indexing.samples import text_table

    embedder = TextEmbedder()
    texts = client.create_collection("txt", spaces={"minilm": {"dim": 384, "model": embedder.identity}})
    texts.upsert(text_table(embedder, space="minilm"))
    job = _run(texts, "knn", 3, space="minilm",
               params={"seed_texts": ["a striker scored in the final minute", "preheat the oven"]})
    assert job.run()["params"]["seed_texts"] == [] and len(job.run()["params"]["seed_vectors"]) == 2
    topics = texts.take(job.results()["id"].to_pylist(), columns=["topic"])["topic"].to_pylist()
    assert set(topics) <= {"football", "cooking"}


def test_embedding_distance_equals_brute_force(digits):
    col, x, _, train, _ = digits
    pool, ref = np.flatnonzero(~train), np.flatnonzero(train)
    job = _run(col, "embedding_distance", 10, space="px", where="split = 'pool'",
               reference_where="split = 'train'")
    nearest = np.sqrt(((x[pool][:, None, :] - x[ref][None]) ** 2).sum(-1)).min(axis=1)
    order = np.argsort(-nearest, kind="stable")[:10]
    assert job.results()["id"].to_pylist() == _ids(pool[order])
    np.testing.assert_allclose(job.results()["score"].to_numpy(), nearest[order], rtol=1e-5)


def test_novelty_flags_the_class_missing_from_the_reference(digits):
    col, _, y, train, _ = digits
    pool = np.flatnonzero(~train)
    n9 = int((y[pool] == 9).sum())
    baseline = n9 / len(pool)  # 0.15: the share of 9s in the pool
    # measured with k=10: LOF novelty 0.51, mean k-NN distance 0.68 (k-th distance: 0.49)
    for params, floor in (({"method": "lof"}, 0.45), ({"method": "knn_distance", "how": "mean"}, 0.6)):
        job = _run(col, "novelty", n9, space="px", where="split = 'pool'", reference_where="split = 'train'",
                   params={**params, "k": 10})
        digits_found = col.take(job.results()["id"].to_pylist(), columns=["digit"])["digit"].to_pylist()
        precision = digits_found.count("9") / n9
        assert precision >= floor and precision > 3 * baseline, (params, precision)


def test_lof_equals_scikit_learn(digits):
    col, x, _, train, _ = digits
    pool = np.flatnonzero(~train)
    job = _run(col, "lof", 15, space="px", where="split = 'pool'", params={"k": 20})
    lof = -LocalOutlierFactor(n_neighbors=20).fit(x[pool]).negative_outlier_factor_
    order = np.argsort(-lof, kind="stable")[:15]
    assert job.results()["id"].to_pylist() == _ids(pool[order])
    # Digits are integer pixels: many distances tie exactly, and at a tie on the k-th
    # neighbour LOF depends on which tied point is taken (float rounding decides, in the
    # server's distance kernel and in scikit-learn's alike), which moves a score by ~1e-3.
    # Tie-free data is compared at rtol 1e-6 in test_miners_density.py.
    np.testing.assert_allclose(job.results()["score"].to_numpy(), lof[order], rtol=2e-3)


def test_typicality_equals_its_definition(digits):
    col, x, _, train, _ = digits
    pool = np.flatnonzero(~train)
    job = _run(col, "typicality", 5, space="px", where="split = 'pool'", params={"k": 10})
    d = np.sqrt(((x[pool][:, None, :] - x[pool][None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    typ = 1 / np.sort(d, axis=1)[:, :10].mean(axis=1)
    assert job.results()["id"].to_pylist() == _ids(pool[np.argsort(-typ, kind="stable")[:5]])


def _plain_kcenter(x: np.ndarray, ref: np.ndarray, size: int) -> list[int]:
    mind = np.sqrt(((x[:, None, :] - ref[None]) ** 2).sum(-1)).min(axis=1)
    picks = []
    for _ in range(size):
        i = int(np.argmax(mind))
        picks.append(i)
        mind = np.minimum(mind, np.sqrt(((x - x[i]) ** 2).sum(-1)))
    return picks


def test_coreset_equals_plain_greedy(digits):
    col, x, _, train, _ = digits
    pool, ref = np.flatnonzero(~train), np.flatnonzero(train)
    job = _run(col, "coreset", 12, space="px", where="split = 'pool'", reference_where="split = 'train'")
    assert job.results()["id"].to_pylist() == _ids(pool[_plain_kcenter(x[pool], x[ref], 12)])
    radii = job.results()["score"].to_numpy()
    assert (np.diff(radii) <= 1e-6).all()


def test_badge_and_cluster_margin(digits):
    from miners.diversity import badge_select

    col, x, _, train, probs = digits
    pool = np.flatnonzero(~train)
    job = _run(col, "badge", 10, space="px", model="lr", where="split = 'pool'", seed=3)
    want = badge_select(probs[pool], x[pool].astype(np.float32), 10, seed=3)
    assert job.results()["id"].to_pylist() == _ids(pool[np.asarray(want)])
    cm = _run(col, "cluster_margin", 10, space="px", model="lr", where="split = 'pool'",
              params={"candidates": 200})
    picked = [int(i[1:]) for i in cm.results()["id"].to_pylist()]
    margin = 1 - np.diff(np.sort(probs[pool], axis=1)[:, -2:], axis=1)[:, 0]
    top200 = set(pool[np.argsort(-margin, kind="stable")[:200]].tolist())
    assert len(set(picked)) == 10 and set(picked) <= top200


def test_near_duplicates_name_their_twin(client):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 8)).astype(np.float32)
    rows = [{"id": f"b{i}", "emb_v": base[i].tolist()} for i in range(50)]
    rows += [{"id": "twin-of-b3", "emb_v": (base[3] + 1e-4).tolist()},
             {"id": "twin-of-b7", "emb_v": (base[7] + 2e-3).tolist()}]
    col = client.create_collection("dups", spaces={"v": {"dim": 8, "metric": "l2"}})
    col.upsert(rows)
    job = _run(col, "near_duplicates", 5, space="v", params={"threshold": 0.05, "k": 5})
    got = job.results()
    assert got["id"].to_pylist() == ["twin-of-b3", "twin-of-b7"]
    assert got["related_id"].to_pylist() == ["b3", "b7"]


def test_activation_energy_and_feature_norm(client):
    logits = np.array([[5.0, 0.0], [0.1, 0.0], [-3.0, -3.0], [2.0, 1.0]])
    col = client.create_collection("act", models={"m": ["a", "b"]}, spaces={"h": {"dim": 2, "metric": "l2"}})
    col.upsert([{"id": f"r{i}", "pred_m": {"logits": logits[i].tolist()}, "emb_h": [float(i + 1), 0.0]}
                for i in range(4)])
    job = _run(col, "activation", 4, model="m", params={"source": "energy"})
    energy = -np.log(np.exp(logits).sum(axis=1))
    assert job.results()["id"].to_pylist() == [f"r{i}" for i in np.argsort(-energy)]
    np.testing.assert_allclose(job.results()["score"].to_numpy(), np.sort(energy)[::-1], rtol=1e-6)
    norm = _run(col, "activation", 2, space="h", params={"source": "feature_norm"})
    assert norm.results()["id"].to_pylist() == ["r0", "r1"]  # smallest feature norms first


def test_chain_margin_then_coreset(digits):
    col, x, _, train, probs = digits
    pool = np.flatnonzero(~train)
    job = _run(col, "chain", 8, space="px", model="lr", where="split = 'pool'", params={"stages": [
        {"miner": "margin", "size": 100}, {"miner": "coreset", "size": 8}]})
    margin = 1 - np.diff(np.sort(probs[pool], axis=1)[:, -2:], axis=1)[:, 0]
    top = pool[np.argsort(-margin, kind="stable")[:100]]
    sub = np.sort(top)  # the coreset stage sees the survivors in table order
    from miners.diversity import kcenter_greedy

    picks, _ = kcenter_greedy(x[sub].astype(np.float32), 8)
    assert job.results()["id"].to_pylist() == _ids(sub[picks])
    assert np.isfinite(job.results()["score"].to_numpy()).all()  # no reference set: still finite scores


BAD = [
    (dict(miner="knn", size=5, space="px"), InvalidArgumentError, "seeds"),
    (dict(miner="knn", size=5, space="px", params={"seed_ids": ["nope"]}), NotFoundError, "nope"),
    (dict(miner="knn", size=5, space="px", params={"seed_vectors": [[1.0, 2.0]]}), InvalidArgumentError, "dimension"),
    (dict(miner="knn", size=5, space="px", params={"seed_ids": "d0001"}), InvalidArgumentError, "list"),
    (dict(miner="coreset", size=5), InvalidArgumentError, "space="),
    (dict(miner="coreset", size=5, space="zz"), NotFoundError, "space 'zz'"),
    (dict(miner="novelty", size=5, space="px"), InvalidArgumentError, "reference_where"),
    (dict(miner="novelty", size=5, space="px", reference_where="split = 'none'"), FailedPreconditionError,
     "reference"),
    (dict(miner="lof", size=5, space="px", params={"k": 0}), InvalidArgumentError, "'k'"),
    (dict(miner="badge", size=5, space="px"), InvalidArgumentError, "model="),
    (dict(miner="chain", size=5, params={"stages": [{"miner": "nope", "size": 3}]}), InvalidArgumentError, "nope"),
    (dict(miner="chain", size=5, model="lr", space="px", params={"stages": [{"miner": "margin", "size": 50},
                                                                             {"miner": "coreset", "size": 4}]}),
     InvalidArgumentError, "size"),
    (dict(miner="chain", size=5, space="px", params={"stages": [{"miner": "margin", "size": 50},
                                                                 {"miner": "coreset"}]}),
     InvalidArgumentError, "model="),
]


@pytest.mark.parametrize(("kw", "error", "needle"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_embedding_requests(client, digits, kw, error, needle):
    col = digits[0]
    before = len(client.runs("digits", limit=1000))
    with pytest.raises(error, match=needle):
        col.mine(**kw)
    assert len(client.runs("digits", limit=1000)) == before


def test_ann_graph_path_agrees_with_exact(tmp_path, monkeypatch):
    """Above the engine's exact threshold the pool graph comes from FAISS IVF (miners.knn);
    above EXACT_MAX_ROWS the knn miner's seeds go through the space's ANN index (LanceDB)."""
    from conftest import clustered

    from indexing.store import Store
    from miners import knn, vectors
    from miners.runner import MiningRequest, run_mining, validate_request
    from miners.runs import RunRecord

    store = Store(str(tmp_path))
    x = clustered(3000, 16, clusters=30, seed=2, spread=0.5)
    x[:10] += 6.0  # planted outliers
    col = store.create_collection("ann", spaces={"v": {"dim": 16, "metric": "l2", "index": {"threshold_rows": 1000}}})
    col.upsert({"id": [f"r{i:04d}" for i in range(3000)], "emb_v": x, "half": np.arange(3000) % 2})
    col.build_index("v")
    col.recall_check("v", queries=30)  # tunes nprobes for this data

    def mine(miner: str, size: int, **params) -> list[str]:
        req = MiningRequest(collection="ann", miner=miner, size=size, space="v", params=params)
        _, clean = validate_request(col, req)
        rec = RunRecord(run_id=miner, collection="ann", miner=miner, size=size, seed=0, version=col.version,
                        space="v", params=clean)
        return run_mining(col, rec).ids

    exact_lof = mine("lof", 10, k=10)
    exact_knn = mine("knn", 20, seed_ids=["r0100", "r0200"])
    vectors._CACHE.clear()
    monkeypatch.setattr(vectors, "EXACT_MAX_ROWS", 100)
    monkeypatch.setattr(knn, "EXACT_MAX_PAIRS", 0)
    monkeypatch.setattr(knn, "MIN_IVF_ROWS", 0)
    ann_lof = mine("lof", 10, k=10)
    ann_knn = mine("knn", 20, seed_ids=["r0100", "r0200"])
    assert set(exact_lof) == {f"r{i:04d}" for i in range(10)} == set(ann_lof)
    assert len(set(ann_knn) & set(exact_knn)) >= 18 and not {"r0100", "r0200"} & set(ann_knn)


def test_cli_runs_embedding_miners_with_json_params(client, digits, capsys):
    from service.cli import main

    assert main(["mine", "digits", "knn", "--size", "3", "--space", "px", "--where", "split = 'pool'",
                 "--param", 'seed_ids=["d0003"]', "--quiet", "--server", client.target]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[3] == "d0003" for line in lines)  # related_id
    assert main(["mine", "digits", "chain", "--size", "4", "--model", "lr", "--space", "px", "--quiet",
                 "--param", 'stages=[{"miner": "entropy", "size": 40}, {"miner": "coreset", "size": 4}]',
                 "--server", client.target]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
