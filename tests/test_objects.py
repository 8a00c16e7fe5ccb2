"""Detection data as first-class data: the detection bugs of issue 19 (regressions), object
rows derived from the image rows, ``objects_where`` filters, box-level analytics.

A real server on loopback and the client; every result is checked against a direct Python
computation on the small hand-built images."""

from __future__ import annotations

import numpy as np
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
