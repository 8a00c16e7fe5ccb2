"""Does uncertainty predict errors? (issue 19, item 5): the Spearman correlation and the
quadrants of an uncertainty against a quality on labeled rows.

The pure report is checked against hand computations (ranks with ties, quadrant membership
by definition) and against independent implementations (pandas' Spearman, SciPy); the
served report end to end through a real server on loopback (client, CLI, web page) on small
hand-built collections whose answer is known."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.stats import spearmanr

from indexing import analytics
from indexing.errors import InvalidArgument
from indexing.objects import image_iou
from indexing.quality import QUADRANTS, label_quality, report
from miners.detection import detection_scores
from service.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    uncertainty_quality_stats,
)
from service.server import ServerConfig, start_server

CLASSES = ["cat", "dog", "owl"]
DET = ["car", "person"]


# -- the pure report --------------------------------------------------------------------------


def test_spearman_with_ties_equals_a_hand_computation():
    u = [0.9, 0.8, 0.8, 0.3, 0.1, 0.1]
    q = [0, 0, 1, 1, 1, 0]
    # average ranks by hand: u 0.1, 0.1 -> 1.5, 1.5; 0.3 -> 3; 0.8, 0.8 -> 4.5, 4.5; 0.9 -> 6
    ru = np.array([6, 4.5, 4.5, 3, 1.5, 1.5])
    rq = np.array([2, 2, 5, 5, 5, 2])  # three 0s share ranks 1..3, three 1s ranks 4..6
    du, dq = ru - ru.mean(), rq - rq.mean()
    want = (du * dq).sum() / math.sqrt((du ** 2).sum() * (dq ** 2).sum())
    rep = report(u, q, [f"i{i}" for i in range(6)])
    assert rep.rho == pytest.approx(want, abs=1e-12)
    assert rep.rho == pytest.approx(-4.5 / math.sqrt(16.5 * 13.5), abs=1e-12)
    assert rep.rho_error == pytest.approx(-want)  # higher quality is better: error = -quality
    # p-value: the t approximation with n - 2 degrees of freedom
    from scipy.stats import t as student

    tstat = want * math.sqrt(4 / (1 - want ** 2))
    assert rep.p_value == pytest.approx(2 * student.sf(abs(tstat), 4), rel=1e-9)


def test_spearman_equals_pandas_on_tied_random_data():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 12, 300).astype(float)  # many ties on both sides
    q = np.round(u / 12 + rng.normal(0, 0.3, 300), 1)
    rep = report(u, q, [str(i) for i in range(300)])
    assert rep.rho == pytest.approx(pd.Series(u).corr(pd.Series(q), method="spearman"), abs=1e-12)
    res = spearmanr(u, q)
    assert rep.p_value == pytest.approx(res.pvalue, rel=1e-9)


def _by_definition(u, q, ids, t_u, t_q, higher_is_better, cap):
    """Quadrant members and their first ``cap`` ids, straight from the definitions."""
    out = {}
    for name, us, qs in QUADRANTS:
        members = []
        for ui, qi, i in zip(u, q, ids, strict=True):
            if not (math.isfinite(ui) and math.isfinite(qi)):
                continue
            high = ui > t_u
            low = qi < t_q if higher_is_better else qi > t_q
            if (high == (us == "high")) and (low == (qs == "low")):
                bad = -qi if higher_is_better else qi
                members.append(((-ui if high else ui), (-bad if low else bad), i))
        out[name] = (len(members), [m[2] for m in sorted(members)[:cap]])
    return out


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_quadrants_equal_their_definition(higher_is_better):
    rng = np.random.default_rng(1)
    n = 101
    u = rng.random(n)
    q = np.round(rng.random(n), 1)  # ties in quality, and at its median
    u[[3, 17]] = np.nan
    q[40] = np.inf
    ids = [f"row{i:03d}" for i in rng.permutation(n)]
    rep = report(u, q, ids, higher_is_better=higher_is_better, max_ids=7)
    ok = np.isfinite(u) & np.isfinite(q)
    assert rep.n == ok.sum() == 98 and rep.non_finite == 3
    assert rep.uncertainty_threshold == np.median(u[ok]) and rep.quality_threshold == np.median(q[ok])
    want = _by_definition(u, q, ids, rep.uncertainty_threshold, rep.quality_threshold, higher_is_better, 7)
    got = {x.name: (x.count, x.ids) for x in rep.quadrants}
    assert got == want
    assert sum(x.count for x in rep.quadrants) == rep.n
    for x in rep.quadrants:
        members = [i for i in range(n) if ok[i] and (u[i] > rep.uncertainty_threshold) == (x.uncertainty == "high")
                   and ((q[i] < rep.quality_threshold) if higher_is_better else (q[i] > rep.quality_threshold))
                   == (x.quality == "low")]
        assert x.mean_uncertainty == pytest.approx(u[members].mean())
        assert x.mean_quality == pytest.approx(q[members].mean())


def test_thresholds_quantiles_and_ties_at_the_threshold():
    u = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    q = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    ids = list("abcde")
    # the median of q is 1: a value equal to the threshold is "high quality", so nothing is
    # flagged low merely for equalling it; 0 < 1 is low
    rep = report(u, q, ids)
    counts = {x.name: x.count for x in rep.quadrants}
    assert rep.uncertainty_threshold == 2.0 and rep.quality_threshold == 1.0
    assert counts == {"high_uncertainty_low_quality": 2, "high_uncertainty_high_quality": 0,
                      "low_uncertainty_low_quality": 0, "low_uncertainty_high_quality": 3}
    assert rep.quadrants[0].ids == ["e", "d"]  # most uncertain first
    # quantile 0.25 of u (linear) = 1.0; an absolute quality threshold of 0.5
    rep = report(u, q, ids, uncertainty_quantile=0.25, quality_threshold=0.5)
    assert rep.uncertainty_threshold == 1.0 and rep.quality_threshold == 0.5
    assert {x.name: x.ids for x in rep.quadrants}["high_uncertainty_high_quality"] == ["c"]
    # counts stay complete when no id is listed
    rep = report(u, q, ids, max_ids=0)
    assert [x.ids for x in rep.quadrants] == [[]] * 4 and sum(x.count for x in rep.quadrants) == 5
    # a constant side: no rank correlation
    assert report(u, np.ones(5), ids).rho is None
    assert report([], [], []).n == 0


@pytest.mark.parametrize("kw, needle", [
    ({"uncertainty_quantile": 1.5}, "uncertainty_quantile"),
    ({"quality_threshold": float("nan")}, "quality_threshold"),
    ({"uncertainty_quantile": 0.3, "uncertainty_threshold": 0.1}, "not both"),
    ({"max_ids": -1}, "max_ids"),
])
def test_bad_report_options(kw, needle):
    with pytest.raises(InvalidArgument, match=needle):
        report([1.0, 2.0], [1.0, 0.0], ["a", "b"], **kw)
    with pytest.raises(InvalidArgument, match="one length"):
        report([1.0, 2.0], [1.0], ["a", "b"])


def test_label_quality_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [0.0, 1.0, 0.0]])
    y = np.array([0, 1, 0])
    assert label_quality(p, y, "correct").tolist() == [1.0, 0.0, 0.0]  # a tie goes to class 0
    loss = label_quality(p, y, "loss")
    assert loss[0] == pytest.approx(-math.log(0.7)) and loss[1] == pytest.approx(-math.log(0.4))
    assert math.isfinite(loss[2]) and loss[2] > 700  # p = 0: clipped, not infinite


def test_image_iou_by_hand():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    assert image_iou(np.array([[0, 0, 10, 10]]), np.array([0.9]), gt[:1]) == 1.0
    # IoU 50/100 = 0.5, matched at 0.5; with a missed second gt box: 0.5 / (1 + 2 - 1)
    assert image_iou(np.array([[0, 0, 10, 5]]), np.array([0.9]), gt[:1]) == 0.5
    assert image_iou(np.array([[0, 0, 10, 5]]), np.array([0.9]), gt) == 0.25
    # below the matching IoU: one spurious, one missed
    assert image_iou(np.array([[0, 0, 10, 4]]), np.array([0.9]), gt[:1]) == 0.0
    assert image_iou(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4))) == 1.0
    assert image_iou(np.zeros((0, 4)), np.zeros(0), gt) == 0.0
    # a duplicate: the more confident takes the gt box, the other is spurious: 1 / (2 + 1 - 1)
    two = np.array([[0, 0, 10, 9], [0, 0, 10, 10]], float)
    assert image_iou(two, np.array([0.5, 0.9]), gt[:1]) == 0.5
    assert image_iou(two, np.array([0.9, 0.5]), gt[:1]) == pytest.approx(0.9 / 2)


# -- served: classification -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("uq")), port=0, http_port=0, grace_s=2))
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def _probs(top: float, cls: int) -> list[float]:
    p = [(1 - top) / 2] * 3
    p[cls] = top
    return p


@pytest.fixture(scope="module")
def cls(client):
    """40 labeled rows: 30 confidently right (top probability 0.75..0.98) and 10 wrong ones
    that are the 10 most uncertain (top 0.36..0.45, on the wrong class); plus unlabeled rows,
    a labeled row without a prediction and one whose label is no class of the model."""
    col = client.create_collection("cls", models={"m": CLASSES}, fields={"my_u": "float64", "note": "string"})
    rows = []
    for i in range(30):
        y = i % 3
        top = 0.75 + 0.23 * i / 29
        rows.append({"id": f"r{i:02d}", "label": CLASSES[y], "pred_m": {"probs": _probs(top, y)}, "my_u": 1 - top})
    for i in range(10):
        y = i % 3
        top = 0.36 + 0.01 * i
        rows.append({"id": f"w{i:02d}", "label": CLASSES[y], "pred_m": {"probs": _probs(top, (y + 1) % 3)},
                     "my_u": 1 - top})
    labeled = list(rows)
    rows += [{"id": f"u{i}", "pred_m": {"probs": _probs(0.5, 0)}, "my_u": 0.5} for i in range(5)]
    rows.append({"id": "nopred", "label": "cat", "note": "x"})
    rows.append({"id": "zebra0", "label": "zebra", "pred_m": {"probs": _probs(0.9, 0)}, "my_u": 0.1})
    col.upsert(rows)
    return col, labeled


def _entropy(p: list[float]) -> float:
    q = np.asarray(np.asarray(p, np.float32), np.float64)  # what the store holds
    return float(-(q * np.log(q)).sum() / math.log(3))


def _quadrants(table: pa.Table) -> dict[str, tuple[int, list[str]]]:
    return {r["quadrant"]: (r["count"], r["ids"]) for r in table.to_pylist()}


def test_wrong_predictions_that_are_the_uncertain_ones(cls, monkeypatch):
    monkeypatch.setattr(analytics, "BATCH_ROWS", 7)  # many streamed batches
    col, rows = cls
    table = col.uncertainty_quality("m", "entropy", "correct")
    stats = uncertainty_quality_stats(table)
    u = [_entropy(r["pred_m"]["probs"]) for r in rows]
    correct = [float(r["id"].startswith("r")) for r in rows]
    want = spearmanr(u, correct)
    assert stats["rho"] == pytest.approx(want.statistic, abs=1e-9) and stats["rho"] < -0.6
    assert stats["rho_error"] == pytest.approx(-want.statistic) and stats["rho_error"] > 0.6
    assert stats["p_value"] == pytest.approx(want.pvalue, rel=1e-6)
    assert (stats["n"], stats["rows"], stats["missing"], stats["unknown_label"]) == (40, 42, 1, 1)
    assert stats["quality_threshold"] == 0.5  # correct vs wrong
    assert stats["uncertainty_threshold"] == pytest.approx(float(np.median(u)), abs=1e-9)
    assert stats["higher_is_better"] is True
    q = _quadrants(table)
    # the ten wrong rows are the ten most uncertain: all caught, most uncertain (w00) first
    assert q["high_uncertainty_low_quality"] == (10, [f"w{i:02d}" for i in range(10)])
    assert q["high_uncertainty_high_quality"] == (10, [f"r{i:02d}" for i in range(10)])
    assert q["low_uncertainty_low_quality"] == (0, [])
    # low uncertainty: the most confident (r29, top probability 0.98) first
    assert q["low_uncertainty_high_quality"] == (20, [f"r{i:02d}" for i in range(29, 9, -1)])
    assert table.column("quadrant").to_pylist() == [name for name, _, _ in QUADRANTS]
    # ids are capped, counts are not
    capped = _quadrants(col.uncertainty_quality("m", max_ids=3))  # entropy / correct are the defaults
    assert capped["low_uncertainty_high_quality"] == (20, ["r29", "r28", "r27"])


def test_loss_quality_and_a_field_uncertainty(cls):
    col, rows = cls
    table = col.uncertainty_quality("m", "least_confidence", "loss")
    stats = uncertainty_quality_stats(table)
    p = [np.asarray(np.asarray(r["pred_m"]["probs"], np.float32), np.float64) for r in rows]
    y = [CLASSES.index(r["label"]) for r in rows]
    loss = [-math.log(pi[yi]) for pi, yi in zip(p, y, strict=True)]
    lc = [1 - pi.max() for pi in p]
    want = spearmanr(lc, loss).statistic
    assert stats["rho"] == pytest.approx(want, abs=1e-9) and stats["rho"] > 0.6
    assert stats["rho_error"] == stats["rho"] and stats["higher_is_better"] is False
    assert stats["quality_threshold"] == pytest.approx(float(np.median(loss)), rel=1e-6)
    # high loss is low quality: the wrong rows have the highest losses
    assert _quadrants(table)["high_uncertainty_low_quality"][0] == 20  # median splits of 40
    # a stored score as the uncertainty ranks rows as least confidence does
    by_field = col.uncertainty_quality("m", "my_u", "loss")
    assert uncertainty_quality_stats(by_field)["rho"] == pytest.approx(want, abs=1e-6)
    assert _quadrants(by_field) == _quadrants(table)
    # a quality field without a model; lower_is_better flips the direction
    own = uncertainty_quality_stats(col.uncertainty_quality(uncertainty="my_u", quality="my_u", lower_is_better=True))
    assert own["rho"] == pytest.approx(1.0) and own["rho_error"] == pytest.approx(1.0)
    assert own["n"] == 46  # every row with a value: 40 + 5 unlabeled + zebra


def test_a_mining_run_as_the_uncertainty(cls):
    col, rows = cls
    job = col.mine("margin", size=len(rows), model="m", where="label IS NOT NULL AND id <> 'zebra0'")
    job.wait(timeout=60)
    by_run = col.uncertainty_quality(run_id=job)  # the run's model is the default model
    by_measure = col.uncertainty_quality("m", "margin")
    s_run, s_measure = uncertainty_quality_stats(by_run), uncertainty_quality_stats(by_measure)
    assert s_run["rho"] == pytest.approx(s_measure["rho"], abs=1e-9)
    assert s_run["uncertainty"] == f"run:{job.run_id}" and s_run["uncertainty_kind"] == "run"
    assert _quadrants(by_run) == _quadrants(by_measure)
    # a run that selected 6 rows covers 6 labeled rows: the rest are missing
    small = col.mine("margin", size=6, model="m", where="label IS NOT NULL")
    small.wait(timeout=60)
    got = uncertainty_quality_stats(col.uncertainty_quality("m", run_id=small.run_id))
    assert got["n"] == 6 and got["missing"] == 41 - 6 and got["unknown_label"] == 1


def test_logits_samples_and_an_older_version(client):
    """Probabilities as the miners read them: probs, else softmax(logits), else the mean of
    the samples; ``version=`` reads the labels of an older version."""
    col = client.create_collection("mix", models={"m": CLASSES})
    logits = [2.0, 0.5, -1.0]
    samples = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]
    rows = [
        {"id": "p1", "label": "cat", "pred_m": {"probs": [0.9, 0.05, 0.05]}},
        {"id": "p2", "label": "dog", "pred_m": {"probs": [0.5, 0.3, 0.2]}},
        {"id": "l1", "label": "cat", "pred_m": {"logits": logits}},
        {"id": "s1", "label": "owl", "pred_m": {"samples": samples}},
        {"id": "p3", "label": "owl", "pred_m": {"probs": [0.1, 0.1, 0.8]}},
    ]
    col.upsert(rows)
    before = col.describe()["version"]
    z = np.exp(np.array(logits) - max(logits))
    probs = {"p1": [0.9, 0.05, 0.05], "p2": [0.5, 0.3, 0.2], "l1": (z / z.sum()).tolist(),
             "s1": np.mean(np.asarray(samples, np.float32), axis=0).tolist(), "p3": [0.1, 0.1, 0.8]}
    ids = list(probs)
    u = [_entropy(probs[i]) for i in ids]
    correct = [1.0, 0.0, 1.0, 0.0, 1.0]  # p2 says cat for dog, s1's mean says dog for owl
    table = col.uncertainty_quality("m")
    stats = uncertainty_quality_stats(table)
    assert stats["n"] == 5 and stats["rho"] == pytest.approx(spearmanr(u, correct).statistic, abs=1e-6)
    assert _quadrants(table) == _by_definition(u, correct, ids, stats["uncertainty_threshold"], 0.5, True, 100)
    col.upsert([{"id": "p2", "label": "cat"}])  # now right
    assert _quadrants(col.uncertainty_quality("m", version=before)) == _quadrants(table)
    now = uncertainty_quality_stats(col.uncertainty_quality("m"))
    assert now["rho"] == pytest.approx(spearmanr(u, [1.0, 1.0, 1.0, 0.0, 1.0]).statistic, abs=1e-6)


def test_the_asyncio_client_gets_the_same_report(server, cls):
    import asyncio

    from service.client import AsyncClient

    col, _ = cls

    async def report_async() -> pa.Table:
        async with AsyncClient(server.address) as client:
            return await client.collection("cls").uncertainty_quality("m", "margin", "loss", max_ids=5)

    got = asyncio.run(report_async())
    want = col.uncertainty_quality("m", "margin", "loss", max_ids=5)
    assert got.to_pylist() == want.to_pylist()
    assert uncertainty_quality_stats(got) == uncertainty_quality_stats(want)


# -- served: detection --------------------------------------------------------------------------


def _box(x1, y1, x2, y2, score, probs):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "probs": probs}


def _gt(x1, y1, x2, y2, label="car"):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "label": label}


#: (id, predicted boxes, gt boxes, the image's IoU quality by hand)
SCENES = [
    ("a", [_box(0, 0, 10, 10, 0.95, [0.97, 0.03])], [_gt(0, 0, 10, 10)], 1.0),
    ("b", [_box(0, 0, 10, 5, 0.6, [0.6, 0.4])], [_gt(0, 0, 10, 10)], 0.5),  # IoU 50/100
    ("c", [_box(0, 0, 10, 8, 0.7, [0.7, 0.3])], [_gt(0, 0, 10, 10), _gt(20, 20, 30, 30, "person")], 0.4),
    ("d", [_box(50, 50, 60, 60, 0.55, [0.5, 0.5])], [_gt(0, 0, 10, 10)], 0.0),  # spurious + missed
    ("e", [], [], 1.0),
    ("f", [_box(0, 0, 10, 10, 0.9, [0.9, 0.1]), _box(30, 0, 40, 9, 0.8, [0.3, 0.7])], [_gt(0, 0, 10, 10)], 0.5),
    ("g", [_box(0, 0, 10, 10, 0.9, [0.8, 0.2])], [_gt(0, 0, 10, 10), _gt(0, 0, 10, 5)], 0.5 * 1.0),  # 1 / 2
]


@pytest.fixture(scope="module")
def det(client):
    col = client.create_collection("det", models={"det": {"classes": DET, "task": "detection"}})
    rows = [{"id": i, "pred_det": {"boxes": p}, "gt_boxes": g} for i, p, g, _ in SCENES]
    rows.append({"id": "nopred", "gt_boxes": [_gt(0, 0, 5, 5)]})  # labeled, no prediction: missing
    rows.append({"id": "unlabeled", "pred_det": {"boxes": [_box(0, 0, 1, 1, 0.5, [0.5, 0.5])]}})
    col.upsert(rows)
    return col


def _det_uncertainty(method: str) -> list[float]:
    """The detection miner's per-image score (its defaults: sum over boxes, entropy-NMS 0.5)."""
    out = []
    for _, boxes, _, _ in SCENES:
        xy = np.array([[b[k] for k in ("x1", "y1", "x2", "y2")] for b in boxes], np.float32).reshape(-1, 4)
        sc = np.array([b["score"] for b in boxes], np.float32)
        pr = np.array([b["probs"] for b in boxes], np.float32).reshape(-1, 2)
        out.append(float(detection_scores(np.zeros(len(boxes), np.int64), xy.astype(np.float64),
                                          sc.astype(np.float64), pr.astype(np.float64), 1, method=method)[0]))
    return out


