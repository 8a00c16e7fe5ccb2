"""Segmentation as a model task (issue 19, item 4): the per-image summaries of pixel
uncertainty against direct computations on hand-built (2, 3, 4, 4) maps, their validation on
upsert, the PyTorch runner on a tiny conv net into a real collection through a real server,
the ``segmentation`` miner's ranking, masks as COCO RLE, and exports with masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from indexing.errors import FailedPrecondition, InvalidArgument
from indexing.export import export_coco
from indexing.labelstudio import export_label_studio
from indexing.masks import (
    MaskError,
    mask_bbox,
    read_mask,
    rle_decode,
    rle_encode,
    rle_from_string,
    rle_to_string,
)
from indexing.schema import ModelSpec
from indexing.segmentation import (
    PixelBald,
    average_pool,
    pixel_bald,
    segmentation_summaries,
    top_count,
    validate_pixel_probs,
)
from indexing.store import Store
from miners.runner import MiningRequest, run_mining, validate_request
from miners.runs import RunRecord

CLASSES = ["road", "car", "person"]


def _maps(seed: int = 3, shape=(2, 3, 4, 4)) -> np.ndarray:
    """(N, C, H, W) probabilities with a few exactly one-hot and exactly uniform pixels."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(shape[1], 0.7), size=(shape[0], shape[2], shape[3]))  # (N, H, W, C)
    p = np.moveaxis(p, -1, 1).copy()
    p[0, :, 0, 0] = [1.0, 0.0, 0.0]
    p[0, :, 1, 2] = [1 / 3, 1 / 3, 1 / 3]
    p[1, :, 3, 3] = [0.0, 0.0, 1.0]
    return p


def _h(v) -> float:
    """Normalised entropy of one pixel, term by term."""
    return -sum(x * math.log(x) for x in v if x > 0) / math.log(len(v))


def _by_hand(p: np.ndarray, q: float, t: float):
    n, c, h, w = p.shape
    means, tops, fracs = [], [], []
    for i in range(n):
        ents, argmaxes = [], []
        for y in range(h):
            for x in range(w):
                v = [float(p[i, k, y, x]) for k in range(c)]
                ents.append(_h(v))
                argmaxes.append(max(range(c), key=lambda k, v=v: (v[k], -k)))  # ties: lowest class
        means.append(sum(ents) / len(ents))
        k = math.ceil(q * h * w)
        tops.append(sum(sorted(ents, reverse=True)[:k]) / k)
        row = []
        for cls in range(c):
            mine = [e for e, a in zip(ents, argmaxes, strict=True) if a == cls]
            row.append(sum(e > t for e in mine) / len(mine) if mine else 0.0)
        fracs.append(row)
    return np.array(means), np.array(tops), np.array(fracs)


# -- the summaries -----------------------------------------------------------------------------


@pytest.mark.parametrize(("q", "t"), [(0.05, 0.5), (0.25, 0.8), (1.0, 0.0), (0.1, 0.3)])
def test_summaries_match_a_direct_computation(q, t):
    p = _maps()
    got = segmentation_summaries(p, top_q=q, uncertain_threshold=t, map_size=2)
    mean, top, frac = _by_hand(p, q, t)
    np.testing.assert_allclose(got.mean_entropy, mean, rtol=1e-12)
    np.testing.assert_allclose(got.topq_entropy, top, rtol=1e-12)
    np.testing.assert_allclose(got.class_uncertain_fraction, frac, rtol=1e-12)
    assert (got.topq_entropy >= got.mean_entropy).all()
    # 2x2 map of a 4x4 image: the mean entropy of each quadrant
    for i in range(2):
        ent = [[_h(p[i, :, y, x]) for x in range(4)] for y in range(4)]
        for a in range(2):
            for b in range(2):
                quad = [ent[y][x] for y in range(2 * a, 2 * a + 2) for x in range(2 * b, 2 * b + 2)]
                assert got.uncertainty_map[i, a, b] == pytest.approx(sum(quad) / 4, rel=1e-12)


