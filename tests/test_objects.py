"""Detection data as first-class data: the detection bugs of issue 19 (regressions), object
rows derived from the image rows, ``objects_where`` filters, box-level analytics.

A real server on loopback and the client; every result is checked against a direct Python
computation on the small hand-built images."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from miners.detection import box_uncertainty, class_balanced_select
from miners.edge import EdgeScorer
from service.client import Client, FailedPreconditionError
from service.server import ServerConfig, start_server

DET = ["car", "person"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("objects")), port=0, grace_s=2))
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def _box(x1: float, y1: float, w: float, h: float, score: float, probs: list[float] | None) -> dict:
    return {"x1": x1, "y1": y1, "x2": x1 + w, "y2": y1 + h, "score": score, "probs": probs}


def _mine(col, miner: str, size: int, **kw) -> list[str]:
    job = col.mine(miner, size=size, **kw)
    job.wait(timeout=60)
    return job.results()["id"].to_pylist()


# -- regressions: the four detection bugs of issue 19 ---------------------------------------


@pytest.fixture(scope="module")
def balanced(client):
    """Three images whose most confident box is a car (uncertain), two a person (less
    uncertain), one image with no boxes, and labeled images whose gt_boxes hold 10 cars and
    no person (their image labels say "person": they must not count)."""
    col = client.create_collection("balanced", models={"det": {"classes": DET, "task": "detection"}})
    rows = []
    for i, p in enumerate([0.5, 0.55, 0.6]):  # car top-1, entropy decreasing with i
        rows.append({"id": f"car{i}", "pred_det": {"boxes": [_box(0, 0, 10, 10, 0.9, [p, 1 - p])]}})
    for i, p in enumerate([0.1, 0.05]):  # person top-1, fairly certain
        rows.append({"id": f"person{i}", "pred_det": {"boxes": [_box(0, 0, 10, 10, 0.8, [p, 1 - p])]}})
    rows.append({"id": "nothing", "pred_det": {"boxes": []}})
    for i in range(5):
        rows.append({"id": f"gt{i}", "label": "person",
                     "gt_boxes": [{"x1": 0, "y1": 0, "x2": 5, "y2": 5, "label": "car"}] * 2})
    col.upsert(rows)
    return col, rows


def _direct_balanced(rows: list[dict], size: int, mode: str, counts: np.ndarray | None) -> list[str]:
    pool = [r for r in rows if r.get("pred_det") is not None]
    scores, classes = [], []
    for r in pool:
        boxes = r["pred_det"]["boxes"]
        p = np.array([b["probs"] for b in boxes], dtype=np.float32).astype(np.float64).reshape(-1, 2)
        scores.append(box_uncertainty(None, p, "entropy").sum() if boxes else 0.0)
        classes.append(int(np.argmax(p[np.argmax([b["score"] for b in boxes])])) if boxes else -1)
    picks = class_balanced_select(np.array(scores), np.array(classes), size, num_classes=2, mode=mode,
                                  class_counts=counts)
    return [pool[i]["id"] for i in picks]


@pytest.mark.parametrize("mode", ["equal", "inverse_frequency"])
def test_balanced_detection_with_an_image_without_boxes(balanced, mode):
    col, rows = balanced
    counts = np.array([10, 0]) if mode == "inverse_frequency" else None
    for size in (2, 4, 6):
        got = _mine(col, "detection", size, model="det", params={"balance": mode})
        assert sorted(got) == sorted(_direct_balanced(rows, size, mode, counts))
    # every image is picked when the budget allows it; the one without boxes comes last
    assert _mine(col, "detection", 6, model="det", params={"balance": mode})[-1] == "nothing"


def test_inverse_frequency_counts_gt_boxes_for_a_detector(balanced):
    col, rows = balanced
    # 10 labeled cars, 0 persons: the person share is 4 * 1 / (1 + 1/10) -> 3 of 4 slots
    got = _mine(col, "detection", 4, model="det", params={"balance": "inverse_frequency"})
    assert sum(i.startswith("person") for i in got) == 2  # only two person images exist
    assert sorted(got) == sorted(_direct_balanced(rows, 4, "inverse_frequency", np.array([10, 0])))
    # three slots of which persons get all they have (2); with equal weights cars get 2 too
    got3 = _mine(col, "detection", 3, model="det", params={"balance": "inverse_frequency"})
    assert sorted(got3) == ["car0", "person0", "person1"]
    equal3 = _mine(col, "detection", 3, model="det", params={"balance": "equal"})
    assert sorted(equal3) == sorted(_direct_balanced(rows, 3, "equal", None))


def test_boxes_without_probs_name_the_row(client):
    col = client.create_collection("noprobs", models={"det": {"classes": DET, "task": "detection"}})
    good = _box(0, 0, 10, 10, 0.9, [0.5, 0.5])
    col.upsert([{"id": f"ok{i}", "pred_det": {"boxes": [good]}} for i in range(5)]
               + [{"id": "bad-row", "pred_det": {"boxes": [good, _box(1, 1, 5, 5, 0.4, None)]}}])
    job = col.mine("detection", size=3, model="det")
    with pytest.raises(FailedPreconditionError) as err:
        job.wait(timeout=60)
    msg = str(err.value)
    assert "'bad-row'" in msg and "pred_det.boxes[1].probs" in msg and "one_minus_score" in msg
    # the documented way out: a method that needs no probabilities scores every image
    got = _mine(col, "detection", 6, model="det", params={"method": "one_minus_score", "nms_iou": 1.0})
    assert got[0] == "bad-row"  # 1 - 0.9 + 1 - 0.4 is the largest sum


def test_edge_scorer_keep_takes_the_box_format_score_takes(client):
    col = client.create_collection("edge", models={"det": {"classes": DET, "task": "detection"}})
    items = [[_box(0, 0, 10, 10, 0.9, [0.5, 0.5]), _box(50, 50, 10, 10, 0.6, [0.9, 0.1])],
             [_box(0, 0, 10, 10, 0.9, [0.99, 0.01])], []]
    served = col.score({"boxes": items}, model="det")["detection"].to_pylist()
    scorer = EdgeScorer(thresholds={"detection": 0.5})
    local = scorer.score(boxes=items)
    np.testing.assert_allclose(local["detection"], served, rtol=1e-6)
    p = np.array([[0.5, 0.5], [0.9, 0.1]], dtype=np.float32).astype(np.float64)
    assert local["detection"][0] == pytest.approx(box_uncertainty(None, p, "entropy").sum(), rel=1e-6)
    assert scorer.keep(boxes=items).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="item 0, box 1: no probs"):
        scorer.keep(boxes=[[_box(0, 0, 1, 1, 0.5, [0.5, 0.5]), _box(0, 0, 1, 1, 0.5, None)]])


# -- objects as rows -------------------------------------------------------------------------

COCO = ["chair", "remote", "cell phone"]
PRED = "source = 'det' AND class IN ('chair', 'remote', 'cell phone') AND area BETWEEN 1e2 AND 1e4 AND score < 0.6"


def _f32(x: float) -> float:
    return float(np.float32(x))


def _scene(rng: np.random.Generator, i: int) -> dict:
    """One image: 0-4 predicted boxes (20% without probs), sometimes no prediction at all,
    and ground-truth boxes on a third of the images."""
    row: dict = {"id": f"img{i:03d}", "split": "pool" if i % 4 else "val"}
    if rng.random() < 0.1:
        row["pred_det"] = None
    else:
        boxes = []
        for _ in range(int(rng.integers(0, 5))):
            x1, y1 = rng.uniform(0, 200, 2)
            w, h = rng.uniform(2, 150, 2)
            probs = rng.dirichlet(np.ones(3)).tolist() if rng.random() < 0.8 else None
            boxes.append(_box(x1, y1, w, h, float(rng.random()), probs))
        row["pred_det"] = {"boxes": boxes}
    if i % 3 == 0:
        row["gt_boxes"] = [{"x1": 1.0, "y1": 2.0, "x2": 1.0 + 10 * (j + 1), "y2": 12.0, "label": COCO[(i + j) % 3]}
                           for j in range(int(rng.integers(1, 3)))]
    return row


def _py_objects(rows: list[dict]) -> list[dict]:
    """The object rows of ``rows`` computed directly from their definition (float32 as stored)."""
    out = []
    for r in rows:
        for k, b in enumerate(((r.get("pred_det") or {}).get("boxes")) or []):
            x1, y1, x2, y2 = (_f32(b[f]) for f in ("x1", "y1", "x2", "y2"))
            probs = b.get("probs")
            cls = COCO[int(np.argmax(np.asarray(probs, np.float32)))] if probs is not None else None
            out.append({"id": r["id"], "source": "det", "box": k, "class": cls, "score": _f32(b["score"]),
                        "x1": x1, "y1": y1, "x2": x2, "y2": y2, "width": x2 - x1, "height": y2 - y1,
                        "area": (x2 - x1) * (y2 - y1)})
        for k, b in enumerate(r.get("gt_boxes") or []):
            x1, y1, x2, y2 = (_f32(b[f]) for f in ("x1", "y1", "x2", "y2"))
            out.append({"id": r["id"], "source": "gt", "box": k, "class": b["label"], "score": None,
                        "x1": x1, "y1": y1, "x2": x2, "y2": y2, "width": x2 - x1, "height": y2 - y1,
                        "area": (x2 - x1) * (y2 - y1)})
    return out


def _matching_ids(rows: list[dict], keep) -> set[str]:
    return {o["id"] for o in _py_objects(rows) if keep(o)}


def _pred(o: dict) -> bool:
    return (o["source"] == "det" and o["class"] in COCO and 1e2 <= o["area"] <= 1e4
            and o["score"] is not None and o["score"] < 0.6)


@pytest.fixture(scope="module")
def scenes(client):
    col = client.create_collection("scenes", models={"det": {"classes": COCO, "task": "detection"},
                                                     "m": ["a", "b"]})
    rng = np.random.default_rng(7)
    rows = [_scene(rng, i) for i in range(60)]
    col.upsert(rows)
    return col, rows


def _key(o: dict) -> tuple:
    return (o["id"], o["source"], o["box"])


def test_object_rows_equal_a_direct_flattening(scenes):
    col, rows = scenes
    got = col.objects().to_pylist()
    want = _py_objects(rows)
    assert len(got) == len(want) and any(o["class"] is None for o in got)
    by_key = {_key(o): o for o in got}
    for w in want:
        g = by_key[_key(w)]
        for name in ("class", "score", "x1", "y1", "x2", "y2"):
            assert g[name] == w[name], (w, name)
        for name in ("width", "height", "area"):
            assert g[name] == pytest.approx(w[name], rel=1e-12)
    det_probs = {(r["id"], k): b.get("probs") for r in rows for k, b in
                 enumerate(((r.get("pred_det") or {}).get("boxes")) or [])}
    for g in got:
        if g["source"] == "det" and det_probs[(g["id"], g["box"])] is not None:
            np.testing.assert_allclose(g["probs"], det_probs[(g["id"], g["box"])], rtol=1e-6)
    # one source, a projection, a limit
    gt = col.objects(source="gt", columns=["id", "class", "area"])
    assert gt.column_names == ["id", "class", "area"]
    assert gt.num_rows == sum(o["source"] == "gt" for o in want)
    assert col.objects(limit=5).num_rows == 5


def test_objects_where_equals_a_direct_computation(scenes, tmp_path):
    col, rows = scenes
    want = _matching_ids(rows, _pred)
    assert 0 < len(want) < len(rows)
    assert col.count(objects_where=PRED) == len(want)
    assert set(col.query(objects_where=PRED, columns=["id"])["id"].to_pylist()) == want
    # combined with an ordinary filter, and written inside where as any_object(...)
    pool = {r["id"] for r in rows if r["split"] == "pool"}
    assert set(col.query("split = 'pool'", objects_where=PRED, columns=["id"])["id"].to_pylist()) == want & pool
    negated = set(col.query(f"NOT any_object({PRED})", columns=["id"])["id"].to_pylist())
    assert negated == {r["id"] for r in rows} - want
    # the object rows kept by the same predicate belong to exactly those images
    objs = col.objects(objects_where=PRED)
    assert set(objs["id"].to_pylist()) == want and objs.num_rows == sum(map(_pred, _py_objects(rows)))
    # a mining run only sees those images
    picked = _mine(col, "detection", 100, model="det", objects_where=PRED, params={"method": "one_minus_score"})
    with_boxes = {r["id"] for r in rows if (r.get("pred_det") or {}).get("boxes") is not None}
    assert set(picked) == want & with_boxes
    # an export writes those rows
    out = col.export(tmp_path / "small.csv", objects_where=PRED, model="det")
    assert out["rows"] == len(want)
    # most images match: the filter names the others (NOT IN), still exact
    anybox = {o["id"] for o in _py_objects(rows)}
    assert len(anybox) > len(rows) / 2
    assert set(col.query(objects_where="box >= 0", columns=["id"])["id"].to_pylist()) == anybox
    assert col.count("NOT any_object(box >= 0)") == len(rows) - len(anybox)
    # a predicate over gt boxes: images with a ground-truth remote
    gt_remote = _matching_ids(rows, lambda o: o["source"] == "gt" and o["class"] == "remote")
    assert col.count(objects_where="source = 'gt' AND class = 'remote'") == len(gt_remote) > 0


def test_objects_histogram_equals_numpy(scenes):
    col, rows = scenes
    areas = [o["area"] for o in _py_objects(rows) if o["source"] == "det"]
    hist = col.histogram("objects.area", bins=7, source="det")
    counts, edges = np.histogram(np.asarray(areas, dtype=np.float64), bins=7)
    assert hist["count"].to_pylist() == counts.tolist()
    np.testing.assert_allclose(hist["bin_start"].to_numpy(), edges[:-1])
    scores = [o["score"] for o in _py_objects(rows) if _pred(o)]
    hist = col.histogram("objects.score", bins=4, range=(0.0, 0.6), objects_where=PRED)
    assert hist["count"].to_pylist() == np.histogram(scores, bins=4, range=(0.0, 0.6))[0].tolist()


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(objects_where="nope < 3"), "unknown object column 'nope'"),
    (dict(objects_where="score < 0.5; DROP TABLE x"), "objects_where"),
    (dict(objects_where="score <"), "objects_where"),
    (dict(objects_where="score < 0.5) OR (1 = 1"), "objects_where"),
    (dict(where="any_object(widht > 3)"), "unknown object column 'widht'"),
    # DuckDB reads $$...$$ and E'...' strings and runs every statement: nothing may hide there
    (dict(objects_where="$$'$$ = 'a') ; SELECT 'v' AS id WHERE ('b' = 'b' --'"), "may not hold"),
    (dict(objects_where="class = E'car'"), "may not hold"),
    (dict(objects_where="score < (SELECT max(score) FROM objects)"), "may not hold"),
])
def test_bad_object_predicates_are_refused(scenes, kw, needle):
    from service.client import InvalidArgumentError

    col, _ = scenes
    with pytest.raises(InvalidArgumentError, match=needle) as err:
        col.count(**kw)
    if "unknown" in needle:
        assert "area" in str(err.value)  # the allowed columns are listed
    with pytest.raises(InvalidArgumentError, match="object"):
        col.objects(**kw)
    with pytest.raises(InvalidArgumentError):
        col.mine("detection", 3, model="det", **kw)
    with pytest.raises(InvalidArgumentError, match="unknown object column"):
        col.objects(columns=["id", "areaa"])
    with pytest.raises(InvalidArgumentError, match="source 'm' has no boxes"):
        col.objects(source="m")
    with pytest.raises(InvalidArgumentError, match="objects.label"):
        col.histogram("objects.label")


def test_object_rows_follow_the_image_rows_at_every_version(client):
    col = client.create_collection("versions", models={"det": {"classes": COCO, "task": "detection"}})
    rng = np.random.default_rng(3)
    v1_rows = [_scene(rng, i) for i in range(12)]
    col.upsert(v1_rows)
    v1 = col.describe()["version"]
    changed = {"id": v1_rows[0]["id"], "pred_det": {"boxes": [_box(0, 0, 20, 20, 0.1, [0.9, 0.05, 0.05])]}}
    col.upsert([changed])
    col.delete(ids=[v1_rows[1]["id"]])
    v3_rows = [changed] + v1_rows[2:]

    def as_set(table) -> set:
        return {(o["id"], o["source"], o["box"], o["class"], o["area"]) for o in table.to_pylist()}

    def py(rs) -> set:
        return {(o["id"], o["source"], o["box"], o["class"], o["area"]) for o in _py_objects(rs)}

    # the changed row lost its gt boxes? no: an upsert of some columns keeps the others
    v3_rows[0] = {**v1_rows[0], **changed}
    assert as_set(col.objects(version=v1)) == py(v1_rows)
    assert as_set(col.objects()) == py(v3_rows)
    small_chair = "source = 'det' AND class = 'chair' AND area <= 400 AND score < 0.2"
    assert col.count(objects_where=small_chair) == len(_matching_ids(v3_rows, lambda o: o["source"] == "det"
                                                                     and o["class"] == "chair"
                                                                     and o["area"] <= 400 and o["score"] < 0.2))
    assert v1_rows[0]["id"] in set(col.query(objects_where=small_chair, columns=["id"])["id"].to_pylist())
    # at the old version the filter is judged on the old boxes
    old = _matching_ids(v1_rows, lambda o: o["source"] == "det" and o["class"] == "chair"
                        and o["area"] <= 400 and o["score"] < 0.2)
    assert col.count(objects_where=small_chair, version=v1) == len(old)
    assert set(col.query(objects_where=small_chair, columns=["id"], version=v1)["id"].to_pylist()) == old


def test_cli_objects_where_mines_queries_and_exports(server, scenes, tmp_path, capsys):
    import csv

    from service.cli import main

    col, rows = scenes
    want = _matching_ids(rows, _pred)
    with_boxes = {r["id"] for r in rows if (r.get("pred_det") or {}).get("boxes") is not None}
    picked = tmp_path / "picked.csv"
    assert main(["mine", "scenes", "detection", "--size", "100", "--model", "det", "--param",
                 "method=one_minus_score", "--objects-where", PRED, "--output", str(picked), "--quiet",
                 "--server", server.address]) == 0
    assert {r["id"] for r in csv.DictReader(picked.open())} == want & with_boxes
    queried = tmp_path / "rows.csv"
    assert main(["query", "scenes", "--where", "split = 'pool'", "--objects-where", PRED, "--columns", "id",
                 "--output", str(queried), "--server", server.address]) == 0
    pool = {r["id"] for r in rows if r["split"] == "pool"}
    assert {r["id"] for r in csv.DictReader(queried.open())} == want & pool
    exported = tmp_path / "labels.jsonl"
    assert main(["export", "scenes", str(exported), "--model", "det", "--objects-where", PRED,
                 "--server", server.address]) == 0
    assert len(exported.read_text().splitlines()) == len(want)
    capsys.readouterr()
    assert main(["query", "scenes", "--objects-where", "colour = 'red'", "--server", server.address]) == 2
    assert "unknown object column 'colour'" in capsys.readouterr().err


# -- box-level analytics ---------------------------------------------------------------------


def _iou(a: list[float], b: list[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _naive_confusion(rows: list[dict], iou: float = 0.5) -> dict:
    """Box confusion from its definition, pair by pair in plain Python."""
    out: dict = {}
    for r in rows:
        boxes, gts = (r.get("pred_det") or {}).get("boxes"), r.get("gt_boxes")
        if boxes is None or gts is None:
            continue
        xy = lambda b: [_f32(b[k]) for k in ("x1", "y1", "x2", "y2")]  # noqa: E731
        taken: set[int] = set()
        order = sorted(range(len(boxes)), key=lambda k: (-_f32(boxes[k]["score"]), k))
        for k in order:
            best, best_iou = None, -1.0
            for j, g in enumerate(gts):
                v = _iou(xy(boxes[k]), xy(g))
                if j not in taken and v >= iou and v > best_iou:
                    best, best_iou = j, v
            probs = boxes[k].get("probs")
            cls = COCO[int(np.argmax(np.asarray(probs, np.float32)))] if probs is not None else "(no class)"
            key = (gts[best]["label"] if best is not None else None, cls)
            out[key] = out.get(key, 0) + 1
            if best is not None:
                taken.add(best)
        for j, g in enumerate(gts):
            if j not in taken:
                out[(g["label"], None)] = out.get((g["label"], None), 0) + 1
    return out


@pytest.fixture(scope="module")
def labeled(client):
    """Images with gt boxes and predictions near them (jittered, sometimes the wrong class,
    sometimes missing), plus spurious boxes; some images unlabeled or unpredicted."""
    col = client.create_collection("labeled", models={"det": {"classes": COCO, "task": "detection"}})
    rng = np.random.default_rng(11)
    rows = []
    for i in range(80):
        gts, preds = [], []
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, 300, 2)
            w, h = rng.uniform(10, 80, 2)
            c = int(rng.integers(0, 3))
            gts.append({"x1": x1, "y1": y1, "x2": x1 + w, "y2": y1 + h, "label": COCO[c]})
            if rng.random() < 0.8:  # found, mostly with the right class, box jittered
                jx, jy = rng.normal(0, 0.15, 2) * (w, h)
                pc = c if rng.random() < 0.7 else int(rng.integers(0, 3))
                p = np.full(3, 0.1)
                p[pc] = 0.8
                preds.append(_box(x1 + jx, y1 + jy, w, h, float(rng.random()),
                                  p.tolist() if rng.random() < 0.9 else None))
        for _ in range(int(rng.integers(0, 2))):  # spurious
            x1, y1 = rng.uniform(400, 600, 2)
            preds.append(_box(x1, y1, 20, 20, float(rng.random()), rng.dirichlet(np.ones(3)).tolist()))
        row = {"id": f"l{i:03d}", "pred_det": {"boxes": preds}, "gt_boxes": gts}
        if i % 9 == 0:
            row["gt_boxes"] = None
        if i % 13 == 0:
            row["pred_det"] = None
        rows.append(row)
    col.upsert(rows)
    return col, rows


def test_box_confusion_equals_a_direct_matching(labeled):
    col, rows = labeled
    for iou in (0.5, 0.3):
        got = {(r["label"], r["predicted"]): r["count"] for r in col.box_confusion("det", iou=iou).to_pylist()}
        want = _naive_confusion(rows, iou)
        assert got == want
    keys = set(got)
    assert any(k[0] is None for k in keys) and any(k[1] is None for k in keys)  # spurious and missed
    assert any(k[0] and k[1] and k[0] != k[1] and k[1] != "(no class)" for k in keys)  # confusions
    # a filter restricts the images
    first = {r["id"] for r in rows[:40]}
    got = {(r["label"], r["predicted"]): r["count"]
           for r in col.box_confusion("det", where="id < 'l040'").to_pylist()}
    assert got == _naive_confusion([r for r in rows if r["id"] in first])


def test_box_confusion_hand_built():
    from indexing.objects import match_boxes

    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    pred = np.array([[20, 20, 30, 31], [0, 0, 10, 9], [1, 0, 10, 10], [100, 100, 110, 110]], float)
    # the most confident prediction takes gt 0; the next one overlapping gt 0 finds it taken
    assert match_boxes(pred, np.array([0.5, 0.9, 0.8, 0.7]), gt).tolist() == [1, 0, -1, -1]
    assert match_boxes(pred, np.array([0.5, 0.7, 0.8, 0.7]), gt).tolist() == [1, -1, 0, -1]
    assert match_boxes(pred[:0], np.zeros(0), gt).tolist() == []


def test_writes_by_box_clauses_name_the_matching_ids(server, scenes):
    """A delete or tag commits on a later version than the one its box clause was expanded
    on: it must name the matching ids, never "every id but the others" (which would also
    take images inserted meanwhile); a read may use the shorter negative form."""
    col, rows = scenes
    store_col = server.store.collection("scenes")
    broad = "any_object(score >= 0)"  # most images have a box
    n = col.count(where=broad)
    assert n > len(rows) / 2
    read = store_col.validate_filter(broad)
    write = store_col.validate_filter(broad, for_write=True)
    assert "NOT" in read and "NOT" not in write and "id IN" in write
    assert col.count(where=write) == n
    tagged = col.tag_items(where=broad, add="boxed")
    assert tagged == n == col.count(where="array_has_any(tags, ['boxed'])")
    col.tag_items(where="array_has_any(tags, ['boxed'])", remove="boxed")


def test_object_classes_and_bad_confusion_requests(labeled, client):
    from collections import Counter

    from service.client import InvalidArgumentError

    col, rows = labeled
    got = {(r["source"], r["class"]): r["count"] for r in col.object_classes().to_pylist()}
    objs = []
    for r in rows:
        for b in ((r.get("pred_det") or {}).get("boxes")) or []:
            p = b.get("probs")
            objs.append(("det", COCO[int(np.argmax(np.asarray(p, np.float32)))] if p is not None else None))
        objs += [("gt", g["label"]) for g in r.get("gt_boxes") or []]
    assert got == dict(Counter(objs))
    only_gt = {r["class"]: r["count"] for r in col.object_classes(source="gt", objects_where="area > 1000").to_pylist()}
    assert only_gt == dict(Counter(g["label"] for r in rows for g in r.get("gt_boxes") or []
                                   if (_f32(g["x2"]) - _f32(g["x1"])) * (_f32(g["y2"]) - _f32(g["y1"])) > 1000))
    other = client.create_collection("clf", models={"m": ["a", "b"]})
    other.upsert([{"id": "x", "pred_m": {"probs": [0.5, 0.5]}}])
    with pytest.raises(InvalidArgumentError, match="needs a detection model"):
        other.box_confusion("m")
    with pytest.raises(InvalidArgumentError, match="iou"):
        col.box_confusion("det", iou=1.5)


def _direct_box_pairs(rows: list[dict], classes: list[str], keep=lambda b: True) -> tuple[dict, int]:
    """(class_a, class_b) -> [count, a_top1, margins], and the boxes without probs, from the
    rows as written: each box's two largest probs (float32 as stored), lower index on ties."""
    pairs: dict[tuple[str, str], list] = {}
    skipped = 0
    for r in rows:
        for b in ((r.get("pred_det") or {}).get("boxes")) or []:
            if not keep(b):
                continue
            if b.get("probs") is None:
                skipped += 1
                continue
            p = [float(np.float32(x)) for x in b["probs"]]
            i1 = max(range(len(p)), key=lambda i: (p[i], -i))
            i2 = max((i for i in range(len(p)) if i != i1), key=lambda i: (p[i], -i))
            a, c = min(i1, i2), max(i1, i2)
            cell = pairs.setdefault((classes[a], classes[c]), [0, 0, []])
            cell[0] += 1
            cell[1] += int(i1 == a)
            cell[2].append(p[i1] - p[i2])
    return pairs, skipped


