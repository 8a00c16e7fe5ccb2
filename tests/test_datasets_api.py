"""The curation loop end to end through a real server on loopback, the Python client and the
CLI: SQL parameter binding, pages with a stable cursor, analytics against pandas, item
tags, exports, and versioned datasets (mine -> tag -> commit -> relabel -> diff)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import math
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexing.export import coco_boxes, read_export
from service.cli import main
from service.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    bind_params,
    histogram_stats,
)
from service.server import ServerConfig, start_server

CLASSES = ["a", "b", "c", "d"]
DET = ["car", "person"]
N = 240


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("curation")), port=0, grace_s=2))
    yield srv
    srv.stop(1)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def _rows(n: int = N, seed: int = 0) -> list[dict]:
    """Rows with labels (40% unlabeled), fields, a 4-d vector, class probabilities of model
    ``m`` and boxes of detection model ``det``; every 7th row is tagged ``review``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        probs = rng.dirichlet(np.full(len(CLASSES), 0.7)).astype(np.float32)
        boxes = []
        for _ in range(int(rng.integers(0, 3)) if i % 3 == 0 else 0):
            x1, y1 = (float(v) for v in np.float32(rng.uniform(0, 100, 2)))
            w, h = (float(v) for v in np.float32(rng.uniform(1, 40, 2)))
            boxes.append({"x1": x1, "y1": y1, "x2": float(np.float32(x1 + w)), "y2": float(np.float32(y1 + h)),
                          "score": float(np.float32(rng.random())),
                          "probs": rng.dirichlet(np.ones(len(DET))).astype(np.float32).tolist()})
        rows.append({
            "id": f"r{i:03d}",
            "label": None if i % 5 < 2 else CLASSES[int(rng.integers(len(CLASSES)))],
            "split": "val" if i % 4 == 0 else "train",
            "n": i % 10,
            "score": None if i % 17 == 0 else float(rng.normal()),
            "text": f"item {i}",
            "uri": f"img/{i}.png",
            "tags": ["review"] if i % 7 == 0 else [],
            "emb_v": rng.standard_normal(4).astype(np.float32).tolist(),
            "pred_m": {"probs": probs.tolist()},
            "pred_det": {"boxes": boxes},
        })
    return rows


def _pool(client: Client, name: str, n: int = N):
    if name in client.list_collections():
        for d in client.datasets(name):
            client.dataset(d["name"]).delete(force=True)
        client.drop_collection(name)
    col = client.create_collection(name, spaces={"v": 4},
                                   models={"m": CLASSES, "det": {"classes": DET, "task": "detection"}})
    rows = _rows(n)
    col.upsert(rows)
    return col, rows


