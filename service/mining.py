"""Mining on the server: runs as jobs, their records, and the Mining gRPC service.

StartMining validates the request completely (miner, size, parameters, model, filter,
non-empty pool with predictions) before anything is persisted, pins the collection's
current version in a new run record, and starts a ``mine`` job that executes it with
:func:`miners.runner.run_mining`. Results are appended in one write when the run ends,
then the record becomes SUCCEEDED.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
from dataclasses import fields, replace
from typing import Any

import numpy as np
import pyarrow as pa
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from indexing.errors import (
    AssayError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    classify_error,
)
from indexing.store import Collection, Store
from miners import registry
from miners.runner import run_mining, validate_request
from miners.runs import REQUEST_FIELDS, RunSpec, RunStore
from protos.assay.v1 import common_pb2, mining_pb2, mining_pb2_grpc
from service.arrow_ipc import table_to_ipc
from service.jobs import JobCancelled, JobContext, JobKind, JobManager
from service.servicers import TextEmbedders, job_to_proto, struct_params


class MiningService:
    """Starts runs as jobs and executes them; shared by the servicer and tests."""

    def __init__(self, store: Store, jobs: JobManager, embedders: TextEmbedders | None = None) -> None:
        self.store = store
        self.jobs = jobs
        self.embedders = embedders or TextEmbedders()
        self.runs = RunStore(store)
        self.runs.mark_interrupted()
        jobs.register("mine", JobKind(run=self._execute, validate=self._validate_job))

    def start(self, req: RunSpec) -> RunSpec:
        col = self.store.collection(req.collection)
        spec, params = validate_request(col, req)
        for p in spec.params:
            if p.embed_to and params.get(p.name):
                # Embed texts now, with the space's embedder (knn's seed_texts): the run record
                # then holds the vectors, and a rerun does not depend on the model still being around.
                vectors = self.embedders.for_space(col.space(req.space)).embed(params[p.name])
                params = {**params, p.embed_to: [*params[p.embed_to], *vectors.astype(float).tolist()],
                          p.name: []}
        if not self.jobs.has_capacity():
            raise ResourceExhausted(f"the job queue is full: {self.jobs.max_queued} jobs are pending or running, "
                                    "the limit (max_jobs); try again later")
        version = col.version if req.version is None else int(col.at_version(req.version).version)
        # 53 bits: the seed reads back as a JSON-safe integer (run_to_dict, web clients)
        seed = req.seed if req.seed is not None else (secrets.randbits(53) if spec.fresh_seed else 0)
        rec = self.runs.new_run(replace(req, collection=col.name, params=params, version=version, seed=seed))
        job = self.jobs.start("mine", col.name, {"run_id": rec.run_id})
        return self.runs.note(rec, job_id=job.id)

    def _validate_job(self, col: Collection, params: dict[str, Any]) -> dict[str, Any]:
        if set(params) != {"run_id"}:
            raise InvalidArgument("start mining runs with Mining.StartMining, not Jobs.StartJob")
        rec = self.runs.get(params["run_id"])
        if rec.state not in ("PENDING", "INTERRUPTED", "FAILED", "CANCELLED"):
            raise FailedPrecondition(f"run {rec.run_id} is {rec.state}")
        return params

    def _execute(self, ctx: JobContext, col: Collection, params: dict[str, Any]) -> dict[str, Any]:
        rec = self.runs.get(params["run_id"])
        try:
            rec = self.runs.note(rec, state="RUNNING", job_id=ctx.job_id, error="", progress=0.0)
            # The version the run reads stays through version cleanup until it is done.
            with col.pin_version(rec.version):
                out = run_mining(col, rec, progress=ctx.progress, check=ctx.check)
            ctx.check()
            t0 = time.perf_counter()
            self.runs.write_results(rec, out.ids, out.scores, out.related, out.boxes)
            timings = {**out.timings, "write_s": time.perf_counter() - t0}
            rec = self.runs.update(rec, state="SUCCEEDED", progress=1.0, results=len(out.ids),
                                   rows_scanned=out.rows_scanned, rows_skipped=out.rows_skipped,
                                   timings=timings, graph=out.graph or {}, stats=_plain(out.stats or {}),
                                   finished_at=time.time())
        except JobCancelled:
            self.runs.update_or_keep(rec, state="CANCELLED", finished_at=time.time(), error="cancelled")
            raise
        except Exception as exc:
            # The run's record says why, in the words the job's error uses: the caller's
            # filter failing on the data, a full disk or a lost object store are not bugs.
            # Saving it may fail for the same reason (a full disk): it is then kept in memory.
            mapped = classify_error(exc, self.store.root)
            error = mapped.message if mapped is not None else f"{type(exc).__name__}: {exc}"
            self.runs.update_or_keep(rec, state="FAILED", finished_at=time.time(), error=error)
            raise
        return {"run_id": rec.run_id, "results": rec.results, "rows_scanned": rec.rows_scanned,
                "rows_skipped": rec.rows_skipped}

    def results(self, run_id: str, columns: list[str] | None = None) -> pa.Table:
        """id, rank, score (+ ``columns`` as they were at the run's version)."""
        rec = self.runs.get(run_id)
        if rec.state != "SUCCEEDED":
            raise FailedPrecondition(f"run {run_id} is {rec.state}; results exist once it has SUCCEEDED")
        table = self.runs.results(run_id)
        if columns:
            extra = [c for c in columns if c not in ("id", "rank", "score")]
            if extra:
                col = self.store.collection(rec.collection)
                rows = col.take(table.column("id").to_pylist(), ["id", *extra], version=rec.version)
                index = {v: i for i, v in enumerate(rows.column("id").to_pylist())}
                positions = pa.array([index.get(i) for i in table.column("id").to_pylist()], pa.int64())
                for name in extra:
                    table = table.append_column(name, rows.column(name).take(positions))
        return table


def _plain(value: Any) -> Any:
    """``stats`` as JSON values (NumPy scalars and arrays as Python numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- RunSpec <-> protobuf, field by field and by name ----------------------------------------


def _fill(msg: Message, fd: FieldDescriptor, value: Any) -> None:
    """Set ``msg.<fd>`` from a RunSpec value: a scalar, an enum by name, a Struct from a
    dict, a map from a dict (of scalars, or of dicts filling a message by field name)."""
    name = fd.name
    if fd.message_type is struct_pb2.Struct.DESCRIPTOR:
        getattr(msg, name).update(value)
    elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        target, value_fd = getattr(msg, name), fd.message_type.fields_by_name["value"]
        if value_fd.message_type is None:
            target.update(value)
            return
        for key, sub in value.items():
            entry = target[key]
            for sub_fd in value_fd.message_type.fields:
                if sub.get(sub_fd.name) is not None:
                    _fill(entry, sub_fd, sub[sub_fd.name])
    elif fd.enum_type is not None:
        setattr(msg, name, fd.enum_type.values_by_name[value].number)
    elif fd.type == FieldDescriptor.TYPE_DOUBLE:
        setattr(msg, name, float(value))
    else:
        setattr(msg, name, value)


def run_to_proto(rec: RunSpec, jobs: JobManager) -> mining_pb2.MiningRun:
    """A run record as ``MiningRun``: every RunSpec field the message has, by name."""
    msg = mining_pb2.MiningRun()
    by_name = msg.DESCRIPTOR.fields_by_name
    for f in fields(RunSpec):
        value = getattr(rec, f.name)
        if f.name in by_name and value is not None:
            _fill(msg, by_name[f.name], value)
    msg.params_json = json.dumps(rec.params)
    if rec.job_id:
        # the job record may have been pruned; the run record stands alone
        with contextlib.suppress(AssayError):
            msg.job.CopyFrom(job_to_proto(jobs.get(rec.job_id)))
    return msg


def run_from_request(request: mining_pb2.StartMiningRequest) -> RunSpec:
    """The run a ``StartMiningRequest`` asks for: each of its fields is the RunSpec request
    field of the same name (unset optional fields keep the RunSpec default)."""
    given: dict[str, Any] = {}
    for fd in request.DESCRIPTOR.fields:
        if fd.name not in REQUEST_FIELDS:
            raise AssertionError(f"StartMiningRequest.{fd.name} is not a RunSpec request field")
        if fd.message_type is struct_pb2.Struct.DESCRIPTOR:
            # Struct numbers arrive as floats: give integral ones back their int type.
            given[fd.name] = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                              for k, v in struct_params(request).items()}
        elif not fd.has_presence or request.HasField(fd.name):
            given[fd.name] = getattr(request, fd.name)
    return RunSpec(**given)


def _param_spec(p: registry.Param) -> mining_pb2.ParamSpec:
    spec = mining_pb2.ParamSpec(name=p.name, type=p.kind, help=p.help, choices=list(p.choices))
    spec.default.CopyFrom(struct_pb2.Value())
    json_format.ParseDict(p.default, spec.default)
    if p.min is not None:
        spec.min = p.min
    if p.max is not None:
        spec.max = p.max
    return spec


class MiningServicer(mining_pb2_grpc.MiningServicer):
    def __init__(self, mining: MiningService) -> None:
        self.mining = mining

    def ListMiners(self, request, context):  # noqa: N802 — gRPC method names
        return mining_pb2.ListMinersResponse(miners=[
            mining_pb2.MinerInfo(name=s.name, family=s.family, description=s.description, inputs=list(s.inputs),
                                 batch=s.select is not None, params=[_param_spec(p) for p in s.params])
            for s in registry.REGISTRY.values()
        ])

    def StartMining(self, request, context):  # noqa: N802
        return run_to_proto(self.mining.start(run_from_request(request)), self.mining.jobs)

    def GetRun(self, request, context):  # noqa: N802
        return run_to_proto(self.mining.runs.get(request.run_id), self.mining.jobs)

    def ListRuns(self, request, context):  # noqa: N802
        runs = self.mining.runs.list(request.collection or None, request.limit or 100)
        return mining_pb2.ListRunsResponse(runs=[run_to_proto(r, self.mining.jobs) for r in runs])

    def CancelRun(self, request, context):  # noqa: N802
        rec = self.mining.runs.get(request.run_id)
        if rec.job_id:
            self.mining.jobs.cancel(rec.job_id)
        return run_to_proto(self.mining.runs.get(request.run_id), self.mining.jobs)

    def RunResults(self, request, context):  # noqa: N802
        table = self.mining.results(request.run_id, list(request.columns) or None)
        page = request.page_rows or 8192
        for start in range(0, max(1, table.num_rows), page):
            chunk = table.slice(start, page)
            yield common_pb2.ArrowPage(arrow_ipc=table_to_ipc(chunk), rows=chunk.num_rows)


def add_mining_servicer(server: Any, mining: MiningService) -> str:
    mining_pb2_grpc.add_MiningServicer_to_server(MiningServicer(mining), server)
    return mining_pb2.DESCRIPTOR.services_by_name["Mining"].full_name


__all__ = ["MiningService", "add_mining_servicer", "run_from_request", "run_to_proto"]
