"""The web page end to end in headless Chromium (Debian's ``chromium``, driven by
Playwright's Python API; never a downloaded browser): log in, open a mining run and see
its thumbnails, the embedding map, a dataset's diff, and stored text shown as text.

Screenshots go to ``$ASSAY_TEST_ARTIFACTS`` (default ``tests/artifacts/``). Without
``/usr/bin/chromium`` these tests are skipped, unless ``ASSAY_REQUIRE_BROWSER=1`` (CI sets
it after installing Chromium) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest

from indexing.samples import digits_table
from service.client import Client
from service.server import ServerConfig, start_server

CHROMIUM = os.environ.get("ASSAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As ENVIRONMENT.md says: no network chatter on a closed network, no sandbox as root.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TOKEN = "e2e-token-5f3c9a"
ARTIFACTS = Path(os.environ.get("ASSAY_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
MINED = 12

if not os.path.exists(CHROMIUM):
    if os.environ.get("ASSAY_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"ASSAY_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM} "
                           "(apt-get install chromium)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "data"
    digits, classes = digits_table(data / "_samples" / "digits")
    server = start_server(ServerConfig(data=str(data), port=0, http_port=0, tokens=(TOKEN,), grace_s=2))
    client = Client(server.address, token=TOKEN, timeout=120)
    col = client.create_collection(
        "digits", spaces={"pixels": {"dim": 64, "metric": "l2", "normalized": False}}, models={"logreg": classes})
    col.upsert(digits, batch_rows=500)
    job = col.mine("margin", size=MINED, model="logreg", where="label IS NULL")
    job.wait()
    ds = client.create_dataset("train", "digits")
    ds.add(run_id=job.run_id)
    ds.commit("the first uncertain digits")
    ds.add(ids=["digit-00001", "digit-00002"])
    ds.commit("two more")
    notes = client.create_collection("notes", spaces={"v": {"dim": 2, "metric": "cosine"}})
    notes.upsert(pa.table({
        "id": ["n1", "n2"],
        "text": ['<img src=x onerror="window.__pwned=1"> is a label', "a harmless note"],
        "emb_v": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0.0, 0.9, 0.1], pa.float32()), 2),
    }))
    scenes = client.create_collection("scenes", models={"det": {"classes": ["car", "person"], "task": "detection"}})
    scenes.upsert([{"id": f"s{i}", "pred_det": {"boxes": [
        {"x1": 0, "y1": 0, "x2": 10 + i, "y2": 10, "score": 0.9, "probs": [0.7, 0.3]},
        {"x1": 50, "y1": 50, "x2": 60, "y2": 70, "score": 0.4, "probs": [0.45, 0.55] if i % 2 else None}]},
        "gt_boxes": [{"x1": 0, "y1": 0, "x2": 10 + i, "y2": 10, "label": "car" if i % 3 else "person"}]}
        for i in range(6)])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield {"base": server.web_url, "job": job, "results": job.results(["true_label"]).to_pylist()}
    client.close()
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        # Playwright starts Chromium headless with a new, empty profile (user data dir) of its own.
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.errors = errors
    yield pg
    context.close()


def _thumbs_loaded(pg) -> list[int]:
    """naturalWidth of each thumbnail on the page (-1 while one is still loading)."""
    return pg.eval_on_selector_all("img.assay-thumb", "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)")


def _all_loaded(pg, n: int) -> list[int] | None:
    widths = _thumbs_loaded(pg)
    return widths if len(widths) == n and -1 not in widths else None


def _until(check, timeout: float = 30.0):
    """Poll ``check()`` until it returns a true value (page.wait_for_function would need
    'unsafe-eval', which the page's Content-Security-Policy rightly refuses)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last value {value!r}")
        time.sleep(0.1)


def test_open_a_run_and_see_its_thumbnails(site, page):
    page.goto(site["base"] + "#token=" + TOKEN)
    page.get_by_role("heading", name="Collections").wait_for()
    assert "token" not in page.url  # the token left the address bar
    page.locator("a.panel", has_text="digits").click()
    page.get_by_role("link", name="Mining runs", exact=True).click()
    page.locator("a.run-link").first.click()
    widths = _until(lambda: _all_loaded(page, MINED))
    assert len(widths) == MINED and all(w > 0 for w in widths), widths
    cards = page.locator("figure.assay-card")
    for i, row in enumerate(site["results"]):
        card = cards.nth(i)
        assert card.locator(".assay-rank").inner_text() == f"#{row['rank']}"
        assert card.locator(".assay-id").inner_text() == row["id"]
        shown = float(card.locator(".assay-score").inner_text().removeprefix("score "))
        assert shown == pytest.approx(row["score"], rel=1e-3)
    assert page.locator("h1").inner_text().startswith(f"Mining run {site['job'].run_id[:8]} — margin on digits")
    page.screenshot(path=str(ARTIFACTS / "web-run.png"), full_page=True)
    assert page.errors == []


def test_login_form_refuses_a_wrong_token(site, page):
    page.goto(site["base"])
    page.locator("#login").wait_for(state="visible")
    page.fill("#token", "not-the-token")
    page.click("#login button")
    page.get_by_text("invalid token").wait_for()
    page.fill("#token", TOKEN)
    page.click("#login button")
    page.locator("a.panel", has_text="digits").wait_for()
    assert page.locator("#login").is_hidden()
    page.click("#logout")
    page.locator("#login").wait_for(state="visible")


def test_embedding_map_with_the_run_picks(site, page):
    page.goto(site["base"] + "#token=" + TOKEN)
    page.locator("a.panel", has_text="digits").wait_for()
    page.goto(site["base"] + f"#/c/digits/map?run={site['job'].run_id}")
    note = page.get_by_text(f"{MINED} picks of the run ringed")
    note.wait_for()
    assert "1,797 of 1,797 rows" in note.inner_text()
    box = page.locator("canvas.map").bounding_box()
    assert box["width"] > 600 and box["height"] > 400
    # Pixels were drawn: the canvas is not blank.
    drawn = page.eval_on_selector("canvas.map", """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert drawn > 5000
    page.screenshot(path=str(ARTIFACTS / "web-map.png"))
    assert page.errors == []


def test_dataset_history_and_diff(site, page):
    page.goto(site["base"] + "#token=" + TOKEN)
    page.locator("a.panel", has_text="digits").wait_for()
    page.goto(site["base"] + "#/d/train")
    page.locator(".diff-summary").wait_for()
    assert page.locator(".diff-summary").inner_text() == "v1 → v2: 2 added, 0 removed, 0 relabeled"
    assert page.locator("table tr").count() == 3  # header + two commits
    page.select_option("select[name=v1]", "0")
    page.click("form.row button")
    page.get_by_text(f"v0 → v2: {MINED + 2} added, 0 removed, 0 relabeled").wait_for()
    widths = _until(lambda: _all_loaded(page, MINED + 2))
    assert all(w > 0 for w in widths)
    assert "null" not in page.locator("main").inner_text()  # no empty section rendered as "null"
    page.screenshot(path=str(ARTIFACTS / "web-dataset.png"), full_page=True)
    assert page.errors == []


def test_stored_text_is_shown_as_text(site, page):
    page.goto(site["base"] + "#token=" + TOKEN)
    page.locator("a.panel", has_text="notes").wait_for()
    page.goto(site["base"] + "#/c/notes/search?like=n2")
    quote = page.locator("blockquote.assay-text")
    quote.wait_for()
    assert quote.inner_text() == '<img src=x onerror="window.__pwned=1"> is a label'
    assert page.locator("blockquote.assay-text img").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_uncertainty_vs_quality_tab(site, page):
    page.goto(site["base"] + "#token=" + TOKEN)
    page.locator("a.panel", has_text="digits").wait_for()
    page.goto(site["base"] + "#/c/digits/quality?model=logreg")
    page.locator("dd.rho").wait_for()
    req = urllib.request.Request(
        site["base"].rstrip("/") + "/api/collections/digits/uncertainty_quality?model=logreg&uncertainty=entropy&quality=correct"
        "&max_ids=20", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as res:
        want = json.loads(res.read())
    assert want["n"] > 0
    for q in want["quadrants"]:
        cell = page.locator(f"td[data-quadrant={q['quadrant']}]")
        assert cell.locator(".num b").inner_text() == f"{q['count']:,}"
        shown = cell.locator(".ids").inner_text().replace("…", "").split()
        assert shown == q["ids"]
    assert "p =" in page.locator("dd.rho").inner_text()
    page.screenshot(path=str(ARTIFACTS / "web-uncertainty-quality.png"), full_page=True)
    assert page.errors == []


def test_boxes_tab(site, page):
    page.goto(site["base"] + "#token=" + TOKEN)
    page.locator("a.panel", has_text="scenes").wait_for()
    page.goto(site["base"] + "#/c/scenes/boxes?model=det&objects_where=" + urllib.parse.quote("score > 0.5"))
    page.locator("table[data-kind=objects]").wait_for()

    def api(kind: str) -> list[dict]:
        req = urllib.request.Request(
            site["base"].rstrip("/") + f"/api/collections/scenes/boxes/{kind}?model=det&objects_where=score%20%3E%200.5",
            headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=60) as res:
            return json.loads(res.read())["rows"]

    bars = page.locator("[data-kind=object_classes] span.num").all_inner_texts()
    assert bars == [f"{r['count']:,}" for r in api("object_classes")] == ["6"]
    for kind in ("box_confusion", "box_confused_pairs", "objects"):
        shown = page.locator(f"table[data-kind={kind}] tr")
        assert shown.count() == len(api(kind)) + 1 > 1, kind  # a header row, then one per row
    first = page.locator("table[data-kind=box_confused_pairs] tr").nth(1).locator("td").all_inner_texts()
    assert first[:3] == ["car", "person", "6"]
    page.screenshot(path=str(ARTIFACTS / "web-boxes.png"), full_page=True)
    assert page.errors == []
