"""Object-level mining (``space="objects:<model>"``) against the same miner on an image space
holding as many vectors.

    uv run --frozen python bench/object_mining.py [--images 20000] [--boxes 3] [--dim 64]

Builds one collection with ``--images`` images, each with ``--boxes`` predicted boxes carrying
a ``--dim`` embedding, and a second collection with ``images * boxes`` rows carrying one
``--dim`` image embedding each (the same vectors). In the same run it times ``load_pool`` and
a ``typicality`` run (k=10) on both, and prints each time and the object/image ratio: what
deriving object rows at read time (flattening the box lists, the DuckDB-free path) costs
over reading a plain vector column. Nothing is asserted (speed is measured, not tested).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexing.store import Store  # noqa: E402
from miners.runner import run_mining, validate_request  # noqa: E402
from miners.runs import RunSpec  # noqa: E402
from miners.vectors import load_pool  # noqa: E402


def _boxes_column(vecs: np.ndarray, images: int, boxes: int) -> pa.Array:
    n = images * boxes
    d = vecs.shape[1]
    xs = pa.array(np.zeros(n, np.float32))
    emb = pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)),
                                   pa.array(vecs.reshape(-1)))
    probs = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
                                     pa.array(np.full(2 * n, 0.5, np.float32)))
    flat = pa.StructArray.from_arrays([xs, xs, pa.array(np.ones(n, np.float32)), pa.array(np.ones(n, np.float32)),
                                       pa.array(np.full(n, 0.5, np.float32)), probs, emb],
                                      names=["x1", "y1", "x2", "y2", "score", "probs", "embedding"])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n + 1, boxes, dtype=np.int32)), flat)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--boxes", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    n = args.images * args.boxes
    vecs = np.random.default_rng(0).standard_normal((n, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        objs = store.create_collection("objs", models={
            "det": {"classes": ["a", "b"], "task": "detection", "box_embedding_dim": args.dim}})
        objs.upsert(pa.table({"id": [f"i{i}" for i in range(args.images)],
                              "pred_det": pa.StructArray.from_arrays(
                                  [_boxes_column(vecs, args.images, args.boxes)], names=["boxes"])}))
        imgs = store.create_collection("imgs", spaces={"e": {"dim": args.dim, "metric": "l2"}})
        imgs.upsert(pa.table({"id": [f"r{i}" for i in range(n)],
                              "emb_e": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), args.dim)}))
        print(f"{args.images:,} images x {args.boxes} boxes = {n:,} object vectors vs {n:,} image vectors, "
              f"d={args.dim}")
        rows = []
        for what, col, space in (("image space", imgs, "e"), ("object space", objs, "objects:det")):
            pool, t_load = _timed(lambda col=col, space=space: load_pool(col, col.version, space, None))
            assert len(pool) == n
            req = RunSpec(collection=col.name, miner="typicality", size=100, space=space, params={"k": 10})
            _, params = validate_request(col, req)
            _, t_run = _timed(lambda col=col, req=req, params=params: run_mining(
                col, RunSpec(**{**req.__dict__, "version": col.version, "seed": 0, "params": params})))
            rows.append((what, t_load, t_run))
            print(f"{what:>13}: load_pool {t_load:6.2f} s   typicality run {t_run:6.2f} s")
        (_, l0, r0), (_, l1, r1) = rows
        print(f"object / image: load_pool {l1 / l0:.2f}x   typicality run {r1 / r0:.2f}x")


if __name__ == "__main__":
    main()
