"""Box filters (``any_object`` / ``objects_where``) and object rows against the scan floor.

    uv run --frozen python bench/objects.py [--images 100000] [--max-boxes 5]

Builds a collection of ``--images`` images with 0..``--max-boxes`` predicted boxes each
(3 classes, random geometry), then in the same run measures

* the floor: scanning ``id`` and ``pred_det.boxes`` alone (LanceDB, the same chunk size);
* a NumPy reference: that scan plus the predicate evaluated on the flattened arrays with
  NumPy (what a hand-written client-side filter costs);
* ``count(any_object(...))`` for a selective and a broad predicate (the expansion scan with
  DuckDB per chunk, then Lance counting with the ``id IN (...)`` filter);
* ``objects()`` of every box;
* the confused pairs of every box: ``box_confused_pairs`` (over the object rows) and the
  image-level ``confused_pairs`` given the detector (its own box path), which must agree;

and prints each time and its ratio to the floor. Nothing is asserted (speed is measured,
not tested).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from indexing.analytics import confused_pairs  # noqa: E402
from indexing.objects import CHUNK_ROWS, box_confused_pairs  # noqa: E402
from indexing.store import Store  # noqa: E402

CLASSES = ["a", "b", "c"]


def build(col, images: int, max_boxes: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_boxes + 1, images)
    for start in range(0, images, 20_000):
        rows = []
        for i in range(start, min(images, start + 20_000)):
            k = int(counts[i])
            xy, wh = rng.uniform(0, 500, (k, 2)), rng.uniform(2, 100, (k, 2))
            p = rng.dirichlet(np.ones(3), k)
            rows.append({"id": f"i{i:08d}", "pred_det": {"boxes": [
                {"x1": float(xy[j, 0]), "y1": float(xy[j, 1]), "x2": float(xy[j, 0] + wh[j, 0]),
                 "y2": float(xy[j, 1] + wh[j, 1]), "score": float(rng.random()), "probs": p[j].tolist()}
                for j in range(k)]}})
        col.upsert(pa.Table.from_pylist(rows))
    return int(counts.sum())


def numpy_reference(table, cls: int, lo: float, hi: float, max_score: float) -> int:
    """Images with a box of class ``cls``, area in [lo, hi] and score < max_score."""
    hits = 0
    q = table.search().select({"id": "id", "b": "pred_det.boxes"}).limit(None)
    for batch in q.to_batches(CHUNK_ROWS):
        boxes = batch.column("b")
        flat = pc.list_flatten(boxes)
        if not len(flat):
            continue
        parent = pc.list_parent_indices(boxes).to_numpy()
        f = {k: flat.field(k).to_numpy(zero_copy_only=False).astype(np.float64) for k in ("x1", "y1", "x2", "y2", "score")}
        area = (f["x2"] - f["x1"]) * (f["y2"] - f["y1"])
        probs = pc.list_flatten(flat.field("probs")).to_numpy().reshape(-1, 3)
        keep = (probs.argmax(axis=1) == cls) & (area >= lo) & (area <= hi) & (f["score"] < max_score)
        hits += len(np.unique(parent[keep]))
    return hits


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--max-boxes", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        col = Store(tmp).create_collection("bench", models={"det": {"classes": CLASSES, "task": "detection"}})
        t_build, boxes = timed(lambda: build(col, args.images, args.max_boxes))
        print(f"{args.images:,} images, {boxes:,} boxes (built in {t_build:.1f} s)")

        def floor() -> int:
            q = col.table.search().select({"id": "id", "b": "pred_det.boxes"}).limit(None)
            return sum(b.num_rows for b in q.to_batches(CHUNK_ROWS))

        t_floor = min(timed(floor)[0] for _ in range(3))  # warm: the best of three
        print(f"floor: scan id + pred_det.boxes            {t_floor:7.2f} s   1.00x")
        t_np, n_np = min(timed(lambda: numpy_reference(col.table, 0, 1e2, 1e3, 0.6)) for _ in range(3))
        print(f"NumPy reference (selective predicate)      {t_np:7.2f} s  {t_np / t_floor:5.2f}x  {n_np:,} images")
        for name, pred in (("selective", "class = 'a' AND area BETWEEN 1e2 AND 1e3 AND score < 0.6"),
                           ("broad", "score < 0.9")):
            t, n = timed(lambda p=pred: col.count(f"any_object({p})"))
            print(f"count(any_object(...)) {name:<10}          {t:7.2f} s  {t / t_floor:5.2f}x  {n:,} images")
            if name == "selective" and n != n_np:
                print(f"  MISMATCH: any_object counts {n:,}, the NumPy reference {n_np:,}")
        t_obj, table = timed(lambda: col.objects())
        print(f"objects(): every box as a row              {t_obj:7.2f} s  {t_obj / t_floor:5.2f}x  {table.num_rows:,} rows")
        t_cp, image_level = timed(lambda: confused_pairs(col, "det", top=100))
        print(f"confused_pairs(det): every box             {t_cp:7.2f} s  {t_cp / t_floor:5.2f}x")
        t_bp, per_box = timed(lambda: box_confused_pairs(col.read_table(None, None), col.model("det"), top=100))
        print(f"box_confused_pairs(det): every box         {t_bp:7.2f} s  {t_bp / t_floor:5.2f}x")
        t_bw, _ = timed(lambda: box_confused_pairs(col.read_table(None, None), col.model("det"),
                                                   objects_where="area < 1e3", top=100))
        print(f"box_confused_pairs(det, area < 1e3)        {t_bw:7.2f} s  {t_bw / t_floor:5.2f}x")
        if image_level.select(["class_a", "class_b", "count"]) != per_box.select(["class_a", "class_b", "count"]):
            print("  MISMATCH: box_confused_pairs and confused_pairs count different pairs")


if __name__ == "__main__":
    main()