def _pairs_of(table: pa.Table) -> tuple[dict, list[dict]]:
    rows = table.to_pylist()
    assert table.column_names == ["class_a", "class_b", "count", "a_top1", "mean_margin"]
    return {(r["class_a"], r["class_b"]): r for r in rows if r["class_a"] is not None}, \
        [r for r in rows if r["class_a"] is None]


def test_box_confused_pairs_hand_built(client):
    col = client.create_collection("pairs", models={"det": {"classes": ["car", "person", "bike"],
                                                             "task": "detection"}})
    col.upsert([
        {"id": "a", "pred_det": {"boxes": [
            _box(0, 0, 10, 10, 0.9, [0.6, 0.3, 0.1]),     # car > person: (car, person), car on top, 0.3
            _box(0, 0, 20, 20, 0.8, [0.2, 0.5, 0.3]),     # person > bike: (person, bike), a on top, 0.2
            _box(5, 5, 10, 10, 0.7, None)]}},             # no probs: skipped, counted
        {"id": "b", "pred_det": {"boxes": [
            _box(0, 0, 10, 10, 0.6, [0.3, 0.6, 0.1]),     # person > car: (car, person), b on top, 0.3
            _box(0, 0, 30, 30, 0.5, [0.4, 0.4, 0.2]),     # a tie: the lower index (car) on top, 0.0
            _box(0, 0, 5, 5, 0.4, [0.1, 0.2, 0.7])]}},    # bike > person: (person, bike), b on top, 0.5
        {"id": "c", "gt_boxes": [{"x1": 0, "y1": 0, "x2": 1, "y2": 1, "label": "car"}]},
    ])
    pairs, rest = _pairs_of(col.box_confused_pairs("det"))
    # top-two by hand (see the comments above)
    assert {k: (v["count"], v["a_top1"]) for k, v in pairs.items()} == {
        ("car", "person"): (3, 2), ("person", "bike"): (2, 1)}
    assert pairs[("car", "person")]["mean_margin"] == pytest.approx((0.3 + 0.3 + 0.0) / 3, abs=1e-6)
    assert pairs[("person", "bike")]["mean_margin"] == pytest.approx((0.2 + 0.5) / 2, abs=1e-6)
    assert rest == [{"class_a": None, "class_b": None, "count": 1, "a_top1": None, "mean_margin": None}]
    assert [r["class_a"] for r in col.box_confused_pairs("det").to_pylist()] == ["car", "person", None]
    # objects_where keeps boxes (not images): the small ones, area <= 100
    pairs, rest = _pairs_of(col.box_confused_pairs("det", objects_where="area <= 100"))
    assert {k: (v["count"], v["a_top1"]) for k, v in pairs.items()} == {
        ("car", "person"): (2, 1), ("person", "bike"): (1, 0)}
    assert rest[0]["count"] == 1
    pairs, rest = _pairs_of(col.box_confused_pairs("det", where="id = 'b'", top=1))
    assert {k: v["count"] for k, v in pairs.items()} == {("car", "person"): 2} and rest == []


