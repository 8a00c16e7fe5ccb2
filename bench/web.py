"""The web page's JSON API and thumbnails: latency over HTTP against the same work done
directly in-process, measured in the same run.

    uv run python bench/web.py [--rows 300000] [--dim 128] [--repeats 7] [--quick] [--json out.json]

Builds a collection of ``--rows`` rows (a ``--dim``-d space, labels on a third of the
rows, a 10-class model's probabilities, PNG ``uri``s for 500 of them), mines it once
(margin, 60 picks), starts the server with its web port, and times each page's API call
through HTTP on loopback (uvicorn + Starlette + JSON) against the reference, the same
reads and computations called directly on the store (no HTTP, no JSON):

* run grid (60 items): ``GET /api/runs/<id>`` vs ``Collection.take`` of the picks' columns;
* embedding map, first view (2,000-row sample, uncached): ``GET .../map`` vs LanceDB
  ``take_offsets`` of the same sample + scikit-learn PCA;
* embedding map again (cached per collection version);
* collection overview, first and cached: vs ``label_distribution`` (a label-column scan);
* thumbnail, first and cached (ETag'd): vs PIL open + thumbnail + encode of the same file;
* similar items (k=24, exact search): vs ``Collection.search`` of the stored vector.

Medians of ``--repeats`` calls (first-view rows: fresh server-side caches each time).
Ratios are reference / assay (1.0 = HTTP adds nothing; lower = the page's overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Report, machine, ms, render  # noqa: E402
from indexing.analytics import label_distribution  # noqa: E402
from service.client import Client  # noqa: E402
from service.server import ServerConfig, start_server  # noqa: E402
from service.web.thumbs import encode_thumbnail  # noqa: E402
from service.web.views import pca_2d, vectors_of  # noqa: E402

CLASSES = [str(i) for i in range(10)]


def build(client: Client, root: str, rows: int, dim: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(0)
    col = client.create_collection("pool", spaces={"v": {"dim": dim, "metric": "l2", "normalized": False}},
                                   models={"m": CLASSES})
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    for i in range(500):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(f"{img_dir}/{i}.png")
    batch = 50_000
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        idx = np.arange(start, start + n)
        logits = rng.normal(0, 2, (n, 10)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        col.upsert(pa.table({
            "id": [f"r{i:08d}" for i in idx],
            "uri": [f"{img_dir}/{i % 500}.png" for i in idx],
            "label": [CLASSES[i % 10] if i % 3 == 0 else None for i in idx],
            "emb_v": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(0, 1, n * dim).astype(np.float32)), dim),
            "pred_m": pa.StructArray.from_arrays([pa.array(list(probs), pa.list_(pa.float32()))], names=["probs"]),
        }), batch_rows=10_000)
    return col


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=300) as res:
        return res.read()


def median_s(fn: Any, repeats: int, before: Any = None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="100,000 rows, 5 repeats")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 100_000, 5
    import lancedb
    import starlette
    import uvicorn

    m = machine(lancedb=lancedb.__version__, starlette=starlette.__version__, uvicorn=uvicorn.__version__)
    print("# assay web page benchmark\n")
    print(f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, python {m['python']}, "
          f"lancedb {m['lancedb']}, starlette {m['starlette']}, uvicorn {m['uvicorn']}")
    print(f"- {args.rows:,} rows, {args.dim}-d space, 10-class probabilities; medians of {args.repeats} calls; "
          f"load average at start {os.getloadavg()[0]:.1f}\n", flush=True)
    report = Report(machine=m, params=vars(args))
    with tempfile.TemporaryDirectory(prefix="assay-bench-web-") as root:
        server = start_server(ServerConfig(data=root, port=0, http_port=0, grace_s=2))
        try:
            with Client(server.address, timeout=600) as client:
                t0 = time.perf_counter()
                build(client, root, args.rows, args.dim)
                client.collection("pool").optimize().wait()
                job = client.collection("pool").mine("margin", size=60, model="m", where="label IS NULL")
                job.wait()
                run_version = job.run()["version"]
                print(f"built and mined in {time.perf_counter() - t0:.0f}s", flush=True)
            base = server.web_url
            app = server.web.app  # the WebApp: its caches are cleared before each first view
            col = server.store.collection("pool")
            ids = server.mining.runs.results(job.run_id).column("id").to_pylist()

            def grid_ref() -> None:
                col.take(ids, ["id", "label", "uri", "text", "tags", "pred_m"], version=run_version)

            report.add("run grid, 60 items", ms(median_s(lambda: get(f"{base}api/runs/{job.run_id}"), args.repeats)),
                       ms(median_s(grid_ref, args.repeats)), kind="latency", unit="ms")

            def map_ref() -> None:
                total = col.table.count_rows()
                offsets = np.sort(np.random.default_rng(0).choice(total, size=2000, replace=False))
                rows = col.table.take_offsets(offsets.tolist()).select(["id", "emb_v", "label", "pred_m"]).to_arrow()
                pca_2d(vectors_of(rows.column("emb_v")))

            report.add("embedding map, 2,000 points, first view",
                       ms(median_s(lambda: get(f"{base}api/collections/pool/map?n=2000"), args.repeats,
                                   before=lambda: app.maps._cache.clear())),
                       ms(median_s(map_ref, args.repeats)), kind="latency", unit="ms")
            report.add("embedding map, cached", ms(median_s(lambda: get(f"{base}api/collections/pool/map?n=2000"),
                                                            args.repeats)),
                       None, kind="info", unit="ms")

            def clear_labels() -> None:
                col._cache.pop("web-labels", None)

            report.add("collection overview, first view",
                       ms(median_s(lambda: get(f"{base}api/collections/pool"), args.repeats, before=clear_labels)),
                       ms(median_s(lambda: label_distribution(col), args.repeats)), kind="latency", unit="ms",
                       note="reference: label_distribution only")
            report.add("collection overview, cached", ms(median_s(lambda: get(f"{base}api/collections/pool"),
                                                                  args.repeats)), None, kind="info", unit="ms")
            uri = col.take([ids[0]], ["uri"])["uri"][0].as_py()
            report.add("thumbnail 256x256 PNG -> 160 px, first",
                       ms(median_s(lambda: get(f"{base}api/thumb?c=pool&id={ids[0]}"), args.repeats,
                                   before=lambda: app.thumbs._cache.clear())),
                       ms(median_s(lambda: encode_thumbnail(uri, 160), args.repeats)), kind="latency", unit="ms")
            report.add("thumbnail, cached", ms(median_s(lambda: get(f"{base}api/thumb?c=pool&id={ids[0]}"),
                                                        args.repeats)), None, kind="info", unit="ms")
            vec = np.asarray(col.take([ids[0]], ["emb_v"])["emb_v"][0].as_py(), np.float32)
            report.add("similar items, k=24",
                       ms(median_s(lambda: get(f"{base}api/collections/pool/search?like={ids[0]}&k=24"), args.repeats)),
                       ms(median_s(lambda: col.search("v", vec, k=25, columns=["id"]), args.repeats)),
                       kind="latency", unit="ms", note="reference: the vector search alone")
            sizes = {"run grid JSON": len(get(f"{base}api/runs/{job.run_id}")),
                     "map JSON (2,000 points)": len(get(f"{base}api/collections/pool/map?n=2000")),
                     "thumbnail": len(get(f"{base}api/thumb?c=pool&id={ids[0]}"))}
        finally:
            server.stop()
    print("## results (ms; ratio = reference / assay)\n")
    print(render(report))
    print("\n" + "; ".join(f"{k}: {v / 1024:.1f} KiB" for k, v in sizes.items()) + " (before gzip)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": m, "params": vars(args), "rows": [vars(r) for r in report.rows], "sizes": sizes},
                      fh, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