def _ids(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


# -- bind_params (no server) -------------------------------------------------------------------


def test_bind_params_renders_literals():
    assert bind_params("label = :l", {"l": "it's"}) == "label = 'it''s'"
    assert bind_params("n IN (:ns) AND ok = :ok", {"ns": [1, 2, 3], "ok": True}) == "n IN (1, 2, 3) AND ok = TRUE"
    assert bind_params("label IN (:ls)", {"ls": ("a", "b'")}) == "label IN ('a', 'b''')"
    assert bind_params("array_has_any(tags, [:t])", {"t": ["x", "y"]}) == "array_has_any(tags, ['x', 'y'])"
    assert bind_params("label IS :none", {"none": None}) == "label IS NULL"
    assert bind_params("flag = :f", {"f": False}) == "flag = FALSE"
    assert bind_params("x > :x", {"x": 0.25}) == "x > 0.25"
    # negative numbers in parentheses: "n -:k" must not turn into a "--" comment
    assert bind_params("n -:k > 0", {"k": -3}) == "n -(-3) > 0"
    assert bind_params("x < :x", {"x": -1.5}) == "x < (-1.5)"
    assert bind_params("n = :n AND x = :x", {"n": np.int64(7), "x": np.float32(0.5)}) == "n = 7 AND x = 0.5"
    naive = dt.datetime(2024, 5, 1, 12, 30)
    assert bind_params("t > :t", {"t": naive}) == "t > TIMESTAMP '2024-05-01 12:30:00.000000'"
    aware = dt.datetime(2024, 5, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert bind_params("t > :t", {"t": aware}) == "t > TIMESTAMP '2024-05-01 12:30:00.000000'"
    assert bind_params("d = :d", {"d": dt.date(2024, 5, 1)}) == "d = DATE '2024-05-01'"
    # the same name twice
    assert bind_params(":a = :a", {"a": 1}) == "1 = 1"


def test_bind_params_leaves_quotes_comments_and_casts_alone():
    where = "text = ':l' AND \"odd:l\" = 1 AND `x:l` = 2 AND n::bigint = :l -- :l\n AND /* :l */ TRUE"
    assert bind_params(where, {"l": 5}) == (
        "text = ':l' AND \"odd:l\" = 1 AND `x:l` = 2 AND n::bigint = 5 -- :l\n AND /* :l */ TRUE")
    # a doubled quote inside a literal does not end it
    assert bind_params("text = 'it''s :l' OR label = :l", {"l": "a"}) == "text = 'it''s :l' OR label = 'a'"
    # an injection attempt stays one literal
    assert bind_params("label = :l", {"l": "x' OR '1'='1"}) == "label = 'x'' OR ''1''=''1'"
    assert bind_params("label = :l", {"l": "x'); DROP TABLE t; --"}) == "label = 'x''); DROP TABLE t; --'"


@pytest.mark.parametrize(("where", "params", "match"), [
    ("x > :x", {"x": float("nan")}, "finite"),
    ("x > :x", {"x": float("inf")}, "finite"),
    ("x > :x", {"x": np.float64("-inf")}, "finite"),
    ("label = :l", {}, "no 'l'"),
    ("label = :l", {"l": "a", "extra": 1}, "extra"),
    ("label = ':l'", {"l": "a"}, "not used"),  # inside a literal: not a placeholder
    ("n IN (:ns)", {"ns": []}, "empty list"),
    ("n IN (:ns)", {"ns": [[1], [2]]}, "nested"),
    ("x = :x", {"x": b"bytes"}, "cannot bind"),
    ("x = :x", {"x": {"a": 1}}, "cannot bind"),
    ("x = :x", {"x": "nul\x00"}, "NUL"),
    ("x = :x", {"x": 2**70}, "64-bit"),
    ("x = :1x", {"1x": 1}, "invalid"),
    ("x = :x", {"x-y": 1}, "invalid"),
])
def test_bind_params_refuses(where, params, match):
    with pytest.raises(InvalidArgumentError, match=match):
        bind_params(where, params)


# -- the curation loop ----------------------------------------------------------------------------


def test_curation_loop_mine_tag_commit_relabel_diff(client, tmp_path):
    col, rows = _pool(client, "loop")
    by_id = {r["id"]: r for r in rows}
    job = col.mine("margin", size=20, model="m", where="label IS NULL")
    job.wait(timeout=120)
    picked = _ids(job.results())
    assert len(picked) == 20 and all(by_id[i]["label"] is None for i in picked)

    # tag the run's results; a second time changes nothing; existing tags are kept
    assert job.tag("to-label") == 20
    assert col.tag_items(run_id=job.run_id, add=["to-label"]) == 0
    tagged = col.query("array_has_any(tags, ['to-label'])", columns=["id", "tags"])
    assert sorted(_ids(tagged)) == sorted(picked)
    assert col.count("array_has_any(tags, [:t])", params={"t": ["to-label"]}) == 20
    for r in tagged.to_pylist():
        assert r["tags"] == (["review", "to-label"] if by_id[r["id"]]["tags"] else ["to-label"])

    # a dataset from the run
    ds = client.create_dataset("train", "loop", description="uncertain first")
    with pytest.raises(AlreadyExistsError):
        client.create_dataset("train", "loop")
    staged = ds.add(run_id=job)  # a MiningJob, or job.run_id
    assert (staged["requested"], staged["changed"], staged["staged_adds"]) == (20, 20, 20)
    assert ds.add(ids=picked[:3])["changed"] == 0  # already (staged) members
    status = ds.status()
    assert (status["head"], status["staged_adds"], status["members"]) == (0, 20, 20)
    v1 = ds.commit("20 most uncertain by margin", author="tester")
    assert (v1["version"], v1["members"], v1["added"], v1["removed"]) == (1, 20, 20, 0)
    assert v1["author"] == "tester" and v1["tag"] == "ds-train-v1"
    with pytest.raises(FailedPreconditionError, match="nothing to commit"):
        ds.commit("again")

    # labels come back for 5 of them; 3 are dropped; labeled 'b' rows of val join
    new_labels = {i: CLASSES[k % 4] for k, i in enumerate(sorted(picked)[:5])}
    col.upsert([{"id": i, "label": lab} for i, lab in new_labels.items()])
    dropped = sorted(picked)[-3:]
    assert ds.remove(ids=dropped)["changed"] == 3
    joined = sorted(r["id"] for r in rows if r["label"] == "b" and r["split"] == "val")
    assert joined
    assert ds.add(where="label = :l AND split = :s", params={"l": "b", "s": "val"})["changed"] == len(joined)
    v2 = ds.commit("labels back; val 'b' joined")
    assert (v2["version"], v2["added"], v2["removed"]) == (2, len(joined), 3)
    assert v2["members"] == 20 - 3 + len(joined)

    d = ds.diff(1, 2)
    assert d["added"] == joined and d["removed"] == dropped
    assert d["relabeled"].to_pylist() == [
        {"id": i, "label_before": None, "label_after": new_labels[i]} for i in sorted(new_labels)]

    # checkout of v1 reads the collection as it was: the old (null) labels
    old = ds.checkout(1, columns=["id", "label", "tags"])
    assert _ids(old) == sorted(picked) and old.column("label").null_count == 20
    assert all("to-label" in t for t in old.column("tags").to_pylist())
    new = ds.checkout(2)
    assert _ids(new) == sorted(set(picked) - set(dropped) | set(joined))
    got = dict(zip(_ids(new), new.column("label").to_pylist(), strict=True))
    assert all(got[i] == lab for i, lab in new_labels.items())
    assert "emb_v" not in new.column_names and "pred_m" not in new.column_names
    assert ds.members(1) == sorted(picked)
    batches = list(ds.checkout_batches(2, columns=["id"], page_rows=7))
    assert all(b.num_rows <= 7 for b in batches) and sum(b.num_rows for b in batches) == v2["members"]

    # tags name versions; history newest first
    assert ds.tag(1, "first-batch") == 1
    assert ds.checkout("first-batch", columns=["id", "label"]).equals(ds.checkout(1, columns=["id", "label"]))
    assert ds.diff("first-batch", "HEAD")["added"] == joined
    hist = ds.history()
    assert [c["version"] for c in hist] == [2, 1] and hist[1]["tags"] == ["first-batch"]
    assert hist[1]["message"] == "20 most uncertain by margin"
    info = ds.info()
    assert (info["head"], info["members"], info["tags"], info["collection"]) == (2, v2["members"],
                                                                               {"first-batch": 1}, "loop")
    assert [x["name"] for x in client.datasets("loop")] == ["train"]
    assert client.datasets("nope") == []

    # the working state: staged changes show in diff(HEAD) until discarded
    ds.remove(ids=joined[:1])
    assert ds.diff(2)["removed"] == joined[:1]
    with pytest.raises(FailedPreconditionError, match="uncommitted"):
        ds.delete()
    assert ds.discard() == 1 and ds.status()["staged_removes"] == 0

    # export a dataset version for labeling: v1's labels
    path = tmp_path / "v1.csv"
    report = col.export(path, model="m", dataset="train", dataset_version="first-batch")
    assert report["rows"] == 20 and report["path"] == str(path)
    back = read_export(path)
    assert sorted(r["id"] for r in back) == sorted(picked)
    assert {r["label"] for r in back} == {None}  # as at v1, before the labels came back

    with pytest.raises(NotFoundError):
        ds.checkout(9)
    with pytest.raises(NotFoundError):
        client.dataset("missing").info()
    ds.delete()
    with pytest.raises(NotFoundError):
        ds.info()


def test_async_client_dataset_and_queries(client, server, tmp_path):
    col, rows = _pool(client, "aloop", n=60)
    labeled = sorted(r["id"] for r in rows if r["label"] is not None)

    async def go():
        async with AsyncClient(server.address, timeout=60) as ac:
            acol = ac.collection("aloop")
            ds = await ac.create_dataset("aset", "aloop")
            await ds.add(where="label IS NOT NULL")
            c = await ds.commit("labeled")
            assert c["members"] == len(labeled)
            assert await ds.members(1) == labeled
            table = await ds.checkout(1, columns=["id", "label"])
            assert _ids(table) == labeled
            assert (await ds.diff(1))["added"] == []
            assert len(await ac.datasets("aloop")) == 1
            pages = [p async for p in acol.pages(columns=["id"], page_rows=25)]
            assert [p.table.num_rows for p in pages] == [25, 25, 10] and pages[-1].last
            dist = await acol.label_distribution()
            assert sum(dist.column("count").to_pylist()) == 60
            assert await acol.tag_items(ids=labeled[:2], add="x") == 2
            assert await acol.count("array_has_any(tags, [:t])", params={"t": "x"}) == 2
            out = await acol.export(tmp_path / "a.jsonl", where="label IS NOT NULL")
            assert out["rows"] == len(labeled)
            await ds.delete()

    asyncio.run(go())


# -- pages ------------------------------------------------------------------------------------


def test_pages_concatenate_to_the_scan_and_stay_stable_while_others_write(client):
    col, rows = _pool(client, "paged")
    where, params = "n >= :n AND label IS NOT NULL", {"n": 3}
    want = col.query(where, columns=["id", "n", "label"], params=params)
    pages = list(col.pages(where, columns=["id", "n", "label"], page_rows=17, params=params))
    assert all(p.table.num_rows <= 17 for p in pages) and pages[-1].last
    assert all(p.next_cursor for p in pages[:-1])
    got = pa.concat_tables([p.table for p in pages])
    assert got.equals(want)
    assert len(set(_ids(got))) == got.num_rows

    # a writer between pages: the cursor keeps reading the version of the first page
    first = col.page(where, columns=["id", "n", "label"], page_rows=40, params=params)
    col.upsert([{"id": f"new{i}", "n": 9, "label": "a"} for i in range(31)])
    col.upsert([{"id": r["id"], "n": 0} for r in rows[:100]])
    rest = list(col.pages(where, columns=["id", "n", "label"], page_rows=40, cursor=first.next_cursor,
                          params=params))
    assert {p.version for p in rest} == {first.version}
    assert pa.concat_tables([first.table, *[p.table for p in rest]]).equals(want)
    assert col.count(where, params=params) != want.num_rows  # the live table did change

    # the old version stays readable by number: scan and count at it
    assert col.count(where, params=params, version=first.version) == want.num_rows
    at = col.query(where, columns=["id", "n", "label"], params=params, version=first.version)
    assert at.equals(want)

    # a cursor belongs to its filter and columns
    with pytest.raises(InvalidArgumentError):
        col.page("n >= 0", columns=["id", "n", "label"], page_rows=40, cursor=first.next_cursor)
    with pytest.raises(InvalidArgumentError):
        col.page(where, columns=["id"], page_rows=40, cursor=first.next_cursor, params=params)
    with pytest.raises(InvalidArgumentError):
        col.page(where, page_rows=40, cursor="not-a-cursor", params=params)
    with pytest.raises(InvalidArgumentError, match="page_rows"):
        col.page(page_rows=0)
    empty = col.page("n > 100")
    assert empty.table.num_rows == 0 and empty.last


# -- analytics --------------------------------------------------------------------------------


def test_analytics_match_pandas(client):
    col, rows = _pool(client, "stats")
    df = pd.DataFrame(rows)
    probs = np.array([r["pred_m"]["probs"] for r in rows], dtype=np.float32).astype(np.float64)
    df["pred"] = [CLASSES[i] for i in probs.argmax(axis=1)]

    got = col.label_distribution()
    want = df.groupby("label", dropna=False).size()
    assert {r["label"]: r["count"] for r in got.to_pylist()} == {
        (None if isinstance(k, float) and math.isnan(k) else k): v for k, v in want.items()}
    got = col.label_distribution("split = :s", group_by="n", params={"s": "val"})
    assert got.column_names == ["label", "n", "count"]
    want = df[df.split == "val"].groupby(["label", "n"], dropna=False).size()
    assert {(r["label"], r["n"]): r["count"] for r in got.to_pylist()} == {
        (None if isinstance(k[0], float) else k[0], k[1]): v for k, v in want.items()}

    conf = col.confusion("m")
    lab = df[df.label.notna()]
    want = lab.groupby(["label", "pred"]).size()
    assert {(r["label"], r["predicted"]): r["count"] for r in conf.to_pylist()} == dict(want.items())
    errors = col.confusion("m", errors_only=True)
    assert all(r["label"] != r["predicted"] for r in errors.to_pylist())
    assert sum(errors.column("count").to_pylist()) == int((lab.label != lab.pred).sum())

    pairs = col.confused_pairs("m", top=50)
    order = np.argsort(-probs, axis=1)
    i1, i2 = order[:, 0], order[:, 1]
    margin = probs[np.arange(N), i1] - probs[np.arange(N), i2]
    pdf = pd.DataFrame({"a": np.minimum(i1, i2), "b": np.maximum(i1, i2), "first": i1, "margin": margin})
    for r in pairs.to_pylist():
        sel = pdf[(pdf.a == CLASSES.index(r["class_a"])) & (pdf.b == CLASSES.index(r["class_b"]))]
        assert r["count"] == len(sel) and r["a_top1"] == int((sel["first"] == sel.a).sum())
        assert r["mean_margin"] == pytest.approx(sel.margin.mean(), rel=1e-6)
    assert sum(pairs.column("count").to_pylist()) == N
    assert col.confused_pairs("m", top=2).num_rows == 2

    unc = col.class_uncertainty("m", "split = :s", params={"s": "train"})
    ent = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(axis=1) / np.log(len(CLASSES))
    df["entropy"] = np.clip(ent, 0, 1)
    want = df[df.split == "train"].groupby("pred")["entropy"].agg(["count", "mean", "min", "max"])
    assert unc.column_names == ["predicted", "count", "mean_score", "min_score", "max_score"]
    for r in unc.to_pylist():
        w = want.loc[r["predicted"]]
        assert r["count"] == w["count"]
        assert r["mean_score"] == pytest.approx(w["mean"], rel=1e-5)
        assert (r["min_score"], r["max_score"]) == (pytest.approx(w["min"], rel=1e-5), pytest.approx(w["max"], rel=1e-5))

    hist = col.histogram("score", bins=8)
    scores = df.score.dropna().to_numpy(dtype=np.float64)
    counts, edges = np.histogram(scores, bins=8)
    assert hist.column("count").to_pylist() == counts.tolist()
    np.testing.assert_allclose(hist.column("bin_start").to_numpy(), edges[:-1])
    stats = histogram_stats(hist)
    assert stats["nulls"] == int(df.score.isna().sum()) and stats["total"] == N
    hist = col.histogram("score", bins=4, range=(-1, 1), where="split = :s", params={"s": "val"})
    val = df[df.split == "val"].score.dropna().to_numpy()
    assert hist.column("count").to_pylist() == np.histogram(val, bins=4, range=(-1, 1))[0].tolist()
    assert histogram_stats(hist)["above"] == int((val > 1).sum())

    with pytest.raises(NotFoundError):
        col.confusion("nope")
    with pytest.raises(InvalidArgumentError, match="histogram"):
        col.histogram("label")
    with pytest.raises(InvalidArgumentError, match="measure"):
        col.class_uncertainty("m", measure="vibes")


# -- tags and export ---------------------------------------------------------------------------


def test_tag_items_by_ids_filter_and_removal(client):
    col, rows = _pool(client, "tags", n=50)
    assert col.tag_items(ids=["r001", "r002"], add=["x", "y"]) == 2
    assert col.tag_items(where="n = :n", params={"n": 1}, add="x") == 4  # r001 already has x
    assert col.count("array_has_any(tags, ['x'])") == 6
    assert col.tag_items(where="array_has_any(tags, ['x'])", remove="x") == 6
    assert col.count("array_has_any(tags, ['x', 'y'])") == 2
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        col.tag_items(ids=["r001"], where="n = 1", add="x")
    with pytest.raises(InvalidArgumentError, match="tags to add"):
        col.tag_items(ids=["r001"])
    with pytest.raises(InvalidArgumentError, match="ids is empty"):
        col.tag_items(ids=[], add="x")


def test_export_round_trips(client, tmp_path):
    col, rows = _pool(client, "export")
    by_id = {r["id"]: r for r in rows}

    job = col.mine("entropy", size=15, model="m", where="split = :s", where_params={"s": "train"})
    job.wait(timeout=120)
    picked = _ids(job.results())
    out = col.export(tmp_path / "run.csv", model="m", run_id=job.run_id, fields=["split", "n"])
    assert out == {"rows": 15, "annotations": 0, "path": str(tmp_path / "run.csv"), "format": "csv"}
    back = read_export(tmp_path / "run.csv", types={"n": pa.int64()})
    assert [r["id"] for r in back] == picked  # in the run's rank order
    for r in back:
        src = by_id[r["id"]]
        p = np.asarray(src["pred_m"]["probs"], dtype=np.float32)
        assert (r["uri"], r["text"], r["label"], r["split"], r["n"]) == (
            src["uri"], src["text"], src["label"], src["split"], src["n"])
        assert r["predicted"] == CLASSES[int(p.argmax())]
        assert r["confidence"] == pytest.approx(float(p.max()), rel=1e-6)
    with open(tmp_path / "run.csv", newline="") as fh:
        assert next(csv.reader(fh)) == ["id", "uri", "text", "label", "split", "n", "predicted", "confidence"]

    out = col.export(tmp_path / "val.jsonl", where="split = :s AND label IS NOT NULL", params={"s": "val"})
    back = read_export(tmp_path / "val.jsonl")
    want = sorted(r["id"] for r in rows if r["split"] == "val" and r["label"] is not None)
    assert out["rows"] == len(want) and sorted(r["id"] for r in back) == want
    assert all(set(r) == {"id", "uri", "text", "label"} for r in back)

    out = col.export(tmp_path / "det.json", model="det", where="split = 'train'")
    train = [r for r in rows if r["split"] == "train"]
    total = sum(len(r["pred_det"]["boxes"]) for r in train)
    assert (out["rows"], out["annotations"], out["format"]) == (len(train), total, "coco")
    doc = json.loads((tmp_path / "det.json").read_text())
    assert [c["name"] for c in doc["categories"] if c["id"]] == DET
    boxes = coco_boxes(tmp_path / "det.json")
    for r in train:
        got = boxes[r["id"]]
        assert len(got) == len(r["pred_det"]["boxes"])
        for g, s in zip(got, r["pred_det"]["boxes"], strict=True):
            for k in ("x1", "y1", "x2", "y2", "score"):
                assert g[k] == pytest.approx(s[k], rel=1e-5, abs=1e-4)
            assert g["label"] == DET[int(np.argmax(s["probs"]))]
    high = col.export(tmp_path / "high.json", model="det", min_score=0.5)
    assert high["annotations"] == sum(b["score"] >= 0.5 for r in rows for b in r["pred_det"]["boxes"])

    # a failed export leaves no file, partial or not
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InvalidArgumentError):
        col.export(tmp_path / "bad.csv", where="nope = 1")
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(InvalidArgumentError, match="format"):
        col.export(tmp_path / "x.txt")
    with pytest.raises(InvalidArgumentError, match="at most one"):
        col.export(tmp_path / "x.csv", where="n = 1", run_id=job.run_id)
    with pytest.raises(InvalidArgumentError, match="COCO needs model"):
        col.export(tmp_path / "x.json")
    with pytest.raises(InvalidArgumentError, match="dataset_version needs dataset"):
        col.export(tmp_path / "x.csv", dataset_version=1)


# -- hostile input ---------------------------------------------------------------------------

HOSTILE = [
    "label = 'a'; DELETE FROM loop",
    "n = 1) OR (n = 2",
    "n = 1 n = 2",
    "no_such_column = 1",
    "label = ",
    "label = 'unterminated",
]


def test_hostile_filters_are_refused_by_every_rpc_and_change_nothing(client, tmp_path):
    col, _ = _pool(client, "hostile", n=40)
    ds = client.create_dataset("hset", "hostile")
    ds.add(ids=["r001"])
    ds.commit("one")
    # settle the background maintenance first (its quiet-time index build is a commit of its
    # own, not a write by a refused call), then hold the version and the rows
    col.optimize().wait(timeout=120)
    version = col.describe()["version"]
    rows = col.query(None, columns=["id", "label", "n", "tags"]).sort_by("id")
    status = ds.status()
    calls = {
        "count": lambda w: col.count(w),
        "scan": lambda w: list(col.scan(w)),
        "query": lambda w: col.query(w),
        "page": lambda w: col.page(w),
        "search": lambda w: col.search("v", [1.0, 0.0, 0.0, 0.0], where=w),
        "delete": lambda w: col.delete(where=w),
        "tag_items": lambda w: col.tag_items(where=w, add="x"),
        "labels": lambda w: col.label_distribution(w),
        "confused": lambda w: col.confused_pairs("m", w),
        "confusion": lambda w: col.confusion("m", w),
        "uncertainty": lambda w: col.class_uncertainty("m", w),
        "histogram": lambda w: col.histogram("score", where=w),
        "export": lambda w: col.export(tmp_path / "h.csv", where=w),
        "dataset add": lambda w: ds.add(where=w),
        "dataset remove": lambda w: ds.remove(where=w),
        "mine": lambda w: col.mine("margin", size=5, model="m", where=w).wait(timeout=60),
    }
    for name, call in calls.items():
        for where in HOSTILE:
            with pytest.raises(InvalidArgumentError):
                call(where)
                pytest.fail(f"{name} ran {where!r}")
    assert col.query(None, columns=["id", "label", "n", "tags"]).sort_by("id").equals(rows)
    assert col.describe()["version"] == version
    assert ds.status() == status
    assert not (tmp_path / "h.csv").exists()

    # values bound as parameters are data, never SQL
    evil = "x' OR '1'='1"
    assert col.count("label = :l", params={"l": evil}) == 0
    assert col.delete(where="label = :l", params={"l": evil}) == 0
    assert col.tag_items(where="text = :t", params={"t": "item 1' OR '1'='1"}, add="x") == 0
    assert ds.add(where="label = :l", params={"l": evil})["changed"] == 0
    assert col.count("text = :t", params={"t": "item 1"}) == 1
    assert col.count("n IN (:ns) AND text LIKE :p", params={"ns": [1, 2], "p": "item 1%"}) == 3  # items 1, 11, 12
    assert col.count("created_at > :t", params={"t": dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)}) == 40
    assert col.count("n > :n", params={"n": -1}) == 40
    assert col.describe()["version"] == version
    with pytest.raises(InvalidArgumentError, match="without a filter"):
        col.count(params={"n": 1})
    with pytest.raises(InvalidArgumentError, match="no params"):  # caught before it is sent
        col.count("label = :l")
    ds.delete()