def test_detection_iou_quality_on_hand_built_boxes(det):
    for method in ("entropy", "one_minus_score"):
        table = det.uncertainty_quality("det", method)  # quality: iou by default
        stats = uncertainty_quality_stats(table)
        u = _det_uncertainty(method)
        iou = [s[3] for s in SCENES]
        assert stats["quality"] == "iou" and stats["iou"] == 0.5
        assert (stats["n"], stats["rows"], stats["missing"]) == (7, 8, 1)
        assert stats["rho"] == pytest.approx(spearmanr(u, iou).statistic, abs=1e-9)
        assert stats["quality_threshold"] == pytest.approx(float(np.median(iou)))
        want = _by_definition(u, iou, [s[0] for s in SCENES], stats["uncertainty_threshold"],
                              stats["quality_threshold"], True, 100)
        assert _quadrants(table) == want
        means = {r["quadrant"]: r["mean_quality"] for r in table.to_pylist() if r["count"]}
        for name, (_, ids) in want.items():
            if ids:
                assert means[name] == pytest.approx(np.mean([s[3] for s in SCENES if s[0] in ids]))
    # a stricter matching IoU: b's box (IoU 0.5) no longer matches, and its IoU quality drops to 0
    strict = det.uncertainty_quality("det", "entropy", iou=0.6)
    iou6 = [0.0 if s[0] == "b" else s[3] for s in SCENES]
    assert uncertainty_quality_stats(strict)["rho"] == pytest.approx(
        spearmanr(_det_uncertainty("entropy"), iou6).statistic, abs=1e-9)
    # images with a box of class person (c's gt box, f's second prediction)
    person = det.uncertainty_quality("det", "entropy", objects_where="class = 'person'")
    assert sorted(i for r in person.to_pylist() for i in r["ids"]) == ["c", "f"]


