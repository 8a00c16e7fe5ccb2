"""DivProto and PPAL against plain entropy-NMS (``detection``) on the same collection.

    uv run --frozen python bench/detection_diversity.py [--images 20000] [--dim 64] [--size 200]

Builds a collection of ``--images`` pool images with 1..4 predicted boxes each (5 classes,
random geometry, a ``--dim``-d embedding per box) plus 1,000 labeled images with
``gt_boxes``, then in the same run mines ``--size`` images with

* ``detection`` (entropy-NMS, summed per image): the reference, one streamed scan;
* ``divproto`` (defaults: 10 x size candidates), and with ``enms="feature"``;
* ``ppal`` (defaults: 4 x size candidates), and ``ppal`` with ``candidate_ratio`` such that
  the pool reaches :data:`miners.detection.PPAL_MAX_CANDIDATES` (its pairwise stage at the
  bound) when ``--bound`` is given;

through ``validate_request`` + ``run_mining`` as the server runs them, and prints each time and
its ratio to the reference. Nothing is asserted (speed is measured, not tested).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexing.store import Store  # noqa: E402
from miners.detection import PPAL_MAX_CANDIDATES  # noqa: E402
from miners.runner import run_mining, validate_request  # noqa: E402
from miners.runs import RunSpec  # noqa: E402

CLASSES = ["a", "b", "c", "d", "e"]
SKEW = [0.5, 0.2, 0.15, 0.1, 0.05]  # labeled gt boxes per class: imbalanced


def build(col, images: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for start in range(0, images + 1000, 10_000):
        rows = []
        for i in range(start, min(images + 1000, start + 10_000)):
            k = int(rng.integers(1, 5))
            p = rng.dirichlet(np.full(len(CLASSES), 0.5), k)
            e = rng.normal(0, 1, (k, dim))
            boxes = [{"x1": 30.0 * j, "y1": 0.0, "x2": 30.0 * j + 20, "y2": 20.0, "score": float(p[j].max()),
                      "probs": p[j].tolist(), "embedding": e[j].tolist()} for j in range(k)]
            row = {"id": f"i{i:08d}", "split": "pool" if i < images else "train", "pred_det": {"boxes": boxes}}
            if i >= images:
                row["gt_boxes"] = [{"x1": 30.0 * j, "y1": 0.0, "x2": 30.0 * j + 20, "y2": 20.0,
                                    "label": CLASSES[int(rng.choice(len(CLASSES), p=SKEW))]}
                                   for j in range(k)]
            rows.append(row)
        col.upsert(pa.Table.from_pylist(rows))


def mine(col, miner: str, size: int, **params) -> float:
    req = RunSpec(collection=col.name, miner=miner, size=size, model="det", where="split = 'pool'",
                  reference_where="split = 'train'" if miner != "detection" else "", seed=0, params=params)
    _, validated = validate_request(col, req)
    rec = replace(req, params=validated, version=col.version, run_id=f"bench-{miner}")
    t0 = time.perf_counter()
    out = run_mining(col, rec)
    took = time.perf_counter() - t0
    assert len(out.ids) == size
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--bound", action="store_true", help="also PPAL with the candidate pool at its bound")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        store = Store(root, optimize_every=0)
        col = store.create_collection("b", models={"det": {"classes": CLASSES, "task": "detection",
                                                           "box_embedding_dim": args.dim}})
        t0 = time.perf_counter()
        build(col, args.images, args.dim)
        print(f"built {args.images:,} pool + 1,000 labeled images ({args.dim}-d box embeddings) "
              f"in {time.perf_counter() - t0:.1f} s")
        ref = min(mine(col, "detection", args.size) for _ in range(2))
        print(f"detection (reference)          {ref:8.2f} s   1.00x")
        runs = [("divproto", {}), ("divproto", {"enms": "feature"}), ("ppal", {})]
        if args.bound:
            runs.append(("ppal", {"candidate_ratio": min(100.0, PPAL_MAX_CANDIDATES / args.size)}))
        for miner, params in runs:
            took = mine(col, miner, args.size, **params)
            label = f"{miner} {params}" if params else miner
            print(f"{label:30s} {took:8.2f} s {took / ref:6.2f}x")


if __name__ == "__main__":
    main()