def test_box_confused_pairs_equal_a_direct_computation(labeled, server, capsys):
    import json

    from service.cli import main

    col, rows = labeled
    big = "area >= 1500 AND score < 0.8"
    for kw, keep in (({}, lambda b: True),
                     ({"objects_where": big},
                      lambda b: (_f32(b["x2"]) - _f32(b["x1"])) * (_f32(b["y2"]) - _f32(b["y1"])) >= 1500
                      and _f32(b["score"]) < 0.8)):
        table = col.box_confused_pairs("det", top=100, **kw)
        got, rest = _pairs_of(table)
        want, skipped = _direct_box_pairs(rows, COCO, keep)
        assert set(got) == set(want) and len(want) >= 2
        for key, (n, first, margins) in want.items():
            assert (got[key]["count"], got[key]["a_top1"]) == (n, first)
            assert got[key]["mean_margin"] == pytest.approx(float(np.mean(margins)), abs=1e-9)
        assert [r["count"] for r in rest] == ([skipped] if skipped else [])
        ranked = [(-r["count"], r["mean_margin"]) for r in table.to_pylist() if r["class_a"] is not None]
        assert ranked == sorted(ranked)
    # the image-level kind on a detector counts every box with probs: the same pairs
    image_level = {(r["class_a"], r["class_b"]): r["count"] for r in col.confused_pairs("det", top=100).to_pylist()}
    assert image_level == {k: v[0] for k, v in _direct_box_pairs(rows, COCO)[0].items()}
    # the CLI prints the client's table
    capsys.readouterr()
    assert main(["stats", "labeled", "box-confused-pairs", "--model", "det", "--objects-where", big,
                 "--top", "1", "--json", "--server", server.address]) == 0
    assert json.loads(capsys.readouterr().out) == col.box_confused_pairs("det", objects_where=big, top=1).to_pylist()