def test_detection_run_scores_equal_the_measure(det):
    job = det.mine("detection", size=20, model="det", where="gt_boxes IS NOT NULL")
    job.wait(timeout=60)
    by_run = det.uncertainty_quality(run_id=job.run_id)
    by_measure = det.uncertainty_quality("det", "entropy")
    assert uncertainty_quality_stats(by_run)["rho"] == pytest.approx(uncertainty_quality_stats(by_measure)["rho"])
    assert _quadrants(by_run) == _quadrants(by_measure)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, needles", [
    ({"model": "nope"}, NotFoundError, ["nope"]),
    ({"model": "m", "quality": "iou"}, InvalidArgumentError, ["quality 'iou'", "detection model", "correct"]),
    ({"model": "m", "uncertainty": "note"}, InvalidArgumentError, ["uncertainty", "'note'", "numeric"]),
    ({"model": "m", "uncertainty": "nothing_here"}, InvalidArgumentError, ["nothing_here", "entropy", "run_id"]),
    ({"model": "m", "quality": "pred_m.probs"}, InvalidArgumentError, ["quality", "pred_m.probs", "numeric"]),
    ({"model": "m", "quality": "pred_m.x"}, InvalidArgumentError, ["'pred_m' has no field 'x'"]),
    ({"model": "m", "quality": "correct", "lower_is_better": True}, InvalidArgumentError, ["lower_is_better"]),
    ({"model": "m", "uncertainty_quantile": 1.5}, InvalidArgumentError, ["uncertainty_quantile"]),
    ({"model": "m", "quality_quantile": 0.2, "quality_threshold": 0.3}, InvalidArgumentError, ["not both"]),
    ({"model": "m", "max_ids": 0}, InvalidArgumentError, ["max_ids"]),
    ({"model": "m", "where": "label = 'nobody'"}, FailedPreconditionError, ["no row", "label"]),
    ({"uncertainty": "my_u"}, InvalidArgumentError, ["quality", "model="]),
    ({"uncertainty": "entropy", "quality": "my_u"}, InvalidArgumentError, ["entropy", "model="]),
    ({"model": "m", "run_id": "no-such-run"}, NotFoundError, ["no-such-run"]),
])
def test_bad_requests_name_the_field(cls, kw, error, needles):
    col, _ = cls
    with pytest.raises(error) as err:
        col.uncertainty_quality(**kw)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_bad_detection_requests(det, cls, client):
    with pytest.raises(InvalidArgumentError, match="quality 'correct' needs a classification model"):
        det.uncertainty_quality("det", quality="correct")
    with pytest.raises(InvalidArgumentError, match="entropy, one_minus_score, margin|one_minus_score"):
        det.uncertainty_quality("det", "least_confidence")
    col, _ = cls
    job = col.mine("margin", size=3, model="m")
    job.wait(timeout=60)
    with pytest.raises(InvalidArgumentError, match="ran on collection 'cls'"):
        det.uncertainty_quality("det", run_id=job.run_id)
    with pytest.raises(InvalidArgumentError, match="not both"):
        col.uncertainty_quality("m", "entropy", run_id=job.run_id)
    # a box without probs: entropy cannot score its image; the message names the row and the way out
    noprobs = client.create_collection("noprobs", models={"det": {"classes": DET, "task": "detection"}})
    noprobs.upsert([{"id": "ok", "pred_det": {"boxes": [_box(0, 0, 9, 9, 0.9, [0.9, 0.1])]},
                     "gt_boxes": [_gt(0, 0, 10, 10)]},
                    {"id": "bad-row", "pred_det": {"boxes": [_box(0, 0, 9, 9, 0.9, [0.9, 0.1]),
                                                             _box(5, 5, 9, 9, 0.4, None)]},
                     "gt_boxes": [_gt(0, 0, 10, 10)]}])
    with pytest.raises(FailedPreconditionError) as err:
        noprobs.uncertainty_quality("det", "entropy")
    assert "'bad-row'" in str(err.value) and "pred_det.boxes[1].probs" in str(err.value)
    assert "one_minus_score" in str(err.value)
    assert uncertainty_quality_stats(noprobs.uncertainty_quality("det", "one_minus_score"))["n"] == 2
    # no labels at all: FAILED_PRECONDITION naming what is missing
    bare = client.create_collection("bare", models={"m": CLASSES})
    bare.upsert([{"id": "x", "pred_m": {"probs": _probs(0.5, 0)}}])
    with pytest.raises(FailedPreconditionError, match="0 row\\(s\\) have a label"):
        bare.uncertainty_quality("m")


