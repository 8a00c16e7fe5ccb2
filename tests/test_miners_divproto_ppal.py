"""Detection acquisition beyond entropy-NMS (issue 19, item 3): per-object embeddings on
boxes, DivProto (Wu et al. 2022) and PPAL (Yang et al. 2024).

Each pure function is checked against a direct (loop-by-loop) implementation of its
definition on small hand-built images with 2-d embeddings, where which image is skipped or
picked can be reasoned out; then both miners run end to end through a real server (real
LanceDB) and their picks are compared with the direct pipeline on the same rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from miners import detection as det
from service.client import Client, FailedPreconditionError, InvalidArgumentError
from service.server import ServerConfig, start_server

CLASSES = ["car", "person", "bike"]


# -- direct implementations of the definitions -------------------------------------------------


def _entropy(p) -> float:
    p = np.asarray(p, float)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(len(p)))


def _cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _direct_prototypes(box_image, probs, unc, emb, keep, has) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for i in sorted({int(box_image[b]) for b in range(len(box_image)) if keep[b]}):
        boxes = [b for b in range(len(box_image)) if box_image[b] == i and keep[b]]
        for c in sorted({int(np.argmax(probs[b])) for b in boxes}):
            num, den = np.zeros(len(emb[0])), 0.0
            for b in boxes:
                if has[b]:
                    w = max(unc[b], 1e-6) * probs[b][c]
                    num, den = num + w * np.asarray(emb[b], float), den + w
            if den > 0:
                out[(i, c)] = num / den
    return out


def _direct_divproto(scores, protos, classes_of, size, counts, thr, fill=True) -> list[int]:
    n = len(scores)
    size = min(size, n)
    present = sorted(set().union(*classes_of))
    w = {c: 1.0 / max(counts[c], 1) for c in present}
    quota = {c: max(1, math.ceil(size * w[c] / sum(w.values()) - 1e-9)) for c in present}
    used = dict.fromkeys(present, 0)
    picked, skipped, chosen = [], [], []  # chosen: (class, prototype) of the picks
    for i in sorted(range(n), key=lambda i: (-scores[i], i)):
        if len(picked) == size:
            break
        cls = classes_of[i]
        if not cls or all(used[c] >= quota[c] for c in cls):
            skipped.append(i)
            continue
        mine = [(c, v) for (j, c), v in protos.items() if j == i]
        if any(c2 == c and _cos(v, v2) > thr for c, v in mine for c2, v2 in chosen):
            skipped.append(i)
            continue
        picked.append(i)
        for c in cls:
            used[c] += 1
        chosen += mine
    if fill:
        picked += skipped[: size - len(picked)]
    return picked


def _direct_ccms(box_image, cls, sc, emb, n, thr) -> np.ndarray:
    boxes_of = {i: [b for b in range(len(box_image)) if box_image[b] == i and sc[b] >= thr] for i in range(n)}

    def d(i, j):
        bi, bj = boxes_of[i], boxes_of[j]
        if not bi:
            return 0.0 if not bj else 2.0
        num = den = 0.0
        for b in bi:
            same = [1 - _cos(emb[b], emb[b2]) for b2 in bj if cls[b2] == cls[b]]
            num += sc[b] * (min(same) if same else 2.0)
            den += sc[b]
        return num / den

    out = np.array([[0.0 if i == j else (d(i, j) + d(j, i)) / 2 for j in range(n)] for i in range(n)])
    return out


def _direct_kmedoids(dist, k, seed, iterations) -> list[int]:
    n = len(dist)
    k = min(k, n)
    med = [int(np.random.default_rng(seed).integers(n))]
    while len(med) < k:
        far = [min(dist[i][m] for m in med) if i not in med else -1.0 for i in range(n)]
        med.append(int(np.argmax(far)))
    for _ in range(iterations):
        assign = [med.index(i) if i in med else min(range(k), key=lambda j: (dist[i][med[j]], j))
                  for i in range(n)]
        new = []
        for j in range(k):
            members = [i for i in range(n) if assign[i] == j]
            new.append(min(members, key=lambda m: (sum(dist[x][m] for x in members), m)))
        if new == med:
            break
        med = new
    return med


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _direct_quality(gt, preds, c, xi=0.6) -> np.ndarray:
    """gt: [(image, xyxy, class)], preds: [(image, xyxy, probs)] -> per-class mean quality."""
    qs = [[] for _ in range(c)]
    for img, g, cls in gt:
        best, bi = 0.0, None
        for j, (pimg, p, _) in enumerate(preds):
            if pimg == img and _iou(p, g) > best:
                best, bi = _iou(p, g), j
        qs[cls].append(0.0 if bi is None else preds[bi][2][cls] ** xi * best ** (1 - xi))
    return np.array([np.mean(q) if q else 0.0 for q in qs])


def _ppal_weight(q, alpha=0.3, upper=0.2) -> float:
    return 1 + alpha * upper * math.log(1 + (math.exp(1 / alpha) - 1) * (1 - q))


def _binary_entropy(s) -> float:
    return 0.0 if s in (0.0, 1.0) else -(s * math.log(s) + (1 - s) * math.log(1 - s)) / math.log(2)


# -- random small instances (3-8 images, 2-3 classes, 2-d embeddings) ------------------------


def _instance(seed: int):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(3, 9)), int(rng.integers(2, 4))
    counts = rng.integers(0, 4, n)
    counts[0] = max(1, counts[0])
    box_image = np.repeat(np.arange(n), counts)
    b = len(box_image)
    probs = rng.dirichlet(np.full(c, 0.7), b)
    emb = rng.normal(0, 1, (b, 2))
    scores = rng.uniform(0, 1, b)
    has = rng.uniform(size=b) > 0.15
    keep = rng.uniform(size=b) > 0.2
    return n, c, box_image, probs, emb, scores, has, keep


@pytest.mark.parametrize("seed", range(12))
def test_prototypes_match_the_definition(seed):
    n, c, box_image, probs, emb, _, has, keep = _instance(seed)
    unc = det.box_uncertainty(None, probs, "entropy")
    p_img, p_cls, protos = det.entropy_prototypes(box_image, probs, unc, emb, keep=keep, has_embedding=has)
    want = _direct_prototypes(box_image, probs, unc, emb, keep, has)
    assert [(int(i), int(k)) for i, k in zip(p_img, p_cls, strict=True)] == sorted(want)
    for (i, k), v in zip(zip(p_img, p_cls, strict=True), protos, strict=True):
        np.testing.assert_allclose(v, want[(int(i), int(k))], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_divproto_select_matches_the_definition(seed):
    n, c, box_image, probs, emb, _, has, keep = _instance(seed)
    rng = np.random.default_rng(100 + seed)
    unc = det.box_uncertainty(None, probs, "entropy")
    scores = rng.uniform(0, 3, n)
    counts = rng.integers(0, 20, c)
    size = int(rng.integers(1, n + 1))
    thr = float(rng.choice([0.0, 0.5, 0.9]))
    p_img, p_cls, protos = det.entropy_prototypes(box_image, probs, unc, emb, keep=keep, has_embedding=has)
    classes_of = [sorted({int(np.argmax(probs[b])) for b in range(len(box_image)) if box_image[b] == i and keep[b]})
                  for i in range(n)]
    got = det.divproto_select(scores, p_img, p_cls, protos, [np.asarray(x, np.int64) for x in classes_of], size,
                              num_classes=c, class_counts=counts, intra_threshold=thr)
    want = _direct_divproto(scores, _direct_prototypes(box_image, probs, unc, emb, keep, has), classes_of, size,
                            counts, thr)
    assert got.rows.tolist() == want


def _direct_greedy_nms(box_image, cls, unc, over) -> list[bool]:
    keep = [True] * len(box_image)
    for i, c in {(int(box_image[b]), int(cls[b])) for b in range(len(box_image))}:
        kept = []
        for b in sorted((b for b in range(len(box_image)) if box_image[b] == i and cls[b] == c),
                        key=lambda b: (-unc[b], b)):
            if any(over(k, b) for k in kept):
                keep[b] = False
            else:
                kept.append(b)
    return keep


@pytest.mark.parametrize("seed", range(10))
def test_feature_nms_matches_the_definition(seed):
    n, c, box_image, probs, emb, _, _, _ = _instance(seed)
    unc = det.box_uncertainty(None, probs, "entropy")
    unc[::3] = unc[0]  # ties: the lower index goes first
    cls = probs.argmax(axis=1)
    for thr in (-0.5, 0.0, 0.7):
        got = det.feature_nms(box_image, cls, unc, emb, thr)
        assert got.tolist() == _direct_greedy_nms(box_image, cls, unc, lambda k, b, t=thr: _cos(emb[k], emb[b]) > t)


def test_feature_nms_suppresses_near_duplicate_features_that_do_not_overlap():
    # one image, three car boxes far apart: two look alike, the third is different
    keep = det.feature_nms(np.zeros(3, int), np.zeros(3, int), np.array([0.9, 0.8, 0.7]),
                           np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), 0.9)
    assert keep.tolist() == [True, False, True]
    boxes = np.array([[0, 0, 10, 10], [100, 0, 110, 10], [200, 0, 210, 10]], float)
    assert det.entropy_nms(np.zeros(3, int), boxes, np.zeros(3, int), np.array([0.9, 0.8, 0.7])).all()


def _protos(rows: list[tuple[int, int, tuple[float, float]]]):
    return (np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[2] for r in rows], float))


def test_divproto_skips_an_image_whose_class_prototype_is_already_picked():
    # car = 0, person = 1; scores descend with the index
    scores = np.array([5.0, 4.0, 3.0, 2.0])
    rows = [(0, 0, (1.0, 0.0)),     # picked
            (1, 0, (1.0, 0.1)),     # car prototype at cos 0.995 from image 0's: skipped
            (2, 0, (0.0, 1.0)),     # a different view of cars: picked
            (3, 1, (1.0, 0.0))]     # same direction as image 0 but another class: picked
    res = det.divproto_select(scores, *_protos(rows), None, 3, num_classes=2, intra_threshold=0.7)
    assert res.rows.tolist() == [0, 2, 3]
    assert (res.skipped_intra, res.skipped_inter, res.filled) == (1, 0, 0)
    # plain entropy ranking would take the near-duplicate view
    assert np.argsort(-scores)[:3].tolist() == [0, 1, 2]


def test_divproto_budgets_favour_the_class_with_fewer_labeled_boxes():
    # 100 labeled cars, 1 labeled person: quotas car = max(1, ceil(3 * 0.01 / 1.01)) = 1,
    # person = ceil(3 * 1 / 1.01) = 3; prototypes all far apart (no intra skip)
    scores = np.array([6.0, 5.0, 4.0, 3.0, 2.0])
    rows = [(0, 0, (1.0, 0.0)), (1, 0, (0.0, 1.0)), (2, 0, (-1.0, 0.0)), (3, 1, (1.0, 0.0)), (4, 1, (-1.0, 0.0))]
    np.testing.assert_array_equal(det.divproto_quotas(np.array([100, 1]), np.array([True, True]), 3), [1, 3])
    res = det.divproto_select(scores, *_protos(rows), None, 3, num_classes=2, class_counts=np.array([100, 1]))
    assert res.rows.tolist() == [0, 3, 4]  # images 1 and 2 hold only cars, whose quota is spent
    assert res.skipped_inter == 2
    # with equal counts the cars' quota (2) lets image 1 in
    assert det.divproto_select(scores, *_protos(rows), None, 3, num_classes=2).rows.tolist() == [0, 1, 3]


def test_divproto_fills_from_the_skipped_images_when_candidates_run_out():
    scores = np.array([3.0, 2.0, 1.0])
    rows = [(0, 0, (1.0, 0.0)), (1, 0, (1.0, 0.01)), (2, 0, (1.0, -0.01))]  # three views of one car
    res = det.divproto_select(scores, *_protos(rows), None, 2, num_classes=1, intra_threshold=0.7)
    assert res.rows.tolist() == [0, 1] and res.filled == 1
    res = det.divproto_select(scores, *_protos(rows), None, 2, num_classes=1, intra_threshold=0.7, fill=False)
    assert res.rows.tolist() == [0] and res.skipped_intra == 2


@pytest.mark.parametrize("seed", range(10))
def test_ccms_distances_match_the_definition(seed):
    n, c, box_image, probs, emb, scores, _, _ = _instance(seed)
    cls = probs.argmax(axis=1)
    got = det.ccms_distances(box_image, cls, scores, emb, n, score_threshold=0.3, block=2)
    np.testing.assert_allclose(got, _direct_ccms(box_image, cls, scores, emb, n, 0.3), atol=1e-12)
    assert np.allclose(got, got.T)


def test_ccms_matches_same_category_boxes_only():
    # image 0: a car at (1, 0); image 1: a car at (1, 0) and a person at (0, 1);
    # image 2: a person at (1, 0) (same vector as the cars, other category)
    box_image = np.array([0, 1, 1, 2])
    cls = np.array([0, 0, 1, 1])
    sc = np.array([1.0, 1.0, 1.0, 1.0])
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    d = det.ccms_distances(box_image, cls, sc, emb, 3, score_threshold=0.0)
    # 0->1: the car matches exactly (0); 1->0: car 0, person has no match (2): mean 1
    assert d[0, 1] == pytest.approx(0.5)
    # 0 and 2: no shared category at all
    assert d[0, 2] == pytest.approx(2.0)
    # 1->2: car unmatched (2), person vs person at cos 0 (1): 1.5; 2->1: person (1): D = 1.25
    assert d[1, 2] == pytest.approx(1.25)


@pytest.mark.parametrize("seed", range(10))
def test_kmedoids_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    pts = rng.normal(0, 1, (int(rng.integers(3, 12)), 2))
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    k = int(rng.integers(1, len(pts) + 1))
    for iterations in (0, 1, 20):
        med, assign = det.kmedoids_select(dist, k, seed=seed, iterations=iterations)
        assert med.tolist() == _direct_kmedoids(dist, k, seed, iterations)
        assert (assign[med] == np.arange(len(med))).all()


def test_kmedoids_takes_one_image_per_cluster():
    pts = np.array([[0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [10, 0], [10, 0.1]], float)
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    for seed in range(5):
        med, _ = det.kmedoids_select(dist, 3, seed=seed, iterations=20)
        assert sorted({0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "c", 6: "c"}[m] for m in med) == ["a", "b", "c"]


def test_class_quality_and_weights_match_the_definition():
    # image 0: a car gt box half-covered by a car-ish prediction; image 1: a person gt box
    # nobody predicted (quality 0) and a car box matched exactly; image 2: a bike gt box
    gt = [(0, (0, 0, 10, 10), 0), (1, (50, 50, 60, 60), 1), (1, (0, 0, 4, 4), 0), (2, (0, 0, 8, 8), 2)]
    preds = [(0, (0, 0, 10, 5), [0.8, 0.1, 0.1]), (0, (20, 20, 30, 30), [0.2, 0.7, 0.1]),
             (1, (0, 0, 4, 4), [0.6, 0.3, 0.1]), (2, (0, 0, 8, 4), [0.1, 0.1, 0.8]),
             (2, (0, 0, 8, 6), [0.1, 0.2, 0.7])]
    sums, counts = det.class_quality_sums(
        np.array([g[0] for g in gt]), np.array([g[1] for g in gt], float), np.array([g[2] for g in gt]),
        np.array([p[0] for p in preds]), np.array([p[1] for p in preds], float),
        np.array([p[2] for p in preds]), 3)
    quality = sums / np.maximum(counts, 1)
    np.testing.assert_allclose(quality, _direct_quality(gt, preds, 3), atol=1e-12)
    assert quality[0] == pytest.approx((0.8 ** 0.6 * 0.5 ** 0.4 + 0.6 ** 0.6) / 2)
    assert quality[2] == pytest.approx(0.7 ** 0.6 * 0.75 ** 0.4)  # the better-overlapping box
    w = det.ppal_class_weights(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(w, [_ppal_weight(q) for q in (0.0, 0.5, 1.0)])
    assert w[0] == pytest.approx(1.2) and w[2] == pytest.approx(1.0)


def test_dcus_scores_match_the_definition():
    rng = np.random.default_rng(3)
    box_image = np.array([0, 0, 1, 2, 2, 2])
    sc = rng.uniform(0, 1, 6)
    sc[1] = 0.01  # below the threshold: not counted
    cls = np.array([0, 1, 1, 2, 0, 1])
    w = np.array([1.0, 1.1, 1.2])
    u = det.binary_entropy(sc)
    got = det.dcus_scores(box_image, u, cls, sc, w, 4, score_threshold=0.05)
    want = [sum(_binary_entropy(sc[b]) * w[cls[b]] for b in range(6) if box_image[b] == i and sc[b] >= 0.05)
            for i in range(4)]
    np.testing.assert_allclose(got, want)
    assert got[3] == 0.0


# -- end to end: a real server, boxes carrying embeddings ------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("divproto")), port=0, grace_s=2))
    with Client(srv.address, timeout=120) as c:
        yield c
    srv.stop(1)


def _box(i: int, score: float, probs, emb) -> dict:
    # boxes of one image never overlap (entropy-NMS keeps them all)
    return {"x1": 20.0 * i, "y1": 0.0, "x2": 20.0 * i + 10, "y2": 10.0, "score": score, "probs": probs,
            "embedding": emb}


POOL = {  # image -> [(score, probs, embedding)]; classes car, person, bike
    "p0": [(0.6, [0.4, 0.3, 0.3], [1.0, 0.0])],
    "p1": [(0.55, [0.42, 0.3, 0.28], [1.0, 0.05])],            # another view of p0's car
    "p2": [(0.5, [0.45, 0.3, 0.25], [0.0, 1.0]), (0.9, [0.9, 0.05, 0.05], [0.0, 1.0])],
    "p3": [(0.7, [0.2, 0.6, 0.2], [1.0, 0.0])],                 # a person
    "p4": [(0.8, [0.2, 0.2, 0.6], [0.5, 0.5])],                 # a bike
    "p5": [(0.35, [0.5, 0.25, 0.25], [-1.0, 0.2])],
    "p6": [(0.95, [0.96, 0.02, 0.02], [0.2, -1.0])],
    "p7": [],
}
# labeled: 4 persons and 4 bikes, no car (cars get the largest DivProto quota, and PPAL's
# largest difficulty weight); image -> (gt boxes [(xyxy, label)], predictions
# [(xyxy, score, probs, embedding)])
_PB = [((0, 0, 10, 10), "person"), ((20, 0, 30, 10), "bike")]
LABELED = {
    "l0": (_PB, [((0, 0, 10, 10), 0.9, [0.05, 0.9, 0.05], [1.0, 0.0]),
                 ((20, 0, 30, 6), 0.6, [0.1, 0.2, 0.7], [0.0, 1.0])]),
    "l1": (_PB, [((0, 0, 10, 5), 0.7, [0.1, 0.6, 0.3], [0.9, 0.1])]),
    "l2": (_PB, [((22, 0, 30, 10), 0.5, [0.2, 0.3, 0.5], [0.5, 0.5])]),
    "l3": (_PB, []),
}


@pytest.fixture(scope="module")
def pool(client):
    col = client.create_collection("dets", models={
        "det": {"classes": CLASSES, "task": "detection", "box_embedding_dim": 2}})
    rows = [{"id": i, "split": "pool", "pred_det": {"boxes": [_box(k, *b) for k, b in enumerate(bs)]}}
            for i, bs in POOL.items()]
    for i, (gts, preds) in LABELED.items():
        rows.append({"id": i, "split": "train",
                     "gt_boxes": [{"x1": g[0], "y1": g[1], "x2": g[2], "y2": g[3], "label": lab} for g, lab in gts],
                     "pred_det": {"boxes": [{"x1": p[0], "y1": p[1], "x2": p[2], "y2": p[3], "score": s,
                                             "probs": pr, "embedding": e} for p, s, pr, e in preds]}})
    col.upsert(rows)
    return col


def _mine(col, miner: str, size: int, **kw):
    job = col.mine(miner, size=size, model="det", where="split = 'pool'", **kw)
    job.wait(timeout=60)
    return job.results()["id"].to_pylist(), job.run()


def test_divproto_end_to_end_matches_the_direct_pipeline(pool):
    ids = list(POOL)
    scores = [sum(_entropy(p) for _, p, _ in POOL[i]) for i in ids]
    flat = [(n, b) for n, i in enumerate(ids) for b in POOL[i]]
    box_image = np.array([n for n, _ in flat])
    probs = np.array([b[1] for _, b in flat])
    protos = _direct_prototypes(box_image, probs, [_entropy(b[1]) for _, b in flat], [b[2] for _, b in flat],
                                [True] * len(flat), [True] * len(flat))
    classes_of = [sorted({int(np.argmax(b[1])) for b in POOL[i]}) for i in ids]
    counts = [0, 4, 4]  # labeled gt boxes: car 0, person 4, bike 4
    want = _direct_divproto(scores, protos, classes_of, 4, counts, 0.7)
    got, run = _mine(pool, "divproto", 4, reference_where="split = 'train'")
    assert got == [ids[i] for i in want]
    # quotas: car 3, person 1, bike 1; p1 (a near-duplicate view of p0's car) is skipped
    # for p5, whose car looks different, although p1 is more uncertain
    assert got == ["p2", "p0", "p5", "p3"]
    stats = run["stats"]
    assert stats["labeled_boxes"] == {"car": 0, "person": 4, "bike": 4}
    assert stats["quotas"] == {"car": 3, "person": 1, "bike": 1}
    assert stats["skipped_intra"] == 1 and stats["filled"] == 0


def test_divproto_with_feature_enms_counts_a_repeated_object_once(pool):
    # p2 holds two car boxes with the same embedding (apart on the image): IoU-NMS keeps
    # both (p2 scores their summed entropy, 1.33, first); feature ENMS keeps the more
    # uncertain one (0.97), below p0 (0.99) and p1 (0.99), and p1 is then skipped as p0's
    # near-duplicate view
    got, run = _mine(pool, "divproto", 2, reference_where="split = 'train'", params={"enms": "feature"})
    assert got == ["p0", "p2"] and run["stats"]["skipped_intra"] == 1
    assert run["stats"]["quotas"]["car"] == 2  # ceil(2 * 1 / 1.5)
    got_iou, run_iou = _mine(pool, "divproto", 2, reference_where="split = 'train'")
    assert got_iou == ["p2", "p0"] and run_iou["stats"]["skipped_intra"] == 0


def test_ppal_end_to_end_matches_the_direct_pipeline(pool):
    ids = list(POOL)
    gt = [(i, g, CLASSES.index(lab)) for i, (gts, _) in enumerate(LABELED.values()) for g, lab in gts]
    preds = [(i, p, pr) for i, (_, ps) in enumerate(LABELED.values()) for p, _, pr, _ in ps]
    weights = [_ppal_weight(q) for q in _direct_quality(gt, preds, 3)]
    dcus = [sum(_binary_entropy(s) * weights[int(np.argmax(p))] for s, p, _ in POOL[i] if s >= 0.05) for i in ids]
    size, ratio = 2, 2.0
    cand = sorted(range(len(ids)), key=lambda i: (-dcus[i], i))[: int(ratio * size)]  # row ids follow insertion
    flat = [(n, b) for n, i in enumerate(cand) for b in POOL[ids[i]]]
    dist = _direct_ccms(np.array([n for n, _ in flat]), [int(np.argmax(b[1])) for _, b in flat],
                        [b[0] for _, b in flat], [b[2] for _, b in flat], len(cand), 0.05)
    med = _direct_kmedoids(dist, size, 5, 20)
    want = sorted((ids[cand[m]] for m in med), key=lambda i: -dcus[ids.index(i)])
    got, run = _mine(pool, "ppal", size, seed=5, reference_where="split = 'train'",
                     params={"candidate_ratio": ratio})
    assert got == want
    assert run["stats"]["candidates"] == 4
    assert run["stats"]["class_weights"]["car"] == pytest.approx(1.2)  # no labeled car: hardest
    assert run["stats"]["class_quality"]["person"] > 0


def test_object_rows_carry_the_embedding_when_asked(pool):
    objs = pool.objects(source="det", where="split = 'pool'", columns=["id", "box", "embedding"])
    got = {(i, b): e for i, b, e in zip(*(objs.column(c).to_pylist() for c in ("id", "box", "embedding")),
                                       strict=True)}
    want = {(i, k): b[2] for i, bs in POOL.items() for k, b in enumerate(bs)}
    assert got.keys() == want.keys()
    for key, e in want.items():
        np.testing.assert_allclose(got[key], e, rtol=1e-6)
    assert "embedding" not in pool.objects(source="det").column_names  # wide: only when named
    gt = pool.objects(source="gt", columns=["id", "embedding"])
    assert gt.num_rows == 8 and gt.column("embedding").null_count == 8
    # an object predicate still filters the rows that carry embeddings
    some = pool.objects(source="det", objects_where="score > 0.85", columns=["id", "embedding"])
    assert sorted(some.column("id").to_pylist()) == ["l0", "p2", "p6"]


@pytest.mark.parametrize(("embedding", "needle"), [
    ([1.0, 2.0, 3.0], "has 3 values; model 'det' declares box_embedding_dim=2"),
    ([1.0, float("nan")], "contains NaN"),
    ([1.0, float("inf")], "contains NaN, infinity"),
    ([1.0, 1e300], "beyond float32"),
])
def test_bad_box_embeddings_are_refused_naming_row_and_box(pool, embedding, needle):
    before = pool.count()
    good = _box(0, 0.5, [0.5, 0.25, 0.25], [0.0, 1.0])
    bad = _box(1, 0.5, [0.5, 0.25, 0.25], embedding)
    with pytest.raises(InvalidArgumentError, match=needle) as err:
        pool.upsert([{"id": "new-ok", "pred_det": {"boxes": [good]}},
                     {"id": "new-bad", "pred_det": {"boxes": [good, bad]}}])
    assert "box 1 of row 1 (id 'new-bad')" in str(err.value)
    assert pool.count() == before  # nothing of the batch is written


def test_boxes_without_an_embedding_are_stored_with_null(pool):
    pool.upsert([{"id": "no-emb", "split": "other", "pred_det": {"boxes": [
        {"x1": 0, "y1": 0, "x2": 1, "y2": 1, "score": 0.5, "probs": [0.5, 0.25, 0.25]}]}}])
    objs = pool.objects(source="det", where="id = 'no-emb'", columns=["embedding"])
    assert objs.column("embedding").to_pylist() == [None]


def test_a_model_without_box_embedding_dim_refuses_embeddings_and_the_miners(client):
    col = client.create_collection("plain-det", models={"det": {"classes": CLASSES, "task": "detection"}})
    with pytest.raises(InvalidArgumentError, match="declared without box_embedding_dim"):
        col.upsert([{"id": "a", "pred_det": {"boxes": [_box(0, 0.5, [0.5, 0.25, 0.25], [1.0, 0.0])]}}])
    col.upsert([{"id": "a", "pred_det": {"boxes": [
        {"x1": 0, "y1": 0, "x2": 1, "y2": 1, "score": 0.5, "probs": [0.5, 0.25, 0.25]}]}}])
    for miner in ("divproto", "ppal"):
        with pytest.raises(FailedPreconditionError, match="box_embedding_dim"):
            col.mine(miner, size=1, model="det")
    info = col.add_model("det2", CLASSES, task="detection", box_embedding_dim=3)
    assert {m["name"]: m["box_embedding_dim"] for m in info["models"]} == {"det": 0, "det2": 3}
    with pytest.raises(InvalidArgumentError, match="box_embedding_dim"):
        col.add_model("det3", CLASSES, task="detection", box_embedding_dim=70_000)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_box_embedding_dim_is_refused_on_a_model_without_boxes(client, task):
    col = client.create_collection(f"no-boxes-{task}", models={"det": {"classes": CLASSES, "task": "detection"}})
    with pytest.raises(InvalidArgumentError, match=f"box_embedding_dim applies to detection models only.*{task}"):
        col.add_model("m", CLASSES, task=task, box_embedding_dim=4)
    with pytest.raises(InvalidArgumentError, match="box_embedding_dim applies to detection models only"):
        client.create_collection(f"no-boxes-{task}-2", models={
            "m": {"classes": CLASSES, "task": task, "box_embedding_dim": 4}})
    assert [m["name"] for m in col.describe()["models"]] == ["det"]
    assert f"no-boxes-{task}-2" not in client.list_collections()


def test_ppal_refuses_a_batch_beyond_its_candidate_bound(pool):
    with pytest.raises(InvalidArgumentError, match=f"at most {det.PPAL_MAX_CANDIDATES}"):
        pool.mine("ppal", size=det.PPAL_MAX_CANDIDATES + 1, model="det")


def test_a_box_without_probs_fails_the_run_naming_row_and_box(client):
    col = client.create_collection("noprobs-emb", models={
        "det": {"classes": CLASSES, "task": "detection", "box_embedding_dim": 2}})
    good = _box(0, 0.5, [0.5, 0.25, 0.25], [1.0, 0.0])
    col.upsert([{"id": f"ok{i}", "pred_det": {"boxes": [good]}} for i in range(3)]
               + [{"id": "bad-row", "pred_det": {"boxes": [good, {**_box(1, 0.4, None, [0.0, 1.0])}]}}])
    for miner in ("divproto", "ppal"):
        job = col.mine(miner, size=2, model="det")
        with pytest.raises(FailedPreconditionError) as err:
            job.wait(timeout=60)
        assert "'bad-row'" in str(err.value) and "pred_det.boxes[1].probs" in str(err.value)
