"""The labeling round trip without a labeling tool: Label Studio tasks (classification, boxes,
brush masks, text) exported through a real server, and Label Studio JSON, CVAT XML and COCO
files imported back as ``label`` / ``gt_boxes`` — matched by id, uri or file name,
idempotently, with the items that match nothing reported. The same against a running Label
Studio is tests/test_label_studio.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.client import Client
from service.client.labeling import file_name
from service.server import ServerConfig, start_server

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "bird"]
W, H = 40, 30  # the images' size: boxes go to Label Studio in percent of it


def decode_ls_rle(data: list[int]) -> np.ndarray:
    """Label Studio's brush RLE read from its definition (a bit stream: 32-bit count, 5-bit
    word size - 1, four 4-bit run-length field sizes - 1, then blocks of a repeat flag, a
    2-bit field choice, the length - 1, and one value or `length` values)."""
    bits = "".join(format(b, "08b") for b in data)
    pos = 0

    def take(n: int) -> int:
        nonlocal pos
        v = int(bits[pos:pos + n], 2)
        pos += n
        return v

    count, word = take(32), take(5) + 1
    sizes = [take(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint8)
    i = 0
    while i < count:
        repeat = take(1)
        length = take(sizes[take(2)]) + 1
        if repeat:
            out[i:i + length] = take(word)
        else:
            for j in range(length):
                out[i + j] = take(word)
        i += length
    return out


def boxes_of(i: int) -> list[dict]:
    """Row i's predicted boxes: pixels in a W x H image, with class probabilities."""
    out = []
    for j in range(i % 3):
        x1, y1 = 2.0 + 5 * j, 3.0 + 2 * j
        p = np.full(3, 0.1)
        p[(i + j) % 3] = 0.8
        out.append({"x1": x1, "y1": y1, "x2": x1 + 10, "y2": y1 + 8, "score": 0.5 + 0.1 * j, "probs": p.tolist()})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shots")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / f"shot_{i:02d}.png")
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[5:15, 4 + i:20 + i] = 1  # class 'cat'
        if i % 2:
            mask[18:26, 10:30] = 3  # class 'bird'
        Image.fromarray(mask).save(root / f"mask_{i:02d}.png")
    (root / "other").mkdir()
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(root / "other" / "shot_00.png")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("label-data")), port=0, grace_s=2))
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=12)
    with Client(srv.address, timeout=60) as c:
        col = c.create_collection("shots", models={"cls": CLASSES, "det": {"classes": CLASSES, "task": "detection"}})
        col.upsert([{"id": f"s{i:02d}", "uri": str(files / f"shot_{i:02d}.png"), "split": "a" if i < 6 else "b",
                     "mask_uri": str(files / f"mask_{i:02d}.png"), "pred_cls": {"probs": probs[i].tolist()},
                     "pred_det": {"boxes": boxes_of(i)}} for i in range(12)])
        notes = c.create_collection("notes", models={"sent": ["pos", "neg"]})
        notes.upsert([{"id": f"n{i}", "text": t, "pred_sent": {"probs": [p, 1 - p]}}
                      for i, (t, p) in enumerate([("great product", 0.9), ("awful", 0.2), ("meh", 0.55)])])
    srv.probs = probs
    yield srv
    srv.stop(1)


