"""Streaming scoring, calibration and the edge scorer, against a real server on loopback.

* streamed scores equal the miners' scores for the same (stored) rows, bit for bit;
* thresholds calibrated on one sample keep the requested fraction of held-out traffic;
* the exported edge scorer (NumPy only) gives the server's scores and decisions;
* bad input is refused with INVALID_ARGUMENT / NOT_FOUND naming the problem.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from indexing import measures
from miners import edge
from miners.edge import EdgeScorer
from miners.runner import MiningRequest, run_mining, validate_request
from miners.runs import RunRecord
from service.client import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError
from service.server import ServerConfig, start_server

C, K, D = 4, 5, 16
CLASSES = ["a", "b", "c", "d"]
CENTRES = np.random.default_rng(123).standard_normal((8, D)) * 3


def traffic(n: int, seed: int) -> dict[str, np.ndarray]:
    """Items from one distribution: logits, their softmax, K noisy MC samples and an
    embedding near one of 8 centres (3% far outliers)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, C)) * rng.uniform(0.3, 3, (n, 1))).astype(np.float32)
    probs = measures.softmax(logits).astype(np.float32)
    samples = measures.softmax(logits[:, None, :] + rng.standard_normal((n, K, C))).astype(np.float32)
    emb = CENTRES[rng.integers(0, len(CENTRES), n)] + rng.standard_normal((n, D))
    out = rng.random(n) < 0.03
    emb[out] += rng.standard_normal((int(out.sum()), D)) * 6
    return {"probs": probs, "logits": logits, "samples": samples, "embedding": emb.astype(np.float32)}


def _pred(t: dict[str, np.ndarray]) -> pa.Array:
    from service.client import _nested_to_arrow

    n = len(t["probs"])
    lists = [pa.ListArray.from_arrays(pa.array(np.arange(0, n * C + 1, C, dtype=np.int32)),
                                      pa.array(t[k].reshape(-1))) for k in ("probs", "logits")]
    return pa.StructArray.from_arrays([*lists, _nested_to_arrow(t["samples"])], names=["probs", "logits", "samples"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("scoring")), port=0, grace_s=1))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def col(client):
    """1,000 reference rows and 2,000 calibration rows, with predictions and two spaces
    (l2 'e', cosine 'u')."""
    col = client.create_collection("traffic", models={"m": CLASSES},
                                   spaces={"e": {"dim": D, "metric": "l2"}, "u": D})
    ref, cal = traffic(1000, 1), traffic(2000, 2)
    for name, t in (("ref", ref), ("cal", cal)):
        n = len(t["probs"])
        col.upsert(pa.table({"id": [f"{name}{i:04d}" for i in range(n)], "split": [name] * n, "pred_m": _pred(t),
                             "emb_e": pa.FixedSizeListArray.from_arrays(pa.array(t["embedding"].ravel()), D),
                             "emb_u": pa.FixedSizeListArray.from_arrays(pa.array(t["embedding"].ravel()), D)}))
    return col


@pytest.fixture(scope="module")
def held_out():
    return traffic(2000, 3)


def _miner(server, miner: str, params: dict | None = None, space: str | None = None) -> dict[str, float]:
    store_col = server.store.collection("traffic")
    req = MiningRequest(collection="traffic", miner=miner, size=2000, model=None if space else "m", space=space,
                        where="split = 'cal'", reference_where="split = 'ref'" if space else None,
                        params=params or {})
    _, p = validate_request(store_col, req)
    out = run_mining(store_col, RunRecord(run_id="t", collection="traffic", miner=miner, size=2000, seed=0,
                                          version=store_col.version, model=req.model or "", space=space or "",
                                          where=req.where, reference_where=req.reference_where or "", params=p))
    return dict(zip(out.ids, out.scores.tolist(), strict=True))


