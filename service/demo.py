"""The demo behind ``make demo``: start assay, load real sample data through the client,
and search it.

Starts the gRPC server on the data root (a local LanceDB folder by default) on a free
loopback port, then, through the Python client only: loads scikit-learn's digits
(rendered to PNG files, with pixel embeddings and a logistic regression's predictions) and
a small text corpus embedded with the packaged MiniLM, optimizes, runs similarity
searches — by stored item, and by text through the server's MiniLM — and mines the
unlabeled digits the model is least sure about. With ``http_port`` the server also serves
the web page, and the demo ends by printing its address (the mined digits' grid); the CLI
then keeps serving until Ctrl-C. Re-running it is safe: rows are upserted by id.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from indexing.embedders import TextEmbedder
from indexing.samples import digits_table, text_table
from indexing.store import resolve_root
from service.client import Client
from service.server import AssayServer, ServerConfig, start_server

TEXT_QUERIES = (
    "how long should bread dough rise before baking?",
    "which planet has the most moons?",
    "my python program raises an exception when the list is empty",
)


def _samples_dir(root: str) -> str:
    if "://" in root:
        # Object-store root: the PNGs still need a local home for the demo.
        return os.path.abspath(os.path.join(".assay-samples", "digits"))
    return os.path.join(os.path.abspath(root), "_samples", "digits")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def run_demo(data: str | None = None, *, out: Callable[[str], Any] = print, http_port: int | None = None,
             hold: Callable[[AssayServer], Any] | None = None) -> dict[str, Any]:
    """Start a server on ``data``, load the sample collections through the client, search
    and mine them; with ``http_port`` (0: any free port; a taken port falls back to any)
    serve the web page too and print the mined run's address. ``hold(server)`` runs before
    the server stops (the CLI waits for Ctrl-C there). Returns a summary (for tests)."""
    root = resolve_root(data)
    if http_port and not _free(http_port):
        out(f"port {http_port} is taken; the web page takes any free port instead")
        http_port = 0
    roots = (root if "://" not in root else os.path.dirname(_samples_dir(root)),)
    server = start_server(ServerConfig.from_env(data=root, host="127.0.0.1", port=0, grace_s=5,
                                                http_port=http_port, data_roots=roots))
    try:
        out(f"assay demo — server on {server.address}, data root {server.store.root}")
        with Client(server.address, timeout=120) as client:
            summary = _load_and_search(client, root, out)
        if server.web_url:
            summary["page"] = f"{server.web_url}#/runs/{summary['run_id']}"
            out(f"\nThe web page: {server.web_url}\n  the mined digits: {summary['page']}")
        if hold is not None:
            hold(server)
        return summary
    finally:
        server.stop()


def serve_until_stopped(server: AssayServer) -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("Serving until Ctrl-C (assay demo --no-serve stops after the demo).", flush=True)
    while not stop.wait(1.0):
        pass


def _load_and_search(client: Client, root: str, out: Callable[[str], Any]) -> dict[str, Any]:
    digits, classes = digits_table(_samples_dir(root))
    col = client.create_collection(
        "digits",
        spaces={"pixels": {"dim": 64, "metric": "l2", "normalized": False, "model": "pixels/16"}},
        models={"logreg": classes},
        if_not_exists=True,
    )
    summary = col.upsert(digits, batch_rows=500)
    col.optimize().wait()
    out(f"  digits: {col.count()} images ({col.count('split = ' + repr('train'))} labeled) in "
        f"{summary.batches} streamed batches; space 'pixels' (64-d), predictions of model 'logreg'")

    embedder = TextEmbedder()
    tcol = client.create_collection(
        "texts", spaces={"minilm": {"dim": embedder.dim, "metric": "cosine", "model": embedder.identity}},
        if_not_exists=True,
    )
    tcol.upsert(text_table(embedder, space="minilm"))
    out(f"  texts: {tcol.count()} sentences embedded with {embedder.identity} ({embedder.dim}-d)")

    # Image similarity: the unlabeled pool items nearest to one pool digit (by its id).
    qid = col.query("split = 'pool' AND true_label = '3'", ["id"], limit=1)["id"][0].as_py()
    hits = col.search(space="pixels", ids=[qid], k=9, where="split = 'pool'",
                      columns=["id", "true_label", "uri"]).to_pylist()
    out(f"\nNearest unlabeled digits to {qid} (a '3'), squared l2 distance on pixels:")
    for row in hits:
        out(f"  {row['id']}  true label {row['true_label']}  distance {row['_distance']:7.3f}  {row['uri']}")
    agree = sum(r["true_label"] == "3" for r in hits) / len(hits)
    out(f"  {agree:.0%} of the neighbours are 3s as well")

    out("\nText search, embedded by the server's MiniLM (cosine distance):")
    text_hits = []
    for q in TEXT_QUERIES:
        res = tcol.search(space="minilm", text=q, k=3, columns=["id", "topic", "text"])
        out(f"  query: {q!r}")
        for row in res.to_pylist():
            out(f"    {row['_distance']:.3f}  [{row['topic']}] {row['text']}")
        text_hits.append(res["topic"].to_pylist())
    # Mining: the unlabeled digits the logistic regression is least sure about.
    job = col.mine("margin", size=10, model="logreg", where="label IS NULL")
    job.wait()
    picked = job.results(columns=["true_label", "pred_logreg", "uri"]).to_pylist()
    out(f"\nMost uncertain unlabeled digits (margin miner, run {job.run_id[:8]}, "
        f"{job.run()['rows_scanned']} pool rows scanned):")
    wrong = 0
    for row in picked:
        probs = row["pred_logreg"]["probs"]
        top2 = sorted(range(len(probs)), key=lambda c: -probs[c])[:2]
        wrong += str(top2[0]) != row["true_label"]
        out(f"  #{row['rank']:<2} {row['id']}  margin score {row['score']:.3f}  model: "
            f"{top2[0]} ({probs[top2[0]]:.2f}) vs {top2[1]} ({probs[top2[1]]:.2f})  true {row['true_label']}")
    out(f"  the model is wrong on {wrong} of these {len(picked)}: worth labeling first")
    return {"digit_neighbours_agree": agree, "text_topics": text_hits, "digits": col.count(),
            "texts": tcol.count(), "mined": [r["id"] for r in picked], "mined_wrong": wrong,
            "run_id": job.run_id}