@pytest.fixture
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def _config(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def test_label_studio_tasks_with_boxes_and_masks(client, server, files, tmp_path):
    col = client.collection("shots")
    out = tmp_path / "tasks.json"
    res = col.export(out, "label-studio", model="det", where="split = 'a'", mask_field="mask_uri",
                     image_url="/data/local-files/?d=shots/{name}")
    tasks = json.loads(out.read_text())
    assert res["rows"] == 6 == len(tasks) and res["format"] == "label-studio"
    config = _config(Path(res["label_config_path"]).read_text())
    assert res["label_config_path"] == str(tmp_path / "tasks.label_config.xml")
    assert [e.tag for e in config] == ["Image", "Choices", "RectangleLabels", "BrushLabels"]
    assert [c.get("value") for c in config.find("RectangleLabels")] == CLASSES
    total = 0
    for i, task in enumerate(tasks):
        data = task["data"]
        assert data["assay_id"] == f"s{i:02d}" and data["uri"] == str(files / f"shot_{i:02d}.png")
        assert data["image"] == f"/data/local-files/?d=shots/shot_{i:02d}.png"
        assert (data["assay_width"], data["assay_height"]) == (W, H)  # read from the PNG header
        results = task["predictions"][0]["result"]
        total += len(results)
        boxes = [r for r in results if r["type"] == "rectanglelabels"]
        assert len(boxes) == len(boxes_of(i))
        for r, b in zip(boxes, boxes_of(i), strict=True):
            v = r["value"]
            assert (r["from_name"], r["to_name"], r["original_width"], r["original_height"]) == ("box", "image", W, H)
            np.testing.assert_allclose([v["x"], v["y"], v["width"], v["height"]],
                                       [100 * b["x1"] / W, 100 * b["y1"] / H, 1000 / W, 800 / H], rtol=1e-6)
            assert v["rectanglelabels"] == [CLASSES[int(np.argmax(b["probs"]))]]
            assert r["score"] == pytest.approx(b["score"], rel=1e-6)
        masks = {r["value"]["brushlabels"][0]: r for r in results if r["type"] == "brushlabels"}
        want = np.asarray(Image.open(files / f"mask_{i:02d}.png"))
        assert set(masks) == ({"cat", "bird"} if i % 2 else {"cat"})
        for name, r in masks.items():
            rgba = decode_ls_rle(r["value"]["rle"]).reshape(H, W, 4)
            np.testing.assert_array_equal(rgba[..., 3] == 255, want == CLASSES.index(name) + 1)
            assert (r["from_name"], r["original_width"], r["original_height"]) == ("mask", W, H)
    assert res["annotations"] == total


def test_label_studio_tasks_of_a_run_a_dataset_and_texts(client, server, tmp_path):
    col = client.collection("shots")
    job = col.mine("margin", 4, model="cls").wait(timeout=120)
    picked = job.results().column("id").to_pylist()
    col.export(tmp_path / "run.json", "label-studio", model="cls", run_id=job.run_id)
    tasks = json.loads((tmp_path / "run.json").read_text())
    assert [t["data"]["assay_id"] for t in tasks] == picked  # in rank order: the most uncertain first
    for t in tasks:
        i = int(t["data"]["assay_id"][1:])
        pred = t["predictions"][0]
        assert pred["result"][0]["value"]["choices"] == [CLASSES[int(server.probs[i].argmax())]]
        assert pred["score"] == pytest.approx(server.probs[i].max(), rel=1e-5)
        assert pred["model_version"] == "assay:cls"
    ds = client.create_dataset("batch1", "shots")
    ds.add(ids=["s07", "s08"])
    ds.commit("two")
    res = col.export(tmp_path / "ds.json", "label-studio", model="cls", dataset="batch1", dataset_version=1)
    assert sorted(t["data"]["assay_id"] for t in json.loads((tmp_path / "ds.json").read_text())) == ["s07", "s08"]
    assert [e.tag for e in _config(res["label_config"])] == ["Image", "Choices"]
    res = client.collection("notes").export(tmp_path / "notes.json", "label-studio", model="sent")
    tasks = json.loads((tmp_path / "notes.json").read_text())
    assert [t["data"]["text"] for t in tasks] == ["great product", "awful", "meh"]
    assert [t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks] == ["pos", "neg", "pos"]
    config = _config(res["label_config"])
    assert config.find("Text").get("value") == "$text" and config.find("Choices").get("toName") == "text"


def _ls_task(task_id: int, data: dict, *annotations: dict) -> dict:
    return {"id": task_id, "data": data, "annotations": list(annotations), "predictions": []}


def _ann(ann_id: int, *results: dict, cancelled: bool = False, ground_truth: bool = False,
         updated: str = "2026-12-01T10:00:00Z") -> dict:
    return {"id": ann_id, "result": list(results), "was_cancelled": cancelled, "ground_truth": ground_truth,
            "updated_at": updated}


def _choice(name: str) -> dict:
    return {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [name]}}


