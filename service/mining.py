"""Mining on the server: runs as jobs, their records, and the Mining gRPC service.

StartMining validates the request completely (miner, size, parameters, model, filter,
non-empty pool with predictions) before anything is persisted, pins the collection's
current version in a new run record, and starts a ``mine`` job that executes it with
:func:`miners.runner.run_mining`. Results are appended in one write when the run ends,
then the record becomes SUCCEEDED.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pyarrow as pa
from google.protobuf import json_format, struct_pb2

from indexing.errors import (
    AssayError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    classify_error,
)
from indexing.store import Collection, Store
from miners import registry
from miners.runner import MiningRequest, run_mining, validate_request
from miners.runs import RunRecord, RunStore
from protos.assay.v1 import common_pb2, jobs_pb2, mining_pb2, mining_pb2_grpc
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

    def start(self, req: MiningRequest) -> RunRecord:
        col = self.store.collection(req.collection)
        _, params = validate_request(col, req)
        if params.get("seed_texts"):
            # Embed text seeds now, with the space's embedder: the run record then holds the
            # vectors, and a rerun does not depend on the model still being around.
            vectors = self.embedders.for_space(col.space(req.space)).embed(params["seed_texts"])
            params = {**params, "seed_vectors": [*params["seed_vectors"], *vectors.astype(float).tolist()],
                      "seed_texts": []}
        if not self.jobs.has_capacity():
            raise ResourceExhausted(f"the job queue is full: {self.jobs.max_queued} jobs are pending or running, "
                                    "the limit (max_jobs); try again later")
        rec = self.runs.new_run(
            collection=col.name, miner=req.miner, size=req.size, seed=req.seed,
            version=col.version if req.version is None else int(col.at_version(req.version).version),
            model=req.model or "", space=req.space or "", where=req.where or "",
            reference_where=req.reference_where or "", reverse=req.reverse, params=params,
        )
        job = self.jobs.start("mine", col.name, {"run_id": rec.run_id})
        return self.runs.update(rec, job_id=job.id)

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
            rec = self.runs.update(rec, state="RUNNING", job_id=ctx.job_id, error="", progress=0.0)
            # The version the run reads stays through version cleanup until it is done.
            with col.pin_version(rec.version):
                out = run_mining(col, rec, progress=ctx.progress, check=ctx.check)
            ctx.check()
            t0 = time.perf_counter()
            self.runs.write_results(rec, out.ids, out.scores, out.related)
            timings = {**out.timings, "write_s": time.perf_counter() - t0}
            rec = self.runs.update(rec, state="SUCCEEDED", progress=1.0, results=len(out.ids),
                                   rows_scanned=out.rows_scanned, rows_skipped=out.rows_skipped,
                                   timings=timings, graph=out.graph or {}, finished_at=time.time())
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


def run_to_proto(rec: RunRecord, jobs: JobManager) -> mining_pb2.MiningRun:
    msg = mining_pb2.MiningRun(
        run_id=rec.run_id, collection=rec.collection, miner=rec.miner, model=rec.model, space=rec.space,
        where=rec.where, reference_where=rec.reference_where, size=rec.size, seed=rec.seed, reverse=rec.reverse,
        version=rec.version, state=jobs_pb2.JobState.Value(rec.state), rows_scanned=rec.rows_scanned,
        rows_skipped=rec.rows_skipped, results=rec.results, error=rec.error, timings=rec.timings,
        created_at=rec.created_at, finished_at=rec.finished_at,
    )
    msg.params.update(rec.params)
    for role, info in (rec.graph or {}).items():
        g = msg.graph[role]
        for name in ("method", "k", "recall_sample", "target_recall", "below_target", "rows", "queries", "nlist",
                     "nprobe", "build_s", "recall_s", "search_s", "device", "cached"):
            if info.get(name) is not None:
                setattr(g, name, info[name])
        if info.get("recall") is not None:
            g.recall = float(info["recall"])
    if rec.job_id:
        # the job record may have been pruned; the run record stands alone
        with contextlib.suppress(AssayError):
            msg.job.CopyFrom(job_to_proto(jobs.get(rec.job_id)))
    return msg


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
        params = struct_params(request)
        # Struct numbers arrive as floats: give integral ones back their int type.
        params = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in params.items()}
        req = MiningRequest(
            collection=request.collection, miner=request.miner, size=int(request.size),
            model=request.model or None, space=request.space or None, where=request.where or None,
            reference_where=request.reference_where or None, params=params,
            seed=int(request.seed) if request.HasField("seed") else 0, reverse=request.reverse,
            version=int(request.version) if request.HasField("version") else None,
        )
        return run_to_proto(self.mining.start(req), self.mining.jobs)

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


__all__ = ["MiningService", "add_mining_servicer"]