@pytest.mark.parametrize("where", ["label = $1", "label = ?", "label = :l"])
def test_placeholders_that_reach_the_server_unbound_are_invalid_argument(client, where):
    """Lance's planner panics on SQL placeholders; the server must answer INVALID_ARGUMENT,
    not INTERNAL (the client itself refuses an unbound :name, so it is sent raw here)."""
    _pool(client, "raw", n=40)
    from protos.assay.v1 import query_pb2
    from service.client import Rpc

    rpc = Rpc("query", "Count", query_pb2.CountRequest(collection="raw", where=where))
    with pytest.raises(InvalidArgumentError):
        client._unary(rpc, 30)


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_curation_commands(client, server, tmp_path, capsys):
    col, rows = _pool(client, "clicur", n=80)
    srv = ["--server", server.address]

    def run(*argv: str) -> tuple[int, str, str]:
        code = main([*argv])
        out, err = capsys.readouterr()
        return code, out, err

    job = col.mine("margin", size=10, model="m", where="label IS NULL")
    job.wait(timeout=120)
    picked = sorted(_ids(job.results()))

    code, out, _ = run("tag", "clicur", "--add", "to-label", "--run", job.run_id, *srv)
    assert code == 0 and "10 row" in out
    code, out, _ = run("query", "clicur", "--where", "array_has_any(tags, [:t])", "--param", "t=to-label",
                       "--columns", "id,label", *srv)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == "id\tlabel" and sorted(x.split("\t")[0] for x in lines[1:]) == picked

    assert run("dataset", "create", "cli", "--collection", "clicur", *srv)[0] == 0
    code, out, _ = run("dataset", "add", "cli", "--run", job.run_id, *srv)
    assert code == 0 and "10 added" in out
    code, out, _ = run("dataset", "commit", "cli", "-m", "first", *srv)
    assert code == 0 and "v1" in out
    col.upsert([{"id": picked[0], "label": "c"}])
    code, out, _ = run("dataset", "add", "cli", "--where", "n = :n AND label IS NOT NULL", "--param", "n=3", *srv)
    assert code == 0
    n3 = sorted(r["id"] for r in rows if r["n"] == 3 and r["label"] is not None)
    assert run("dataset", "remove", "cli", "--ids", picked[-1], *srv)[0] == 0
    code, out, _ = run("dataset", "status", "cli", *srv)
    assert code == 0 and f"+{len(n3)} -1" in out
    assert run("dataset", "commit", "cli", "-m", "second", "--author", "me", *srv)[0] == 0
    code, out, err = run("dataset", "diff", "cli", "1", "2", *srv)
    assert code == 0
    assert out.splitlines() == [*(f"+ {i}" for i in n3), f"- {picked[-1]}", f"~ {picked[0]}: null -> c"]
    code, out, _ = run("dataset", "diff", "cli", "1", "2", "--json", *srv)
    assert json.loads(out)["relabeled"] == [{"id": picked[0], "label_before": None, "label_after": "c"}]
    assert run("dataset", "tag", "cli", "1", "before-labels", *srv)[0] == 0
    code, out, _ = run("dataset", "history", "cli", *srv)
    assert code == 0 and out.splitlines()[0].startswith("v2") and "[before-labels]" in out and "me" in out
    target = tmp_path / "cli-v1.parquet"
    code, _, _ = run("dataset", "checkout", "cli", "--version", "before-labels", "--output", str(target), *srv)
    v1 = pq.read_table(target)
    assert code == 0 and _ids(v1) == picked and v1.column("label").null_count == 10
    code, out, _ = run("dataset", "checkout", "cli", "--version", "2", "--columns", "id,label", *srv)
    assert code == 0 and out.splitlines()[0] == "id\tlabel" and len(out.splitlines()) == 1 + 10 - 1 + len(n3)
    code, out, _ = run("dataset", "list", "--collection", "clicur", *srv)
    assert code == 0 and out.startswith("cli\tclicur\tv2")
    code, out, _ = run("dataset", "info", "cli", *srv)
    assert json.loads(out)["tags"] == {"before-labels": 1}

    code, out, _ = run("stats", "clicur", "labels", "--group-by", "split", *srv)
    assert code == 0 and out.split()[:3] == ["label", "split", "count"]
    code, out, _ = run("stats", "clicur", "confused", "--model", "m", "--json", *srv)
    assert code == 0 and sum(r["count"] for r in json.loads(out)) == 80
    code, out, _ = run("stats", "clicur", "histogram", "--field", "score", "--bins", "5", "--where",
                       "split = :s", "--param", "s=train", *srv)
    assert code == 0 and len(out.strip().splitlines()) == 6
    assert run("stats", "clicur", "uncertainty", "--model", "m", "--measure", "margin", *srv)[0] == 0
    assert run("stats", "clicur", "confusion", "--model", "m", "--errors-only", *srv)[0] == 0

    dest = tmp_path / "cli.csv"
    code, out, _ = run("export", "clicur", str(dest), "--dataset", "cli", "--version", "1", "--model", "m", *srv)
    assert code == 0 and "10 rows" in out
    assert sorted(r["id"] for r in read_export(dest)) == picked
    code, out, _ = run("export", "clicur", str(tmp_path / "cli.json"), "--model", "det", "--run", job.run_id, *srv)
    assert code == 0 and "annotations" in out

    # errors: a status code on stderr, exit 2, no traceback
    code, _, err = run("dataset", "commit", "cli", "-m", "nothing", *srv)
    assert code == 2 and "FAILED_PRECONDITION" in err
    code, _, err = run("query", "clicur", "--where", "n = 1; DROP", *srv)
    assert code == 2 and "INVALID_ARGUMENT" in err
    code, _, err = run("query", "clicur", "--where", "label = :l", *srv)  # no --param for :l
    assert code == 2 and "INVALID_ARGUMENT" in err and ":l" in err
    code, _, err = run("dataset", "info", "nope", *srv)
    assert code == 2 and "NOT_FOUND" in err
    assert run("dataset", "delete", "cli", *srv)[0] == 0
    assert client.datasets("clicur") == []
