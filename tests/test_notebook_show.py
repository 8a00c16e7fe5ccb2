"""Notebook grids (``job.show()``, ``client.show(...)``) against a real server on loopback.

One server with a token and a web port serves three collections: the sample digits (PNG
files, a logistic regression's probs) mined with ``margin``; hand-made images of several
sizes inside and outside the server's data roots with predictions as probs, as logits or
missing; and texts that try to inject HTML.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import re
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from indexing.samples import digits_table
from service.client import AsyncClient, Client, InvalidArgumentError, MiningJob
from service.notebook import Grid
from service.server import ServerConfig, start_server
from service.web.gallery import grid_css

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "nb-token"
SHAPES = {  # id -> (file, size); "far" lies outside the data roots
    "big": ("img/shapes/big.png", (200, 120)),
    "tall": ("img/shapes/tall.png", (90, 300)),
    "tiny": ("img/shapes/tiny.png", (40, 30)),
    "far": ("outside/far.png", (50, 50)),
}
HOSTILE = "<script>alert(1)</script>"


# -- fixtures ----------------------------------------------------------------------------------


def _png(path, size, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    server = start_server(ServerConfig(data=str(root / "data"), port=0, http_port=0, grace_s=1,
                                       tokens=(TOKEN,), data_roots=(str(root / "img"),)))
    try:
        with Client(server.address, token=TOKEN, timeout=60, web_url=server.web_url) as client:
            digits, classes = digits_table(root / "img" / "digits")
            col = client.create_collection(
                "digits", spaces={"pixels": {"dim": 64, "metric": "l2", "normalized": False}},
                models={"logreg": classes})
            col.upsert(digits)
            job = col.mine("margin", size=20, model="logreg", where="label IS NULL")
            job.wait(60)

            shapes = client.create_collection("shapes", models={"m": ["cat", "dog", "<b>owl</b>"]})
            logits = [0.5, 2.0, -1.0]
            shapes.upsert([
                {"id": "big", "uri": _png(root / SHAPES["big"][0], SHAPES["big"][1], 0), "label": "dog",
                 "pred_m": {"probs": [0.1, 0.2, 0.7]}},
                {"id": "tall", "uri": _png(root / SHAPES["tall"][0], SHAPES["tall"][1], 1),
                 "pred_m": {"logits": logits}},
                {"id": "tiny", "uri": _png(root / SHAPES["tiny"][0], SHAPES["tiny"][1], 2), "label": "<i>cat</i>"},
                {"id": "far", "uri": _png(root / SHAPES["far"][0], SHAPES["far"][1], 3),
                 "pred_m": {"probs": [0.6, 0.3, 0.1]}},
                {"id": "gone", "uri": str(root / "img" / "shapes" / "gone.png")},
                {"id": "s3", "uri": "s3://bucket/key.png"},
            ])

            texts = client.create_collection("texts")
            texts.upsert([
                {"id": "t1", "text": f"before {HOSTILE} after & \"quoted\"", "label": "x"},
                {"id": "t2", "text": "plain words " * 60},
            ])
            yield {"server": server, "client": client, "job": job, "root": root, "classes": classes,
                   "logits": logits}
    finally:
        server.stop()


# -- reading the HTML back ---------------------------------------------------------------------


class _Cards(HTMLParser):
    """Per card: rank, score text, id, label, prediction text, img src, text snippet, no-thumb text."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self._field: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "figure" and cls == "assay-card":
            self.cards.append({})
        elif tag == "img" and cls == "assay-thumb":
            self.cards[-1]["src"] = a["src"]
        elif cls in ("assay-rank", "assay-score", "assay-id", "assay-label", "assay-pred", "assay-text",
                     "assay-nothumb"):
            self._field = cls.removeprefix("assay-")
            self.cards[-1].setdefault(self._field, "")

    def handle_endtag(self, tag):
        if tag in ("span", "div", "blockquote"):
            self._field = None

    def handle_data(self, data):
        if self._field and self.cards:
            self.cards[-1][self._field] += data


def cards(grid: Grid) -> list[dict]:
    parser = _Cards()
    parser.feed(grid.html)
    return parser.cards


def decode(src: str) -> Image.Image:
    m = re.fullmatch(r"data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)", src)
    assert m, src[:80]
    im = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
    im.load()
    assert im.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[m.group(1)]
    return im


def fitted(size: tuple[int, int], box: int) -> tuple[int, int]:
    """What PIL's thumbnail() gives: the image shrunk (never grown) to fit box x box."""
    w, h = size
    if max(w, h) <= box:
        return w, h
    return (box, round(h * box / w)) if w >= h else (round(w * box / h), box)


# -- mining runs -------------------------------------------------------------------------------


