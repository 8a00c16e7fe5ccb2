"""Conventions that hold across the service (issue 20, item 5), through a real server:

* distances: ``search`` reports the space's LanceDB distance (squared L2 for ``l2``,
  ``1 - cos`` for ``cosine``); miners report and take the Euclidean distance (between the
  unit vectors for ``cosine``), so for the same pair ``miner = sqrt(search)`` (``l2``) and
  ``miner = sqrt(2 * search)`` (``cosine``) — README "Distances";
* a model that stores only ``samples`` is mined by ``margin``/``entropy``/``least_confidence``
  on the mean of its samples, as ``col.score`` scores it;
* run records keep integer parameters integers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.client import Client
from service.client.errors import FailedPreconditionError
from service.server import ServerConfig, start_server

N, DIM, K, C = 40, 6, 5, 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("conv-data")), port=0, grace_s=2))
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def data(server):
    rng = np.random.default_rng(11)
    vecs = rng.standard_normal((N, DIM)).astype(np.float32)
    samples = rng.dirichlet(np.ones(C) * 0.8, size=(N, K))  # K passes per row, C classes
    with Client(server.address, timeout=60) as c:
        col = c.create_collection("conv", spaces={"e": {"dim": DIM, "metric": "l2"},
                                                  "u": {"dim": DIM, "metric": "cosine"}},
                                  models={"mc": ["a", "b", "c"], "p": ["a", "b", "c"]})
        col.upsert([{"id": f"r{i:02d}", "emb_e": vecs[i].tolist(), "emb_u": vecs[i].tolist(),
                     "pred_mc": {"samples": samples[i].tolist()}} for i in range(N)])
    return vecs, samples


@pytest.fixture
def col(server, data):
    with Client(server.address, timeout=60) as c:
        yield c.collection("conv")


@pytest.mark.parametrize("space", ["e", "u"])
def test_search_and_miner_distances_follow_the_documented_convention(col, data, space):
    vecs, _ = data
    q = 7
    hits = col.search(space, vecs[q], k=N, where="id != 'r07'")
    searched = dict(zip(hits.column("id").to_pylist(), hits.column("_distance").to_pylist(), strict=True))
    a, b = vecs.astype(np.float64), vecs[q].astype(np.float64)
    if space == "e":
        want_search = ((a - b) ** 2).sum(axis=1)  # squared L2, by definition
        euclid = np.sqrt(want_search)
        to_miner = np.sqrt
    else:
        cos = a @ b / (np.linalg.norm(a, axis=1) * np.linalg.norm(b))
        want_search = 1 - cos
        ua, ub = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b)
        euclid = np.linalg.norm(ua - ub, axis=1)  # between the unit vectors

        def to_miner(d):
            return np.sqrt(2 * d)
    ids = [f"r{i:02d}" for i in range(N) if i != q]
    got = np.array([searched[i] for i in ids])
    np.testing.assert_allclose(got, np.delete(want_search, q), rtol=1e-4, atol=1e-5)

    # embedding_distance: each pool row's distance to its nearest reference row (here: r07 alone)
    job = col.mine("embedding_distance", N - 1, space=space, where="id != 'r07'", reference_where="id = 'r07'")
    job.wait()
    res = job.results(columns=["id"])
    mined = dict(zip(res.column("id").to_pylist(), res.column("score").to_pylist(), strict=True))
    assert set(mined) == set(ids)
    m = np.array([mined[i] for i in ids])
    np.testing.assert_allclose(m, np.delete(euclid, q), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m, to_miner(got), rtol=1e-3, atol=1e-4)  # the convention, both ways

    # knn from a seed: score = -(Euclidean distance to the nearest seed)
    job = col.mine("knn", 5, space=space, params={"seed_ids": ["r07"]})
    job.wait()
    res = job.results(columns=["id"])
    for rid, score in zip(res.column("id").to_pylist(), res.column("score").to_pylist(), strict=True):
        assert -score == pytest.approx(float(to_miner(searched[rid])), rel=1e-3, abs=1e-4)
    assert res.column("id").to_pylist() == sorted(searched, key=searched.get)[:5]


@pytest.mark.parametrize("miner", ["margin", "entropy", "least_confidence"])
def test_a_model_with_only_samples_is_mined_on_their_mean(col, data, miner):
    _, samples = data
    p = samples.mean(axis=1)  # (N, C)
    top2 = np.sort(p, axis=1)[:, ::-1][:, :2]
    want = {"margin": 1 - (top2[:, 0] - top2[:, 1]),
            "entropy": -(p * np.log(p)).sum(axis=1) / np.log(C),  # normalised by log C
            "least_confidence": 1 - top2[:, 0]}[miner]
    job = col.mine(miner, 8, model="mc")
    job.wait()
    res = job.results(columns=["id"])
    order = np.argsort(-want, kind="stable")[:8]
    assert res.column("id").to_pylist() == [f"r{i:02d}" for i in order]
    scores = np.asarray(res.column("score").to_pylist())
    np.testing.assert_allclose(scores, want[order], rtol=1e-4)
    # and col.score, given the same samples, agrees with the miner
    scored = col.score({"samples": samples, "id": [f"r{i:02d}" for i in range(N)]}, model="mc")
    by_id = dict(zip(scored.column("id").to_pylist(), scored.column(miner).to_pylist(), strict=True))
    picked = res.column("id").to_pylist()
    np.testing.assert_allclose([by_id[i] for i in picked], scores, rtol=1e-4)


def test_a_model_with_nothing_stored_has_nothing_to_mine(col, data):
    # pred_p has no probs, logits or samples on any row: refused, saying what is read
    with pytest.raises(FailedPreconditionError, match=r"pred_p\.samples.*upsert those columns"):
        col.mine("margin", 5, model="p")


def test_run_records_keep_ints_ints(server, col, data):
    job = col.mine("knn", 3, space="e", params={"seed_ids": ["r01"], "rrf_k": 20, "aggregate": "rrf"})
    job.wait()
    with Client(server.address, timeout=60) as c:
        [rec] = [r for r in c.runs("conv") if r["run_id"] == job.run_id]
    assert rec["params"]["rrf_k"] == 20 and isinstance(rec["params"]["rrf_k"], int)
    assert isinstance(rec["size"], int) and rec["size"] == 3


def test_exports_of_a_samples_only_model_show_the_mean(col, data, tmp_path):
    _, samples = data
    p = samples.mean(axis=1)
    res = col.export(tmp_path / "mc.jsonl", model="mc", ids=["r03", "r04"])
    assert res["rows"] == 2
    rows = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    for r in rows:
        i = int(r["id"][1:])
        assert r["predicted"] == "abc"[int(p[i].argmax())]
        assert r["confidence"] == pytest.approx(float(p[i].max()), rel=1e-6)
    res = col.export(tmp_path / "mc-ls.json", "label-studio", model="mc", ids=["r03"])
    [task] = json.loads((tmp_path / "mc-ls.json").read_text())
    [result] = task["predictions"][0]["result"]
    assert result["value"]["choices"] == ["abc"[int(p[3].argmax())]]
    assert result["score"] == pytest.approx(float(p[3].max()), rel=1e-6)