def test_streamed_scores_equal_the_miners(server, col):
    stored = col.query("split = 'cal'", columns=["id", "pred_m", "emb_e"])
    got = col.score(stored, model="m", space="e", reference_where="split = 'ref'", batch_rows=300)
    assert got.column("index").to_pylist() == list(range(2000))
    assert got.column("id").to_pylist() == stored.column("id").to_pylist()
    assert got.column("keep").null_count == 2000  # no thresholds: no decision
    ids = got.column("id").to_pylist()
    for name in (*edge.PROB_SCORES, *edge.SAMPLE_SCORES):
        want = _miner(server, name)
        np.testing.assert_array_equal(got.column(name).to_numpy(), [want[i] for i in ids], err_msg=name)
    want = _miner(server, "activation", {"source": "energy"})
    np.testing.assert_array_equal(got.column("energy").to_numpy(), [want[i] for i in ids])
    want = _miner(server, "novelty", {"method": "knn_distance", "k": 10}, space="e")
    np.testing.assert_array_equal(got.column("novelty").to_numpy(), [want[i] for i in ids])
    # LOF novelty and the mean k-NN distance, in the cosine space (vectors stored unit-length)
    stored_u = col.query("split = 'cal'", columns=["id", "emb_u"])
    for params in ({"method": "lof", "k": 7}, {"method": "knn_distance", "how": "mean", "k": 5}):
        want = _miner(server, "novelty", params, space="u")
        res = col.score(stored_u, space="u", reference_where="split = 'ref'", k=params["k"],
                        novelty=params["method"], how=params.get("how", "kth"))
        np.testing.assert_allclose(res.column("novelty").to_numpy(), [want[i] for i in res.column("id").to_pylist()],
                                   rtol=1e-6, err_msg=str(params))  # unit vectors re-normalised: ~1 ulp


def test_calibrated_thresholds_keep_the_budget_on_held_out_data(col, held_out):
    cases = [(0.05, ["entropy"]), (0.1, ["bald", "novelty"]), (0.02, ["margin", "energy", "novelty"])]
    for budget, criteria in cases:
        cal = col.calibrate(budget, where="split = 'cal'", criteria=criteria, model="m", space="e",
                            reference_where="split = 'ref'")
        assert cal["rows"] == 2000 and cal["criteria"] == criteria and set(cal["thresholds"]) == set(criteria)
        assert cal["kept_fraction"] == pytest.approx(math.ceil(budget * 2000) / 2000)
        out = col.score(held_out, model="m", space="e", reference_where="split = 'ref'", thresholds=cal)
        kept = out.column("keep").to_numpy(zero_copy_only=False).mean()
        tol = 4 * math.sqrt(2 * budget * (1 - budget) / 2000)  # two samples of 2,000
        assert abs(kept - budget) <= tol, (budget, criteria, kept)
        if len(criteria) > 1:  # every criterion takes part in the decision
            fired = [(out.column(c).to_numpy() >= cal["thresholds"][c]).sum() for c in criteria]
            assert all(f > 0 for f in fired), fired
    # a sample of the pool gives nearly the same thresholds
    part = col.calibrate(0.05, where="split = 'cal'", criteria=["entropy"], model="m", max_rows=1000, seed=4)
    assert 700 < part["rows"] < 1300
    full = col.calibrate(0.05, where="split = 'cal'", criteria=["entropy"], model="m")
    assert part["thresholds"]["entropy"] == pytest.approx(full["thresholds"]["entropy"], abs=0.05)


def test_calibration_leaves_a_reference_row_out_of_its_own_neighbours(server, col):
    cal = col.calibrate(0.1, where="split = 'ref'", criteria=["novelty"], space="e", reference_where="split = 'ref'")
    ref = col.query("split = 'ref'", columns=["id", "emb_e"])
    vectors = np.asarray(ref.column("emb_e").to_pylist(), dtype=np.float32)
    pool = server.store.collection("traffic").query("split = 'ref'", columns=["id"])  # the pool's row order
    assert pool.column("id").to_pylist() == ref.column("id").to_pylist()
    own = edge.NoveltyReference(vectors, k=10).scores(vectors, self_index=np.arange(len(vectors)))
    assert cal["thresholds"]["novelty"] == edge.calibrate_thresholds({"novelty": own}, 0.1)["novelty"]