def test_topq_counts_and_exact_values():
    assert top_count(0.05, 16) == 1 and top_count(0.05, 100) == 5 and top_count(0.1, 16) == 2
    assert top_count(1.0, 16) == 16
    # half the pixels uniform (h = 1), half one-hot (h = 0)
    p = np.zeros((1, 2, 2, 4))
    p[0, :, 0, :] = 0.5
    p[0, 0, 1, :] = 1.0
    s = segmentation_summaries(p, top_q=0.5, uncertain_threshold=0.5, map_size=2)
    assert s.mean_entropy[0] == pytest.approx(0.5) and s.topq_entropy[0] == pytest.approx(1.0)
    # uniform pixels tie -> class 0, which then holds 4 uncertain + 4 certain pixels
    np.testing.assert_allclose(s.class_uncertain_fraction[0], [0.5, 0.0])
    np.testing.assert_allclose(s.uncertainty_map[0], [[1.0, 1.0], [0.0, 0.0]])


def test_logits_give_the_summaries_of_their_softmax():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (2, 3, 4, 4))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    a = segmentation_summaries(logits=z, top_q=0.2, map_size=3)
    b = segmentation_summaries(p, top_q=0.2, map_size=3)
    for f in ("mean_entropy", "topq_entropy", "class_uncertain_fraction", "uncertainty_map"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-12, atol=1e-15)


def test_uncertainty_map_equals_torch_adaptive_pooling():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for h, w, size in [(4, 4, 2), (7, 5, 3), (3, 2, 4), (16, 10, 16), (9, 9, 1)]:
        m = rng.random((2, h, w))
        want = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(m)[:, None], size)[:, 0].numpy()
        np.testing.assert_allclose(average_pool(m, size), want, rtol=1e-12)


def test_pixel_bald_against_a_direct_computation():
    rng = np.random.default_rng(5)
    t_passes = 3
    samples = np.stack([_maps(seed=s) for s in range(t_passes)])  # (T, N, C, H, W)
    samples[:, 1, :, 0, 0] = [1.0, 0.0, 0.0]  # all passes agree on this pixel: no information
    got = pixel_bald(samples)
    n, c, h, w = samples.shape[1:]
    for i in range(n):
        total = 0.0
        for y in range(h):
            for x in range(w):
                mean = [sum(samples[t, i, k, y, x] for t in range(t_passes)) / t_passes for k in range(c)]
                nats = -sum(v * math.log(v) for v in mean if v > 0)
                each = [-sum(v * math.log(v) for v in samples[t, i, :, y, x] if v > 0) for t in range(t_passes)]
                total += nats - sum(each) / t_passes
        assert got[i] == pytest.approx(total / (h * w), rel=1e-10)
    # two passes that disagree completely on every pixel: log 2 nats
    flip = np.zeros((2, 1, 2, 3, 3))
    flip[0, 0, 0], flip[1, 0, 1] = 1.0, 1.0
    assert pixel_bald(flip)[0] == pytest.approx(math.log(2))
    # identical passes: 0; and the accumulator equals the batch function
    same = np.repeat(_maps()[None], 4, axis=0)
    np.testing.assert_allclose(pixel_bald(same), 0.0, atol=1e-15)
    acc = PixelBald()
    for t in range(t_passes):
        acc.add(samples[t])
    np.testing.assert_allclose(acc.result(), got, rtol=1e-15)
    del rng


def test_bad_maps_are_refused_naming_the_image_and_pixel():
    p = _maps()
    with pytest.raises(ValueError, match=r"4-D array \(N, C, H, W\).*shape \(2, 3, 4\)"):
        segmentation_summaries(p[:, :, :, 0])
    bad = p.copy()
    bad[1, :, 2, 3] *= 1.5
    with pytest.raises(ValueError, match=r"image n=1, pixel \(y=2, x=3\) sum to 1\.5.*logits"):
        segmentation_summaries(bad)
    bad = p.copy()
    bad[0, 2, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*image n=0, pixel \(y=1, x=1\)"):
        segmentation_summaries(bad)
    with pytest.raises(ValueError, match="negative"):
        segmentation_summaries(p - 0.5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        validate_pixel_probs(p[:, :1])
    z = np.zeros((1, 3, 2, 2))
    z[0, 1, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"logits contains NaN.*pixel \(y=1, x=0\)"):
        segmentation_summaries(logits=z)
    with pytest.raises(ValueError, match=r"pass t=1, image n=0"):
        s = np.stack([p, p])
        s[1, 0, :, 0, 0] = 0.2
        pixel_bald(s)
    with pytest.raises(ValueError, match="top_q"):
        segmentation_summaries(p, top_q=0.0)


# -- the model task and validation on upsert -----------------------------------------------


def _seg_row(i: int, **over) -> dict:
    pred = {"mean_entropy": 0.1 * i, "topq_entropy": min(1.0, 0.1 * i + 0.2),
            "class_uncertain_fraction": [0.1 * (i % 3), 0.5, 0.0], "bald": 0.01 * i,
            "uncertainty_map": [0.1] * 4}
    pred.update(over)
    return {"id": f"img{i}", "uri": f"img{i}.png", "pred_seg": pred}


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "data"), optimize_every=0)


