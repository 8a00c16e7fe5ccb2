"""indexing.analytics and indexing.export on a real collection, checked against pandas /
NumPy computations on the same (seeded, random) rows."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from indexing import analytics
from indexing.analytics import (
    class_uncertainty,
    confused_pairs,
    confusion,
    histogram,
    histogram_stats,
    label_distribution,
)
from indexing.errors import FailedPrecondition, InvalidArgument, NotFound
from indexing.export import coco_boxes, export_coco, export_rows, read_export
from miners.uncertainty import (
    entropy_scores,
    least_confidence_scores,
    margin_scores,
    ratio_scores,
    softmax,
)

N = 400
CLASSES = ("cat", "dog", "bird", "fish")
DET_CLASSES = ("car", "person", "sign")
TEXTS = ("", None, 'say "hi", ok', "line1\nline2", "ünïcödé ✓", "plain")


def _rows(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(N):
        r: dict = {"id": f"r{i:04d}"}
        u = rng.random()
        r["label"] = None if u < 0.2 else ("zebra" if u < 0.25 else str(rng.choice(CLASSES)))
        r["split"] = str(rng.choice(["train", "val", "test"]))
        r["n"] = int(rng.integers(0, 10))
        s = rng.random()
        r["score"] = None if s < 0.1 else float(rng.normal())
        r["uri"] = None if rng.random() < 0.1 else f"img/{i}.png"
        r["text"] = TEXTS[int(rng.integers(0, len(TEXTS)))]
        k = rng.random()
        if k < 0.55:
            p = rng.dirichlet(np.full(4, 0.7)).astype(np.float32)
            pred = {"probs": p.tolist()}
        elif k < 0.65:
            pred = {"probs": [0.25] * 4}  # exact tie: argmax takes the first class
        elif k < 0.9:
            pred = {"logits": (rng.normal(size=4) * 3).astype(np.float32).tolist()}
        else:
            pred = None
        if pred is not None and rng.random() < 0.5:
            pred["loss"] = float(np.float32(rng.gamma(2.0)))
        r["pred_m"] = pred
        if rng.random() < 0.15:
            r["pred_det"] = None
        else:
            boxes = []
            for _ in range(int(rng.integers(0, 4))):
                x1, y1 = rng.uniform(0, 100, 2)
                w, h = rng.uniform(1, 50, 2)
                box = {"x1": x1, "y1": y1, "x2": x1 + w, "y2": y1 + h, "score": float(rng.random())}
                if rng.random() < 0.8:
                    box["probs"] = rng.dirichlet(np.ones(3)).astype(np.float32).tolist()
                boxes.append(box)
            r["pred_det"] = {"boxes": boxes}
        rows.append(r)
    rows[3]["score"] = float("nan")
    rows[7]["score"] = float("inf")
    rows[11]["score"] = float("-inf")
    return rows


@pytest.fixture
def pool(store, monkeypatch):
    """(collection, the rows written, as a DataFrame). Small batches: every aggregate is
    built from many partial batches."""
    monkeypatch.setattr(analytics, "BATCH_ROWS", 64)
    col = store.create_collection(
        "pool", models={"m": CLASSES, "det": {"classes": DET_CLASSES, "task": "detection"}, "empty": ["a", "b"]},
        fields={"split": pa.string(), "n": pa.int64(), "score": pa.float64()},
    )
    rows = _rows()
    for part in (rows[:250], rows[250:]):  # two writes: two fragments
        col.upsert(pa.Table.from_pylist(part))
    # What the store holds: float32 boxes.
    for r in rows:
        for b in (r["pred_det"] or {}).get("boxes", []):
            for k in ("x1", "y1", "x2", "y2", "score"):
                b[k] = float(np.float32(b[k]))
    return col, rows, pd.DataFrame(rows)


def _probs(pred: dict | None) -> np.ndarray | None:
    if pred is None:
        return None
    if pred.get("probs") is not None:
        return np.asarray(pred["probs"], dtype=np.float32).astype(np.float64)
    return softmax(np.asarray(pred["logits"], dtype=np.float32).astype(np.float64)[None])[0]


def _top2(p: np.ndarray) -> tuple[int, int]:
    i1 = int(np.argmax(p))
    q = p.copy()
    q[i1] = -np.inf
    return i1, int(np.argmax(q))


# -- label distribution -------------------------------------------------------------------

def test_label_distribution_matches_pandas(pool):
    col, _, df = pool
    got = label_distribution(col).to_pylist()
    want = df.groupby("label", dropna=False).size()
    assert {r["label"]: r["count"] for r in got} == {
        (None if (isinstance(k, float) and math.isnan(k)) else k): v for k, v in want.items()}
    assert any(r["label"] is None for r in got)  # unlabeled rows: their own (null) row
    counts = [r["count"] for r in got]
    assert counts == sorted(counts, reverse=True)

    got = label_distribution(col, where="n >= 5 AND split <> 'test'", group_by="split").to_pylist()
    sub = df[(df.n >= 5) & (df.split != "test")]
    want = sub.groupby(["label", "split"], dropna=False).size()
    norm = {((None if not isinstance(k[0], str) else k[0]), k[1]): v for k, v in want.items()}
    assert {(r["label"], r["split"]): r["count"] for r in got} == norm
    assert [r["split"] for r in got] == sorted(r["split"] for r in got)  # grouped, then by count

    assert label_distribution(col, where="n > 100").num_rows == 0


def test_label_distribution_reads_an_old_version(pool):
    col, _, df = pool
    v0 = col.version
    col.upsert(pa.table({"id": pa.array(["r0000", "r0001"], pa.string()), "label": ["fish", "fish"]}))
    old = {r["label"]: r["count"] for r in label_distribution(col, version=v0).to_pylist()}
    assert old["fish"] == int((df.label == "fish").sum())
    new = {r["label"]: r["count"] for r in label_distribution(col).to_pylist()}
    assert new != old and sum(new.values()) == sum(old.values()) == N


# -- predictions -----------------------------------------------------------------------

def test_confused_pairs_match_pandas(pool):
    col, rows, _ = pool
    recs = []
    for r in rows:
        p = _probs(r["pred_m"])
        if p is None or r["split"] == "test":
            continue
        i1, i2 = _top2(p)
        a, b = min(i1, i2), max(i1, i2)
        recs.append({"class_a": CLASSES[a], "class_b": CLASSES[b], "a_top1": int(i1 == a), "margin": p[i1] - p[i2]})
    want = pd.DataFrame(recs).groupby(["class_a", "class_b"]).agg(
        count=("margin", "size"), a_top1=("a_top1", "sum"), mean_margin=("margin", "mean"))
    full = confused_pairs(col, "m", where="split <> 'test'", top=100)
    assert full.column_names == ["class_a", "class_b", "count", "a_top1", "mean_margin"]
    got = {(r["class_a"], r["class_b"]): r for r in full.to_pylist()}
    assert set(got) == set(want.index)
    for key, w in want.iterrows():
        assert got[key]["count"] == w["count"] and got[key]["a_top1"] == w["a_top1"]
        assert got[key]["mean_margin"] == pytest.approx(w["mean_margin"], rel=1e-9)
    for r in got.values():  # unordered pairs, in the model's class order
        assert CLASSES.index(r["class_a"]) < CLASSES.index(r["class_b"])
    keys = [(-r["count"], r["mean_margin"]) for r in full.to_pylist()]
    assert keys == sorted(keys)
    assert confused_pairs(col, "m", where="split <> 'test'", top=2).to_pylist() == full.to_pylist()[:2]


def test_confused_pairs_of_a_detector_count_boxes(pool):
    col, rows, _ = pool
    pairs: dict[tuple[str, str], int] = {}
    for r in rows:
        for b in (r["pred_det"] or {}).get("boxes", []):
            if b.get("probs") is None:
                continue
            i1, i2 = _top2(np.asarray(b["probs"], dtype=np.float32).astype(np.float64))
            key = (DET_CLASSES[min(i1, i2)], DET_CLASSES[max(i1, i2)])
            pairs[key] = pairs.get(key, 0) + 1
    got = confused_pairs(col, "det", top=10).to_pylist()
    assert {(r["class_a"], r["class_b"]): r["count"] for r in got} == pairs


def test_confusion_matches_pandas_crosstab(pool):
    col, rows, _ = pool
    recs = [{"label": r["label"], "predicted": CLASSES[int(np.argmax(_probs(r["pred_m"])))]}
            for r in rows if r["label"] is not None and r["pred_m"] is not None and r["n"] < 8]
    want = pd.DataFrame(recs).groupby(["label", "predicted"]).size().to_dict()
    got = confusion(col, "m", where="n < 8")
    assert got.column_names == ["label", "predicted", "count"]
    assert {(r["label"], r["predicted"]): r["count"] for r in got.to_pylist()} == want
    assert any(r["label"] == "zebra" for r in got.to_pylist())  # labels outside the classes kept
    errors = confusion(col, "m", where="n < 8", errors_only=True).to_pylist()
    assert {(r["label"], r["predicted"]): r["count"] for r in errors} == {
        k: v for k, v in want.items() if k[0] != k[1]}


@pytest.mark.parametrize("measure,fn", [("entropy", entropy_scores), ("margin", margin_scores),
                                        ("least_confidence", least_confidence_scores), ("ratio", ratio_scores)])
def test_class_uncertainty_matches_miners(pool, measure, fn):
    col, rows, _ = pool
    kept = [(r, _probs(r["pred_m"])) for r in rows if r["pred_m"] is not None and r["split"] == "train"]
    p = np.stack([q for _, q in kept])
    df = pd.DataFrame({"predicted": [CLASSES[i] for i in p.argmax(axis=1)], "score": fn(p, validate=False)})
    want = df.groupby("predicted")["score"].agg(["size", "mean", "min", "max"])
    got = class_uncertainty(col, "m", where="split = 'train'", measure=measure)
    assert got.column_names == ["predicted", "count", "mean_score", "min_score", "max_score"]
    rows_out = got.to_pylist()
    assert {r["predicted"] for r in rows_out} == set(want.index)
    for r in rows_out:
        w = want.loc[r["predicted"]]
        assert r["count"] == w["size"]
        assert (r["mean_score"], r["min_score"], r["max_score"]) == pytest.approx(
            (w["mean"], w["min"], w["max"]), rel=1e-9, abs=1e-12)
    means = [r["mean_score"] for r in rows_out]
    assert means == sorted(means, reverse=True)


# -- histograms ---------------------------------------------------------------------------

def _finite(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return a[np.isfinite(a)]


def test_histogram_matches_numpy(pool):
    col, _, df = pool
    h = histogram(col, "score", bins=7)
    counts, edges = np.histogram(_finite(df.score), bins=7)
    assert h.column_names == ["bin_start", "bin_end", "count"]
    assert h.column("count").to_pylist() == counts.tolist()
    assert h.column("bin_start").to_pylist() == edges[:-1].tolist()
    assert h.column("bin_end").to_pylist() == edges[1:].tolist()
    stats = histogram_stats(h)
    assert stats["nulls"] == int(df.score.isna().sum() - 1)  # pandas counts the NaN as missing
    assert stats["non_finite"] == 3 and stats["total"] == N
    assert stats["below"] == stats["above"] == 0

    h = histogram(col, "score", bins=5, range=(-1.0, 1.0), where="split = 'val'")
    vals = _finite(df[df.split == "val"].score)
    assert h.column("count").to_pylist() == np.histogram(vals, bins=5, range=(-1, 1))[0].tolist()
    stats = histogram_stats(h)
    assert (stats["below"], stats["above"]) == (int((vals < -1).sum()), int((vals > 1).sum()))


@pytest.mark.parametrize("bins", [1, 3, 9, 10, 20])
def test_histogram_of_integers_puts_edge_values_where_numpy_does(pool, bins):
    col, _, df = pool
    h = histogram(col, "n", bins=bins)
    assert h.column("count").to_pylist() == np.histogram(df.n.to_numpy(np.float64), bins=bins)[0].tolist()


def test_histogram_of_a_prediction_field_constant_and_empty(pool):
    col, rows, df = pool
    losses = [r["pred_m"]["loss"] for r in rows if r["pred_m"] and "loss" in r["pred_m"]]
    h = histogram(col, "pred_m.loss", bins=6)
    assert h.column("count").to_pylist() == np.histogram(np.asarray(losses), bins=6)[0].tolist()
    assert histogram_stats(h)["nulls"] == N - len(losses)

    h = histogram(col, "n", bins=4, where="n = 3")  # one value: numpy widens to +-0.5
    c, e = np.histogram(df[df.n == 3].n.to_numpy(np.float64), bins=4)
    assert h.column("count").to_pylist() == c.tolist() and h.column("bin_start").to_pylist() == e[:-1].tolist()

    h = histogram(col, "score", bins=2, where="n > 100")
    assert h.column("count").to_pylist() == [0, 0] and histogram_stats(h)["total"] == 0


# -- errors and hostile filters ---------------------------------------------------------

def test_bad_arguments_name_the_problem(pool):
    col, _, _ = pool
    with pytest.raises(NotFound, match="model 'nope'"):
        confused_pairs(col, "nope")
    with pytest.raises(InvalidArgument, match="unknown field 'nope'"):
        histogram(col, "nope")
    with pytest.raises(InvalidArgument, match="numeric"):
        histogram(col, "split")
    with pytest.raises(InvalidArgument, match="numeric"):
        histogram(col, "pred_m.probs")
    with pytest.raises(InvalidArgument, match="has no field"):
        histogram(col, "pred_m.nope")
    with pytest.raises(InvalidArgument, match="bins"):
        histogram(col, "n", bins=0)
    with pytest.raises(InvalidArgument, match="range"):
        histogram(col, "n", range=(2, 1))
    with pytest.raises(InvalidArgument, match="measure"):
        class_uncertainty(col, "m", measure="variance")
    with pytest.raises(InvalidArgument, match="top"):
        confused_pairs(col, "m", top=0)
    with pytest.raises(InvalidArgument, match="group_by"):
        label_distribution(col, group_by="nope")
    with pytest.raises(InvalidArgument, match="group_by"):
        label_distribution(col, group_by="pred_m")
    with pytest.raises(FailedPrecondition, match="detection"):
        confusion(col, "det")
    with pytest.raises(FailedPrecondition, match="no predictions"):
        class_uncertainty(col, "empty")
    # a filter that matches nothing is an empty answer, not an error
    assert confused_pairs(col, "m", where="n > 100").num_rows == 0


HOSTILE = [
    "label = 'cat'; DROP TABLE pool",
    "(SELECT 1)",
    "label IN (SELECT label FROM pool)",
    "EXISTS (SELECT 1)",
    "nosuchfn(label) = 1",
    "read_csv('/etc/passwd') IS NOT NULL",
    "1 = 1) OR (1 = 1",  # Lance alone would run this as "1 = 1" and ignore the rest
    "n = 1) OR (n = 3",
    "n = 1 n = 2",
    "label = 'cat' -- ) OR (1 = 1",
    "",
]


@pytest.mark.parametrize("where", HOSTILE)
def test_hostile_filters_are_refused_and_change_nothing(pool, tmp_path, where):
    col, _, _ = pool
    version, rows = col.version, col.count()
    out = tmp_path / "out"
    calls = [
        lambda: label_distribution(col, where),
        lambda: confused_pairs(col, "m", where),
        lambda: confusion(col, "m", where),
        lambda: class_uncertainty(col, "m", where),
        lambda: histogram(col, "score", where=where),
        lambda: export_rows(col, out / "rows.csv", where=where, model="m"),
        lambda: export_coco(col, "det", out / "coco.json", where=where),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match="filter"):
            call()
    assert (col.version, col.count()) == (version, rows)
    assert not out.exists() or not os.listdir(out)


# -- export -------------------------------------------------------------------------------

def _prelabel(r: dict) -> tuple[str | None, float | None]:
    p = _probs(r["pred_m"])
    if p is None:
        return None, None
    return CLASSES[int(np.argmax(p))], float(p.max())


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)
    return a == b


def _expected(r: dict) -> dict:
    pred, conf = _prelabel(r)
    return {"id": r["id"], "uri": r["uri"], "text": r["text"], "label": r["label"], "n": r["n"],
            "score": r["score"], "predicted": pred, "confidence": conf}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_rows_round_trip(pool, tmp_path, fmt):
    col, rows, _ = pool
    path = tmp_path / f"batch.{fmt}"
    report = export_rows(col, path, where="split = 'train'", model="m", fields=["n", "score"], batch_size=50)
    want = {r["id"]: _expected(r) for r in rows if r["split"] == "train"}
    assert report.rows == len(want) and report.format == fmt and report.missing == 0
    back = read_export(path, types={"n": pa.int64(), "score": pa.float64()})
    assert len(back) == len(want)
    for got in back:
        exp = want[got["id"]]
        assert list(got) == list(exp)
        assert all(_same(got[k], exp[k]) for k in exp), (got, exp)
    assert {g["text"] for g in back} >= {"", None, 'say "hi", ok', "line1\nline2"}  # "" and null differ

    # read with the standard library, as a labeling tool would
    with open(path, encoding="utf-8", newline="") as fh:
        plain = list(csv.DictReader(fh)) if fmt == "csv" else [json.loads(line) for line in fh]
    assert [p["id"] for p in plain] == [b["id"] for b in back]
    for p in plain:
        exp = want[p["id"]]
        assert p["text"] == (exp["text"] if fmt == "jsonl" else (exp["text"] or ""))
        if exp["confidence"] is not None:
            assert float(p["confidence"]) == pytest.approx(exp["confidence"], rel=1e-12)


def test_export_rows_by_ids_keeps_order_and_counts_missing(pool, tmp_path):
    col, rows, _ = pool
    by_id = {r["id"]: r for r in rows}
    ids = ["r0399", "r0002", "nope", "r0150", "r0002", "r0007"]
    report = export_rows(col, tmp_path / "ids.jsonl", ids=ids, batch_size=2)
    assert (report.rows, report.missing) == (4, 1)
    back = read_export(tmp_path / "ids.jsonl")
    assert [b["id"] for b in back] == ["r0399", "r0002", "r0150", "r0007"]
    for b in back:
        r = by_id[b["id"]]
        assert b == {"id": r["id"], "uri": r["uri"], "text": r["text"], "label": r["label"]}


def test_export_rows_detection_prelabel_is_the_most_confident_box(pool, tmp_path):
    col, rows, _ = pool
    export_rows(col, tmp_path / "det.csv", model="det")
    back = {b["id"]: b for b in read_export(tmp_path / "det.csv")}
    assert len(back) == N
    for r in rows:
        boxes = (r["pred_det"] or {}).get("boxes", [])
        b = back[r["id"]]
        if not boxes:
            assert (b["predicted"], b["confidence"]) == (None, None)
            continue
        best = max(boxes, key=lambda x: x["score"])  # first of the most confident on ties
        assert b["confidence"] == best["score"]
        want = None if best.get("probs") is None else DET_CLASSES[int(np.argmax(np.float32(best["probs"])))]
        assert b["predicted"] == want


def test_export_argument_errors(pool, tmp_path):
    col, _, _ = pool
    out = tmp_path / "out"
    with pytest.raises(InvalidArgument, match="format"):
        export_rows(col, out / "x.txt")
    with pytest.raises(InvalidArgument, match="not both"):
        export_rows(col, out / "x.csv", ids=["r0001"], where="n = 1")
    with pytest.raises(InvalidArgument, match="fields"):
        export_rows(col, out / "x.csv", fields=["emb_nope"])
    with pytest.raises(NotFound):
        export_rows(col, out / "x.csv", model="nope")
    with pytest.raises(FailedPrecondition, match="classification"):
        export_coco(col, "m", out / "x.json")
    assert not out.exists()


def test_export_coco_round_trips_boxes(pool, tmp_path):
    col, rows, _ = pool
    for name, size in (("a.png", (32, 20)), ("b.jpg", (5, 9))):
        Image.new("RGB", size, "red").save(tmp_path / name)
    col.upsert(pa.table({"id": pa.array(["r0000", "r0001"], pa.string()),
                         "uri": [str(tmp_path / "a.png"), f"file://{tmp_path / 'b.jpg'}"]}))
    path = tmp_path / "coco.json"
    report = export_coco(col, "det", path)
    doc = json.loads(path.read_text())
    total = sum(len((r["pred_det"] or {}).get("boxes", [])) for r in rows)
    assert (report.rows, report.annotations, report.sized_images) == (N, total, 2)
    assert len(doc["images"]) == N and len(doc["annotations"]) == total
    images = {img["assay_id"]: img for img in doc["images"]}
    assert (images["r0000"]["width"], images["r0000"]["height"]) == (32, 20)
    assert (images["r0001"]["width"], images["r0001"]["height"]) == (5, 9)
    assert "width" not in images["r0002"]
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    assert [cats[i + 1] for i in range(3)] == list(DET_CLASSES)
    assert (0 in cats) == any(b.get("probs") is None for r in rows for b in (r["pred_det"] or {}).get("boxes", []))
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["area"] == pytest.approx(w * h) and w >= 0 and h >= 0

    back = coco_boxes(path)
    assert set(back) == {r["id"] for r in rows}
    for r in rows:
        stored = (r["pred_det"] or {}).get("boxes", [])
        got = back[r["id"]]
        assert len(got) == len(stored)
        for g, s in zip(got, stored, strict=True):
            for k in ("x1", "y1", "x2", "y2", "score"):
                assert np.float32(g[k]) == np.float32(s[k]), (k, g, s)
            want = None if s.get("probs") is None else DET_CLASSES[int(np.argmax(np.float32(s["probs"])))]
            assert g["label"] == want

    report = export_coco(col, "det", path, where="split = 'val'", min_score=0.5, image_sizes=False)
    val = [r for r in rows if r["split"] == "val"]
    assert report.rows == len(val) and report.sized_images == 0
    assert report.annotations == sum(b["score"] >= 0.5 for r in val for b in (r["pred_det"] or {}).get("boxes", []))
    assert sum(len(v) for v in coco_boxes(path).values()) == report.annotations
