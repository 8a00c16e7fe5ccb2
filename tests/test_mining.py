"""Mining end to end: a real server and LanceDB table, the client, the CLI; each miner
checked against a float64 computation from its definition on the stored values."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pytest

from indexing.store import Store
from miners import runner as runner_module
from miners.runner import MiningRequest, run_mining, validate_request
from miners.runs import RunRecord
from service.cli import main
from service.client import (
    AssayClientError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from service.server import ServerConfig, start_server

C = 4
CLASSES = ["a", "b", "c", "d"]


def _probs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(C, 0.7), n).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("mining")), port=0, grace_s=2))
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def pool(client):
    """3,000 rows: 2,000 unlabeled with probs, 500 unlabeled with only logits, 500 labeled."""
    col = client.create_collection("pool", models={"m": CLASSES})
    probs = _probs(3000, seed=1)
    logits = np.random.default_rng(2).normal(0, 2, (3000, C)).astype(np.float32)
    rows = []
    for i in range(3000):
        pred = {"logits": logits[i].tolist()} if 2000 <= i < 2500 else {"probs": probs[i].tolist()}
        rows.append({"id": f"r{i:04d}", "split": "train" if i >= 2500 else "pool",
                     "label": CLASSES[i % C] if i >= 2500 else None, "pred_m": pred})
    col.upsert(rows)
    return col, probs.astype(np.float64), logits.astype(np.float64)


def _expected_top(scores: np.ndarray, ids: list[str], k: int) -> tuple[list[str], np.ndarray]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def _definition(miner: str, p: np.ndarray) -> np.ndarray:
    s = np.sort(p, axis=1)[:, ::-1]
    if miner == "least_confidence":
        return 1 - s[:, 0]
    if miner == "margin":
        return 1 - (s[:, 0] - s[:, 1])
    if miner == "ratio":
        return s[:, 1] / s[:, 0]
    ent = np.zeros(len(p))
    for i, row in enumerate(p):
        ent[i] = -sum(x * np.log(x) for x in row if x > 0) / np.log(C)
    return ent


@pytest.mark.parametrize("miner", ["least_confidence", "margin", "ratio", "entropy"])
def test_uncertainty_miners_match_their_definitions(pool, miner):
    col, probs, _ = pool
    job = col.mine(miner, size=25, model="m", where="split = 'pool' AND pred_m.probs IS NOT NULL")
    job.wait(timeout=120)
    got = job.results(columns=["split"])
    assert got.column_names == ["id", "rank", "score", "split"]
    assert got["rank"].to_pylist() == list(range(1, 26)) and set(got["split"].to_pylist()) == {"pool"}
    ids = [f"r{i:04d}" for i in range(2000)]
    want_ids, want_scores = _expected_top(_definition(miner, probs[:2000]), ids, 25)
    assert got["id"].to_pylist() == want_ids
    np.testing.assert_allclose(got["score"].to_numpy(), want_scores, rtol=1e-9)
    run = job.run()
    assert run["state"] == "SUCCEEDED" and run["rows_scanned"] == 2000 and run["rows_skipped"] == 0
    assert run["params"]["stochastic"] == "none"  # defaults are recorded


def test_rows_with_only_logits_go_through_a_tempered_softmax(pool):
    col, _, logits = pool
    job = col.mine("entropy", size=10, model="m", where="pred_m.probs IS NULL AND split = 'pool'",
                   params={"logits_temperature": 2.0})
    job.wait(timeout=120)
    z = logits[2000:2500] / 2.0
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want_ids, want_scores = _expected_top(_definition("entropy", p), [f"r{i:04d}" for i in range(2000, 2500)], 10)
    got = job.results()
    assert got["id"].to_pylist() == want_ids
    np.testing.assert_allclose(got["score"].to_numpy(), want_scores, rtol=1e-6)


def test_reverse_picks_the_most_confident(pool):
    col, probs, _ = pool
    job = col.mine("least_confidence", size=5, model="m", where="split = 'pool' AND pred_m.probs IS NOT NULL",
                   reverse=True)
    job.wait(timeout=60)
    scores = _definition("least_confidence", probs[:2000])
    want = [f"r{i:04d}" for i in np.argsort(scores, kind="stable")[:5]]
    assert job.results()["id"].to_pylist() == want


def test_stochastic_selection_is_seeded(pool):
    col, _, _ = pool

    def run(seed: int, temperature: float = 1.0) -> list[str]:
        job = col.mine("margin", size=30, model="m", where="split = 'pool'", seed=seed,
                       params={"stochastic": "power", "temperature": temperature})
        return job.wait(timeout=60) and job.results()["id"].to_pylist()

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    deterministic = col.mine("margin", size=30, model="m", where="split = 'pool'")
    deterministic.wait(timeout=60)
    # At a tiny temperature, sampling collapses onto the top scores.
    assert set(run(5, temperature=1e-4)) == set(deterministic.results()["id"].to_pylist())


def test_class_balanced_budget(pool):
    col, probs, _ = pool
    job = col.mine("margin", size=20, model="m", where="split = 'pool' AND pred_m.probs IS NOT NULL",
                   params={"balance": "equal"})
    job.wait(timeout=60)
    picked = [int(i[1:]) for i in job.results()["id"].to_pylist()]
    predicted = probs[picked].argmax(axis=1)
    assert np.bincount(predicted, minlength=C).tolist() == [5, 5, 5, 5]


def test_runs_are_persisted_and_reproducible(server, client, pool):
    col, _, _ = pool
    job = col.mine("margin", size=15, model="m", where="label IS NULL")
    job.wait(timeout=60)
    first = job.results()
    version = job.run()["version"]
    # New, very uncertain rows arrive: a new run picks them, a rerun on the old version does not.
    col.upsert([{"id": f"new{i}", "pred_m": {"probs": [0.25, 0.25, 0.25, 0.25]}} for i in range(5)])
    fresh = col.mine("margin", size=15, model="m", where="label IS NULL")
    fresh.wait(timeout=60)
    assert {f"new{i}" for i in range(5)} <= set(fresh.results()["id"].to_pylist())
    again = job.rerun()
    again.wait(timeout=60)
    assert again.run()["version"] == version and again.run_id != job.run_id
    assert again.results().equals(first)
    listed = {r["run_id"] for r in client.runs("pool")}
    assert {job.run_id, fresh.run_id, again.run_id} <= listed
    assert client.mining_job(job.run_id).results().equals(first)


def test_results_outlive_the_server(tmp_path):
    data = str(tmp_path)
    srv = start_server(ServerConfig(data=data, port=0, grace_s=1))
    with Client(srv.address) as c:
        col = c.create_collection("p", models={"m": CLASSES})
        col.upsert([{"id": f"r{i}", "pred_m": {"probs": p.tolist()}} for i, p in enumerate(_probs(50, 3))])
        job = col.mine("entropy", size=5, model="m")
        job.wait(timeout=60)
        before = job.results(columns=["id"])
    srv.stop(1)
    srv = start_server(ServerConfig(data=data, port=0, grace_s=1))
    try:
        with Client(srv.address) as c:
            assert c.mining_job(job.run_id).results(columns=["id"]).equals(before)
    finally:
        srv.stop(1)


def test_chunked_mining_of_50k_rows_equals_in_memory(tmp_path):
    store = Store(str(tmp_path), mining_score_cache_bytes=0)  # the whole pool read, chunk by chunk
    col = store.create_collection("big", models={"m": CLASSES})
    n = 50_000
    probs = _probs(n, seed=7)
    ids = [f"r{i:05d}" for i in range(n)]
    preds = pa.StructArray.from_arrays(
        [pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), C).cast(pa.list_(pa.float32()))], ["probs"])
    for s in range(0, n, 10_000):
        col.upsert(pa.table({"id": ids[s:s + 10_000], "pred_m": preds.slice(s, 10_000)}))
    req = MiningRequest(collection="big", miner="margin", size=100, model="m")
    _, params = validate_request(col, req)
    rec = RunRecord(run_id="t", collection="big", miner="margin", size=100, seed=0, version=col.version,
                    model="m", params=params)
    small = run_mining(col, rec, chunk_rows=997)
    large = run_mining(col, rec, chunk_rows=100_000)
    want_ids, want_scores = _expected_top(_definition("margin", probs.astype(np.float64)), ids, 100)
    assert small.ids == large.ids == want_ids
    np.testing.assert_allclose(small.scores, want_scores, rtol=1e-9)
    assert small.rows_scanned == n and small.rows_skipped == 0


def test_bayesian_miners_and_batchbald(client):
    from miners.bayesian import bald_scores

    rng = np.random.default_rng(4)
    k = 8
    base = rng.dirichlet(np.full(3, 0.5), (20, k))  # 20 distinct items, K=8 samples, C=3
    samples = np.concatenate([base, base, base])    # every item three times
    col = client.create_collection("bayes", models={"mc": ["x", "y", "z"]})
    col.upsert([{"id": f"item{i % 20}-copy{i // 20}", "pred_mc": {"samples": s.tolist()}}
                for i, s in enumerate(samples.astype(np.float32))])
    bald = col.mine("bald", size=9, model="mc")
    bald.wait(timeout=60)
    top = bald.results()
    stored = samples.astype(np.float32).astype(np.float64)
    scores = bald_scores(stored)
    # Copies score identically; the top-9 by BALD are three items, three copies each.
    assert len({i.split("-")[0] for i in top["id"].to_pylist()}) == 3
    np.testing.assert_allclose(np.sort(top["score"].to_numpy())[::-1], np.sort(scores)[::-1][:9], rtol=1e-9)
    batch = col.mine("batchbald", size=6, model="mc", params={"candidates": 60})
    batch.wait(timeout=120)
    picked = batch.results()["id"].to_pylist()
    assert len(picked) == 6 and len({i.split("-")[0] for i in picked}) == 6  # no two copies


def test_detection_learning_loss_and_aum(client):
    col = client.create_collection("det", models={"det": ["car", "person"]})
    certain = {"x1": 0.0, "y1": 0.0, "x2": 10.0, "y2": 10.0, "score": 0.9, "probs": [0.99, 0.01]}
    unsure = {"x1": 20.0, "y1": 20.0, "x2": 30.0, "y2": 30.0, "score": 0.5, "probs": [0.5, 0.5]}
    unsure_dup = {**unsure, "x1": 21.0, "score": 0.45}  # overlaps `unsure`, same class: suppressed by NMS
    col.upsert([
        {"id": "one-unsure", "pred_det": {"boxes": [certain, unsure], "loss": 0.1}},
        {"id": "dup-unsure", "pred_det": {"boxes": [unsure, unsure_dup], "loss": 3.0}},
        {"id": "two-unsure", "pred_det": {"boxes": [unsure, {**unsure, "x1": 100.0, "x2": 110.0}], "loss": 1.0}},
        {"id": "empty", "pred_det": {"boxes": [], "loss": 0.5}},
    ])
    job = col.mine("detection", size=4, model="det", params={"aggregate": "sum", "nms_iou": 0.5})
    job.wait(timeout=60)
    order = job.results()["id"].to_pylist()
    assert order[0] == "two-unsure" and order[-1] == "empty"
    scores = dict(zip(order, job.results()["score"].to_pylist(), strict=True))
    assert scores["dup-unsure"] == pytest.approx(1.0)  # the near-duplicate box was suppressed
    no_nms = col.mine("detection", size=4, model="det", params={"aggregate": "sum", "nms_iou": 1.0})
    no_nms.wait(timeout=60)
    assert dict(zip(no_nms.results()["id"].to_pylist(), no_nms.results()["score"].to_pylist(),
                    strict=True))["dup-unsure"] == pytest.approx(2.0)
    loss = col.mine("learning_loss", size=2, model="det")
    loss.wait(timeout=60)
    assert loss.results()["id"].to_pylist() == ["dup-unsure", "two-unsure"]

    aum = client.create_collection("aum", models={"clf": ["a", "b"]})
    # margins of the assigned label over 3 epochs: clean items grow confident, one is mislabeled
    aum.upsert([
        {"id": "clean1", "label": "a", "pred_clf": {"epoch_logits": [[1, 0], [2, 0], [3, 0]]}},
        {"id": "clean2", "label": "b", "pred_clf": {"epoch_logits": [[0, 1], [0, 1], [0, 2]]}},
        {"id": "flipped", "label": "a", "pred_clf": {"epoch_logits": [[0, 1], [0, 2], [0, 3]]}},
        {"id": "unlabeled", "pred_clf": {"epoch_logits": [[0, 5], [0, 5], [0, 5]]}},
    ])
    job = aum.mine("aum", size=3, model="clf")
    job.wait(timeout=60)
    got = job.results()
    assert got["id"].to_pylist() == ["flipped", "clean2", "clean1"]
    np.testing.assert_allclose(got["score"].to_numpy(), [2.0, -4 / 3, -2.0])  # score = -AUM
    assert job.run()["rows_skipped"] == 1  # the unlabeled row has no label to score


BAD = [
    (dict(miner="no_such_miner", size=5, model="m"), InvalidArgumentError, "unknown miner"),
    (dict(miner="margin", size=0, model="m"), InvalidArgumentError, "size"),
    (dict(miner="margin", size=2_000_000, model="m"), InvalidArgumentError, "size"),
    (dict(miner="margin", size=5), InvalidArgumentError, "model="),
    (dict(miner="margin", size=5, model="nope"), NotFoundError, "model 'nope'"),
    (dict(miner="margin", size=5, model="m", params={"temperature": "hot"}), InvalidArgumentError, "temperature"),
    (dict(miner="margin", size=5, model="m", params={"temperature": 0}), InvalidArgumentError, "temperature"),
    (dict(miner="margin", size=5, model="m", params={"bogus": 1}), InvalidArgumentError, "bogus"),
    (dict(miner="margin", size=5, model="m", params={"stochastic": "magic"}), InvalidArgumentError, "stochastic"),
    (dict(miner="margin", size=5, model="m", where="nope = 1"), InvalidArgumentError, "filter"),
    (dict(miner="margin", size=5, model="m", where="split = 'nowhere'"), FailedPreconditionError, "matches no rows"),
    (dict(miner="bald", size=5, model="m"), FailedPreconditionError, "samples"),
    (dict(miner="margin", size=5, model="m", reference_where="split = 'train'"), InvalidArgumentError, "reference"),
    (dict(miner="margin", size=5, model="m", version=10_000), NotFoundError, "version"),
]


@pytest.mark.parametrize(("request_kw", "error", "needle"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_start_nothing(client, pool, request_kw, error, needle):
    col, _, _ = pool
    runs_before = len(client.runs("pool", limit=1000))
    with pytest.raises(error, match=needle):
        col.mine(**request_kw)
    assert len(client.runs("pool", limit=1000)) == runs_before


def test_unknown_collection(client):
    with pytest.raises(NotFoundError):
        client.collection("nowhere").mine("margin", size=3, model="m")


def test_cancel_a_run_mid_way(client, pool, monkeypatch):
    monkeypatch.setattr(runner_module, "CHUNK_ROWS", 8)  # ~375 chunks: time to cancel
    col, _, _ = pool
    job = col.mine("margin", size=10, model="m")
    for update in job.watch():
        if update.progress > 0.05:
            break
    job.cancel()
    with pytest.raises(AssayClientError) as err:
        job.wait(timeout=60)
    assert err.value.code == "CANCELLED"
    assert job.run()["state"] == "CANCELLED"
    with pytest.raises(FailedPreconditionError, match="CANCELLED"):
        job.results()


def test_cli_mine_and_runs(server, pool, tmp_path, capsys):
    out = tmp_path / "picked.csv"
    assert main(["mine", "pool", "margin", "--size", "7", "--model", "m", "--where", "label IS NULL",
                 "--param", "stochastic=softmax", "--param", "temperature=0.1", "--seed", "3",
                 "--columns", "split", "--output", str(out), "--quiet", "--server", server.address]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7 and {r["split"] for r in rows} == {"pool"} and rows[0]["rank"] == "1"
    assert main(["mine", "pool", "entropy", "--size", "3", "--model", "m", "--quiet", "--server", server.address]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and printed[0].split("\t")[1] == "1"
    assert main(["runs", "pool", "--server", server.address]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["miners", "--server", server.address]) == 0
    assert "batchbald" in capsys.readouterr().out
    assert main(["mine", "pool", "nope", "--size", "3", "--server", server.address]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