def test_edge_scorer_equals_the_server(tmp_path, col, held_out):
    opts = dict(model="m", reference_where="split = 'ref'")
    for space in ("e", "u"):
        for fmt in ("npz", "json"):
            path = tmp_path / f"scorer_{space}.{fmt}"
            info = col.export_scorer(path, budget=0.05, where="split = 'cal'", criteria=["bald", "novelty"],
                                     space=space, reference="all", novelty="lof", k=8, **opts)
            assert info["reference_rows"] == 1000 and info["format"] == fmt and path.stat().st_size == info["bytes"]
            scorer = EdgeScorer.load(path)
            assert scorer.thresholds == info["thresholds"] and scorer.budget == 0.05
            assert scorer.meta["collection"] == "traffic" and scorer.meta["reference_kind"] == "all"
            server_out = col.score(held_out, space=space, thresholds=scorer.thresholds, novelty="lof", k=8, **opts)
            local = scorer.score(**held_out)
            for name in [*edge.PROB_SCORES, *edge.SAMPLE_SCORES, "energy", "novelty"]:
                np.testing.assert_array_equal(local[name], server_out.column(name).to_numpy(),
                                              err_msg=f"{space} {fmt} {name}")
            np.testing.assert_array_equal(local["keep"], server_out.column("keep").to_numpy(zero_copy_only=False))
            # the server calibrated with the same formulas: its thresholds keep 5% of its own pool
            assert info["kept_fraction"] == pytest.approx(0.05)


def test_compact_edge_references_keep_the_budget(tmp_path, col, held_out):
    for reference, size in (("sample", 150), ("centroids", 24)):
        path = tmp_path / f"{reference}.npz"
        info = col.export_scorer(path, budget=0.05, where="split = 'cal'", criteria=["novelty"], space="e",
                                 reference_where="split = 'ref'", reference=reference, reference_size=size, seed=1)
        assert info["reference_rows"] == size
        scorer = EdgeScorer.load(path)
        assert scorer.meta["reference_kind"] == reference and scorer.reference.vectors.shape == (size, D)
        kept = scorer.keep(embedding=held_out["embedding"]).mean()
        assert abs(kept - 0.05) <= 4 * math.sqrt(2 * 0.05 * 0.95 / 2000), (reference, kept)
        assert path.stat().st_size < 40_000  # a small file for a device


def test_ann_path_is_close_to_exact(monkeypatch, client, held_out):
    """Above EXACT_MAX_ROWS (lowered here) the reference is searched in an IVF index of the
    k-NN graph engine, tuned for recall@k >= 0.95: a k-th neighbour distance can only come
    out longer than the exact one (a missed neighbour), and rarely does."""
    import service.scoring

    col = client.create_collection("indexed", spaces={"e": {"dim": D, "metric": "l2"}})
    ref = traffic(1200, 5)["embedding"]
    col.upsert({"id": [f"r{i}" for i in range(len(ref))], "emb_e": ref})
    col.build_index("e", kind="ivf_flat").wait(timeout=120)
    monkeypatch.setattr(service.scoring, "EXACT_MAX_ROWS", 100)
    items = {"embedding": held_out["embedding"][:500]}
    exact = edge.NoveltyReference(ref, k=10).scores(held_out["embedding"][:500])
    ann = col.score(items, space="e").column("novelty").to_numpy()
    assert (ann >= exact * (1 - 1e-5)).all()
    assert np.mean(np.isclose(ann, exact, rtol=1e-4)) > 0.8 and np.median(ann / exact - 1) < 1e-5
    lof = col.score(items, space="e", novelty="lof").column("novelty").to_numpy()
    exact_lof = edge.NoveltyReference(ref, k=10, method="lof").scores(held_out["embedding"][:500])
    assert np.isfinite(lof).all() and np.corrcoef(lof, exact_lof)[0, 1] > 0.95
    cal = col.calibrate(0.1, criteria=["novelty"], space="e")  # reference rows, each leaving itself out
    own = edge.NoveltyReference(ref, k=10).scores(ref, self_index=np.arange(len(ref)))
    assert cal["thresholds"]["novelty"] == pytest.approx(edge.calibrate_thresholds({"novelty": own}, 0.1)["novelty"],
                                                         rel=0.05)


