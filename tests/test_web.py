"""The web port's HTTP handlers, through a real server on loopback (gRPC + uvicorn):
auth (tokens, sessions, read-only), thumbnails served only from the data roots, and the
JSON views checked against direct computations on the same data."""

from __future__ import annotations

import http.client
import io
import json
import os
from collections import Counter
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from service.client import Client
from service.server import ServerConfig, start_server
from service.web.views import pca_2d

RW, RO = "rw-token-0123456789", "ro-token-9876543210"
N, DIM, CLASSES = 60, 8, ["cat", "dog", "owl"]


def request(base: str, path: str, *, token: str | None = None, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One raw HTTP request (the path is sent as given: no normalisation of '..')."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=body, headers=hdrs)
        res = conn.getresponse()
        return res.status, res.headers, res.read()
    finally:
        conn.close()


def get_json(base: str, path: str, token: str | None = RO, **kw) -> tuple[int, dict]:
    status, _, data = request(base, path, token=token, **kw)
    return status, json.loads(data)


def png(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 128)).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server (read-write + read-only tokens, web port) over a collection of PNGs with a
    space, labels and a model's probabilities, plus hostile uris; a finished margin run; a
    dataset with two commits."""
    tmp = tmp_path_factory.mktemp("web")
    data = tmp / "data"
    images = data / "images"
    outside = tmp / "outside"
    rng = np.random.default_rng(3)
    for i in range(N):
        png(images / f"img_{i:03d}.png", (40 + i, 30 + (i % 7) * 10), (i * 4) % 256)
    png(outside / "secret.png", (50, 50), 7)
    (images / "not_an_image.png").write_bytes(b"this is not a png")
    os.symlink(outside / "secret.png", images / "link_out.png")
    hostile = {
        "h-abs": "/etc/passwd",
        "h-dotdot": str(images / ".." / ".." / "outside" / "secret.png"),
        "h-symlink": str(images / "link_out.png"),
        "h-file-uri": "file:///etc/hostname",
        "h-s3": "s3://bucket/images/x.png",
        "h-http": "http://example.com/a.png",
        "h-relative": "../../outside/secret.png",
        "h-notimage": str(images / "not_an_image.png"),
    }
    ids = [f"item-{i:03d}" for i in range(N)]
    centers = rng.normal(0, 4, (3, DIM))
    truth = rng.integers(0, 3, N)
    vectors = (centers[truth] + rng.normal(0, 1, (N, DIM))).astype(np.float32)
    logits = rng.normal(0, 1.5, (N, 3)) + 2 * np.eye(3)[truth]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = [CLASSES[t] if i % 3 == 0 else None for i, t in enumerate(truth)]
    all_ids = ids + list(hostile)
    n_all = len(all_ids)
    more = rng.normal(0, 4, (len(hostile), DIM)).astype(np.float32)
    table = pa.table({
        "id": all_ids,
        "uri": [str(images / f"img_{i:03d}.png") for i in range(N)] + list(hostile.values()),
        "label": labels + [None] * len(hostile),
        "emb_v": pa.FixedSizeListArray.from_arrays(pa.array(np.vstack([vectors, more]).ravel()), DIM),
        "pred_m": pa.StructArray.from_arrays(
            [pa.array([p.astype(np.float32).tolist() for p in probs] + [[1 / 3] * 3] * len(hostile),
                      pa.list_(pa.float32()))], names=["probs"]),
    })
    server = start_server(ServerConfig(data=str(data), port=0, http_port=0, tokens=(RW,), read_tokens=(RO,),
                                       grace_s=2))
    client = Client(server.address, token=RW, timeout=120)
    col = client.create_collection("pics", spaces={"v": {"dim": DIM, "metric": "l2", "normalized": False}},
                                   models={"m": CLASSES})
    col.upsert(table)
    job = col.mine("margin", size=12, model="m", where="label IS NULL AND id LIKE 'item-%'")
    job.wait()
    ds = client.create_dataset("train", "pics")
    ds.add(ids=ids[:10])
    ds.commit("first ten")
    ds.add(ids=ids[10:14])
    ds.remove(ids=ids[:2])
    ds.commit("four more, two out")
    texts = client.create_collection("notes", spaces={"v": {"dim": 4, "metric": "cosine"}})
    texts.upsert(pa.table({"id": ["n1", "n2"], "text": ["<script>alert(1)</script> hello", "plain " * 100],
                           "emb_v": pa.FixedSizeListArray.from_arrays(pa.array(
                               np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32).ravel()), 4)}))
    yield {"server": server, "base": server.web_url, "client": client, "col": col, "job": job, "ids": ids,
           "vectors": np.vstack([vectors, more]).astype(np.float64), "probs": probs, "labels": labels,
           "all_ids": all_ids, "n_all": n_all, "hostile": hostile, "images": images, "data": data}
    client.close()
    server.stop()


# -- auth --------------------------------------------------------------------------------


def test_api_needs_a_token_and_accepts_both_kinds(world):
    base = world["base"]
    for path in ("/api/collections", "/api/collections/pics", f"/api/runs/{world['job'].run_id}",
                 "/api/thumb?c=pics&id=item-000", "/api/datasets/train", "/api/collections/pics/map"):
        status, headers, body = request(base, path)
        assert status == 401, path
        assert json.loads(body)["error"]["code"] == "UNAUTHENTICATED"
        assert headers["WWW-Authenticate"] == "Bearer"
        assert request(base, path, token="wrong-token")[0] == 401
    for token in (RO, RW):
        status, cols = get_json(base, "/api/collections", token)
        assert status == 200 and {c["name"] for c in cols} == {"pics", "notes"}


def test_page_shell_is_public_but_holds_no_data(world):
    base = world["base"]
    status, headers, body = request(base, "/")
    assert status == 200 and b'<script src="/static/app.js"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, js = request(base, "/static/app.js")
    assert status == 200 and b"textContent" in js
    status, info = get_json(base, "/api/info", None)
    assert status == 200 and info == {"service": "assay", "auth_required": True, "authenticated": False}


def test_login_session_cookie_and_logout(world):
    base = world["base"]
    status, _, body = request(base, "/api/login", method="POST", body=json.dumps({"token": "nope"}).encode(),
                              headers={"Content-Type": "application/json"})
    assert status == 401 and json.loads(body)["error"]["message"] == "invalid token"
    status, headers, _ = request(base, "/api/login", method="POST", body=json.dumps({"token": RO}).encode(),
                                 headers={"Content-Type": "application/json"})
    assert status == 200
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("SameSite=Strict", "SameSite=strict")
    session = cookie.split(";")[0]
    status, cols = get_json(base, "/api/collections", None, headers={"Cookie": session})
    assert status == 200 and len(cols) == 2
    status, info = get_json(base, "/api/info", None, headers={"Cookie": session})
    assert info["authenticated"] and info["grpc_address"] == world["server"].address
    request(base, "/api/logout", method="POST", headers={"Cookie": session})
    assert request(base, "/api/collections", headers={"Cookie": session})[0] == 401
    assert request(base, "/api/collections", headers={"Cookie": "assay_session=forged"})[0] == 401
    status, _, body = request(base, "/api/login", method="POST", body=b"not json",
                              headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == "INVALID_ARGUMENT"


def test_the_api_is_read_only(world):
    base = world["base"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, _, body = request(base, "/api/collections/pics", token=RW, method=method, body=b"{}")
        assert status == 405, method
        assert "read-only" in json.loads(body)["error"]["message"]
    assert world["col"].count() == world["n_all"]


def test_rate_limit_and_login_throttle(tmp_path):
    server = start_server(ServerConfig(data=str(tmp_path), port=0, http_port=0, tokens=(RW,), rate_limit=0.5,
                                       rate_burst=2, grace_s=1))
    try:
        base = server.web_url
        codes = [request(base, "/api/collections", token=RW)[0] for _ in range(3)]
        assert codes == [200, 200, 429]
        status, body = get_json(base, "/api/collections", RW)
        assert status == 429 and "0.5 calls/s (burst 2)" in body["error"]["message"]
        logins = [request(base, "/api/login", method="POST", body=json.dumps({"token": f"guess{i}"}).encode(),
                          headers={"Content-Type": "application/json"})[0] for i in range(14)]
        assert logins[0] == 401 and logins[-1] == 429
    finally:
        server.stop()


def test_without_tokens_only_loopback_host_names_are_answered(tmp_path):
    server = start_server(ServerConfig(data=str(tmp_path), port=0, http_port=0, grace_s=1))
    try:
        base = server.web_url
        assert request(base, "/api/collections")[0] == 200
        port = urlsplit(base).port
        assert request(base, "/api/collections", headers={"Host": f"localhost:{port}"})[0] == 200
        status, _, body = request(base, "/api/collections", headers={"Host": f"attacker.example:{port}"})
        assert status == 403 and "loopback" in json.loads(body)["error"]["message"]
        assert request(base, "/", headers={"Host": "rebind.attacker.example"})[0] == 403
    finally:
        server.stop()


# -- thumbnails ----------------------------------------------------------------------------


def test_thumbnails_of_images_inside_the_data_root(world):
    base = world["base"]
    for i, size in ((0, 160), (52, 64), (59, 64)):  # 40x30 kept; 92x60 and 99x60 shrunk to 64 wide
        status, headers, body = request(base, f"/api/thumb?c=pics&id=item-{i:03d}&s={size}", token=RO)
        assert status == 200
        im = Image.open(io.BytesIO(body)).convert("RGB")
        w, h = 40 + i, 30 + (i % 7) * 10
        assert max(im.size) == min(size, w) and im.size[1] == round(h * min(1.0, size / w))
        # The row's own image: its solid colour, within JPEG's error.
        assert np.abs(np.asarray(im.getpixel((im.size[0] // 2, im.size[1] // 2))) -
                      [(i * 4) % 256, 255 - (i * 4) % 256, 128]).max() <= 6
        assert headers["Content-Type"] in ("image/png", "image/jpeg") and headers["ETag"]
        again = request(base, f"/api/thumb?c=pics&id=item-{i:03d}&s={size}", token=RO,
                        headers={"If-None-Match": headers["ETag"]})
        assert again[0] == 304


@pytest.mark.parametrize("item, status, code", [
    ("h-abs", 403, "PERMISSION_DENIED"),
    ("h-dotdot", 403, "PERMISSION_DENIED"),
    ("h-symlink", 403, "PERMISSION_DENIED"),
    ("h-file-uri", 403, "PERMISSION_DENIED"),
    ("h-s3", 403, "PERMISSION_DENIED"),
    ("h-relative", 403, "PERMISSION_DENIED"),
    ("h-http", 400, "INVALID_ARGUMENT"),
    ("h-notimage", 400, "INVALID_ARGUMENT"),
])
def test_thumbnails_outside_the_data_roots_are_refused(world, item, status, code):
    got, headers, body = request(world["base"], f"/api/thumb?c=pics&id={quote(item)}", token=RW)
    err = json.loads(body)["error"]
    assert (got, err["code"]) == (status, code), err
    assert headers["Content-Type"] == "application/json"
    if status == 403:
        assert "outside the data roots" in err["message"] or "segments" in err["message"]
    assert b"root:" not in body  # never a byte of the file


@pytest.mark.parametrize("path", [
    "/api/thumb?c=pics&id=../../../../etc/passwd",
    "/api/thumb?c=../pics&id=item-000",
    "/api/thumb?c=pics&id=item-000&s=10000",
    "/api/thumb?c=pics&id=item-000&s=abc",
    "/api/thumb?c=pics",
    "/api/thumb?c=nope&id=item-000",
    "/api/thumb?c=notes&id=n1",
])
def test_bad_thumbnail_requests(world, path):
    status, _, body = request(world["base"], path, token=RW)
    assert status in (400, 404), (path, status)
    assert json.loads(body)["error"]["message"]


@pytest.mark.parametrize("path", [
    "/static/../service/web/app.py", "/static/%2e%2e/app.py", "/static/..%2f..%2fpyproject.toml",
    "/static/../../../../etc/passwd", "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
])
def test_static_files_do_not_escape_their_folder(world, path):
    status, _, body = request(world["base"], path)
    assert status == 404
    assert b"import" not in body and b"root:" not in body


# -- views against direct computations ----------------------------------------------------------


def test_collection_detail_counts_labels(world):
    status, info = get_json(world["base"], "/api/collections/pics")
    assert status == 200 and info["rows"] == world["n_all"] and info["kind"] == "image"
    expected = Counter(x for x in world["labels"] if x is not None)
    assert {r["label"]: r["count"] for r in info["labels"]} == dict(expected)
    assert info["labeled"] == sum(expected.values()) and info["unlabeled"] == world["n_all"] - info["labeled"]
    assert info["runs"][0]["run_id"] == world["job"].run_id and info["runs"][0]["state"] == "SUCCEEDED"
    assert [d["name"] for d in info["datasets"]] == ["train"]
    assert get_json(world["base"], "/api/collections/nope")[0] == 404


def test_run_grid_matches_results_and_predictions(world):
    job, base = world["job"], world["base"]
    results = job.results(["uri", "label"]).to_pylist()
    status, page = get_json(base, f"/api/runs/{job.run_id}?limit=200")
    assert status == 200 and page["total"] == 12 == len(page["items"])
    index = {i: n for n, i in enumerate(world["all_ids"])}
    for item, row in zip(page["items"], results, strict=True):
        assert (item["id"], item["rank"], item["uri"]) == (row["id"], row["rank"], row["uri"])
        assert item["score"] == pytest.approx(row["score"])
        p = world["probs"][index[item["id"]]].astype(np.float32)
        assert item["prediction"]["class"] == CLASSES[int(p.argmax())]
        assert item["prediction"]["confidence"] == pytest.approx(float(p.max()), rel=1e-6)
        top2 = np.sort(p)[::-1][:2]
        assert item["score"] == pytest.approx(1 - (top2[0] - top2[1]), abs=1e-5)  # margin score, by definition
    first = get_json(base, f"/api/runs/{job.run_id}?offset=0&limit=5")[1]["items"]
    rest = get_json(base, f"/api/runs/{job.run_id}?offset=5&limit=200")[1]["items"]
    assert first + rest == page["items"]
    for bad in ("limit=0", "limit=201", "offset=-1", "limit=x"):
        status, body = get_json(base, f"/api/runs/{job.run_id}?{bad}")
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT", bad
    assert get_json(base, "/api/runs/0123456789abcdef")[0] == 404


def test_similar_items_equal_brute_force(world):
    vectors, ids = world["vectors"], world["all_ids"]
    status, res = get_json(world["base"], "/api/collections/pics/search?like=item-004&k=7")
    assert status == 200 and res["space"] == "v"
    d = ((vectors - vectors[4]) ** 2).sum(1)
    d[4] = np.inf
    order = np.argsort(d, kind="stable")[:7]
    assert [it["id"] for it in res["items"]] == [ids[i] for i in order]
    assert [it["distance"] for it in res["items"]] == pytest.approx(d[order].tolist(), rel=1e-4)
    status, res = get_json(world["base"], "/api/collections/pics/search?like=item-004&k=5&where=label%20IS%20NULL")
    assert all(world["labels"][ids.index(it["id"])] is None for it in res["items"] if it["id"].startswith("item"))


@pytest.mark.parametrize("query, status, code", [
    ("q=cats", 409, "FAILED_PRECONDITION"),  # space without a text model
    ("like=item-001&q=x", 400, "INVALID_ARGUMENT"),
    ("", 400, "INVALID_ARGUMENT"),
    ("like=item-001&where=label%20%3D%3D%3D%20x", 400, "INVALID_ARGUMENT"),
    ("like=item-001&where=n%20%3D%201)%20OR%20(n%20%3D%203", 400, "INVALID_ARGUMENT"),
    ("like=item-001&space=nope", 404, "NOT_FOUND"),
    ("like=nope", 400, "INVALID_ARGUMENT"),
    ("like=item-001&k=0", 400, "INVALID_ARGUMENT"),
])
def test_search_errors(world, query, status, code):
    got, body = get_json(world["base"], f"/api/collections/pics/search?{query}")
    assert (got, body["error"]["code"]) == (status, code), body


def test_map_is_the_pca_of_the_space_and_places_the_picks(world):
    base, vectors, ids = world["base"], world["vectors"], world["all_ids"]
    status, m = get_json(base, f"/api/collections/pics/map?n={5000}&run={world['job'].run_id}")
    assert status == 200 and m["sampled"] == m["total"] == world["n_all"]
    pts = {p["id"]: p for p in m["points"] if not p.get("picked")}
    centered = vectors - vectors.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    ref = centered @ vt[:2].T
    got = np.array([[pts[i]["x"], pts[i]["y"]] for i in ids])
    signs = np.sign((got * ref).sum(0))  # principal axes are defined up to sign
    np.testing.assert_allclose(got, ref * signs, atol=1e-3)
    assert m["explained"] == pytest.approx((s[:2] ** 2 / (s ** 2).sum()).tolist(), rel=1e-3)
    picks = [p for p in m["points"] if p.get("picked")]
    assert [p["rank"] for p in picks] == list(range(1, 13))
    for p in picks:
        np.testing.assert_allclose([p["x"], p["y"]], [pts[p["id"]]["x"], pts[p["id"]]["y"]], atol=1e-3)
    labels = dict(zip(ids, world["labels"] + [None] * len(world["hostile"]), strict=True))
    assert all(pts[i]["label"] == labels[i] for i in ids)
    status, small = get_json(base, "/api/collections/pics/map?n=10")
    assert small["sampled"] == 10 and small["total"] == world["n_all"]
    assert len({p["id"] for p in small["points"]}) == 10 and {p["id"] for p in small["points"]} <= set(ids)
    for bad in ("n=5", "n=100000", "space=nope", "run=0123"):
        assert get_json(base, f"/api/collections/pics/map?{bad}")[0] in (400, 404), bad


def test_pca_2d_on_hand_checkable_points():
    # Points on the line y = 2x in 3-d, with a small z wobble: the first axis carries the line.
    x = np.array([[0, 0, 0], [1, 2, 0.1], [2, 4, -0.1], [3, 6, 0.0]], dtype=np.float64)
    xy, mean, axes = pca_2d(x)
    np.testing.assert_allclose(mean, [1.5, 3.0, 0.0])
    np.testing.assert_allclose(np.abs(axes[:, 0]), np.array([1, 2, 0]) / np.sqrt(5), atol=1e-2)
    np.testing.assert_allclose(np.abs(xy[:, 0]), np.abs((x - mean) @ axes[:, 0]))
    assert np.var(xy[:, 0]) > 100 * np.var(xy[:, 1])
    one, _, _ = pca_2d(np.array([[1.0, 2.0]]))
    assert one.shape == (1, 2)


def test_dataset_history_and_diff(world):
    base, ids = world["base"], world["ids"]
    status, d = get_json(base, "/api/datasets/train")
    assert status == 200 and [c["version"] for c in d["history"]] == [2, 1]
    assert d["dataset"]["members"] == 12 and d["status"]["clean"]
    status, diff = get_json(base, "/api/datasets/train/diff")
    assert (diff["v1"], diff["v2"], diff["added"], diff["removed"]) == (1, 2, 4, 2)
    assert diff["added_ids"] == ids[10:14] and diff["removed_ids"] == ids[:2]
    assert [it["id"] for it in diff["added_items"]] == ids[10:14]
    status, whole = get_json(base, "/api/datasets/train/diff?v1=0&v2=2")
    assert whole["added"] == 12 and whole["removed"] == 0
    assert get_json(base, "/api/datasets/nope")[0] == 404
    assert get_json(base, "/api/datasets/train/diff?v1=9")[0] == 404
    assert [x["name"] for x in get_json(base, "/api/datasets?collection=pics")[1]] == ["train"]


def test_text_items_are_data_not_markup(world):
    status, res = get_json(world["base"], "/api/collections/notes/search?like=n2&k=1")
    assert status == 200 and res["items"][0]["text"] == "<script>alert(1)</script> hello"
    status, res = get_json(world["base"], "/api/collections/notes/search?like=n1&k=1")
    assert res["items"][0]["text"].endswith("…") and len(res["items"][0]["text"]) <= 281


def test_clip_text_tower_search_equals_the_embedder(tmp_path, tiny):
    """Text -> image through the CLIP text tower of a tiny model built by the test."""
    from indexing.embedders import ClipEmbedder

    name, ckpt = tiny
    emb = ClipEmbedder(name, ckpt)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        p = tmp_path / "data" / "img" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    vecs = emb.embed_images(paths)
    server = start_server(ServerConfig(data=str(tmp_path / "data"), port=0, http_port=0, grace_s=1))
    try:
        with Client(server.address) as client:
            col = client.create_collection("clip", spaces={"img": {"dim": emb.dim, "metric": "cosine",
                                                                     "model": emb.identity}})
            col.upsert(pa.table({"id": [f"c{i}" for i in range(12)], "uri": paths,
                                 "emb_img": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), emb.dim)}))
        status, res = get_json(server.web_url, "/api/collections/clip/search?q=a%20red%20square&k=5", None)
        assert status == 200 and res["space"] == "img"
        q = emb.embed_texts(["a red square"])[0]
        unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        d = 1 - unit @ (q / np.linalg.norm(q))
        assert [it["id"] for it in res["items"]] == [f"c{i}" for i in np.argsort(d)[:5]]
        assert [it["distance"] for it in res["items"]] == pytest.approx(np.sort(d)[:5].tolist(), abs=1e-4)
    finally:
        server.stop()


def test_run_grid_shows_labels_as_the_miner_read_them(world):
    """A pick labeled after the run still shows the label (null) the miner saw, like RunResults."""
    job, col = world["job"], world["col"]
    first = job.results().column("id")[0].as_py()
    col.tag_items(ids=[first], add=["seen"])  # an unrelated write: a new version
    col.upsert(pa.table({"id": [first], "label": ["owl"]}))
    try:
        status, page = get_json(world["base"], f"/api/runs/{job.run_id}?limit=1")
        assert status == 200 and page["as_of_version"] == job.run()["version"]
        assert page["items"][0]["id"] == first and "label" not in page["items"][0]
        assert col.take([first], ["label"])["label"][0].as_py() == "owl"
    finally:
        col.upsert(pa.table({"id": [first], "label": pa.array([None], pa.string())}))


def test_tls_and_client_certificates_on_the_web_port(tmp_path):
    """The web port takes the gRPC port's certificate and, with --tls-client-ca, requires a
    client certificate signed by that CA; the session cookie is Secure."""
    import ssl
    import urllib.error
    import urllib.request

    from test_auth import _pki

    good, rogue = _pki(tmp_path, "good"), _pki(tmp_path, "rogue")
    server = start_server(ServerConfig(
        data=str(tmp_path / "d"), host="localhost", port=0, http_port=0, grace_s=1, tokens=(RW,),
        tls_cert=str(good["server"][0]), tls_key=str(good["server"][1]), tls_client_ca=str(good["ca"])))
    try:
        url = server.web_url
        assert url.startswith("https://localhost:")

        def opener(cert_key):
            ctx = ssl.create_default_context(cafile=str(good["ca"]))
            if cert_key:
                ctx.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
            return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))

        ok = opener(good["client"])
        req = urllib.request.Request(url + "api/login", data=json.dumps({"token": RW}).encode(),
                                     headers={"Content-Type": "application/json"})
        with ok.open(req, timeout=30) as res:
            cookie = res.headers["Set-Cookie"]
        assert "Secure" in cookie
        with ok.open(urllib.request.Request(url + "api/collections", headers={"Authorization": f"Bearer {RW}"}),
                     timeout=30) as res:
            assert json.loads(res.read()) == []
        for cert_key in (None, rogue["client"]):  # no certificate, or one another CA signed
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                opener(cert_key).open(url + "api/info", timeout=30).read()
    finally:
        server.stop(1)


def test_predictions_from_probs_logits_and_boxes(store):
    """The grid's top prediction, by its definition: argmax of probs, else of softmax(logits),
    else the most confident class over a detection's boxes; None without a prediction."""
    from service.web.views import predictions

    col = store.create_collection("preds", models={"m": CLASSES})
    box = {"x1": 0.0, "y1": 0.0, "x2": 1.0, "y2": 1.0, "score": 0.9}
    col.upsert(pa.table({"id": ["p", "l", "b", "none"]}).append_column("pred_m", pa.array([
        {"probs": [0.2, 0.5, 0.3]},
        {"logits": [2.0, 0.0, 1.0]},
        {"boxes": [{**box, "probs": [0.1, 0.3, 0.6]}, {**box, "probs": [0.05, 0.9, 0.05]}]},
        None,
    ], col.schema.field("pred_m").type)))
    rows = col.take(["p", "l", "b", "none"], ["pred_m"])
    got = predictions(col, "m", rows.column("pred_m").combine_chunks())
    e = np.exp([2.0, 0.0, 1.0])
    assert got[0] == {"model": "m", "class": "dog", "confidence": pytest.approx(0.5)}
    assert got[1] == {"model": "m", "class": "cat", "confidence": pytest.approx(e[0] / e.sum())}
    assert got[2] == {"model": "m", "class": "dog", "confidence": pytest.approx(0.9), "boxes": 2}
    assert got[3] is None
    assert predictions(col, None, rows.column("pred_m").combine_chunks()) == [None] * 4