# -- CLI and web page ---------------------------------------------------------------------------


def test_cli_prints_rho_and_the_quadrants(server, cls, capsys):
    from service.cli import main

    col, _ = cls
    assert main(["uncertainty-quality", "cls", "--model", "m", "--uncertainty", "entropy", "--quality", "correct",
                 "--max-ids", "2", "--server", server.address]) == 0
    out = capsys.readouterr().out
    stats = uncertainty_quality_stats(col.uncertainty_quality("m"))
    assert f"spearman rho(uncertainty, quality) = {stats['rho']:+.4f}" in out and "n = 40" in out
    assert "the uncertain rows are the bad ones" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("high_", "low_"))}
    assert lines["high_uncertainty_low_quality"][1] == "10" and lines["high_uncertainty_low_quality"][-3:] == \
        ["w00", "w01", "…"]
    assert lines["low_uncertainty_low_quality"][1] == "0"
    assert main(["uncertainty-quality", "cls", "--model", "m", "--quality", "loss", "--json",
                 "--server", server.address]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["quality"] == "loss" and got["higher_is_better"] is False and len(got["quadrants"]) == 4
    assert main(["uncertainty-quality", "cls", "--model", "m", "--quality", "iou", "--server", server.address]) != 0


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_web_endpoint_equals_the_client(server, cls, det):
    col, _ = cls
    base = server.web_url.rstrip("/")
    status, body = _get(f"{base}/api/collections/cls/uncertainty_quality?model=m&uncertainty=entropy&quality=correct")
    assert status == 200, body
    table = col.uncertainty_quality("m", max_ids=20)
    stats = uncertainty_quality_stats(table)
    assert body["rho"] == pytest.approx(stats["rho"]) and body["n"] == 40
    assert [(q["quadrant"], q["count"], q["ids"]) for q in body["quadrants"]] == \
        [(r["quadrant"], r["count"], r["ids"]) for r in table.to_pylist()]
    status, body = _get(f"{base}/api/collections/det/uncertainty_quality?model=det&quality=iou&iou=0.5&max_ids=1")
    assert status == 200 and body["n"] == 7 and all(len(q["ids"]) <= 1 for q in body["quadrants"])
    status, body = _get(f"{base}/api/collections/det/uncertainty_quality?model=det&quality=correct")
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT" and "quality 'correct'" in body["error"]["message"]
    status, body = _get(f"{base}/api/collections/cls/uncertainty_quality?model=m&iou=abc")
    assert status == 400 and "iou" in body["error"]["message"]
    status, body = _get(f"{base}/api/collections/cls/uncertainty_quality?model=ghost")
    assert status == 404