def test_bad_box_confused_pairs_requests(labeled, client, server, capsys):
    from service.cli import main
    from service.client import InvalidArgumentError, NotFoundError

    col, _ = labeled
    other = client.create_collection("clf_pairs", models={"m": ["a", "b"]})
    other.upsert([{"id": "x", "pred_m": {"probs": [0.6, 0.4]}}])
    with pytest.raises(InvalidArgumentError, match="box confused pairs need a detection model; 'm' is a "
                                                   "classification model"):
        other.box_confused_pairs("m")
    with pytest.raises(FailedPreconditionError, match="needs a classifier"):  # and vice versa
        col.confusion("det")
    with pytest.raises(InvalidArgumentError, match="top must be"):
        col.box_confused_pairs("det", top=20_000)
    with pytest.raises(InvalidArgumentError, match="unknown object column 'colour'"):
        col.box_confused_pairs("det", objects_where="colour = 'red'")
    with pytest.raises(NotFoundError, match=r"model 'gt' not found in collection 'labeled' \(known: det\)"):
        col.box_confused_pairs("gt")  # gt boxes have a label, no probs: no pairs
    with pytest.raises(SystemExit, match="--model is required"):
        main(["stats", "labeled", "box-confused-pairs", "--server", server.address])


# -- per-box exports -------------------------------------------------------------------------


