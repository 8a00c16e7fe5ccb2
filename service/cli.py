"""The ``assay`` command line.

    assay serve [--data DIR] [--host H] [--port P] [--token T]...   run the gRPC server
    assay demo [--data DIR]               load the sample data and search it
    assay collections [--data DIR]        list collections
    assay describe NAME [--data DIR]      a collection's schema, spaces, models, indexes
    assay optimize NAME [--data DIR]      compact, update/build indexes, clean old versions
    assay index NAME --space S [--kind K] build a vector index now
    assay recall NAME --space S           recall@k of the index vs exact search (tunes nprobes)
    assay drop NAME [--data DIR]          drop a collection
    assay ingest COLLECTION SOURCE [--data DIR] [--text-space NAME[=MODEL]]
               [--image-space NAME --clip-model M --clip-pretrained P] [--labels-from-folders]
               [--batch-rows N] [--id-field F] [--errors PATH] [--quiet]
                                          load an image folder or a .parquet/.csv/.jsonl file,
                                          embedding on the way in (resumable; exit 3 on bad rows)
    assay reindex COLLECTION --space NAME [--model M | --clip-model M --clip-pretrained P]
               [--source text|uri] [--where SQL] [--batch-rows N] [--restart] [--no-index]
               [--engine local|ray [--ray-address A] [--ray-workers N]] [--remote] [--quiet]
                                          re-embed rows into a space (crash-safe: rerun to resume;
                                          the old space is served until the switch; exit 3 on bad rows)

Through a running server (``--server``, else $ASSAY_SERVER, else 127.0.0.1:50051;
``--token``, else $ASSAY_TOKEN):

    assay miners                          the miners and their parameters
    assay mine COLLECTION MINER --size N [--model M] [--where SQL] [--param k=v]...
               [--seed S] [--reverse] [--columns a,b] [--output results.csv|.parquet|.jsonl]
    assay runs [COLLECTION]               recent mining runs

The data root is ``--data``, else ``$ASSAY_DATA``, else ``./data``; ``s3://bucket/prefix``
roots read their endpoint and credentials from the environment (see README).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from indexing.errors import AssayError


def _store(args: argparse.Namespace) -> Any:
    from indexing.store import Store

    return Store(args.data)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import ServerConfig, configure_logging, serve

    configure_logging(args.log_level if args.log_level != "WARNING" else "INFO", args.log_format)
    config = ServerConfig.from_env(
        data=args.data, host=args.host, port=args.port, tokens=tuple(args.token) if args.token else None,
        tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port, grace_s=args.grace,
        job_workers=args.job_workers, max_message_mb=args.max_message_mb,
        allow_unauthenticated_remote=True if args.allow_unauthenticated_remote else None,
    )
    serve(config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    run_demo(args.data)
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in store.list_collections():
        col = store.collection(name)
        print(f"{name}\t{col.count()} rows\tversion {col.version}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    _print_json(_store(args).describe(args.name))
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    _print_json(asdict(_store(args).collection(args.name).optimize()))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    col = _store(args).collection(args.name)
    kind = col.build_index(args.space, kind=args.kind)
    print(f"built {kind} index on {args.name}.emb_{args.space}")
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    col = _store(args).collection(args.name)
    _print_json(asdict(col.recall_check(args.space, queries=args.queries, k=args.k, tune=not args.no_tune)))
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    _store(args).drop_collection(args.name)
    print(f"dropped {args.name}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from indexing.ingest import ingest, write_errors

    text_space, text_model = None, None
    if args.text_space:
        text_space, _, text_model = args.text_space.partition("=")
        text_model = text_model or None
    report = ingest(
        _store(args), args.collection, args.source,
        text_space=text_space, text_model=text_model, image_space=args.image_space,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
        labels_from_folders=args.labels_from_folders, batch_rows=args.batch_rows,
        id_field=args.id_field, progress=not args.quiet,
    )
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.collection}: {report.summary()}")
    if not report.bad:
        return 0
    path = args.errors or f"{args.collection}-ingest-errors.jsonl"
    write_errors(report, path)
    for row in report.bad[:10]:
        where = next((f"{k} {row[k]}" for k in ("path", "line", "row") if k in row), "?")
        print(f"  bad: {where}: {row['reason']}", file=sys.stderr)
    if len(report.bad) > 10:
        print(f"  ... and {len(report.bad) - 10} more", file=sys.stderr)
    print(f"{len(report.bad)} bad rows written to {path}", file=sys.stderr)
    return 3


def cmd_reindex(args: argparse.Namespace) -> int:
    params = {
        "space": args.space, "model": args.model, "clip_model": args.clip_model,
        "clip_pretrained": args.clip_pretrained, "source": args.source, "where": args.where,
        "batch_rows": args.batch_rows, "engine": args.engine, "ray_address": args.ray_address,
        "ray_workers": args.ray_workers, "restart": args.restart, "build_index": not args.no_index,
    }
    if args.remote:  # as a job of the running server, watched here
        space = params.pop("space")
        with _client(args) as client:
            job = client.collection(args.collection).reindex(
                space, **{k: v for k, v in params.items() if v is not None})
            result = job.wait(progress=not args.quiet).result
        bad = result.get("bad", [])
        summary = result.get("summary", "")
        if result.get("bad_count", 0) > len(bad):
            summary += f" (the first {len(bad)} bad rows are listed)"
    else:
        from indexing.reindex import reindex

        report = reindex(_store(args), args.collection, progress=not args.quiet, **params)
        bad, summary = report.bad, report.summary()
    print(f"{args.collection}: {summary}")
    if not bad:
        return 0
    path = args.errors or f"{args.collection}-reindex-errors.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for row in bad:
            fh.write(json.dumps(row, default=str) + "\n")
    for row in bad[:10]:
        print(f"  bad: id {row['id']}: {row['reason']}", file=sys.stderr)
    print(f"{len(bad)} rows without a vector, listed in {path} (rerun to retry them)", file=sys.stderr)
    return 3


def _client(args: argparse.Namespace) -> Any:
    from service.client import Client

    return Client(args.server, token=args.token)


def _param(text: str) -> tuple[str, Any]:
    """``k=v`` with v parsed as JSON when it is JSON (numbers, true/false), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes name=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def cmd_miners(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for m in client.miners():
            params = ", ".join(f"{p['name']}={p.get('default')}" for p in m.get("params", []))
            print(f"{m['name']:<18} {m['family']:<12} {m['description']}\n{'':<31}params: {params or '-'}")
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    with _client(args) as client:
        col = client.collection(args.collection)
        job = col.mine(args.miner, args.size, model=args.model, space=args.space, where=args.where,
                       reference_where=args.reference_where, params=dict(args.param or []), seed=args.seed,
                       reverse=args.reverse)
        job.wait(progress=not args.quiet)
        columns = [c for c in (args.columns or "").split(",") if c]
        table = job.results(columns=columns or None)
        run = job.run()
        print(f"run {job.run_id}: {run.get('results', 0)} results from {run.get('rows_scanned', 0)} rows "
              f"(version {run.get('version')}, {run.get('rows_skipped', 0)} without inputs)", file=sys.stderr)
        if args.output:
            _write_table(table, args.output)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            for row in table.to_pylist():
                print("\t".join(str(row[c]) for c in table.column_names))
    return 0


def _write_table(table: Any, path: str) -> None:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif path.endswith(".csv"):
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    elif path.endswith(".jsonl"):
        with open(path, "w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, default=str) + "\n")
    else:
        raise SystemExit(f"--output must end in .csv, .parquet or .jsonl: {path}")


def cmd_runs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for run in client.runs(args.collection, limit=args.limit):
            print(f"{run['run_id']}\t{run['state']}\t{run['collection']}\t{run['miner']}\tsize {run.get('size')}"
                  f"\tversion {run.get('version')}\t{run.get('results', 0)} results")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="assay", description="Embedding search and mining for active learning.")
    parser.add_argument("--log-level", default=os.environ.get("ASSAY_LOG_LEVEL", "WARNING"))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=None, help="data root (default $ASSAY_DATA or ./data)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the gRPC server (settings also from ASSAY_*)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 50051; 0 = any free port)")
    p.add_argument("--token", action="append", help="bearer token clients must send (repeatable)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--grace", type=float, default=None, help="shutdown grace period in seconds (default 10)")
    p.add_argument("--job-workers", type=int, default=None, help="jobs run at once (default 2)")
    p.add_argument("--max-message-mb", type=int, default=None, help="largest gRPC message (default 64)")
    p.add_argument("--allow-unauthenticated-remote", action="store_true",
                   help="bind a non-loopback host even without a token")
    p.add_argument("--log-format", choices=["json", "text"], default=os.environ.get("ASSAY_LOG_FORMAT", "json"))
    p.set_defaults(func=cmd_serve)
    sub.add_parser("demo", parents=[common], help="load sample data and search it").set_defaults(func=cmd_demo)
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", default=os.environ.get("ASSAY_SERVER", "127.0.0.1:50051"))
    remote.add_argument("--token", default=os.environ.get("ASSAY_TOKEN"))
    sub.add_parser("miners", parents=[remote], help="list the server's miners").set_defaults(func=cmd_miners)
    p = sub.add_parser("mine", parents=[remote], help="run a miner and print or save its results")
    p.add_argument("collection")
    p.add_argument("miner")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--model")
    p.add_argument("--space")
    p.add_argument("--where")
    p.add_argument("--reference-where")
    p.add_argument("--param", action="append", type=_param, help="miner parameter name=value (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--reverse", action="store_true", help="lowest scores first (most confident)")
    p.add_argument("--columns", help="collection columns to add to id, rank, score (comma-separated)")
    p.add_argument("--output", help="write the results to .csv, .parquet or .jsonl instead of printing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_mine)
    p = sub.add_parser("runs", parents=[remote], help="list recent mining runs")
    p.add_argument("collection", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_runs)
    sub.add_parser("collections", parents=[common], help="list collections").set_defaults(func=cmd_collections)
    for name, func, text in (
        ("describe", cmd_describe, "describe a collection"),
        ("optimize", cmd_optimize, "compact, update indexes, clean old versions"),
        ("drop", cmd_drop, "drop a collection"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("name")
        p.set_defaults(func=func)
    p = sub.add_parser("ingest", parents=[common],
                       help="load an image folder or a .parquet/.csv/.jsonl file, embedding on the way in")
    p.add_argument("collection")
    p.add_argument("source", help="an image folder, or a .parquet, .csv or .jsonl file")
    p.add_argument("--text-space", metavar="NAME[=MODEL]",
                   help="embed the 'text' field into space NAME (default model: the packaged MiniLM)")
    p.add_argument("--image-space", metavar="NAME", help="embed the 'uri' images into space NAME (CLIP)")
    p.add_argument("--clip-model", help="open_clip model name for --image-space, e.g. ViT-B-32")
    p.add_argument("--clip-pretrained", help="pretrained tag (cached) or local checkpoint file")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="image folders: label = the class sub-folder name")
    p.add_argument("--batch-rows", type=int, default=1000, help="rows read, embedded and written at once")
    p.add_argument("--id-field", default="id", help="the source field holding the ids (default id)")
    p.add_argument("--errors", help="where to write the bad rows (default ./COLLECTION-ingest-errors.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)
    p = sub.add_parser("reindex", parents=[common, remote],
                       help="re-embed a collection's rows into a space (resumable)")
    p.add_argument("collection")
    p.add_argument("--space", required=True, help="the space to (re)fill: new, or re-embedded in place of the old")
    p.add_argument("--model", help="sentence-transformers name or path (default: the packaged MiniLM), "
                                   "or an identity such as open_clip:ViT-B-32:laion2b_s34b_b79k")
    p.add_argument("--clip-model", help="open_clip model name (embeds the 'uri' images)")
    p.add_argument("--clip-pretrained", help="pretrained tag (cached) or local checkpoint file")
    p.add_argument("--source", choices=["text", "uri"], help="column to embed (default: uri for CLIP, else text)")
    p.add_argument("--where", help="SQL filter: re-embed only these rows")
    p.add_argument("--batch-rows", type=int, default=256, help="rows embedded and written per commit")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--ray-workers", type=int, help="embedding actors (default: cluster CPUs - 1)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted reindex and begin again")
    p.add_argument("--no-index", action="store_true", help="do not build the new space's index")
    p.add_argument("--remote", action="store_true", help="run as a job of the server (--server) instead of here")
    p.add_argument("--errors", help="where to write the rows that failed (default ./COLLECTION-reindex-errors.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reindex)
    p = sub.add_parser("index", parents=[common], help="build a space's vector index")
    p.add_argument("name")
    p.add_argument("--space", required=True)
    p.add_argument("--kind", default=None, help="ivf_rq (default), ivf_sq, ivf_pq, ivf_hnsw_sq, ivf_flat")
    p.set_defaults(func=cmd_index)
    p = sub.add_parser("recall", parents=[common], help="recall of the index against exact search")
    p.add_argument("name")
    p.add_argument("--space", required=True)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--no-tune", action="store_true", help="measure only; do not raise nprobes")
    p.set_defaults(func=cmd_recall)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except AssayError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # the client's errors carry a status code too; keep the CLI free of tracebacks
        code = getattr(exc, "code", None)
        if isinstance(code, str):
            print(f"error ({code}): {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