def test_box_views_equal_the_client(world):
    """The page's box endpoints (object classes, box confusion, confused pairs per box,
    object rows) answer what the client's Aggregate calls answer, filters included."""
    client, base = world["client"], world["base"]
    col = client.create_collection("web_boxes", models={"det": {"classes": ["car", "person"], "task": "detection"}})

    def box(x1, y1, w, h, score, probs):
        return {"x1": x1, "y1": y1, "x2": x1 + w, "y2": y1 + h, "score": score, "probs": probs}

    rng = np.random.default_rng(5)
    rows = []
    for i in range(12):
        preds = [box(*rng.uniform(0, 50, 2), *rng.uniform(5, 40, 2), float(rng.random()),
                     None if j == 2 else rng.dirichlet([1, 1]).tolist()) for j in range(int(rng.integers(0, 4)))]
        # gt: the first two predicted boxes (labels alternating), and a missed box in odd images
        gts = [{**{k: p[k] for k in ("x1", "y1", "x2", "y2")}, "label": ["car", "person"][j % 2]}
               for j, p in enumerate(preds[:2])]
        gts += [{"x1": 200, "y1": 200, "x2": 210, "y2": 210, "label": "car"}][: i % 2]
        rows.append({"id": f"b{i:02d}", "split": "val" if i % 3 else "pool", "pred_det": {"boxes": preds},
                     "gt_boxes": gts})
    col.upsert(rows)
    f = {"where": "split = 'val'", "objects_where": "area > 100"}
    url = f"/api/collections/web_boxes/boxes/{{}}?where={quote(f['where'])}&objects_where={quote(f['objects_where'])}"
    cases = [
        ("object_classes", "&model=det", col.object_classes(**f, source="det")),
        ("object_classes", "", col.object_classes(**f)),
        ("box_confusion", "&model=det&iou=0.3", col.box_confusion("det", iou=0.3, **f)),
        ("box_confused_pairs", "&model=det&top=1", col.box_confused_pairs("det", top=1, **f)),
        ("box_confused_pairs", "&model=det", col.box_confused_pairs("det", **f)),
        ("objects", "&model=gt&limit=5", col.objects(**f, source="gt", limit=5)),
        ("objects", "", col.objects(**f, limit=100)),
    ]
    for kind, extra, want in cases:
        status, body = get_json(base, url.format(kind) + extra)
        assert status == 200, body
        assert body["kind"] == kind and body["columns"] == want.column_names
        assert body["rows"] == want.to_pylist() and want.num_rows > 0, (kind, extra)
    assert len(get_json(base, url.format("objects"))[1]["rows"]) == min(100, col.objects(**f).num_rows)
    assert any(r["class_a"] is None for r in col.box_confused_pairs("det").to_pylist())  # a box had no probs
    for path, status, code in [
        ("/api/collections/web_boxes/boxes/nope", 404, "NOT_FOUND"),
        ("/api/collections/pics/boxes/box_confused_pairs?model=m", 400, "INVALID_ARGUMENT"),
        ("/api/collections/web_boxes/boxes/box_confusion", 400, "INVALID_ARGUMENT"),
        ("/api/collections/web_boxes/boxes/objects?limit=0", 400, "INVALID_ARGUMENT"),
        ("/api/collections/web_boxes/boxes/objects?objects_where=colour%3D1", 400, "INVALID_ARGUMENT"),
    ]:
        got = get_json(base, path)
        assert (got[0], got[1]["error"]["code"]) == (status, code), (path, got)
    assert "detection model" in get_json(base, "/api/collections/pics/boxes/box_confused_pairs?model=m")[1]["error"]["message"]