def test_per_box_exports_equal_the_object_rows(scenes, tmp_path):
    import csv
    import json

    col, rows = scenes
    out = col.export(tmp_path / "boxes.jsonl", format="objects_jsonl", objects_where=PRED)
    lines = [json.loads(x) for x in (tmp_path / "boxes.jsonl").read_text().splitlines()]
    assert lines == col.objects(objects_where=PRED).to_pylist()
    assert out["rows"] == len(lines) == sum(map(_pred, _py_objects(rows)))
    out = col.export(tmp_path / "gt.csv", format="objects_csv", model="gt", where="split = 'val'")
    got = list(csv.DictReader((tmp_path / "gt.csv").open()))
    want = [o for o in _py_objects(rows) if o["source"] == "gt" and
            next(r for r in rows if r["id"] == o["id"])["split"] == "val"]
    assert out["rows"] == len(got) == len(want) > 0
    assert sorted((g["id"], int(g["box"]), g["class"], float(g["area"])) for g in got) == \
        sorted((w["id"], w["box"], w["class"], w["area"]) for w in want)
    det = col.export(tmp_path / "det.csv", format="objects_csv", model="det", ids=["img001", "img002", "zzz"])
    assert det["rows"] == sum(o["source"] == "det" and o["id"] in ("img001", "img002") for o in _py_objects(rows))