def _check_run_grid(grid: Grid, job: MiningJob, classes: list[str], limit: int) -> list[dict]:
    results = job.results(columns=["label", "uri", "pred_logreg"])
    got = cards(grid)
    assert len(got) == len(grid.items) == min(limit, results.num_rows)
    rows = results.slice(0, len(got)).to_pylist()
    for card, item, row in zip(got, grid.items, rows, strict=True):
        assert item["id"] == row["id"] and card["id"] == row["id"]
        assert item["rank"] == row["rank"] and card["rank"] == f"#{row['rank']}"
        assert item["score"] == row["score"] and card["score"] == f"score {row['score']:.4g}"
        top = int(np.argmax(np.asarray(row["pred_logreg"]["probs"], np.float64)))
        assert item["prediction"]["class"] == classes[top]
        assert item["prediction"]["confidence"] == pytest.approx(row["pred_logreg"]["probs"][top], abs=1e-6)
        assert card["pred"] == f"logreg: {classes[top]} ({row['pred_logreg']['probs'][top]:.2f})"
        assert card["label"] == f"label {row['label'] or '–'}"
        im = decode(card["src"])
        assert im.size == fitted(Image.open(row["uri"]).size, 160) == (32, 32)
    assert [c["rank"] for c in got] == [f"#{i}" for i in range(1, len(got) + 1)]
    return got


def test_job_show_via_web_url_matches_results(env):
    job = env["job"]
    grid = job.show()  # the client's web_url, with its token
    assert grid._repr_html_() == grid.html and grid.thumb_errors == {}
    got = _check_run_grid(grid, job, env["classes"], 60)
    assert len(got) == 20
    assert "margin run" in grid.title and "20 of 20" in grid.title


def test_job_show_from_local_files_without_web_url(env):
    server, job = env["server"], env["job"]
    with Client(server.address, token=TOKEN) as plain:  # no web_url: PIL reads the PNGs here
        local = plain.mining_job(job.run_id).show(limit=8)
    via_web = job.show(limit=8)
    _check_run_grid(local, job, env["classes"], 8)
    assert local.thumb_errors == {}
    for a, b in zip(cards(local), cards(via_web), strict=True):
        assert np.array_equal(np.asarray(decode(a["src"])), np.asarray(decode(b["src"])))


def test_client_show_by_run_id_and_async(env):
    client, job, server = env["client"], env["job"], env["server"]
    grid = client.show(job.run_id, limit=5, size=64)
    assert [it["rank"] for it in grid.items] == [1, 2, 3, 4, 5]
    assert [it["id"] for it in grid.items] == job.results()["id"].to_pylist()[:5]

    async def main() -> Grid:
        async with AsyncClient(server.address, token=TOKEN, web_url=server.web_url) as aclient:
            ajob = await aclient.mining_job(job.run_id)
            return await ajob.show(limit=3)

    agrid = asyncio.run(main())
    assert [it["id"] for it in agrid.items] == [it["id"] for it in grid.items[:3]]
    assert len(agrid.thumbs) == 3


