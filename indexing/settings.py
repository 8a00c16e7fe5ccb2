"""Every setting of assay, in one table: environment variables and tunable constants.

Each entry is a :class:`Setting`: its name, default, what it does, and the environment
variable that sets it, if any. Three kinds:

* **server settings** (lower-case names): the fields of ``service.server.ServerConfig``,
  each read from ``ASSAY_<NAME>`` (``ASSAY_TOKEN`` / ``ASSAY_READ_TOKEN`` for the token
  lists) by ``ServerConfig.from_env``; ``assay serve`` flags win over them. The request
  limits ``max_k`` ... are ``service.servicers.Limits``.
* **environment variables** read elsewhere (the data root, object-store access, the
  CLI's server and log settings): named by the variable; read with :func:`read` at the
  moment they are needed, so a variable set after import counts.
* **constants** (upper-case names): sizes, limits, caches, timeouts and batch sizes of
  the store, miners, scoring, jobs, the web page, notebooks and the client, bound here
  once and imported by the module that uses them (under the name it has always used
  there). Change them here. Block sizes and tolerances that belong to an algorithm stay
  next to its math in ``miners/``; per-collection index policies are stored with the
  space (``indexing.schema.IndexPolicy``); background maintenance and group commit take a
  ``MaintenancePolicy`` (``indexing.maintenance``).

An empty environment variable counts as unset. This module imports nothing but the
standard library: every layer, and the light client, may import it.
``python -m indexing.settings`` prints the README's table of settings (``--check FILE`` /
``--write FILE`` compare it with, or write it into, the README between its markers).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["SETTINGS", "Setting", "markdown_table", "read", "server_env"]

TRUE_WORDS: Final = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Setting:
    """One setting: ``name`` (a server setting, an environment variable or a constant),
    ``default``, ``doc``, the ``env`` variable that sets it (None: set in code only),
    its ``group`` (where it acts) and ``kind`` (how a variable's text is parsed: str,
    int, float, bool, or list for comma-separated values)."""

    name: str
    default: Any
    doc: str
    group: str
    env: str | None = None
    kind: str = "str"

    def parse(self, raw: str) -> Any:
        if self.kind == "int":
            return int(raw)
        if self.kind == "float":
            return float(raw)
        if self.kind == "bool":
            return raw.strip().lower() in TRUE_WORDS
        if self.kind == "list":
            return tuple(t.strip() for t in raw.split(",") if t.strip())
        return raw

    def raw(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The variable's text, or None when it is unset or empty (or there is none)."""
        if self.env is None:
            return None
        return (os.environ if environ is None else environ).get(self.env) or None

    def read(self, environ: Mapping[str, str] | None = None) -> Any:
        """The value: the environment variable's, parsed, when it is set; else the default."""
        raw = self.raw(environ)
        return self.default if raw is None else self.parse(raw)


SETTINGS: dict[str, Setting] = {}


def _kind(default: Any) -> str:
    for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (tuple, "list")):
        if isinstance(default, t):
            return name
    return "str"


def _define(name: str, default: Any, doc: str, group: str, *, env: str | None = None,
            kind: str | None = None) -> Any:
    if name in SETTINGS:
        raise ValueError(f"setting {name} is defined twice")
    SETTINGS[name] = Setting(name, default, doc, group, env, kind or _kind(default))
    return default


def _server(name: str, default: Any, doc: str, *, kind: str | None = None,
            env: str | None = None) -> None:
    _define(name, default, doc, "server", env=env or f"ASSAY_{name.upper()}", kind=kind)


def _env(name: str, default: Any, doc: str, group: str, kind: str = "str") -> None:
    _define(name, default, doc, group, env=name, kind=kind)