def test_the_task_is_registered_with_its_settings(store):
    col = store.create_collection("scenes", models={
        "seg": {"classes": CLASSES, "task": "segmentation", "top_q": 0.1, "map_size": 2},
        "cls": CLASSES})
    seg = col.model("seg")
    assert (seg.task, seg.top_q, seg.uncertain_threshold, seg.map_size) == ("segmentation", 0.1, 0.5, 2)
    assert store.collection("scenes").model("seg") == seg  # read back from the table's schema
    assert col.describe()["models"]["seg"]["top_q"] == 0.1
    assert "top_q" not in col.describe()["models"]["cls"]  # other tasks keep their JSON
    col.add_model("seg2", CLASSES, task="segmentation")
    assert col.model("seg2").top_q == 0.05
    with pytest.raises(InvalidArgument, match="task must be one of classification, detection, segmentation"):
        col.add_model("x", CLASSES, task="panoptic")
    with pytest.raises(InvalidArgument, match="top_q must be a fraction"):
        col.add_model("y", CLASSES, task="segmentation", top_q=5)
    with pytest.raises(InvalidArgument, match="unknown setting"):
        col.add_model("z", CLASSES, task="segmentation", topq=0.1)


def test_summaries_are_validated_on_upsert(store):
    col = store.create_collection("scenes", models={
        "seg": {"classes": CLASSES, "task": "segmentation", "map_size": 2}, "cls": CLASSES})
    col.upsert([_seg_row(i) for i in range(4)])
    version = col.version
    cases = [
        (dict(class_uncertain_fraction=[0.1, 0.2]), r"class_uncertain_fraction of row 1 \(id 'img6'\) has 2 values; "
                                                    r"it needs one fraction per class \(3\)"),
        (dict(uncertainty_map=[0.1] * 16), r"uncertainty_map of row 1 .* 16 values; it needs 2x2 = 4"),
        (dict(mean_entropy=1.5, topq_entropy=1.0), r"mean_entropy of row 1 \(id 'img6'\) is 1\.5"),
        (dict(mean_entropy=float("nan")), r"mean_entropy of row 1 .* is nan"),
        (dict(bald=2.0), r"bald of row 1 .* \[0, 1\.09861\] \(nats"),
        (dict(mean_entropy=0.9, topq_entropy=0.3), r"row 1 .* topq_entropy 0\.3 < mean_entropy 0\.9"),
        (dict(class_uncertain_fraction=[0.1, 1.5, 0.0]), r"class_uncertain_fraction of row 1 .* outside \[0, 1\]"),
        (dict(mask_uri=""), r"mask_uri of row 1 .* empty string"),
    ]
    for over, needle in cases:
        with pytest.raises(InvalidArgument, match=needle):
            col.upsert([_seg_row(5), _seg_row(6, **over)])
    with pytest.raises(InvalidArgument, match="need a model registered with task='segmentation'"):
        col.upsert([{"id": "c", "pred_cls": {"mean_entropy": 0.2}}])
    assert col.version == version and col.count() == 4  # nothing half-written
    assert col.count("pred_seg.topq_entropy > 0.35") == 2  # summaries are filterable columns
    got = col.take(["img3"], ["id", "pred_seg"]).column("pred_seg").to_pylist()[0]
    assert got["topq_entropy"] == pytest.approx(0.5) and got["probs"] is None and got["mask_uri"] is None


# -- the miner ----------------------------------------------------------------------------------


def _mine(col, size: int, **params) -> list[str]:
    req = MiningRequest(collection=col.name, miner="segmentation", size=size, model="seg", params=params)
    _, validated = validate_request(col, req)
    out = run_mining(col, RunRecord(run_id="r", collection=col.name, miner="segmentation", size=size, seed=0,
                                    version=col.version, model="seg", params=validated))
    return out.ids