def test_yolo_export_normalises_by_the_image_size(client, tmp_path):
    import zipfile

    from PIL import Image

    col = client.create_collection("yolo", models={"det": {"classes": COCO, "task": "detection"}})
    sizes = {"a": (200, 100), "b": (64, 48), "c": (50, 50)}
    rows = []
    for name, (w, h) in sizes.items():
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (w, h)).save(path)
        rows.append({"id": f"id-{name}", "uri": str(path)})
    rows[0]["pred_det"] = {"boxes": [_box(10, 20, 50, 30, 0.9, [0.1, 0.8, 0.1]),
                                     _box(0, 0, 200, 100, 0.2, [0.7, 0.2, 0.1]),
                                     _box(5, 5, 5, 5, 0.9, None)]}  # no class: left out
    rows[1]["pred_det"] = {"boxes": [_box(32, 24, 16, 12, 0.5, [0.2, 0.2, 0.6])]}
    col.upsert(rows)
    out = col.export(tmp_path / "labels.zip", model="det", min_score=0.3)
    assert out == {"rows": 3, "annotations": 2, "path": str(tmp_path / "labels.zip"), "format": "yolo"}
    with zipfile.ZipFile(tmp_path / "labels.zip") as z:
        assert z.read("classes.txt").decode().splitlines() == COCO
        a = [list(map(float, line.split())) for line in z.read("labels/a.txt").decode().splitlines()]
        np.testing.assert_allclose(a, [[1, (10 + 25) / 200, (20 + 15) / 100, 50 / 200, 30 / 100]], atol=1e-6)
        b = [list(map(float, line.split())) for line in z.read("labels/b.txt").decode().splitlines()]
        np.testing.assert_allclose(b, [[2, 40 / 64, 30 / 48, 16 / 64, 12 / 48]], atol=1e-6)
        assert z.read("labels/c.txt") == b""  # no boxes: a negative
    # an id is any string: the entry names of images sharing a file name stay inside labels/
    other = tmp_path / "sub"
    other.mkdir()
    Image.new("RGB", (10, 10)).save(other / "a.png")
    col.upsert([{"id": "../../../escape\\x", "uri": str(other / "a.png"),
                 "pred_det": {"boxes": [_box(1, 1, 2, 2, 0.9, [0.1, 0.8, 0.1])]}}])
    col.export(tmp_path / "named.zip", model="det")
    with zipfile.ZipFile(tmp_path / "named.zip") as z:
        names = z.namelist()
    assert len(names) == len(set(names)) == 5 and "labels/a.txt" in names
    assert all(n == "classes.txt" or (n.startswith("labels/") and "/" not in n[7:] and "\\" not in n
                                      and not n[7:].startswith(".")) for n in names), names
    col.upsert([{"id": "no-file", "uri": str(tmp_path / "missing.png")}])
    with pytest.raises(FailedPreconditionError, match="'no-file'"):
        col.export(tmp_path / "again.zip", model="det")
    assert not (tmp_path / "again.zip").exists()


