"""Cluster-Margin with a batch of 100,000 through the runner on a real LanceDB table: the
whole batch comes back, no row twice, only among the most uncertain candidates, and the
same picks as the pure function (sampled k-means, exact assignment, round-robin) called
on the same candidates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from indexing import measures
from indexing.store import Store
from miners.diversity import cluster_margin_select
from miners.runner import run_mining, validate_request
from miners.runs import RunSpec

N, D, BATCH = 150_000, 8, 100_000


@pytest.mark.slow
def test_cluster_margin_batch_of_100k(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (N, D)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), N).astype(np.float32)
    store = Store(str(tmp_path), optimize_every=0)
    col = store.create_collection("big", spaces={"v": {"dim": D, "metric": "l2"}}, models={"m": ["a", "b", "c"]})
    col.upsert(pa.table({
        "id": [f"r{i:06d}" for i in range(N)],
        "emb_v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D),
        "pred_m": pa.StructArray.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), 3).cast(pa.list_(pa.float32()))],
            ["probs"]),
    }))
    col = store.collection("big")
    req = RunSpec(collection="big", miner="cluster_margin", size=BATCH, model="m", space="v", seed=3,
                  params={"candidates": 120_000})
    _, params = validate_request(col, req)
    out = run_mining(col, RunSpec(**{**req.__dict__, "params": params, "version": col.version, "run_id": "cm"}))
    rows = np.asarray([int(i[1:]) for i in out.ids])
    assert len(rows) == BATCH and len(np.unique(rows)) == BATCH
    margin = measures.margin_scores(probs.astype(np.float64), validate=False)
    cand = np.argsort(-margin, kind="stable")[:120_000]
    assert set(rows.tolist()) <= set(cand.tolist())
    np.testing.assert_allclose(out.scores, margin[rows])
    # the same as the function on the same candidates, in the runner's (table) order
    want = cand[cluster_margin_select(x[cand], margin[cand], BATCH, seed=3)]
    np.testing.assert_array_equal(rows, want)