def test_the_miner_ranks_by_the_chosen_summary(store):
    col = store.create_collection("scenes", models={
        "seg": {"classes": CLASSES, "task": "segmentation", "map_size": 2}, "cls": CLASSES})
    rows = [
        _seg_row(0, mean_entropy=0.30, topq_entropy=0.40, bald=0.05, class_uncertain_fraction=[0.1, 0.9, 0.0]),
        _seg_row(1, mean_entropy=0.10, topq_entropy=0.90, bald=0.01, class_uncertain_fraction=[0.2, 0.1, 0.3]),
        _seg_row(2, mean_entropy=0.20, topq_entropy=0.60, bald=0.30, class_uncertain_fraction=[0.8, 0.0, 0.0]),
        _seg_row(3, mean_entropy=0.50, topq_entropy=0.50, bald=None, class_uncertain_fraction=[0.0, 0.2, 0.95]),
    ]
    col.upsert(rows)
    assert _mine(col, 4) == ["img1", "img2", "img3", "img0"]  # topq_entropy by default
    assert _mine(col, 4, summary="mean_entropy") == ["img3", "img0", "img2", "img1"]
    assert _mine(col, 4, summary="bald") == ["img2", "img0", "img1"]  # img3 has no BALD: not in the pool
    assert _mine(col, 2, summary="class_uncertain_fraction", class_name="car") == ["img0", "img3"]
    assert _mine(col, 4, summary="class_uncertain_fraction") == ["img3", "img0", "img2", "img1"]  # max over classes
    with pytest.raises(InvalidArgument, match="'bike' is not a class of model 'seg'"):
        _mine(col, 2, summary="class_uncertain_fraction", class_name="bike")
    with pytest.raises(InvalidArgument, match="class_name' applies to summary='class_uncertain_fraction'"):
        _mine(col, 2, class_name="car")
    with pytest.raises(InvalidArgument, match="balance needs predicted classes"):
        _mine(col, 2, balance="equal")
    req = MiningRequest(collection=col.name, miner="segmentation", size=2, model="cls")
    with pytest.raises(FailedPrecondition, match="'cls' is a classification model"):
        validate_request(col, req)


# -- masks --------------------------------------------------------------------------------------


def test_coco_rle_by_hand_and_round_trips():
    m = np.array([[0, 1], [1, 1]], bool)  # column-major: 0, 1 | 1, 1
    assert rle_encode(m) == {"size": [2, 2], "counts": [1, 3]}
    m = np.array([[1, 0, 0], [0, 0, 1]], bool)  # column-major: 1, 0, 0, 0, 0, 1
    assert rle_encode(m) == {"size": [2, 3], "counts": [0, 1, 4, 1]}
    rng = np.random.default_rng(2)
    for shape in [(1, 1), (5, 7), (32, 17), (64, 64)]:
        mask = rng.random(shape) < rng.uniform(0.05, 0.95)
        rle = rle_encode(mask)
        np.testing.assert_array_equal(rle_decode(rle), mask)
        text = rle_to_string(rle["counts"])
        assert rle_from_string(text) == rle["counts"]
        np.testing.assert_array_equal(rle_decode({"size": rle["size"], "counts": text}), mask)
    # counts with large and negative differences round-trip through the string form
    counts = [0, 5000, 3, 70000, 1, 2, 65536, 0, 9]
    assert rle_from_string(rle_to_string(counts)) == counts
    with pytest.raises(MaskError, match="cover 5 pixels; size 2x2 has 4"):
        rle_decode({"size": [2, 2], "counts": [1, 4]})