def test_missing_inputs_and_streams(col, held_out):
    # items with a null embedding or no predictions: their scores are null, they do not fire
    items = pa.table({"id": ["x", "y", "z"],
                      "probs": pa.array([held_out["probs"][0].tolist(), None, held_out["probs"][2].tolist()]),
                      "embedding": pa.array([held_out["embedding"][0].tolist(), held_out["embedding"][1].tolist(),
                                             None])})
    out = col.score(items, model="m", space="e", reference_where="split = 'ref'",
                    thresholds={"entropy": 0.0, "novelty": 1e9})
    assert out.column("entropy").is_null().to_pylist() == [False, True, False]
    assert out.column("novelty").is_null().to_pylist() == [False, False, True]
    assert out.column("keep").to_pylist() == [True, False, True]
    # a generator of chunks streams: one table per request, as soon as it is scored
    chunks = ({"probs": held_out["probs"][i:i + 100]} for i in range(0, 300, 100))
    parts = list(col.score_stream(chunks, model="m", thresholds={"margin": 0.5}))
    assert [p.num_rows for p in parts] == [100, 100, 100]
    assert parts[2].column("index").to_pylist()[0] == 200


def test_edge_module_needs_numpy_only():
    code = ("import sys\n"
            "for m in ('torch', 'lancedb', 'lance', 'grpc', 'pyarrow', 'sklearn', 'scipy', 'pandas'):\n"
            "    sys.modules[m] = None\n"
            "import numpy as np\n"
            "from miners.edge import EdgeScorer, NoveltyReference\n"
            "s = EdgeScorer(thresholds={'entropy': 0.5, 'novelty': 1.0},"
            " reference=NoveltyReference(np.eye(3, dtype=np.float32), k=2))\n"
            "out = s.score(probs=np.array([[0.5, 0.5], [1.0, 0.0]]), embedding=np.eye(3)[:2] * 3)\n"
            "s2 = EdgeScorer.from_bytes(s.to_bytes('json'))\n"
            "assert (s2.score(probs=np.array([[0.5, 0.5], [1.0, 0.0]]), embedding=np.eye(3)[:2] * 3)['keep']"
            " == out['keep']).all()\n"
            "print(out['keep'].tolist())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[True, True]"


def test_bad_input_is_refused(col, held_out):
    opts = dict(model="m", space="e", reference_where="split = 'ref'")
    with pytest.raises(InvalidArgumentError, match=r"row 1 \(id 'b'\) has 3 values; model 'm' has 4 classes"):
        col.score({"id": ["a", "b"], "probs": [[0.25] * 4, [0.5, 0.25, 0.25]]}, **opts)
    with pytest.raises(InvalidArgumentError, match=r"row 0 does not sum to 1"):
        col.score({"probs": [[0.5, 0.5, 0.5, 0.5]]}, **opts)
    with pytest.raises(InvalidArgumentError, match=r"samples.*the first item 5; every item of a batch needs the same K"):
        col.score({"samples": [held_out["samples"][0].tolist(), held_out["samples"][1, :3].tolist()]}, **opts)
    with pytest.raises(InvalidArgumentError, match=r"row 0 has dimension 8; space 'e' has dimension 16"):
        col.score({"embedding": np.ones((2, 8), np.float32)}, **opts)
    with pytest.raises(InvalidArgumentError, match=r"NaN"):
        col.score({"embedding": np.full((1, D), np.nan, np.float32)}, **opts)
    with pytest.raises(InvalidArgumentError, match=r"zero vector"):
        col.score({"embedding": np.zeros((1, D), np.float32)}, space="u")
    with pytest.raises(InvalidArgumentError, match=r"unknown column\(s\) prob"):
        col.score({"prob": [[0.25] * 4]}, **opts)
    with pytest.raises(InvalidArgumentError, match=r"unknown score\(s\) entropyy"):
        col.score({"probs": [[0.25] * 4]}, model="m", thresholds={"entropyy": 0.5})
    with pytest.raises(InvalidArgumentError, match=r"batch 0: the items carry embeddings but spec.space is not set"):
        col.score({"embedding": np.ones((1, D), np.float32)}, model="m")
    with pytest.raises(NotFoundError, match=r"model 'nope' not found"):
        col.score({"probs": [[0.25] * 4]}, model="nope")
    with pytest.raises(NotFoundError, match=r"space 'nope' not found"):
        col.score({"embedding": np.ones((1, D), np.float32)}, space="nope")
    with pytest.raises(NotFoundError):
        col.client.collection("absent").score({"probs": [[0.5, 0.5]]})
    with pytest.raises(InvalidArgumentError, match=r"budget must be a fraction in \(0, 1\)"):
        col.calibrate(1.5, criteria=["entropy"], model="m")
    with pytest.raises(InvalidArgumentError, match=r"criterion 'novelty' needs spec.space"):
        col.calibrate(0.1, criteria=["novelty"], model="m")
    with pytest.raises(FailedPreconditionError, match=r"matches no rows"):
        col.calibrate(0.1, where="split = 'none'", criteria=["entropy"], model="m")
    with pytest.raises(FailedPreconditionError, match=r"no reference row has a vector"):
        col.score({"embedding": np.ones((1, D), np.float32)}, space="e", reference_where="split = 'none'")
    with pytest.raises(InvalidArgumentError, match=r"spec.k must be in"):
        col.score({"probs": [[0.25] * 4]}, model="m", k=5000)
    with pytest.raises(InvalidArgumentError, match=r"LOF novelty needs reference rows"):
        col.export_scorer("/dev/null", space="e", novelty="lof", reference="centroids")


def test_detections_score_like_the_detection_miner(server, client):
    rng = np.random.default_rng(9)
    rows = []
    for i in range(60):
        boxes = []
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 50, 2)
            p = rng.dirichlet(np.ones(3)).tolist()
            boxes.append({"x1": x, "y1": y, "x2": x + rng.uniform(1, 20), "y2": y + rng.uniform(1, 20),
                          "score": float(rng.uniform(0.05, 1)), "probs": p})
        rows.append({"id": f"img{i}", "pred_det": {"boxes": boxes}})
    col = client.create_collection("dets", models={"det": {"classes": ["cat", "dog", "bird"], "task": "detection"}})
    col.upsert(rows)
    store_col = server.store.collection("dets")
    req = MiningRequest(collection="dets", miner="detection", size=60, model="det")
    _, params = validate_request(store_col, req)
    out = run_mining(store_col, RunRecord(run_id="d", collection="dets", miner="detection", size=60, seed=0,
                                          version=store_col.version, model="det", params=params))
    want = dict(zip(out.ids, out.scores.tolist(), strict=True))
    got = col.score(col.query(columns=["id", "pred_det"]), model="det")
    np.testing.assert_array_equal(got.column("detection").to_numpy(), [want[i] for i in got.column("id").to_pylist()])
    scorer = EdgeScorer(classes=("cat", "dog", "bird"))
    boxes = [{"boxes": [[b["x1"], b["y1"], b["x2"], b["y2"]] for b in r["pred_det"]["boxes"]],
              "scores": [b["score"] for b in r["pred_det"]["boxes"]],
              "probs": [b["probs"] for b in r["pred_det"]["boxes"]] or None} for r in rows]
    local = scorer.score(boxes=boxes)["detection"]
    np.testing.assert_allclose(local, [want[r["id"]] for r in rows], rtol=1e-6)  # float32 as stored


def test_asyncio_client(server, tmp_path, col, held_out):
    import asyncio

    from service.client import AsyncClient

    items = {"probs": held_out["probs"][:50], "embedding": held_out["embedding"][:50]}
    opts = dict(model="m", space="e", reference_where="split = 'ref'")
    sync = col.score(items, **opts)

    async def main():
        async with AsyncClient(server.address) as client:
            acol = client.collection("traffic")
            cal = await acol.calibrate(0.1, where="split = 'cal'", criteria=["entropy"], model="m")
            out = await acol.score(items, thresholds=cal, **opts)
            info = await acol.export_scorer(tmp_path / "a.json", thresholds=cal, **opts)
            return cal, out, info

    cal, out, info = asyncio.run(main())
    assert out.drop_columns(["keep"]).equals(sync.drop_columns(["keep"]))
    assert out.column("keep").to_pylist() == (sync.column("entropy").to_numpy() >= cal["thresholds"]["entropy"]).tolist()
    assert EdgeScorer.load(tmp_path / "a.json").thresholds == cal["thresholds"] == info["thresholds"]