def read(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The value of setting ``name`` now (its variable, parsed, or its default)."""
    return SETTINGS[name].read(environ)


def server_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The server settings whose environment variable is set: field name -> value."""
    out: dict[str, Any] = {}
    for s in SETTINGS.values():
        if s.group in ("server", "limits") and s.env and s.raw(environ) is not None:
            out[s.name] = s.read(environ)
    return out


def server_default(name: str) -> Any:
    """The default of a server setting (``ServerConfig`` and ``Limits`` take theirs here)."""
    setting = SETTINGS[name]
    assert setting.group in ("server", "limits"), name
    return setting.default


# -- the server: ServerConfig (assay serve's flags win over the variables) --------------------

_server("data", None, "the data root: a folder or `s3://bucket/prefix` (also for the CLI and the demo)",
        kind="str")
_server("host", "127.0.0.1", "bind address (loopback only without a token, see Auth)")
_server("port", 50051, "gRPC port; 0 = any free port")
_server("tokens", (), "read-write bearer tokens, comma-separated (the CLI sends the first one)",
        env="ASSAY_TOKEN")
_server("read_tokens", (), "read-only bearer tokens: search, query, results", env="ASSAY_READ_TOKEN")
_server("tls_cert", None, "PEM certificate chain: enables TLS (gRPC and web ports)", kind="str")
_server("tls_key", None, "PEM private key of `tls_cert`", kind="str")
_server("tls_client_ca", None, "PEM CA bundle: require client certificates it signed (mutual TLS)",
        kind="str")
_server("rate_limit", 0.0, "calls per second per token (without auth, all callers together); 0 = off")
_server("rate_burst", 0, "calls at once above the rate; 0 = max(1, rate)")
_server("allow_unauthenticated_remote", False, "bind a non-loopback host without a token (1/true)")
_server("max_message_mb", 64, "largest gRPC message, both ways (MiB)")
_server("rpc_workers", 16, "threads serving gRPC calls")
_server("job_workers", 2, "jobs (optimize, index builds, reindex, mining runs) run at once")
_server("max_jobs", 64, "jobs pending or running at most; more are refused")
_server("grace_s", 10.0, "shutdown grace period: calls get it, jobs half of it")
_server("metrics_port", None, "Prometheus metrics port; unset = off", kind="int")
_server("http_port", None, "the web page's port; unset = off, 0 = any free port (`assay demo`: "
        "`DEMO_HTTP_PORT`)", kind="int")
_server("data_roots", (), "folders or `s3://` prefixes the web page may show images from, "
        "comma-separated; default the data root when it is local")
_server("optimize_every", 8, "fan-out of background compaction: small fragments of a size tier merged at once; "
        "0 switches automatic maintenance off")
_server("write_log", False, "acknowledge small upserts once they are in the collection's write-ahead log "
        "(local roots), applied to the table right after; reads wait for them (1/true)")
_server("keepalive_s", 120.0, "the server pings a connection quiet this long (s)")
_server("keepalive_timeout_s", 20.0, "and drops it when no answer comes in this long (s)")
_server("min_ping_interval_s", 10.0, "clients may ping this often (s), with or without calls")
_server("max_ping_strikes", 2, "early pings tolerated before GOAWAY `too_many_pings`")
_server("max_connection_idle_s", 0.0, "close connections without calls this long (s); 0 = never")
_server("max_connection_age_s", 0.0, "ask clients to reconnect after this long (s); 0 = never")
_server("max_connection_age_grace_s", 0.0, "then give calls in flight this long (s); 0 = no limit")

# -- request limits: service.servicers.Limits (answered RESOURCE_EXHAUSTED, naming the limit) --

_define("max_k", 10_000, "neighbours per search query at most", "limits", env="ASSAY_MAX_K")
_define("max_batch_rows", 100_000, "rows per upsert batch at most", "limits", env="ASSAY_MAX_BATCH_ROWS")
_define("max_page_rows", 100_000, "rows per scan page at most", "limits")
_define("max_queries", 10_000, "queries per search call at most", "limits")

# -- the data root and object storage (read when a store opens) -------------------------------

DEFAULT_ROOT: Final = _define("DEFAULT_ROOT", "./data", "the data root when neither `--data` nor "
                              "`ASSAY_DATA` gives one", "store")
_env("ASSAY_S3_ENDPOINT", None, "object-store endpoint (MinIO, a gateway); `http://` enables plain HTTP",
     "storage")
_env("AWS_ENDPOINT_URL", None, "the endpoint when `ASSAY_S3_ENDPOINT` is unset", "storage")
_env("AWS_ACCESS_KEY_ID", None, "object-store credentials (also read by pyarrow for `s3://` images)",
     "storage")
_env("AWS_SECRET_ACCESS_KEY", None, "object-store credentials", "storage")
_env("AWS_SESSION_TOKEN", None, "object-store session token", "storage")
_env("AWS_REGION", None, "object-store region (then `AWS_DEFAULT_REGION`, then `us-east-1`)", "storage")
_env("AWS_DEFAULT_REGION", None, "object-store region when `AWS_REGION` is unset", "storage")
_env("ASSAY_S3_CONNECT_TIMEOUT", "3s", "connecting to the object store may take this long", "storage")
_env("ASSAY_S3_TIMEOUT", "10s", "a whole object-store request may take this long", "storage")
_env("ASSAY_S3_MAX_RETRIES", "3", "retries of a failed object-store request", "storage")
_env("ASSAY_S3_RETRY_TIMEOUT", "10", "seconds of retrying a failed object-store request", "storage")

# -- the CLI and the demo -------------------------------------------------------------------

_env("ASSAY_SERVER", "127.0.0.1:50051", "the server remote CLI commands call (`--server`)", "cli")
_env("ASSAY_LOG_LEVEL", "WARNING", "the CLI's log level (`--log-level`)", "cli")
_env("ASSAY_LOG_FORMAT", "json", "`assay serve`'s log format: json or text (`--log-format`)", "cli")
_env("USER", "", "the default author of `assay dataset commit`", "cli")
DEMO_HTTP_PORT: Final = _define("DEMO_HTTP_PORT", 8765, "`assay demo`'s web port when neither "
                                "`--http-port` nor `ASSAY_HTTP_PORT` gives one", "cli")

# -- the store ---------------------------------------------------------------------------------

MAX_K: Final = _define("MAX_K", 10_000, "k of a store search at most (the server's `max_k` "
                       "is checked first)", "store")
SCHEMA_RECHECK_S: Final = _define("SCHEMA_RECHECK_S", 0.05, "how stale a cached schema/registry "
                                  "may be (other writers' changes), in seconds", "store")
ID_CHUNK: Final = _define("ID_CHUNK", 10_000, "ids per `id IN (...)` lookup", "store")
COMPACT_KEEP_ROWS: Final = _define("COMPACT_KEEP_ROWS", 32_768, "fragments at least this big are "
                                   "left alone by compaction unless over 10% of their rows are "
                                   "deleted", "store")
# LanceDB's caches (shared by every collection of a store; assay's own tables have their
# own, smaller pair): the index cache holds vector/scalar index pages, the metadata cache
# manifests and fragment metadata — per version, which a steady write stream makes many
# of. Bounded, so memory stays flat.
INDEX_CACHE_BYTES: Final = _define("INDEX_CACHE_BYTES", 1 << 30, "LanceDB's index cache, shared "
                                   "by the store's collections", "store")
METADATA_CACHE_BYTES: Final = _define("METADATA_CACHE_BYTES", 64 << 20, "LanceDB's metadata "
                                      "(manifest) cache, shared by the store's collections", "store")
SYSTEM_INDEX_CACHE_BYTES: Final = _define("SYSTEM_INDEX_CACHE_BYTES", 32 << 20, "LanceDB's index cache "
                                          "of assay's own tables (runs, results, jobs, datasets), "
                                          "apart from the collections'", "store")
SYSTEM_METADATA_CACHE_BYTES: Final = _define("SYSTEM_METADATA_CACHE_BYTES", 16 << 20, "LanceDB's "
                                             "metadata cache of assay's own tables", "store")
FLAT_CACHE_BYTES: Final = _define("FLAT_CACHE_BYTES", 512 << 20, "vectors held in memory for exact "
                                  "(flat) search, for all of a store's spaces together; a space "
                                  "whose vectors do not fit is searched by LanceDB "
                                  "(indexing.flat_search)", "store")
FLAT_METADATA_CACHE_BYTES: Final = _define("FLAT_METADATA_CACHE_BYTES", 16 << 20, "Lance's metadata "
                                           "cache (manifests, data file footers) of the datasets "
                                           "exact search reads, per collection", "store")
MAX_IMAGE_BYTES: Final = _define("MAX_IMAGE_BYTES", 256 << 20, "largest image file read", "store")
IMAGE_CONNECT_TIMEOUT_S: Final = _define("IMAGE_CONNECT_TIMEOUT_S", 10.0, "connecting to S3 "
                                         "for an image may take this long (s)", "store")
IMAGE_REQUEST_TIMEOUT_S: Final = _define("IMAGE_REQUEST_TIMEOUT_S", 60.0, "reading an image "
                                         "from S3 may take this long (s)", "store")
CSV_BLOCK_BYTES: Final = _define("CSV_BLOCK_BYTES", 8 << 20, "bytes per CSV read block while "
                                 "ingesting (types are inferred from the first)", "store")
ANALYTICS_BATCH_ROWS: Final = _define("ANALYTICS_BATCH_ROWS", 65_536, "rows per streamed batch "
                                      "of analytics and exports", "store")
MAX_BINS: Final = _define("MAX_BINS", 10_000, "histogram bins at most", "store")
MAX_TOP: Final = _define("MAX_TOP", 10_000, "confused pairs listed at most", "store")
MAX_QUADRANT_IDS: Final = _define("MAX_QUADRANT_IDS", 10_000, "ids an uncertainty-quality report "
                                  "lists per quadrant at most (the counts are always complete)", "store")
SCAN_SHARE: Final = _define("SCAN_SHARE", 0.25, "a dataset's members are read by one filtered "
                            "scan when they are at least this share of the rows", "store")
MEMBERSHIP_CACHE: Final = _define("MEMBERSHIP_CACHE", 16, "committed dataset memberships kept "
                                  "in memory", "store")
DATASETS_OPTIMIZE_EVERY: Final = _define("DATASETS_OPTIMIZE_EVERY", 50, "writes to the dataset "
                                         "tables between background compactions", "store")
INDEXED_MERGE_MIN_ROWS: Final = _define("INDEXED_MERGE_MIN_ROWS", 120_000, "an upsert that updates "
                                        "at most `ID_CHUNK` rows of a collection this big merges through "
                                        "the BTREE on id (its batch made whole from the stored rows); "
                                        "smaller, by a scan of every id, the cheaper there", "store")
ONE_BATCH_MAX_ROWS: Final = _define("ONE_BATCH_MAX_ROWS", 4_096, "a write of at most this many rows "
                                    "reaches LanceDB as one record batch (its chunks copied together); "
                                    "bigger ones (a bulk ingest's) as they are", "store")
GROUP_COMMIT_LINGER_S: Final = _define("GROUP_COMMIT_LINGER_S", 0.1, "a busy collection's next "
                                       "commit waits at most this long (and never longer than the last "
                                       "commit took) for the writers the last one answered; 0 = never",
                                       "store")
WRITE_LOG_BATCH_ROWS: Final = _define("WRITE_LOG_BATCH_ROWS", 4_096, "with the write log on, "
                                      "upsert batches of at most this many rows go through it; bigger "
                                      "ones (a bulk ingest's) are acknowledged after their commit", "store")
WRITE_LOG_BACKLOG_ROWS: Final = _define("WRITE_LOG_BACKLOG_ROWS", 16_384, "rows acknowledged from "
                                        "the write log and not yet applied at most; above, a writer "
                                        "also waits for its commit", "store")
WRITE_LOG_APPLY_ROWS: Final = _define("WRITE_LOG_APPLY_ROWS", 8_192, "the write log's applier lets "
                                      "this many rows gather before a commit (a commit costs about the "
                                      "same whatever it holds), unless a read or an unlogged write waits", "store")
WRITE_LOG_APPLY_WAIT_S: Final = _define("WRITE_LOG_APPLY_WAIT_S", 0.5, "and waits for them this long "
                                        "at most", "store")
WRITE_LOG_READ_WAIT_S: Final = _define("WRITE_LOG_READ_WAIT_S", 30.0, "a read waits this long at most "
                                       "for the writes acknowledged before it to be applied, then fails "
                                       "UNAVAILABLE", "store")
REINDEX_MAX_PASSES: Final = _define("REINDEX_MAX_PASSES", 4, "reindex passes at most: the first "
                                    "and catch-up passes for rows written meanwhile", "store")

# -- mining ------------------------------------------------------------------------------------

MAX_SIZE: Final = _define("MAX_SIZE", 1_000_000, "rows a mining run selects at most", "mining")
MINING_CHUNK_ROWS: Final = _define("MINING_CHUNK_ROWS", 65_536, "rows per chunk of a mining scan",
                                   "mining")
MINING_SCORE_CACHE_BYTES: Final = _define("MINING_SCORE_CACHE_BYTES", 128 << 20, "scores of "
                                          "row-local miners kept per fragment between runs, for all "
                                          "of a store's collections together (9 bytes a row; "
                                          "indexing.fragment_values)", "mining")
MINING_THREADS: Final = _define("MINING_THREADS", max(1, min(4, os.cpu_count() or 1)),
                                "threads scoring chunks while the next ones are read "
                                "(min(4, cores))", "mining")
EXACT_MAX_ROWS: Final = _define("EXACT_MAX_ROWS", 50_000, "up to this many rows a k-NN graph is "
                                "exact; above, it comes from the space's vector index", "mining")
MEMMAP_ABOVE_BYTES: Final = _define("MEMMAP_ABOVE_BYTES", 4 << 30, "a pool's vectors larger than "
                                    "this are held in a memory-mapped temporary file", "mining")
POOL_MAPPED_BUDGET_BYTES: Final = _define("POOL_MAPPED_BUDGET_BYTES", 4 << 30, "file-backed pages a "
                                          "run keeps resident at most (checked every 0.1 s): above, the "
                                          "pages of memory-mapped pools go back to the page cache (0: "
                                          "never)", "mining")
KNN_QUERY_BATCH: Final = _define("KNN_QUERY_BATCH", 512, "queries per batched index search of "
                                 "a k-NN graph", "mining")
POOL_CHUNK_ROWS: Final = _define("POOL_CHUNK_ROWS", 65_536, "rows per chunk while loading a "
                                 "pool's vectors", "mining")
KNN_CACHE_ENTRIES: Final = _define("KNN_CACHE_ENTRIES", 8, "k-NN graphs kept in memory (runs "
                                   "on the same version and filter reuse them; a graph for k "
                                   "serves every k' <= k)", "mining")
KNN_CACHE_MAX_BYTES: Final = _define("KNN_CACHE_MAX_BYTES", 4 << 30, "bytes of k-NN graphs kept in "
                                     "memory at most (the newest is always kept)", "mining")

# -- selection, cold start, label issues, deduplication (miners/select.py, coldstart.py, ...) ----

SEALS_K: Final = _define("SEALS_K", 100, "SEALS: nearest unlabeled rows of each labeled row kept as "
                         "candidates (the paper's k)", "mining")
SELECT_LAZY_BUDGET: Final = _define("SELECT_LAZY_BUDGET", 4096, "`select`: rows one lazy greedy "
                                    "step may visit (at least N/64) before every row is brought up "
                                    "to date and the rest is eager", "mining")
TYPICLUST_K: Final = _define("TYPICLUST_K", 20, "TypiClust: neighbours of the typicality "
                             "1 / mean distance (the paper's 20)", "mining")
TYPICLUST_MIN_CLUSTER: Final = _define("TYPICLUST_MIN_CLUSTER", 5, "TypiClust: clusters smaller "
                                       "than this are never picked from (the authors' code: 5)",
                                       "mining")
TYPICLUST_MAX_CLUSTERS: Final = _define("TYPICLUST_MAX_CLUSTERS", 5000, "TypiClust: k-means "
                                        "clusters at most (|labeled| + batch beyond: several "
                                        "picks per cluster, most typical first)", "mining")
TYPICLUST_POINTS_PER_CLUSTER: Final = _define("TYPICLUST_POINTS_PER_CLUSTER", 64, "TypiClust: "
                                              "k-means trains on at most this many seeded rows "
                                              "per cluster, then assigns every row", "mining")
PROBCOVER_PURITY: Final = _define("PROBCOVER_PURITY", 0.95, "ProbCover: the ball radius is the "
                                  "largest with at least this share of pure balls (alpha)",
                                  "mining")
PROBCOVER_PURITY_SAMPLE: Final = _define("PROBCOVER_PURITY_SAMPLE", 20_000, "ProbCover: balls "
                                         "whose purity is measured (a seeded sample beyond)",
                                         "mining")
PROBCOVER_EXACT_ROWS: Final = _define("PROBCOVER_EXACT_ROWS", 50_000, "ProbCover: up to this many "
                                      "rows (labeled + pool) the purity rule's distances and the "
                                      "delta-ball graph are exact (O(N^2 d)); above, both come from one "
                                      "set of inverted lists (a join, no copy of the rows), each with its recall "
                                      "measured on a sample", "mining")
CLUSTER_MARGIN_MAX_CLUSTERS: Final = _define("CLUSTER_MARGIN_MAX_CLUSTERS", 2048, "Cluster-Margin: "
                                             "clusters at most, however large the batch (then "
                                             "several rounds of the round-robin)", "mining")
CLUSTER_MARGIN_SAMPLE: Final = _define("CLUSTER_MARGIN_SAMPLE", 20_000, "Cluster-Margin: "
                                       "candidates clustered (the rest is assigned to the "
                                       "nearest cluster centre) when there are more", "mining")
SEMDEDUP_EPS: Final = _define("SEMDEDUP_EPS", 0.05, "SemDeDup: pairs with cosine similarity "
                              "above 1 - eps are semantic duplicates", "mining")
SEMDEDUP_CLUSTER_ROWS: Final = _define("SEMDEDUP_CLUSTER_ROWS", 1000, "SemDeDup: k-means "
                                       "clusters = rows / this (rounded, at least 1)", "mining")
LABEL_ISSUE_MIN_PER_CLASS: Final = _define("LABEL_ISSUE_MIN_PER_CLASS", 1, "confident learning: "
                                           "labeled rows of a class never all flagged: at least "
                                           "this many kept", "mining")

# -- scoring at the edge (service.scoring) -----------------------------------------------------

SCORING_MAX_K: Final = _define("SCORING_MAX_K", 1000, "k of novelty scoring at most", "scoring")
CALIBRATION_MAX_ROWS: Final = _define("CALIBRATION_MAX_ROWS", 100_000, "stored rows sampled to "
                                      "calibrate, by default", "scoring")
REFERENCE_SIZE: Final = _define("REFERENCE_SIZE", 2048, "rows of an exported scorer's "
                                "reference set, by default", "scoring")
MAX_REFERENCE_SIZE: Final = _define("MAX_REFERENCE_SIZE", 1_000_000, "rows of an exported "
                                    "scorer's reference set at most", "scoring")
SCORING_CHUNK_ROWS: Final = _define("SCORING_CHUNK_ROWS", 8192, "rows per chunk of a "
                                    "calibration scan", "scoring")
SCORER_EXPORT_CHUNK: Final = _define("SCORER_EXPORT_CHUNK", 1 << 20, "bytes per streamed chunk "
                                     "of an exported scorer", "scoring")
REFERENCE_CACHE: Final = _define("REFERENCE_CACHE", 4, "reference sets kept in memory",
                                 "scoring")

# -- the service: calls, jobs, exports ---------------------------------------------------------

MAX_MESSAGE_CHARS: Final = _define("MAX_MESSAGE_CHARS", 2000, "error messages are cut to this "
                                   "many characters", "service")
EXPORT_CHUNK_BYTES: Final = _define("EXPORT_CHUNK_BYTES", (1 << 20) - (64 << 10), "bytes per "
                                    "streamed export chunk (fits the smallest message limit)",
                                    "service")
UPSERT_READ_AHEAD_BYTES: Final = _define("UPSERT_READ_AHEAD_BYTES", 128 << 20, "bytes of an upsert "
                                         "stream's batches received and validated while its last "
                                         "commit runs (they go out together in the next commit)",
                                         "service")
RUNS_MAINTAIN_EVERY: Final = _define("RUNS_MAINTAIN_EVERY", 32, "writes to the mining run tables "
                                     "(`_runs`, `_run_results`) between their compactions", "service")
RUN_RECORDS_CACHED: Final = _define("RUN_RECORDS_CACHED", 1024, "mining run records the server keeps in "
                                    "memory, newest used first (it alone writes them: each lookup in "
                                    "`_runs` cost ~6 ms, three per run)", "service")
RUNS_CLEANUP_EVERY_S: Final = _define("RUNS_CLEANUP_EVERY_S", 10.0, "seconds between removals of "
                                      "old versions of the mining run tables and `_jobs` (those over "
                                      "10 s old: nothing reads them, and each read lists the versions "
                                      "kept)", "service")
JOB_RECORDS_KEPT: Final = _define("JOB_RECORDS_KEPT", 1024, "ended job records the server keeps in "
                                  "memory, newest first; older ones are read from `_jobs` when asked "
                                  "for (held, every record since the data root began grew the "
                                  "server without bound)", "service")
JOBS_COMPACT_EVERY: Final = _define("JOBS_COMPACT_EVERY", 32, "job record writes between "
                                    "compactions of the `_jobs` table (each record write joins on "
                                    "`id` across its fragments: at 200, 600 sequential mining runs "
                                    "took a record write from ~10 to ~20 ms)", "service")
REINDEX_BAD_SHOWN: Final = _define("REINDEX_BAD_SHOWN", 100, "bad rows listed in a reindex "
                                   "job's result (all are counted)", "service")
MAINTENANCE_WAIT_S: Final = _define("MAINTENANCE_WAIT_S", 30.0, "at shutdown, a running "
                                    "compaction or index build is waited for max(grace, this)",
                                    "service")
MALLOC_MMAP_THRESHOLD: Final = _define("MALLOC_MMAP_THRESHOLD", 256 << 10, "allocations of at "
                                       "least this many bytes are mmapped and returned when "
                                       "freed (glibc; 0: glibc's dynamic threshold)", "service")
MALLOC_TRIM_EVERY_S: Final = _define("MALLOC_TRIM_EVERY_S", 30.0, "seconds between returns of the "
                                     "heap's free pages to the system (glibc malloc_trim; 0: "
                                     "never)", "service")

# -- the web page and notebook grids -----------------------------------------------------------

SESSION_TTL_S: Final = _define("SESSION_TTL_S", 12 * 3600, "a web login lasts this long (s)", "web")
MAX_SESSIONS: Final = _define("MAX_SESSIONS", 10_000, "web sessions held at most", "web")
MAX_CACHED_URIS: Final = _define("MAX_CACHED_URIS", 100_000, "image URIs remembered per "
                                 "collection for thumbnails", "web")
THUMB_CACHE_BYTES: Final = _define("THUMB_CACHE_BYTES", 64 << 20, "thumbnails kept in memory",
                                   "web")
MAX_GRID: Final = _define("MAX_GRID", 200, "items per grid of the page at most", "web")
MAX_MAP_POINTS: Final = _define("MAX_MAP_POINTS", 5000, "rows the page's map samples at most",
                                "web")
MAX_LIST: Final = _define("MAX_LIST", 200, "ids a history or diff lists at most", "web")
MAX_LABELS: Final = _define("MAX_LABELS", 50, "labels of the page's label distribution", "web")
TEXT_SNIPPET: Final = _define("TEXT_SNIPPET", 280, "characters of text shown on a card", "web")
DEFAULT_THUMB_SIZE: Final = _define("DEFAULT_THUMB_SIZE", 160, "thumbnail size (px) when none "
                                    "is asked for", "web")
GRID_LIMIT: Final = _define("GRID_LIMIT", 60, "items of a notebook grid (`show()`), by default",
                            "web")
THUMB_TIMEOUT_S: Final = _define("THUMB_TIMEOUT_S", 10.0, "a notebook grid waits this long for "
                                 "a thumbnail (s)", "web")
THUMB_MAX_BYTES: Final = _define("THUMB_MAX_BYTES", 8 << 20, "largest thumbnail a notebook grid "
                                 "accepts", "web")
THUMB_WORKERS: Final = _define("THUMB_WORKERS", 6, "thumbnails a notebook grid fetches at once",
                               "web")

# -- the Python client (Client(...) arguments override them) ----------------------------------

CLIENT_TIMEOUT_S: Final = _define("CLIENT_TIMEOUT_S", 30.0, "deadline of unary calls (s): "
                                  "`Client(timeout=)`", "client")
CLIENT_RETRIES: Final = _define("CLIENT_RETRIES", 4, "retries of UNAVAILABLE: `Client(retries=)`",
                                "client")
RETRY_BASE_DELAY_S: Final = _define("RETRY_BASE_DELAY_S", 0.1, "first retry's backoff (s), "
                                    "doubling", "client")
RETRY_MAX_DELAY_S: Final = _define("RETRY_MAX_DELAY_S", 5.0, "longest retry backoff (s)", "client")
CLIENT_MAX_MESSAGE_BYTES: Final = _define("CLIENT_MAX_MESSAGE_BYTES", 64 * 1024 * 1024, "largest "
                                          "message: `Client(max_message_bytes=)`", "client")
CLIENT_KEEPALIVE_S: Final = _define("CLIENT_KEEPALIVE_S", 60.0, "ping after this long without "
                                    "activity while calls are in flight: `Client(keepalive_s=)`",
                                    "client")
CLIENT_KEEPALIVE_TIMEOUT_S: Final = _define("CLIENT_KEEPALIVE_TIMEOUT_S", 20.0, "drop the "
                                            "connection when a ping gets no answer in this long",
                                            "client")
UPSERT_WINDOW: Final = _define("UPSERT_WINDOW", 4, "upsert batches sent and not yet "
                               "acknowledged, at most", "client")
REQUEST_ENVELOPE_BYTES: Final = _define("REQUEST_ENVELOPE_BYTES", 16 * 1024, "bytes of an upsert "
                                        "request kept for all but its Arrow payload", "client")

GROUPS: Final = {
    "server": "The server (`service.server.ServerConfig`; `assay serve` flags win over the variables)",
    "limits": "Request limits (`service.servicers.Limits`; answered RESOURCE_EXHAUSTED, naming the limit)",
    "storage": "Object storage (read when a store opens an `s3://` root)",
    "cli": "The CLI and the demo",
    "store": "The store (`indexing/`)",
    "mining": "Mining (`miners/`)",
    "scoring": "Scoring at the edge (`service/scoring.py`)",
    "service": "The service: calls, jobs, exports",
    "web": "The web page and notebook grids",
    "client": "The Python client (`Client(...)` arguments override them)",
}


def _shown(value: Any) -> str:
    if value is None or value == () or value == "":
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 20} MiB" if value < 1 << 30 else f"{value >> 30} GiB"
    if isinstance(value, int) and value >= 100_000:
        return f"{value:,}"
    return str(value)