def _png(path, values: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(values.astype(np.uint8)).save(path)
    return str(path)


def test_read_mask_png_and_json(tmp_path):
    values = np.array([[0, 1, 1], [2, 3, 255]])
    got = read_mask(_png(tmp_path / "m.png", values), CLASSES)
    np.testing.assert_array_equal(got, [[0, 1, 1], [2, 3, 0]])  # 255 = ignore
    with pytest.raises(MaskError, match=r"pixel \(y=0, x=1\) has value 7; the model has 3 classes"):
        read_mask(_png(tmp_path / "bad.png", np.array([[0, 7]])), CLASSES)
    car = np.array([[1, 1, 0], [0, 0, 0]], bool)
    person = np.array([[0, 1, 0], [0, 0, 1]], bool)  # painted after car: wins the overlap
    doc = [{"segmentation": rle_encode(car), "category": "car"},
           {"segmentation": {"size": [2, 3], "counts": rle_to_string(rle_encode(person)["counts"])}, "category_id": 3}]
    (tmp_path / "m.json").write_text(json.dumps(doc))
    np.testing.assert_array_equal(read_mask(str(tmp_path / "m.json"), CLASSES), [[2, 3, 0], [0, 0, 3]])
    (tmp_path / "bad.json").write_text(json.dumps([{"segmentation": rle_encode(car), "category": "bike"}]))
    with pytest.raises(MaskError, match="'bike' is not one of the model's classes"):
        read_mask(str(tmp_path / "bad.json"), CLASSES)
    assert read_mask(str(tmp_path / "absent.png"), CLASSES) is None
    assert read_mask("s3://bucket/m.png", CLASSES) is None


def test_coco_and_label_studio_exports_carry_the_masks(store, tmp_path):
    col = store.create_collection("scenes", models={"seg": {"classes": CLASSES, "task": "segmentation",
                                                            "map_size": 2}})
    m0 = np.zeros((4, 5), np.uint8)
    m0[1:3, 1:4] = 2  # car
    m0[3, 0] = 3  # person
    car = np.array([[0, 0, 0], [0, 1, 1], [0, 1, 1]], bool)
    (tmp_path / "m1.json").write_text(json.dumps([{"segmentation": rle_encode(car), "category": "car"}]))
    col.upsert([_seg_row(0, mask_uri=_png(tmp_path / "m0.png", m0)),
                _seg_row(1, mask_uri=str(tmp_path / "m1.json")),
                _seg_row(2, mask_uri=str(tmp_path / "gone.png")),
                _seg_row(3)])
    report = export_coco(col, "seg", tmp_path / "out.json", ids=["img0", "img1", "img2", "img3"])
    doc = json.loads((tmp_path / "out.json").read_text())
    assert (report.rows, report.annotations, report.masks_missing) == (4, 3, 1)
    assert [c["name"] for c in doc["categories"]] == CLASSES and doc["categories"][0]["id"] == 1
    images = {im["assay_id"]: im for im in doc["images"]}
    assert (images["img0"]["width"], images["img0"]["height"]) == (5, 4)  # from the mask
    by_image: dict[int, list] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    first = sorted(by_image[images["img0"]["id"]], key=lambda a: a["category_id"])
    assert [a["category_id"] for a in first] == [2, 3]
    np.testing.assert_array_equal(rle_decode(first[0]["segmentation"]), m0 == 2)
    assert first[0]["bbox"] == [1.0, 1.0, 3.0, 2.0] and first[0]["area"] == 6
    assert first[1]["bbox"] == [0.0, 3.0, 1.0, 1.0] and first[1]["area"] == 1
    (second,) = by_image[images["img1"]["id"]]
    np.testing.assert_array_equal(rle_decode(second["segmentation"]), car)
    assert images["img2"]["id"] not in by_image and images["img3"]["id"] not in by_image
    # a mask file that is not a mask of the model's classes fails the export, naming the row
    col.upsert([_seg_row(4, mask_uri=_png(tmp_path / "bad.png", np.array([[9]])))])
    with pytest.raises(InvalidArgument, match=r"row 'img4': pred_seg.mask_uri .* value 9"):
        export_coco(col, "seg", tmp_path / "bad.json", ids=["img4"])
    assert not (tmp_path / "bad.json").exists()
    # Label Studio: the model's mask_uri becomes brushlabels without a mask_field
    report, config = export_label_studio(col, tmp_path / "ls.json", model="seg", ids=["img0", "img1"])
    tasks = json.loads((tmp_path / "ls.json").read_text())
    labels = [[r["value"]["brushlabels"][0] for r in t["predictions"][0]["result"]] for t in tasks]
    assert labels == [["car", "person"], ["car"]] and "<BrushLabels" in config


def test_an_export_to_a_classification_model_is_still_refused(store, tmp_path):
    col = store.create_collection("plain", models={"cls": CLASSES})
    col.upsert([{"id": "a", "pred_cls": {"probs": [0.2, 0.3, 0.5]}}])
    with pytest.raises(FailedPrecondition, match="no boxes or masks"):
        export_coco(col, "cls", tmp_path / "x.json")


def test_model_spec_json_round_trip():
    spec = ModelSpec(name="s", classes=tuple(CLASSES), task="segmentation", top_q=0.2,
                     uncertain_threshold=0.3, map_size=8)
    assert ModelSpec.from_json(spec.to_json()) == spec
    plain = ModelSpec(name="c", classes=tuple(CLASSES))
    assert json.loads(plain.to_json()) == {"name": "c", "classes": CLASSES, "task": "classification"}
    assert pa.types.is_struct(spec.arrow_type) and spec.arrow_type.get_field_index("topq_entropy") >= 0
    assert plain.arrow_type.get_field_index("topq_entropy") < 0


# -- the PyTorch runner, end to end through a real server ---------------------------------------


def _tiny_seg_model():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3),
                          nn.Conv2d(8, len(CLASSES), 1))
    with torch.no_grad():
        model[3].weight *= 4  # confident in places, unsure in others
    return model.eval()


