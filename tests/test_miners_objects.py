"""Object-level mining (issue 19, item 2): the embedding miners on a detection model's
per-box embeddings (``space="objects:<model>"``), through a real server on loopback and real
LanceDB tables. Each miner's picks are checked against a direct computation from its
definition on small hand-built box embeddings; the per-image aggregation against its
definition; boxes without an embedding are skipped and counted; bad input is refused with
INVALID_ARGUMENT naming the fix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from miners.runs import images_of
from service.client import Client, InvalidArgumentError, NotFoundError
from service.server import ServerConfig, start_server

CLASSES = ["a", "b"]

# image -> box embeddings (None: a box stored without one); split pool unless named "r*"
POOL = {
    "i0": [[0.0, 0.0], [10.0, 10.0]],
    "i1": [[0.01, 0.0], [5.0, 5.0]],           # i1#0: a near-duplicate of i0#0 in another image
    "i2": [[3.0, 0.0], None],                  # i2#1 has no embedding: skipped, counted
    "i3": [[-8.0, 2.0]],                       # far from everything
    "i4": [],                                  # no boxes
}
REFERENCE = {"r0": [[0.0, 0.1], [10.0, 9.5]]}


def _box(k: int, emb) -> dict:
    box = {"x1": 20.0 * k, "y1": 0.0, "x2": 20.0 * k + 10, "y2": 10.0, "score": 0.5, "probs": [0.6, 0.4]}
    if emb is not None:
        box["embedding"] = emb
    return box


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("objmine")), port=0, grace_s=2))
    with Client(srv.address, timeout=120) as c:
        yield c
    srv.stop(1)


@pytest.fixture(scope="module")
def col(client):
    col = client.create_collection("objs", spaces={"img": {"dim": 2, "metric": "l2"}}, models={
        "det": {"classes": CLASSES, "task": "detection", "box_embedding_dim": 2},
        "plain": {"classes": CLASSES, "task": "detection"},
        "cls": CLASSES})
    rows = []
    for split, images in (("pool", POOL), ("ref", REFERENCE)):
        for i, embs in images.items():
            rows.append({"id": i, "split": split, "emb_img": [1.0, 0.0],
                         "pred_det": {"boxes": [_box(k, e) for k, e in enumerate(embs)]}})
    col.upsert(rows)
    return col


def _objects(images: dict) -> tuple[list[str], np.ndarray]:
    """The boxes with an embedding, in scan order: (``"<image>#<box>"``, (n, 2) vectors)."""
    names, vecs = [], []
    for i, embs in images.items():
        for k, e in enumerate(embs):
            if e is not None:
                names.append(f"{i}#{k}")
                vecs.append(e)
    return names, np.asarray(vecs, dtype=np.float64)


POOL_NAMES, POOL_X = _objects(POOL)
REF_NAMES, REF_X = _objects(REFERENCE)


def _mine(col, miner: str, size: int, where: str = "split = 'pool'", **kw):
    job = col.mine(miner, size=size, space="objects:det", where=where, **kw)
    job.wait(timeout=60)
    res = job.results()
    names = [f"{i}#{b}" for i, b in zip(res["id"].to_pylist(), res["box"].to_pylist(), strict=True)]
    return names, res, job


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def test_knn_from_an_object_seed_matches_brute_force(col):
    names, res, job = _mine(col, "knn", 3, params={"seed_ids": ["i0#0"]})
    seed = POOL_X[POOL_NAMES.index("i0#0")]
    d = np.linalg.norm(POOL_X - seed, axis=1)
    order = [POOL_NAMES[j] for j in np.argsort(d, kind="stable") if POOL_NAMES[j] != "i0#0"]
    assert names == order[:3]
    assert names[0] == "i1#0"  # the same object seen in another image
    np.testing.assert_allclose(res["score"].to_numpy(), -np.sort(d)[1:4], rtol=1e-5)
    assert res["related_id"].to_pylist() == ["i0#0"] * 3


def test_knn_from_an_image_seed_uses_every_box_of_it(col):
    names, res, _ = _mine(col, "knn", 3, params={"seed_ids": ["i0"]})
    seeds = POOL_X[[POOL_NAMES.index("i0#0"), POOL_NAMES.index("i0#1")]]
    others = [j for j, n in enumerate(POOL_NAMES) if not n.startswith("i0#")]
    d = _dist(POOL_X[others], seeds).min(axis=1)
    want = [POOL_NAMES[others[j]] for j in np.argsort(d, kind="stable")[:3]]
    assert names == want


def test_near_duplicate_objects_in_different_images_are_found(col):
    names, res, job = _mine(col, "near_duplicates", 5, params={"threshold": 0.1, "k": 3})
    d = _dist(POOL_X, POOL_X)
    np.fill_diagonal(d, np.inf)
    pairs = {(POOL_NAMES[max(i, j)], POOL_NAMES[min(i, j)]) for i, j in zip(*np.nonzero(d <= 0.1), strict=True)}
    assert pairs == {("i1#0", "i0#0")}
    assert names == ["i1#0"] and res["related_id"].to_pylist() == ["i0#0"]
    np.testing.assert_allclose(res["score"].to_numpy(), [-0.01], rtol=1e-4)


def _kcenter(x: np.ndarray, ref: np.ndarray, size: int) -> list[int]:
    """k-center greedy from the definition: each pick the point farthest from the centres so far."""
    centres = list(ref)
    picks = []
    for _ in range(size):
        d = _dist(x, np.asarray(centres)).min(axis=1)
        d[picks] = -1
        picks.append(int(np.argmax(d)))
        centres.append(x[picks[-1]])
    return picks


def test_coreset_picks_the_object_farthest_from_the_reference_objects(col):
    names, res, job = _mine(col, "coreset", 3, reference_where="split = 'ref'")
    want = [POOL_NAMES[j] for j in _kcenter(POOL_X, REF_X, 3)]
    assert names == want and names[0] == "i3#0"
    np.testing.assert_allclose(res["score"].to_numpy()[0], _dist(POOL_X[[POOL_NAMES.index("i3#0")]], REF_X).min(),
                               rtol=1e-5)


def test_typicality_matches_the_definition(col):
    names, res, _ = _mine(col, "typicality", len(POOL_NAMES), params={"k": 2})
    d = np.sort(_dist(POOL_X, POOL_X), axis=1)[:, 1:3]  # own row left out
    score = 1.0 / d.mean(axis=1)
    got = dict(zip(names, res["score"].to_numpy(), strict=True))
    assert set(got) == set(POOL_NAMES)
    np.testing.assert_allclose([got[n] for n in POOL_NAMES], score, rtol=1e-5)


def test_novelty_against_the_objects_of_the_reference_images(col):
    names, res, _ = _mine(col, "novelty", 2, reference_where="split = 'ref'",
                          params={"method": "knn_distance", "k": 1})
    d = _dist(POOL_X, REF_X).min(axis=1)
    assert names == [POOL_NAMES[j] for j in np.argsort(-d, kind="stable")[:2]]
    np.testing.assert_allclose(res["score"].to_numpy(), np.sort(d)[::-1][:2], rtol=1e-5)


def test_boxes_without_an_embedding_are_skipped_and_counted(col):
    _, _, job = _mine(col, "typicality", 2, params={"k": 2})
    run = job.run()
    assert run["rows_skipped"] == 1  # i2#1
    assert run["stats"]["objects"] == {"scanned": len(POOL_NAMES) + 1, "skipped_no_embedding": 1,
                                       "mined": len(POOL_NAMES)}


def test_results_aggregate_to_images_by_their_best_object(col):
    names, res, job = _mine(col, "typicality", len(POOL_NAMES), params={"k": 2})
    # by definition: an image's score is the max of its objects' scores, its best object the argmax
    best: dict[str, tuple[float, int]] = {}
    for i, b, s in zip(res["id"].to_pylist(), res["box"].to_pylist(), res["score"].to_pylist(), strict=True):
        if i not in best or s > best[i][0]:
            best[i] = (s, b)
    want = sorted(best, key=lambda i: -best[i][0])
    images = images_of(res)
    assert images["id"].to_pylist() == want
    assert images["score"].to_pylist() == [best[i][0] for i in want]
    assert images["box"].to_pylist() == [best[i][1] for i in want]
    assert images["rank"].to_pylist() == list(range(1, len(want) + 1))
    # tag by run acts on images, each once
    col.tag_items(run_id=job, add=["objmined"])
    tagged = col.query(where="array_has(tags, 'objmined')", columns=["id"])
    assert sorted(tagged["id"].to_pylist()) == sorted(want)


def test_images_of_leaves_image_runs_alone():
    table = pa.table({"id": ["a", "b"], "rank": pa.array([1, 2], pa.int32()), "score": [0.9, 0.8]})
    assert images_of(table).equals(table)


@pytest.mark.parametrize(("space", "needle"), [
    ("objects:plain", "declared without box_embedding_dim"),
    ("objects:cls", "a classification model has no boxes"),
    ("objects:img", "'img' is an image embedding space, not a model"),
    ("objects:nope", "'nope' is not a model"),
    ("det", "space='objects:det'"),
])
def test_a_space_that_holds_no_object_embeddings_is_refused_naming_the_fix(col, space, needle):
    with pytest.raises(InvalidArgumentError, match=needle) as err:
        col.mine("typicality", size=1, space=space)
    if space.startswith("objects:"):
        assert "objects:det" not in needle and "det" in str(err.value)  # names the model that works


def test_a_miner_that_reads_more_than_vectors_is_refused_on_objects(col):
    with pytest.raises(InvalidArgumentError, match="cannot run on object space.*probs.*coreset"):
        col.mine("badge", size=1, space="objects:det", model="cls")


def test_an_unknown_object_seed_is_refused(col):
    with pytest.raises(NotFoundError, match="i0#7|'<image id>#<box index>'"):
        col.mine("knn", size=1, space="objects:det", params={"seed_ids": ["nope#0"]})


@pytest.mark.parametrize(("miner", "kw"), [
    ("lof", {"params": {"k": 2}}),
    ("semdedup", {"where": "split = 'pool' AND id != 'i0'"}),  # cosine: i0#0 is the zero vector
    ("probcover", {"reference_where": "split = 'ref'"}),
    ("typiclust", {}),
    ("embedding_distance", {"reference_where": "split = 'ref'"}),
])
def test_every_vectors_miner_runs_on_objects(col, miner, kw):
    names, res, _ = _mine(col, miner, 2, **kw)
    assert names and set(names) <= set(POOL_NAMES)


def test_objects_where_restricts_the_boxes_mined_and_the_reference(col):
    names, _, job = _mine(col, "coreset", 3, reference_where="split = 'ref'", objects_where="box = 0")
    pool = [j for j, n in enumerate(POOL_NAMES) if n.endswith("#0")]
    ref = [j for j, n in enumerate(REF_NAMES) if n.endswith("#0")]
    want = [POOL_NAMES[pool[j]] for j in _kcenter(POOL_X[pool], REF_X[ref], 3)]
    assert names == want and all(n.endswith("#0") for n in names)
    run = job.run()
    assert run["objects_where"] == "box = 0"
    assert run["stats"]["objects"]["mined"] == len(pool)


def test_objects_where_is_refused_outside_an_object_space_and_when_malformed(client, col):
    from service.client.rpc import rpc_start_mining

    rpc = rpc_start_mining("objs", "typicality", 1, space="img", objects_where="box = 0")
    with pytest.raises(InvalidArgumentError, match="objects_where restricts the boxes of an object space.*any_object"):
        client._unary(rpc, 30)
    with pytest.raises(InvalidArgumentError, match="objects_where.*nope"):
        col.mine("typicality", size=1, space="objects:det", objects_where="nope > 1")


def test_a_pool_whose_boxes_have_no_embedding_fails_saying_so(col):
    from service.client import FailedPreconditionError

    with pytest.raises(FailedPreconditionError, match="none of the 1 boxes of the pool matching objects_where has "
                                                      "an embedding.*box_embeddings"):
        _mine(col, "typicality", 1, where="id = 'i2'", objects_where="box = 1")


def test_lof_novelty_on_objects_matches_scikit_learn(col):
    from sklearn.neighbors import LocalOutlierFactor

    names, res, _ = _mine(col, "novelty", len(POOL_NAMES), reference_where="split = 'ref'", params={"k": 1})
    sk = -LocalOutlierFactor(n_neighbors=1, novelty=True).fit(REF_X).score_samples(POOL_X)
    got = dict(zip(names, res["score"].to_numpy(), strict=True))
    np.testing.assert_allclose([got[n] for n in POOL_NAMES], sk, rtol=1e-4)