def markdown_table() -> str:
    """The README's tables of every setting: one per group, in the order defined here."""
    out: list[str] = []
    for group, title in GROUPS.items():
        rows = [s for s in SETTINGS.values() if s.group == group]
        out += [f"**{title}**", "", "| setting | environment variable | default | what |",
                "|---|---|---|---|"]
        for s in rows:
            default = "min(4, cores)" if s.name == "MINING_THREADS" else _shown(s.default)
            env = f"`{s.env}`" if s.env else "–"
            name = "–" if s.env == s.name else f"`{s.name}`"
            out.append(f"| {name} | {env} | {default} | {s.doc} |")
        out.append("")
    return "\n".join(out)


BEGIN: Final = "<!-- settings table: generated by `python -m indexing.settings --write README.md` -->\n"
END: Final = "<!-- end of the settings table -->\n"


def _with_table(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + markdown_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stdout.write(markdown_table())
        return 0
    if len(args) != 2 or args[0] not in ("--check", "--write"):
        sys.stderr.write("usage: python -m indexing.settings [--check FILE | --write FILE]\n")
        return 2
    with open(args[1], encoding="utf-8") as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        sys.stderr.write(f"{args[1]} has no settings table markers\n")
        return 1
    wanted = _with_table(text)
    if args[0] == "--write":
        if wanted != text:
            with open(args[1], "w", encoding="utf-8") as fh:
                fh.write(wanted)
        return 0
    if wanted != text:
        sys.stderr.write(f"{args[1]}: the settings table is out of date; run "
                         f"`python -m indexing.settings --write {args[1]}` (or `make settings`)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