def test_the_runner_stores_summaries_masks_and_bald_through_the_server(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    from indexing.inference import InferenceRunner
    from service.client import Client
    from service.server import ServerConfig, start_server

    model = _tiny_seg_model()
    torch.manual_seed(1)
    x = torch.rand(10, 3, 12, 12)
    ids = [f"img{i}" for i in range(10)]
    loader = DataLoader(TensorDataset(x), batch_size=4)  # batches of 4, 4, 2
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    want = segmentation_summaries(probs, top_q=0.1, map_size=4, validate=False)
    srv = start_server(ServerConfig(data=str(tmp_path / "srv"), port=0, grace_s=1))
    try:
        with Client(srv.address, timeout=60) as client:
            client.create_collection("scenes", models={
                "seg": {"classes": CLASSES, "task": "segmentation", "top_q": 0.1, "map_size": 4}})
            sink = client.collection("scenes")
            runner = InferenceRunner(model_name="seg", segmentation=True, mc_samples=3, ids=ids,
                                     mask_dir=tmp_path / "masks", flush_rows=4, progress=False)
            res = runner.run(model, loader, sink=sink)
            assert (res.rows, res.batches, res.writes) == (10, 3, 3)
            table = sink.query(columns=["id", "pred_seg"])
            got = {r["id"]: r["pred_seg"] for r in table.to_pylist()}
            assert sorted(got) == sorted(ids)
            for i, rid in enumerate(ids):
                row = got[rid]
                assert row["probs"] is None and row["samples"] is None  # no maps, no per-pixel anything
                assert row["mean_entropy"] == pytest.approx(want.mean_entropy[i], rel=1e-5)
                assert row["topq_entropy"] == pytest.approx(want.topq_entropy[i], rel=1e-5)
                np.testing.assert_allclose(row["class_uncertain_fraction"], want.class_uncertain_fraction[i],
                                           rtol=1e-6)
                np.testing.assert_allclose(row["uncertainty_map"], want.uncertainty_map[i].ravel(), rtol=1e-5)
                np.testing.assert_array_equal(read_mask(row["mask_uri"], CLASSES), probs[i].argmax(axis=0) + 1)
            bald = np.array([got[r]["bald"] for r in ids])
            assert np.isfinite(bald).all() and (bald >= 0).all() and bald.max() > 0
            # seeded, consistent dropout masks: the same BALD again, whatever the batching
            again = next(InferenceRunner(model_name="seg", segmentation=True, mc_samples=3, ids=ids,
                                         segmentation_settings={"top_q": 0.1, "map_size": 4}, progress=False)
                         .predict(model, DataLoader(TensorDataset(x), batch_size=10)))
            np.testing.assert_allclose(again.column("pred_seg").combine_chunks().field("bald").to_numpy(),
                                       bald, rtol=1e-6)

            top = sink.mine("segmentation", 3, model="seg").wait(timeout=60).results()
            order = sorted(ids, key=lambda r: -got[r]["topq_entropy"])
            assert top.column("id").to_pylist() == order[:3]
            by_bald = sink.mine("segmentation", 3, model="seg", params={"summary": "bald"}).wait(timeout=60).results()
            assert by_bald.column("id").to_pylist() == sorted(ids, key=lambda r: -got[r]["bald"])[:3]

            out = sink.export(tmp_path / "scenes.json", model="seg", ids=ids[:2])
            doc = json.loads((tmp_path / "scenes.json").read_text())
            assert out["annotations"] == len(doc["annotations"]) > 0
            for a in doc["annotations"]:
                i = a["image_id"] - 1
                np.testing.assert_array_equal(rle_decode(a["segmentation"]),
                                              probs[i].argmax(axis=0) == a["category_id"] - 1)

            # the same through the CLI: one call to mine, one to export
            import csv

            from service.cli import main

            picked = tmp_path / "picked.csv"
            assert main(["mine", "scenes", "segmentation", "--size", "3", "--model", "seg", "--param",
                         "summary=bald", "--output", str(picked), "--quiet", "--server", srv.address]) == 0
            assert [r["id"] for r in csv.DictReader(picked.open())] == by_bald.column("id").to_pylist()
            assert main(["export", "scenes", str(tmp_path / "cli.json"), "--model", "seg", "--server",
                         srv.address]) == 0
            cli_doc = json.loads((tmp_path / "cli.json").read_text())
            assert len(cli_doc["images"]) == 10 and len(cli_doc["annotations"]) >= len(doc["annotations"])

            with pytest.raises(ValueError, match="differs from the registered model's top_q=0.1"):
                InferenceRunner(model_name="seg", segmentation=True, segmentation_settings={"top_q": 0.2},
                                ids=ids, progress=False).run(model, loader, sink=sink)
    finally:
        srv.stop(0)


def test_the_runner_registers_the_model_and_refuses_bad_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from indexing.inference import InferenceRunner, run

    model = _tiny_seg_model()
    x = torch.rand(5, 3, 6, 6)
    col = Store(str(tmp_path / "data")).create_collection("scenes")
    res = run(model, DataLoader(TensorDataset(x), batch_size=5), sink=col, model_name="seg", classes=CLASSES,
              segmentation=True, segmentation_settings={"map_size": 2}, progress=False)
    assert res.rows == 5 and col.model("seg").task == "segmentation" and col.model("seg").map_size == 2
    stored = col.query(columns=["id", "pred_seg"]).column("pred_seg").to_pylist()
    assert all(len(r["uncertainty_map"]) == 4 and r["bald"] is None and r["mask_uri"] is None for r in stored)
    with pytest.raises(ValueError, match=r"must be \(N, C\) logits; got shape \(5, 3, 6, 6\); for \(N, C, H, W\) "
                                         "outputs pass segmentation=True"):
        run(model, [x], progress=False)
    with pytest.raises(ValueError, match=r"segmentation model's output must be \(N, C, H, W\)"):
        run(nn.Flatten(), [x], segmentation=True, progress=False)
    # probabilities from the model (activation="none") are checked, naming the pixel
    with pytest.raises(ValueError, match=r"batch starting at id '0'.*image n=0, pixel \(y=0, x=0\) sum to"):
        run(nn.Identity(), [torch.rand(2, 3, 4, 4)], segmentation=True, activation="none", progress=False)
    with pytest.raises(ValueError, match="not both"):
        InferenceRunner(segmentation=True, detection=lambda out: [])
    with pytest.raises(ValueError, match="mask_dir writes segmentation masks"):
        InferenceRunner(mask_dir=tmp_path)
    col.add_model("cls", CLASSES)
    with pytest.raises(ValueError, match="registered as a classification model"):
        run(model, [x], sink=col, model_name="cls", segmentation=True, progress=False)


def test_rle_agrees_with_pycocotools_where_installed():
    """pycocotools is not a dependency; where it is installed, the RLE written here must be
    what it writes (compressed strings, decoding, bbox, area)."""
    cm = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = rng.random((h, w)) < rng.uniform(0.01, 0.99)
        if trial % 3 == 0:  # long runs: large differences between counts
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):, rng.integers(0, w):] = True
        ref = cm.encode(np.asfortranarray(m.astype(np.uint8)))
        mine = rle_encode(m)
        assert rle_to_string(mine["counts"]) == ref["counts"].decode()
        assert rle_from_string(ref["counts"].decode()) == mine["counts"]
        np.testing.assert_array_equal(cm.decode(cm.frPyObjects(mine, h, w)), m)
        if m.any():
            assert list(cm.toBbox(ref)) == mask_bbox(m) and int(cm.area(ref)) == int(m.sum())
