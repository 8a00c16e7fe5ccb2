"""The uncertainty-vs-quality report against the analytics aggregate that streams the same
columns, in the same run.

    uv run --frozen python bench/uncertainty_quality.py [--rows 200000] [--classes 10] [--images 20000]

Builds a collection of ``--rows`` labeled rows with a classifier's probabilities and
``--images`` labeled images with 0..4 predicted and 0..4 gt boxes, then measures

* the reference: ``class_uncertainty`` (entropy per predicted class), which streams the
  same ``probs`` column and computes the same entropy, grouped by DuckDB;
* ``uncertainty_quality`` entropy vs ``correct`` (also reads ``label``; keeps every row's
  id, score and quality, ranks them for Spearman and sorts the quadrants);
* the pure :func:`indexing.quality.report` on the same number of rows (no I/O);
* for detection, ``box_confusion`` (the same IoU matching, per image) as the reference for
  ``uncertainty_quality`` with quality ``iou`` (plus the detection miner's per-image score);

and prints each time and its ratio to its reference. Nothing is asserted.
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

from indexing.analytics import class_uncertainty  # noqa: E402
from indexing.objects import box_confusion  # noqa: E402
from indexing.quality import report, report_stats, uncertainty_quality  # noqa: E402
from indexing.store import Store  # noqa: E402
from service.quality import box_scorers  # noqa: E402


def build_classification(col, rows: int, c: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(c)]
    for start in range(0, rows, 50_000):
        n = min(rows, start + 50_000) - start
        y = rng.integers(0, c, n)
        logits = rng.normal(0, 1.5, (n, c)) + 2.5 * np.eye(c)[y]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p = (p / p.sum(1, keepdims=True)).astype(np.float32)
        probs = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c + 1, c, dtype=np.int32)), pa.array(p.ravel()))
        col.upsert(pa.table({
            "id": [f"r{i:09d}" for i in range(start, start + n)],
            "label": [classes[k] for k in y],
            "pred_m": pa.StructArray.from_arrays([probs], names=["probs"]),
        }))


def build_detection(col, images: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images):
        gt, pred = [], []
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 400, 2)
            w, h = rng.uniform(5, 80, 2)
            gt.append({"x1": x, "y1": y, "x2": x + w, "y2": y + h, "label": "a"})
            if rng.random() < 0.8:  # found, with some jitter
                j = rng.normal(0, 4, 4)
                p = rng.dirichlet(np.ones(2))
                x1, y1 = x + j[0], y + j[1]
                pred.append({"x1": x1, "y1": y1, "x2": max(x1, x + w + j[2]), "y2": max(y1, y + h + j[3]),
                             "score": float(rng.random()), "probs": p.tolist()})
        rows.append({"id": f"i{i:08d}", "gt_boxes": gt, "pred_det": {"boxes": pred}})
    col.upsert(pa.Table.from_pylist(rows))


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        col = store.create_collection("cls", models={"m": [f"c{i}" for i in range(args.classes)]})
        build_classification(col, args.rows, args.classes)
        ref = timed(lambda: class_uncertainty(col, "m"), args.repeat)
        got = timed(lambda: uncertainty_quality(col, "m", "entropy", "correct"), args.repeat)
        rng = np.random.default_rng(2)
        u, q = rng.random(args.rows), rng.integers(0, 2, args.rows).astype(float)
        ids = pa.array([f"r{i:09d}" for i in range(args.rows)])
        pure = timed(lambda: report(u, q, ids), args.repeat)
        print(f"classification, {args.rows:,} labeled rows, {args.classes} classes (best of {args.repeat}):")
        print(f"  class_uncertainty (reference)         {ref:8.3f} s")
        stats = report_stats(uncertainty_quality(col, "m", "entropy", "correct"))
        print(f"  uncertainty_quality entropy/correct   {got:8.3f} s  ({got / ref:.2f}x the reference; "
              f"n = {stats['n']:,}, rho = {stats['rho']:+.3f})")
        print(f"  report() alone on arrays              {pure:8.3f} s  ({pure / ref:.2f}x)")

        det = store.create_collection("det", models={"det": {"classes": ["a", "b"], "task": "detection"}})
        build_detection(det, args.images)
        spec = det.model("det")
        ref = timed(lambda: box_confusion(det.table, spec), args.repeat)
        scorers = box_scorers()
        got = timed(lambda: uncertainty_quality(det, "det", "entropy", "iou", box_scores=scorers), args.repeat)
        print(f"detection, {args.images:,} labeled images (0-4 gt boxes each, 80% found):")
        print(f"  box_confusion (reference)             {ref:8.3f} s")
        stats = report_stats(uncertainty_quality(det, "det", "entropy", "iou", box_scores=scorers))
        print(f"  uncertainty_quality entropy/iou       {got:8.3f} s  ({got / ref:.2f}x the reference; "
              f"n = {stats['n']:,}, rho = {stats['rho']:+.3f})")


if __name__ == "__main__":
    main()