def test_a_scan_with_no_match_at_an_old_version_is_empty(client):
    # Scan and Page answered an empty result with a limit-0 query of the CURRENT version,
    # which Lance reads as "no limit": rows of another version came back
    col = client.create_collection("emptypage")
    col.upsert([{"id": "old"}])
    v1 = col.describe()["version"]
    col.upsert([{"id": "new"}])
    assert col.query("id = 'new'", version=v1).num_rows == 0
    assert col.query("id = 'new'", version=v1).column_names == col.query(limit=0).column_names
    assert col.page("id = 'new'", version=v1).table.num_rows == 0
    assert col.query("id = 'new'").num_rows == 1


def test_object_rows_stay_consistent_under_concurrent_upserts(client):
    """A writer keeps replacing boxes and deleting/re-adding images; every read pinned at a
    version sees object rows equal to the flattening of that version's image rows."""
    import threading

    col = client.create_collection("busy", models={"det": {"classes": COCO, "task": "detection"}})
    rng = np.random.default_rng(5)
    col.upsert([_scene(rng, i) for i in range(20)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        wrng = np.random.default_rng(9)
        try:
            for step in range(12):
                if stop.is_set():
                    return
                col.upsert([_scene(wrng, int(i)) for i in wrng.choice(20, 5, replace=False)])
                if step % 3 == 2:
                    col.delete(ids=[f"img{int(wrng.integers(0, 20)):03d}"])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def image_rows(version: int) -> list[dict]:
        table = col.query(columns=["id", "pred_det", "gt_boxes"], version=version)
        return [{k: v for k, v in r.items()} for r in table.to_pylist()]

    t = threading.Thread(target=writer)
    t.start()
    seen = set()
    try:
        while t.is_alive() or len(seen) < 2:
            v = col.describe()["version"]
            seen.add(v)
            got = {(o["id"], o["source"], o["box"], o["class"], o["area"]) for o in
                   col.objects(version=v).to_pylist()}
            want = {(o["id"], o["source"], o["box"], o["class"], o["area"]) for o in _py_objects(image_rows(v))}
            assert got == want
            ids = _matching_ids(image_rows(v), _pred)
            assert col.count(objects_where=PRED, version=v) == len(ids)
            if not t.is_alive():
                break
    finally:
        stop.set()
        t.join()
    assert not errors
    assert len(seen) >= 2


_WRITER = """
import sys
import numpy as np
import pyarrow as pa
from indexing.store import Store
sys.path.insert(0, {tests!r})
from test_objects import COCO, _scene
col = Store({root!r}).create_collection("crash", models={{"det": {{"classes": COCO, "task": "detection"}}}})
rng = np.random.default_rng(1)
col.upsert(pa.Table.from_pylist([_scene(rng, i) for i in range(50)]))
print("ready", flush=True)
for step in range(10_000):
    col.upsert(pa.Table.from_pylist([_scene(rng, int(i)) for i in rng.choice(400, 40, replace=False)]))
"""


@pytest.mark.slow
def test_object_rows_match_the_image_rows_after_a_crash_mid_write(tmp_path):
    """A writer process killed with SIGKILL in the middle of its upserts: at the version the
    store opens on (and every older one), object rows are the flattening of the image rows."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from indexing.store import Store

    root = str(tmp_path / "data")
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=root, tests=tests)],
                            stdout=subprocess.PIPE, cwd=os.path.dirname(tests))
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(1.5)  # a few more commits, then die mid-write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    col = Store(root).collection("crash")
    versions = [v["version"] for v in col.versions()]
    assert len(versions) >= 3
    for v in [versions[-1], versions[len(versions) // 2]]:
        table = col.at_version(v)
        rows = table.search().select(["id", "pred_det", "gt_boxes"]).limit(None).to_arrow().to_pylist()
        got = {(o["id"], o["source"], o["box"], o["class"], o["area"]) for o in col.objects(version=v).to_pylist()}
        assert got == {(o["id"], o["source"], o["box"], o["class"], o["area"]) for o in _py_objects(rows)}
        assert col.count(f"any_object({PRED})", version=v) == len(_matching_ids(rows, _pred))


def test_cli_box_stats(server, labeled, capsys):
    import json

    from service.cli import main

    col, rows = labeled
    assert main(["stats", "labeled", "box-confusion", "--model", "det", "--json", "--server", server.address]) == 0
    got = {(r["label"], r["predicted"]): r["count"] for r in json.loads(capsys.readouterr().out)}
    assert got == _naive_confusion(rows)
    assert main(["stats", "labeled", "box-classes", "--model", "gt", "--objects-where", "class = 'chair'", "--json",
                 "--server", server.address]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"source": "gt", "class": "chair", "count": sum(g["label"] == "chair" for r in rows
                                                         for g in r.get("gt_boxes") or [])}]
    assert main(["stats", "labeled", "histogram", "--field", "objects.score", "--model", "det", "--bins", "5",
                 "--range", "0,1", "--json", "--server", server.address]) == 0
    scores = [_f32(b["score"]) for r in rows for b in ((r.get("pred_det") or {}).get("boxes") or [])]
    assert [r["count"] for r in json.loads(capsys.readouterr().out)] == \
        np.histogram(scores, bins=5, range=(0, 1))[0].tolist()


def test_expand_names_the_smaller_side(store):
    from indexing.objects import expand

    col = store.create_collection("ex", models={"det": {"classes": COCO, "task": "detection"}})
    col.upsert(pa.Table.from_pylist([
        {"id": f"r{i}", "pred_det": {"boxes": [_box(0, 0, 10, 10, i / 10, [1.0, 0.0, 0.0])]}} for i in range(10)]))
    table = col.table
    assert expand(table, "any_object(score < 0.2)") == "(id IN ('r0', 'r1'))"
    assert expand(table, "any_object(score >= 0.2)") == "(NOT (id IN ('r0', 'r1')))"
    assert expand(table, "any_object(score >= 0)") == "(1 = 1)"
    assert expand(table, "x = 1 AND any_object(score > 5)") == "x = 1 AND (1 = 0)"
    assert expand(table, "'any_object(score > 5)' = text") == "'any_object(score > 5)' = text"