def _rect(x: float, y: float, w: float, h: float, label: str, size: tuple[int, int] | None = (W, H),
          rotation: float = 0) -> dict:
    r = {"from_name": "box", "to_name": "image", "type": "rectanglelabels",
         "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}
    if size:
        r["original_width"], r["original_height"] = size
    return r


def test_import_a_label_studio_export_idempotently(client, files, tmp_path):
    col = client.create_collection("ls_import", if_not_exists=True)
    col.upsert([{"id": f"s{i:02d}", "uri": str(files / f"shot_{i:02d}.png")} for i in range(6)])
    export = [
        # assay's own task: matched by assay_id; the later annotation wins
        _ls_task(1, {"assay_id": "s00", "image": "/data/local-files/?d=x/shot_00.png"},
                 _ann(1, _choice("cat"), _rect(10, 20, 50, 40, "dog"), updated="2026-12-01T10:00:00Z"),
                 _ann(2, _choice("dog"), _rect(25, 10, 50, 50, "dog"), updated="2026-12-02T10:00:00Z")),
        # a ground-truth annotation counts over a later one; no boxes drawn -> gt_boxes = []
        _ls_task(2, {"assay_id": "s01"}, _ann(3, _choice("bird"), ground_truth=True),
                 _ann(4, _choice("cat"), updated="2026-12-09T10:00:00Z")),
        # a task made elsewhere: matched by the image's file name (Label Studio's upload prefix dropped)
        _ls_task(3, {"image": "/data/upload/1/0a1b2c3d__shot_02.png"}, _ann(5, _choice("cat"), _rect(0, 0, 100, 100, "cat"))),
        # skipped by the annotator, and never annotated: nothing written, counted
        _ls_task(4, {"assay_id": "s03"}, _ann(6, _choice("cat"), cancelled=True)),
        _ls_task(5, {"assay_id": "s04"}),
        # a rotated box becomes the box around it (rotation about its top-left corner)
        _ls_task(6, {"assay_id": "s05", "assay_width": W, "assay_height": H}, _ann(7, _rect(50, 50, 25, 20, "cat",
                                                                                              size=None, rotation=90))),
        # matches nothing
        _ls_task(7, {"assay_id": "gone"}, _ann(8, _choice("cat"))),
        _ls_task(8, {"image": "http://elsewhere/nope.png"}, _ann(9, _choice("cat"))),
    ]
    path = tmp_path / "project-1.json"
    path.write_text(json.dumps(export))
    dry = col.import_labels(path, dry_run=True)
    assert dry["changed"] == 4 and dry["version"] is None
    assert col.count("label IS NOT NULL") == 0  # a dry run writes nothing
    rep = col.import_labels(path)
    assert (rep["format"], rep["items"], rep["matched"], rep["changed"], rep["not_annotated"]) == \
        ("label-studio", 8, 4, 4, 2)
    assert {u["item"]: u["reason"] for u in rep["unmatched"]} == {
        "task 7": "no row has id 'gone'", "task 8": "no row has the uri or file name 'http://elsewhere/nope.png'"}
    rows = {r["id"]: r for r in col.take([f"s{i:02d}" for i in range(6)], ["id", "label", "gt_boxes"]).to_pylist()}
    assert rows["s00"]["label"] == "dog"
    assert rows["s00"]["gt_boxes"] == [{"x1": 10.0, "y1": 3.0, "x2": 30.0, "y2": 18.0, "label": "dog"}]
    assert rows["s01"]["label"] == "bird" and rows["s01"]["gt_boxes"] == []
    assert rows["s02"]["label"] == "cat" and rows["s02"]["gt_boxes"] == [
        {"x1": 0.0, "y1": 0.0, "x2": 40.0, "y2": 30.0, "label": "cat"}]
    assert rows["s03"]["label"] is None and rows["s04"]["label"] is None
    (box,) = rows["s05"]["gt_boxes"]  # 10 x 6 px at (20, 15), turned 90 degrees clockwise about (20, 15)
    assert [round(box[k], 4) for k in ("x1", "y1", "x2", "y2")] == [14.0, 15.0, 20.0, 25.0]
    assert rows["s05"]["label"] is None
    again = col.import_labels(path)
    assert again["changed"] == 0 and again["unchanged"] == 4 and again["version"] is None
    assert col.count() == 6


def test_import_cvat_xml(client, files, tmp_path):
    col = client.create_collection("cvat", if_not_exists=True)
    col.upsert([{"id": f"c{i}", "uri": str(files / f"shot_{i:02d}.png")} for i in range(1, 4)])
    xml = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><name>shots</name><size>4</size></task></meta>
  <image id="0" name="shot_01.png" width="40" height="30">
    <tag label="cat" source="manual"></tag>
    <box label="cat" source="manual" occluded="0" xtl="1.5" ytl="2.0" xbr="11.5" ybr="12.0" z_order="0"></box>
    <box label="dog" source="manual" occluded="0" xtl="20" ytl="10" xbr="30" ybr="14" rotation="90.0" z_order="0"></box>
  </image>
  <image id="1" name="images/shot_02.png" width="40" height="30">
    <tag label="bird" source="manual"></tag>
  </image>
  <image id="2" name="shot_03.png" width="40" height="30"></image>
  <image id="3" name="missing.png" width="40" height="30"><tag label="cat" source="manual"></tag></image>
</annotations>
"""
    path = tmp_path / "annotations.xml"
    path.write_text(xml)
    rep = col.import_labels(path)
    assert rep["format"] == "cvat" and rep["matched"] == 3 and rep["changed"] == 3
    assert rep["unmatched"] == [{"item": "image 'missing.png'", "reason": "no row has the uri or file name 'missing.png'"}]
    rows = {r["id"]: r for r in col.take(["c1", "c2", "c3"], ["id", "label", "gt_boxes"]).to_pylist()}
    assert rows["c1"]["label"] == "cat"
    first, turned = rows["c1"]["gt_boxes"]
    assert first == {"x1": 1.5, "y1": 2.0, "x2": 11.5, "y2": 12.0, "label": "cat"}
    # 10 x 4 about its centre (25, 12), turned 90 degrees: 4 x 10
    assert [round(turned[k], 4) for k in ("x1", "y1", "x2", "y2")] == [23.0, 7.0, 27.0, 17.0]
    assert rows["c2"] == {"id": "c2", "label": "bird", "gt_boxes": []}  # the file has boxes: none drawn here
    assert rows["c3"]["label"] is None and rows["c3"]["gt_boxes"] == []
    assert col.import_labels(path)["changed"] == 0


def test_import_coco_from_assay_and_by_file_name(client, files, tmp_path):
    col = client.collection("shots")
    out = tmp_path / "det.json"
    col.export(out, "coco", model="det", where="split = 'b'")
    doc = json.loads(out.read_text())
    doc["annotations"] = doc["annotations"][1:]  # the annotator deleted one box
    out.write_text(json.dumps(doc))
    rep = col.import_labels(out)
    assert rep["format"] == "coco" and rep["matched"] == 6 and rep["unmatched"] == []
    names = {c["id"]: c["name"] for c in doc["categories"]}
    by_row = {img["assay_id"]: [] for img in doc["images"]}
    ids = {img["id"]: img["assay_id"] for img in doc["images"]}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        by_row[ids[a["image_id"]]].append({"x1": x, "y1": y, "x2": x + w, "y2": y + h, "label": names[a["category_id"]]})
    got = {r["id"]: r["gt_boxes"] for r in col.take(list(by_row), ["id", "gt_boxes"]).to_pylist()}
    assert got == by_row
    # a COCO file from another tool: no assay ids, file names with a folder and Label Studio's prefix
    other = {"images": [{"id": 0, "file_name": "images/9f8e7d6c__shot_06.png", "width": W, "height": H},
                        {"id": 1, "file_name": "shot_00.png", "width": W, "height": H}],
             "categories": [{"id": 0, "name": "bird"}],
             "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "bbox": [1, 2, 3, 4]}]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    rep = col.import_labels(tmp_path / "other.json", "coco")
    assert rep["matched"] == 2 and rep["unmatched"] == []
    got = {r["id"]: r["gt_boxes"] for r in col.take(["s06", "s00"], ["id", "gt_boxes"]).to_pylist()}
    # a COCO file lists every image: one without annotations has no objects
    assert got == {"s06": [{"x1": 1.0, "y1": 2.0, "x2": 4.0, "y2": 6.0, "label": "bird"}], "s00": []}


def test_a_file_name_that_names_several_rows_is_reported(client, files, tmp_path):
    col = client.create_collection("twins", if_not_exists=True)
    col.upsert([{"id": "t1", "uri": str(files / "shot_00.png")}, {"id": "t2", "uri": str(files / "other" / "shot_00.png")}])
    (tmp_path / "x.json").write_text(json.dumps([_ls_task(1, {"image": "shot_00.png"}, _ann(1, _choice("cat")))]))
    rep = col.import_labels(tmp_path / "x.json")
    assert rep["matched"] == 0 and "2 rows have the file name 'shot_00.png'" in rep["unmatched"][0]["reason"]
    # the exact uri is not ambiguous
    (tmp_path / "y.json").write_text(json.dumps(
        [_ls_task(1, {"image": str(files / "other" / "shot_00.png")}, _ann(1, _choice("cat")))]))
    assert col.import_labels(tmp_path / "y.json")["matched"] == 1
    assert col.take(["t2"], ["label"]).column("label").to_pylist() == ["cat"]


def test_file_names_and_bad_files(tmp_path):
    assert file_name("/data/local-files/?d=imgs/a%20b.png") == "a b.png"
    assert file_name("/data/upload/3/deadbeef__x.jpg") == "x.jpg"
    assert file_name("file:///srv/imgs/y.png") == "y.png"
    assert file_name("https://cdn.example.com/p/z.png?sig=1") == "z.png"
    from service.client import InvalidArgumentError
    from service.client.labeling import read_labels

    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        read_labels(tmp_path / "bad.json")
    (tmp_path / "bad.xml").write_text("<root/>")
    with pytest.raises(InvalidArgumentError, match="<annotations>"):
        read_labels(tmp_path / "bad.xml")
    with pytest.raises(InvalidArgumentError, match="cannot tell the format"):
        read_labels(tmp_path / "labels.txt")
    # a malformed item is refused before anything is written, naming the file and the format
    coco = {"images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "x"}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "bbox": ["one", 2, 3, 4]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(InvalidArgumentError, match="c.json is not a well-formed coco export"):
        read_labels(tmp_path / "c.json", "coco")
    # a box the server would refuse (negative size, infinite) is reported on its item, not sent
    coco["annotations"][0]["bbox"] = [5, 5, -3, 2]
    coco["images"].append({"id": 1, "file_name": "b.png"})
    coco["annotations"].append({"id": 1, "image_id": 1, "category_id": 0, "bbox": [1, 1, 2, 2]})
    (tmp_path / "c.json").write_text(json.dumps(coco))
    _, records = read_labels(tmp_path / "c.json", "coco")
    by_name = {r.names[0]: r for r in records}
    assert by_name["a.png"].boxes is None and "x2 >= x1" in by_name["a.png"].problem
    assert by_name["b.png"].problem is None and by_name["b.png"].boxes[0]["x2"] == 3.0


def test_the_cli_exports_tasks_and_imports_labels(server, files, tmp_path):
    env = {**os.environ, "ASSAY_SERVER": server.address, "PYTHONPATH": str(ROOT)}
    env.pop("ASSAY_DATA", None)

    def assay(*argv: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "service.cli", *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out

    out = assay("export", "shots", "t.json", "--format", "label-studio", "--model", "cls", "--where", "split = :s",
                "--where-param", "s=a")
    assert "wrote 6 rows" in out.stdout and "t.label_config.xml" in out.stdout
    tasks = json.loads((tmp_path / "t.json").read_text())
    for t in tasks:  # label every task as the model's second choice
        i = int(t["data"]["assay_id"][1:])
        t["annotations"] = [_ann(1, _choice(CLASSES[int(np.argsort(server.probs[i])[-2])]))]
    (tmp_path / "done.json").write_text(json.dumps(tasks))
    report = json.loads(assay("import", "shots", "done.json", "--json").stdout)
    assert report["matched"] == 6 and report["changed"] == 6
    out = assay("import", "shots", "done.json")
    assert "changed 0" in out.stdout and "6 unchanged" in out.stdout
    with Client(server.address) as c:
        got = c.collection("shots").take([f"s{i:02d}" for i in range(6)], ["label"]).column("label").to_pylist()
    assert got == [CLASSES[int(np.argsort(server.probs[i])[-2])] for i in range(6)]
    assert not (tmp_path / "data").exists()
