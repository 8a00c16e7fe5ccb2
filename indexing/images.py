"""Open images named by a URI: a local path, a ``file://`` URI or ``s3://bucket/key``.

Bulk ingest and the reindex job read images that live next to the data file, on local
disk, or in an S3-compatible object store (AWS, MinIO, Ceph, R2...). This module is the
one place that turns such a URI into an RGB ``PIL.Image``, so every caller accepts the
same URIs and reports an unreadable image the same way: an ``InvalidArgument`` that names
the URI and the reason, which bulk jobs record as a bad row instead of failing the batch.

Object-store access goes through ``pyarrow.fs.S3FileSystem``, configured from the same
options the store uses (``indexing.store.storage_options_from_env``: ``ASSAY_S3_ENDPOINT``
or ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``), or from explicit Lance/object_store style
``storage_options``. One filesystem object is built per distinct configuration and reused:
building one costs a client and its connection pool, which a batch must not pay per image.

``open_images`` reads the object-store URIs of a batch with a small shared thread pool:
those reads are latency bound (tens of ms each), so overlapping them is what makes S3
ingest run at local speed; local files are read inline, where threads only cost.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from indexing.errors import InvalidArgument
from indexing.settings import IMAGE_CONNECT_TIMEOUT_S as _CONNECT_TIMEOUT_S
from indexing.settings import IMAGE_REQUEST_TIMEOUT_S as _REQUEST_TIMEOUT_S
from indexing.settings import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    import pyarrow.fs
    from PIL import Image

__all__ = ["MAX_IMAGE_BYTES", "SUPPORTED_URIS", "canonical_uri", "open_image", "open_images"]

#: What ``open_image`` accepts, as error messages name it.
SUPPORTED_URIS = "local paths, file:///absolute/path URIs and s3://bucket/key"

#: Objects larger than this are refused before they are downloaded: a remote object is
#: read whole into memory, and no sane training image is this large.

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Bounded so that a stalled endpoint fails a row instead of hanging a bulk job.


def _scheme(uri: str) -> str | None:
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else None


def _local_path(uri: str, base_dir: Path | None) -> Path:
    """The absolute path of a local path or ``file://`` URI (relative paths resolve against
    ``base_dir``, else the working directory)."""
    if _scheme(uri) == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            # Historically ``file://rel/path`` meant a relative path; keep reading it so.
            path = Path(unquote(parts.netloc + parts.path))
        else:
            path = Path(unquote(parts.path))
    else:
        path = Path(uri)
    path = path.expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    return path.resolve()


def _split_s3(uri: str) -> tuple[str, str]:
    # Not urlsplit: S3 keys may contain '?' and '#', which are not query or fragment here.
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise InvalidArgument(f"cannot read image {uri}: expected s3://bucket/key", field="uri")
    return bucket, key


def _check_uri(uri: Any) -> str:
    if not isinstance(uri, str) or not uri:
        raise InvalidArgument(f"image uri must be a non-empty string, got {uri!r}", field="uri")
    scheme = _scheme(uri)
    if scheme not in (None, "file", "s3"):
        raise InvalidArgument(
            f"cannot read image {uri}: unsupported URI scheme '{scheme}://'; supported are "
            f"{SUPPORTED_URIS}",
            field="uri",
        )
    return uri


def canonical_uri(uri: str, *, base_dir: Path | None = None) -> str:
    """One spelling per image: the absolute path for local paths and ``file://`` URIs, the
    URI itself for ``s3://``. Callers use it to read each distinct image once. Raises
    ``InvalidArgument`` for an unsupported scheme."""
    uri = _check_uri(uri)
    if _scheme(uri) == "s3":
        _split_s3(uri)
        return uri
    return str(_local_path(uri, base_dir))


# ---------------------------------------------------------------------------- S3


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _s3_kwargs(options: Mapping[str, str]) -> dict[str, Any]:
    """``S3FileSystem`` arguments from Lance / object_store style storage options (the
    keys ``Store`` uses); keys that concern only Lance tables are ignored."""
    opts = {str(k).lower(): v for k, v in options.items() if v is not None and v != ""}

    def first(*keys: str) -> Any:
        return next((opts[k] for k in keys if k in opts), None)

    kw: dict[str, Any] = {
        "region": first("region", "aws_region", "aws_default_region") or "us-east-1",
        "connect_timeout": _CONNECT_TIMEOUT_S,
        "request_timeout": _REQUEST_TIMEOUT_S,
    }
    access = first("aws_access_key_id", "access_key_id")
    secret = first("aws_secret_access_key", "secret_access_key")
    if access and secret:
        kw["access_key"] = str(access)
        kw["secret_key"] = str(secret)
        token = first("aws_session_token", "session_token", "aws_token", "token")
        if token:
            kw["session_token"] = str(token)
    # Otherwise the AWS SDK's default chain (environment, ~/.aws, instance role) applies.
    if _truthy(first("aws_skip_signature", "skip_signature") or ""):
        kw["anonymous"] = True
    if _truthy(first("aws_virtual_hosted_style_request", "virtual_hosted_style_request") or ""):
        kw["force_virtual_addressing"] = True
    endpoint = first("endpoint", "aws_endpoint", "aws_endpoint_url", "endpoint_url")
    if endpoint:
        endpoint = str(endpoint).rstrip("/")
        # pyarrow wants host[:port] and the scheme apart; an endpoint without a scheme is
        # HTTPS unless allow_http says otherwise.
        scheme = _scheme(endpoint)
        if scheme:
            endpoint = endpoint[len(scheme) + 3:]
        else:
            scheme = "http" if _truthy(first("allow_http", "aws_allow_http") or "") else "https"
        kw["endpoint_override"] = endpoint
        kw["scheme"] = scheme
    return kw


@functools.lru_cache(maxsize=16)
def _s3_filesystem(key: tuple[tuple[str, Any], ...]) -> pyarrow.fs.S3FileSystem:
    """One filesystem per configuration (endpoint, region, credentials...): a batch of
    images shares the client and its connection pool. S3FileSystem is thread-safe."""
    from pyarrow.fs import S3FileSystem

    return S3FileSystem(**dict(key))


def _s3_for(storage_options: Mapping[str, str] | None) -> pyarrow.fs.S3FileSystem:
    if storage_options is None:
        from indexing.store import storage_options_from_env

        storage_options = storage_options_from_env("s3://")
    try:
        return _s3_filesystem(tuple(sorted(_s3_kwargs(storage_options).items())))
    except (OSError, ValueError, TypeError) as exc:  # pyarrow's errors derive from these
        raise InvalidArgument(f"cannot configure the S3 filesystem: {exc}",
                              field="storage_options") from exc


def _read_s3(uri: str, storage_options: Mapping[str, str] | None) -> bytes:
    bucket, key = _split_s3(uri)
    fs = _s3_for(storage_options)
    try:
        with fs.open_input_file(f"{bucket}/{key}") as fh:
            size = fh.size()
            if size > MAX_IMAGE_BYTES:
                raise InvalidArgument(
                    f"cannot read image {uri}: the object is {size} bytes, over the "
                    f"{MAX_IMAGE_BYTES}-byte limit for one image",
                    field="uri",
                )
            return fh.read()
    except FileNotFoundError as exc:
        # pyarrow says the same for a missing bucket; its message adds nothing.
        raise InvalidArgument(f"cannot read image {uri}: no such object", field="uri") from exc
    except OSError as exc:  # pyarrow reports S3 errors (access denied, no bucket...) as OSError
        raise InvalidArgument(f"cannot read image {uri}: {exc}", field="uri") from exc


# ---------------------------------------------------------------------------- decoding


def _decode(source: str | io.BytesIO, shown: str) -> Image.Image:
    from PIL import Image

    try:
        with Image.open(source) as im:
            # PIL itself raises only beyond twice MAX_IMAGE_PIXELS (and merely warns between);
            # refusing at the limit, before decoding, keeps one bomb from taking the worker's
            # memory. Set PIL.Image.MAX_IMAGE_PIXELS to change the limit (None disables it).
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} = {im.width * im.height} pixels, over the "
                    f"{limit}-pixel limit (PIL.Image.MAX_IMAGE_PIXELS)"
                )
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(
            f"cannot read image {shown}: refused as a possible decompression bomb: {exc}",
            field="uri",
        ) from exc
    except FileNotFoundError as exc:
        raise InvalidArgument(f"cannot read image {shown}: no such file", field="uri") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # PIL's plugins raise many types on malformed data (OSError, SyntaxError, ValueError,
        # EOFError, struct.error...): whichever it is, the image is unreadable, which a bulk
        # job must report as a bad row rather than die on.
        raise InvalidArgument(
            f"cannot read image {shown}: {type(exc).__name__}: {exc}", field="uri"
        ) from exc


def open_image(
    uri: str,
    *,
    base_dir: Path | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> Image.Image:
    """Read the image at ``uri`` and return it in RGB.

    Args:
        uri: a local path (relative ones resolve against ``base_dir``, else the working
            directory), a ``file://`` URI, or ``s3://bucket/key``.
        base_dir: folder that relative paths are relative to (for ingest: the data file's).
        storage_options: object-store options in the store's spelling (``endpoint``,
            ``allow_http``, ``region``, ``aws_access_key_id``, ``aws_secret_access_key``,
            ``aws_session_token``...); ``None`` reads them from the environment like
            ``Store`` does.

    Raises ``InvalidArgument`` naming the URI and the reason when the scheme is not
    supported, or the image is missing, unreadable, corrupt or over the size limits.
    """
    uri = _check_uri(uri)
    if _scheme(uri) == "s3":
        return _decode(io.BytesIO(_read_s3(uri, storage_options)), uri)
    path = _local_path(uri, base_dir)
    shown = uri if uri == str(path) else f"{uri} ({path})"
    return _decode(str(path), shown)


def open_images(
    uris: Sequence[str],
    *,
    base_dir: Path | None = None,
    storage_options: Mapping[str, str] | None = None,
    max_workers: int = 8,
) -> list[tuple[int, Image.Image | str]]:
    """Read a batch of images in input order: ``s3://`` objects with up to ``max_workers``
    threads of a shared pool, local files in the calling thread.

    Returns one ``(index, image or error message)`` per input: a bad URI or image does not
    stop the batch, its message (as ``open_image`` would raise it) takes its place, so a
    bulk job can report it against its row. Threads pay off because reading is I/O bound
    (S3 latency); decoding a batch at once holds all of its images in memory, so callers
    pass batches of the size they embed.
    """
    uris = list(uris)
    if storage_options is None and any(isinstance(u, str) and _scheme(u) == "s3" for u in uris):
        from indexing.store import storage_options_from_env

        # Resolved once here, so the threads neither re-read the environment per image nor
        # race to build the (cached) filesystem on the first batch.
        storage_options = storage_options_from_env("s3://")
        with contextlib.suppress(InvalidArgument):  # then each s3 row reports the reason
            _s3_for(storage_options)

    def one(i: int) -> tuple[int, Image.Image | str]:
        try:
            return i, open_image(uris[i], base_dir=base_dir, storage_options=storage_options)
        except InvalidArgument as exc:
            return i, exc.message

    # Threads only for object-store reads (latency bound): a local file decodes faster
    # than a thread hand-off costs (measured: 320 local PNGs 0.40 s through 8 threads
    # against 0.05 s inline), so those are read in the calling thread.
    remote = [i for i, u in enumerate(uris) if isinstance(u, str) and _scheme(u) == "s3"]
    out: list[tuple[int, Image.Image | str] | None] = [None] * len(uris)
    if len(remote) > 1 and max_workers > 1:
        for i, got in zip(remote, _pool(max_workers).map(one, remote), strict=True):
            out[i] = got[0], got[1]
    else:
        for i in remote:
            out[i] = one(i)
    remote_set = set(remote)
    for i in range(len(uris)):
        if i not in remote_set:
            out[i] = one(i)
    return [r for r in out if r is not None]


@functools.lru_cache(maxsize=4)
def _pool(max_workers: int) -> ThreadPoolExecutor:
    """One long-lived reader pool per size, shared by every batch (not one per call)."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="assay-images")