def test_show_loads_neither_the_store_nor_duckdb_nor_torch(env, tmp_path):
    """A notebook with only the client: drawing grids (a run's picks with thumbnails from the
    web port, a table's rows with predictions and local thumbnails) imports no lancedb,
    DuckDB or torch, and of indexing/ only the leaves the client and the grid share."""
    server, job = env["server"], env["job"]
    heavy = ("lancedb", "lance", "duckdb", "torch", "sentence_transformers", "sklearn")
    code = f"""
import sys
from service.client import Client
with Client({server.address!r}, token={TOKEN!r}, web_url={server.web_url!r}) as client:
    run = client.show({job.run_id!r}, limit=4)
    job = client.mining_job({job.run_id!r})
    again = job.show(limit=2, web_url="")
    table = client.collection("shapes").query(columns=["id"])
    shapes = client.show(table, collection="shapes")
assert len(run) == 4 and len(run.thumbs) == 4 and len(again) == 2, (run, again)
assert any(it["prediction"] for it in shapes.items), shapes.items
print(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r}))
print(sorted(m for m in sys.modules if m.split(".")[0] == "indexing"))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded_heavy, loaded_indexing = out.stdout.strip().splitlines()
    assert loaded_heavy == "[]"
    assert set(ast.literal_eval(loaded_indexing)) <= {"indexing", "indexing.errors", "indexing.filters",
                                          "indexing.images", "indexing.measures", "indexing.predictions",
                                          "indexing.settings"}, loaded_indexing


# -- tables: sizes, roots, predictions, failures ------------------------------------------------


def test_table_show_sizes_roots_and_predictions(env):
    client, root = env["client"], env["root"]
    table = client.collection("shapes").query(columns=["id"])
    assert "pred_m" not in table.column_names  # read by show() with take
    by_id = {it["id"]: it for it in client.show(table, collection="shapes").items}

    for size in (160, 64):
        grid = client.show(table, collection="shapes", size=size)
        got = {c["id"]: c for c in cards(grid)}
        assert set(got) == {"big", "tall", "tiny", "far", "gone", "s3"}
        for name in ("big", "tall", "tiny"):
            im = decode(got[name]["src"])
            assert im.size == fitted(SHAPES[name][1], size)
            assert im.format == ("PNG" if max(im.size) < 64 else "JPEG")
        # Outside the data roots, a missing file, an object-store image: cards without thumbnails.
        for name in ("far", "gone", "s3"):
            assert "src" not in got[name] and got[name]["nothumb"]
        assert "403" in grid.thumb_errors["far"] and "gone" in grid.thumb_errors
        assert got["far"]["nothumb"] == str(root / SHAPES["far"][0])

    # Predictions: argmax of probs, else of softmax(logits); none without either.
    assert by_id["big"]["prediction"] == {"model": "m", "class": "<b>owl</b>", "confidence": pytest.approx(0.7)}
    z = np.exp(np.asarray(env["logits"]) - max(env["logits"]))
    assert by_id["tall"]["prediction"]["class"] == "dog"
    assert by_id["tall"]["prediction"]["confidence"] == pytest.approx(z.max() / z.sum(), rel=1e-6)
    assert by_id["tiny"]["prediction"] is None and "pred" not in got["tiny"]
    # Class names and labels are text, never markup.
    assert got["big"]["pred"] == "m: <b>owl</b> (0.70)" and got["tiny"]["label"] == "label <i>cat</i>"
    assert "m: <b>&lt;b&gt;owl&lt;/b&gt;</b>" in grid.html and "<b>owl</b>" not in grid.html
    assert "&lt;i&gt;cat&lt;/i&gt;" in grid.html and "<i>cat</i>" not in grid.html


def test_table_show_from_local_files_reads_outside_the_roots(env):
    """Without a web URL the notebook reads what it can read itself: the server's roots do not apply."""
    client = env["client"]
    table = client.collection("shapes").query(columns=["id", "uri"])
    grid = client.show(table, collection="shapes", web_url="")
    got = {c["id"]: c for c in cards(grid)}
    assert decode(got["far"]["src"]).size == SHAPES["far"][1]
    assert decode(got["big"]["src"]).size == fitted(SHAPES["big"][1], 160)
    assert set(grid.thumb_errors) == {"gone", "s3"}
    assert "web_url" in grid.thumb_errors["s3"]


def test_unreachable_web_url_gives_cards_without_thumbnails(env):
    client = env["client"]
    table = client.collection("shapes").query(columns=["id"])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    with pytest.warns(UserWarning, match="no thumbnails for the 6 items"):
        grid = client.show(table, collection="shapes", web_url=closed)
    assert len(grid.items) == 6 and grid.thumbs == {} and "src" not in grid.html
    assert set(grid.thumb_errors) == {"big", "tall", "tiny", "far", "gone", "s3"}


def test_search_results_show_distances(env):
    client = env["client"]
    hits = client.collection("digits").search("pixels", ids=["digit-00003"], k=4, columns=["id", "label"])
    grid = client.show(hits, collection="digits")
    got = cards(grid)
    assert [c["id"] for c in got] == hits["id"].to_pylist()
    assert [c["score"] for c in got] == [f"distance {d:.4g}" for d in hits["_distance"].to_pylist()]
    assert all(decode(c["src"]).size == (32, 32) for c in got)


# -- text, escaping, saving, arguments ---------------------------------------------------------


def test_text_collection_shows_escaped_snippets(env):
    client = env["client"]
    grid = client.show(client.collection("texts").query(columns=["id"]), collection="texts")
    got = {c["id"]: c for c in cards(grid)}
    assert got["t1"]["text"] == f"before {HOSTILE} after & \"quoted\""  # as text, once parsed
    assert HOSTILE not in grid.html and "&lt;script&gt;alert(1)&lt;/script&gt;" in grid.html
    assert "<script" not in grid.html.lower()
    assert got["t2"]["text"].endswith("…") and len(got["t2"]["text"]) <= 281
    assert grid.thumbs == {} and grid.thumb_errors == {}


def test_save_writes_a_standalone_page(env, tmp_path):
    grid = env["job"].show(limit=4)
    out = grid.save(tmp_path / "picks.html")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and grid_css() in page and grid.html in page
    assert page.count('class="assay-card"') == 4 and page.count('src="data:image/png;base64,') == 4
    assert repr(grid).startswith("Grid(4 items, 4 thumbnails")


def test_bad_arguments(env):
    client, job = env["client"], env["job"]
    with pytest.raises(InvalidArgumentError, match="size"):
        job.show(size=100)
    with pytest.raises(InvalidArgumentError, match="limit"):
        job.show(limit=0)
    with pytest.raises(InvalidArgumentError, match="collection="):
        client.show(pa.table({"id": ["digit-00001"]}))
    with pytest.raises(InvalidArgumentError, match="'id'"):
        client.show(pa.table({"x": [1]}), collection="digits")
    with pytest.raises(InvalidArgumentError, match="MiningJob"):
        client.show(42, collection="digits")
