"""Does a segmentation model's uncertainty predict its errors? (issue 19, item 5): the per-image
mask IoU of ``quality="iou"`` (``pred_<m>.mask_uri`` against the ``gt_mask_uri`` column)
checked by hand on tiny PNG / COCO-RLE masks, then the report end to end through a real
server on loopback (client and CLI) on a collection whose answer is known."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy.stats import spearmanr

from indexing.masks import GT_MASK_COLUMN, read_mask, rle_encode
from indexing.quality import _mask_quality, mask_iou
from indexing.schema import ModelSpec
from service.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    uncertainty_quality_stats,
)
from service.server import ServerConfig, start_server

CLASSES = ["road", "car", "tree"]
SPEC = ModelSpec(name="seg", classes=tuple(CLASSES), task="segmentation")


def _png(path, values) -> str:
    Image.fromarray(np.asarray(values, np.uint8), mode="L").save(path)
    return str(path)


# -- the per-image IoU, by hand ----------------------------------------------------------------


def test_mask_iou_by_hand_on_png_masks(tmp_path):
    # 0 = none, k = class k - 1, 255 = ignore (in the gt: left out; in a prediction: none)
    pred = _png(tmp_path / "p.png", [[1, 1, 2], [3, 2, 255]])
    gt = _png(tmp_path / "g.png", [[1, 2, 2], [0, 255, 0]])
    p = read_mask(pred, CLASSES, ignore=-1)
    g = read_mask(gt, CLASSES, ignore=-1)
    assert g[1, 1] == -1 and p[1, 2] == -1  # read as ignore where asked
    assert read_mask(gt, CLASSES)[1, 1] == 0  # the pre-label reading is unchanged
    # the gt's ignore pixel (1, 1) is left out, so pred's class 2 there does not count:
    # class 1: P = {(0,0), (0,1)}, G = {(0,0)}: 1/2; class 2: P = {(0,2)}, G = {(0,1), (0,2)}: 1/2;
    # class 3: P = {(1,0)}, G = {}: 0; mean 1/3
    assert mask_iou(read_mask(pred, CLASSES), g) == pytest.approx(1 / 3)
    # the same pixels without an ignore: class 2 becomes {(0,2),(1,1)} vs {(0,1),(0,2)} = 1/3
    g_no_ignore = g.copy()
    g_no_ignore[1, 1] = 0
    assert mask_iou(read_mask(pred, CLASSES), g_no_ignore) == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    # a perfect prediction, and empty vs empty (nothing to find, nothing found)
    assert mask_iou(g_no_ignore, g_no_ignore) == 1.0
    empty = np.zeros((2, 3), np.int32)
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(empty, np.full((2, 3), -1)) == 1.0  # everything ignored
    assert mask_iou(empty, g) == 0.0  # nothing found of two classes
    with pytest.raises(ValueError, match="different shapes"):
        mask_iou(empty, np.zeros((3, 2)))


def test_mask_iou_equals_scikit_learn_jaccard_on_random_masks():
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        pred = rng.integers(0, 4, size=(6, 7))
        gt = rng.integers(0, 4, size=(6, 7))
        gt[rng.random((6, 7)) < 0.2] = -1  # ignore pixels
        keep = gt != -1
        labels = sorted((set(np.unique(pred[keep])) | set(np.unique(gt[keep]))) - {0})
        want = jaccard_score(gt[keep], pred[keep], labels=labels, average="macro", zero_division=0)
        assert mask_iou(pred, gt) == pytest.approx(want)


def test_mask_quality_reads_rle_counts_missing_files_and_names_mismatched_rows(tmp_path):
    gt_map = np.array([[1, 1, 0, 0], [1, 1, 2, 2], [0, 0, 2, 2]])
    gt = _png(tmp_path / "gt.png", gt_map)
    # a COCO RLE prediction: class 1 one pixel short, class 2 exact -> (3/4 + 1) / 2
    pred_map = gt_map.copy()
    pred_map[1, 1] = 0
    rle = tmp_path / "pred.json"
    rle.write_text(json.dumps([{"segmentation": rle_encode(pred_map == k), "category_id": k} for k in (1, 2)]))
    ids = pa.array(["a", "b", "c", "d"])
    pred = pa.array([str(rle), str(tmp_path / "absent.png"), None, f"file://{rle}"])
    gts = pa.array([gt, gt, gt, None])
    labeled = np.array([True, True, True, False])
    q, got, lost, problem = _mask_quality(ids, pred, gts, labeled, SPEC)
    assert q[0] == pytest.approx((3 / 4 + 1) / 2) and got.tolist() == [True, False, False, False]
    assert lost == 1 and "'b'" in problem and "absent.png" in problem  # the file that is not there
    assert np.isnan(q[1:]).all()
    # an unreadable file is counted the same way, with its reason
    (tmp_path / "junk.png").write_bytes(b"not a png")
    _, got, lost, problem = _mask_quality(pa.array(["x"]), pa.array([str(tmp_path / "junk.png")]),
                                          pa.array([gt]), np.array([True]), SPEC)
    assert (got.tolist(), lost) == ([False], 1) and "cannot read the image" in problem
    wide = _png(tmp_path / "wide.png", np.zeros((3, 5)))
    with pytest.raises(Exception, match=r"row 'bad-row'.* is 3x5 .* is 3x4") as err:
        _mask_quality(pa.array(["bad-row"]), pa.array([wide]), pa.array([gt]), np.array([True]), SPEC)
    assert type(err.value).__name__ == "FailedPrecondition"


# -- served: a segmentation collection ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("segq")), port=0, http_port=0, grace_s=2))
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


N = 12


def _gt_map() -> np.ndarray:
    g = np.zeros((8, 8), np.uint8)
    g[:, :4] = 1  # road on the left half
    g[:, 4:] = 2  # car on the right half
    g[0, 0] = 255  # one ignore pixel
    return g


def _iou(i: int) -> float:
    """Image i's prediction: i road pixels (never the ignored one) called car:
    road (31 - i) / 31, car 32 / (32 + i)."""
    return ((31 - i) / 31 + 32 / (32 + i)) / 2


@pytest.fixture(scope="module")
def seg(client, tmp_path_factory):
    """N labeled images whose IoU falls as their topq_entropy rises (img00 best and surest), a
    labeled image whose predicted mask file is absent, one without a predicted mask and an
    unlabeled one."""
    d = tmp_path_factory.mktemp("masks")
    gt = _png(d / "gt.png", _gt_map())
    road = [(y, x) for y in range(8) for x in range(4) if (y, x) != (0, 0)]
    rows = []
    for i in range(N):
        p = _gt_map()
        p[0, 0] = 1
        for y, x in road[:i]:
            p[y, x] = 2
        u = 0.1 + 0.05 * i
        rows.append({"id": f"img{i:02d}", "pred_seg": {"mean_entropy": u / 2, "topq_entropy": u, "bald": 0.01 * i,
                                                       "mask_uri": _png(d / f"p{i}.png", p)},
                     GT_MASK_COLUMN: gt})
    rows.append({"id": "gone", "pred_seg": {"mean_entropy": 0.1, "topq_entropy": 0.9,
                                            "mask_uri": str(d / "deleted.png")}, GT_MASK_COLUMN: gt})
    rows.append({"id": "nomask", "pred_seg": {"mean_entropy": 0.1, "topq_entropy": 0.9}, GT_MASK_COLUMN: gt})
    rows.append({"id": "unlabeled", "pred_seg": {"mean_entropy": 0.1, "topq_entropy": 0.9,
                                                 "mask_uri": str(d / "p0.png")}})
    col = client.create_collection("scenes", models={"seg": {"classes": CLASSES, "task": "segmentation"}},
                                   fields={GT_MASK_COLUMN: "string"})
    col.upsert(rows)
    return col, d


def _quadrants(table: pa.Table) -> dict[str, tuple[int, list[str]]]:
    return {r["quadrant"]: (r["count"], r["ids"]) for r in table.to_pylist()}


def test_the_worst_masks_are_the_most_uncertain(seg):
    col, _ = seg
    table = col.uncertainty_quality("seg")  # topq_entropy and iou are the segmentation defaults
    stats = uncertainty_quality_stats(table)
    u = [0.1 + 0.05 * i for i in range(N)]
    iou = [_iou(i) for i in range(N)]
    want = spearmanr(u, iou)
    assert stats["rho"] == pytest.approx(want.statistic) and stats["rho_error"] > 0.6
    assert (stats["uncertainty"], stats["quality"], stats["quality_kind"]) == ("pred_seg.topq_entropy", "iou",
                                                                              "mask_iou")
    # 14 labeled rows: 12 scored, 'gone' (its mask file is absent) and 'nomask' left out
    assert (stats["n"], stats["rows"], stats["missing"], stats["missing_masks"]) == (N, 14, 2, 1)
    assert "'gone'" in stats["mask_problem"] and stats["gt_mask_column"] == GT_MASK_COLUMN
    assert stats["quality_threshold"] == pytest.approx(float(np.median(iou)))
    q = _quadrants(table)
    assert q["high_uncertainty_low_quality"] == (6, [f"img{i:02d}" for i in range(11, 5, -1)])
    assert q["low_uncertainty_high_quality"] == (6, [f"img{i:02d}" for i in range(6)])
    assert q["high_uncertainty_high_quality"] == (0, []) and q["low_uncertainty_low_quality"] == (0, [])
    means = {r["quadrant"]: r["mean_quality"] for r in table.to_pylist()}
    assert means["high_uncertainty_low_quality"] == pytest.approx(np.mean(iou[6:]))
    # the other stored summaries, by name
    bald = uncertainty_quality_stats(col.uncertainty_quality("seg", "bald", "iou"))
    assert bald["uncertainty"] == "pred_seg.bald" and bald["rho_error"] == pytest.approx(1.0)
    assert uncertainty_quality_stats(col.uncertainty_quality("seg", "pred_seg.mean_entropy"))["rho_error"] == \
        pytest.approx(1.0)


def test_cli_reports_the_segmentation_iou(server, seg, capsys):
    from service.cli import main

    assert main(["uncertainty-quality", "scenes", "--model", "seg", "--uncertainty", "topq_entropy",
                 "--max-ids", "2", "--server", server.address]) == 0
    out = capsys.readouterr().out
    assert "uncertainty: pred_seg.topq_entropy   quality: iou (higher is better)" in out
    assert "rho_error = +1.0000: the uncertain rows are the bad ones" in out and "n = 12" in out
    assert "missing_masks 1" in out and "deleted.png" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("high_", "low_"))}
    assert lines["high_uncertainty_low_quality"][1] == "6"
    assert lines["high_uncertainty_low_quality"][-3:] == ["img11", "img10", "…"]


def test_the_web_tab_reads_the_same_report(server, seg):
    col, _ = seg
    url = f"{server.web_url.rstrip('/')}/api/collections/scenes/uncertainty_quality?model=seg&quality=iou"
    with urllib.request.urlopen(url, timeout=60) as res:
        body = json.loads(res.read())
    table = col.uncertainty_quality("seg", max_ids=20)
    stats = uncertainty_quality_stats(table)
    assert body["rho"] == pytest.approx(stats["rho"]) and body["missing_masks"] == 1
    assert [(q["quadrant"], q["count"], q["ids"]) for q in body["quadrants"]] == \
        [(r["quadrant"], r["count"], r["ids"]) for r in table.to_pylist()]
    # the tab offers a segmentation model its summaries and the mask IoU
    with urllib.request.urlopen(f"{server.web_url.rstrip('/')}/static/app.js", timeout=60) as res:
        js = res.read().decode()
    assert 'segmentation: ["topq_entropy", "mean_entropy", "bald"]' in js and 'segmentation: ["iou"]' in js


def test_bad_segmentation_requests(client, seg):
    col, d = seg
    with pytest.raises(InvalidArgumentError, match="stores per-image summaries, not probabilities"):
        col.uncertainty_quality("seg", "entropy")
    with pytest.raises(InvalidArgumentError, match="quality 'correct' needs a classification model.*masks "
                                                   "compared with gt_mask_uri"):
        col.uncertainty_quality("seg", quality="correct")
    # no gt_mask_uri column: FAILED_PRECONDITION naming the column and the fix
    bare = client.create_collection("nogt", models={"seg": {"classes": CLASSES, "task": "segmentation"}})
    bare.upsert([{"id": "a", "pred_seg": {"mean_entropy": 0.1, "topq_entropy": 0.2,
                                          "mask_uri": str(d / "p0.png")}}])
    with pytest.raises(FailedPreconditionError) as err:
        bare.uncertainty_quality("seg", quality="iou")
    msg = str(err.value)
    assert "'gt_mask_uri'" in msg and "upsert each labeled image's mask path" in msg and "nogt" in msg
    # two masks of one image with different sizes: the row is named
    odd = client.create_collection("odd", models={"seg": {"classes": CLASSES, "task": "segmentation"}},
                                   fields={GT_MASK_COLUMN: "string"})
    odd.upsert([{"id": "fine", "pred_seg": {"mean_entropy": 0.1, "topq_entropy": 0.2,
                                            "mask_uri": str(d / "p0.png")}, GT_MASK_COLUMN: str(d / "gt.png")},
                {"id": "bad-row", "pred_seg": {"mean_entropy": 0.1, "topq_entropy": 0.2,
                                               "mask_uri": _png(d / "small.png", np.zeros((4, 8)))},
                 GT_MASK_COLUMN: str(d / "gt.png")}])
    with pytest.raises(FailedPreconditionError, match=r"row 'bad-row'.* 4x8 .* 8x8"):
        odd.uncertainty_quality("seg")
