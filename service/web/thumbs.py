"""Thumbnails for the web page, read only from the configured data roots.

A thumbnail is asked for by collection and item id, never by path: the server reads the
row's ``uri`` and serves the image only when that URI lies inside one of the data roots.

- Local paths (and ``file://`` URIs) are resolved the way ingest reads them (relative to
  the working directory), then through every symlink (``Path.resolve``), and must be
  inside a resolved local root: ``..`` segments, absolute paths elsewhere and symlinks out
  of a root are all refused.
- ``s3://bucket/key`` must start with an ``s3://`` root at a ``/`` boundary and may not
  contain ``.`` or ``..`` segments (object stores do not normalise them, but a proxy in
  front of one might).
- Any other scheme is refused.

Images are decoded with the same guards as ingest (size and decompression-bomb limits),
shrunk to at most ``size`` pixels on the long side, and encoded as JPEG (PNG when they
are tiny, where JPEG's blocks would blur them). Recent thumbnails stay in a small LRU
cache keyed by the resolved URI, its modification time (local files) and the size.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from indexing.errors import InvalidArgument, PermissionDenied
from indexing.images import canonical_uri, open_image
from indexing.settings import DEFAULT_THUMB_SIZE
from indexing.settings import THUMB_CACHE_BYTES as _CACHE_BYTES

THUMB_SIZES = (64, 96, 128, 160, 256, 384)


class DataRoots:
    """Where images may be served from: local folders and ``s3://`` prefixes."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.local: list[Path] = []
        self.s3: list[str] = []
        for root in roots:
            if not root:
                continue
            if root.startswith("s3://"):
                self.s3.append(root.rstrip("/") + "/")
            elif "://" in root and not root.startswith("file://"):
                raise ValueError(f"data root {root!r}: only local folders and s3:// prefixes can be data roots")
            else:
                self.local.append(Path(canonical_uri(root)))

    def __bool__(self) -> bool:
        return bool(self.local or self.s3)

    def describe(self) -> list[str]:
        return [*(str(p) for p in self.local), *self.s3]

    def resolve(self, uri: str) -> str:
        """The canonical URI to read for ``uri``; PermissionDenied when it is outside
        every root, InvalidArgument when it is not a URI that can be read at all."""
        if not isinstance(uri, str) or not uri or "\x00" in uri:
            raise InvalidArgument("the item's uri is empty or not a string")
        if uri.startswith("s3://"):
            rest = uri[len("s3://"):]
            if any(seg in (".", "..") for seg in rest.split("/")):
                raise PermissionDenied(f"image {uri} has '.' or '..' segments; not served")
            if any(uri.startswith(prefix) for prefix in self.s3):
                return uri
            raise PermissionDenied(f"image {uri} is outside the data roots; not served")
        path = Path(canonical_uri(uri))  # InvalidArgument for other schemes
        for root in self.local:
            if path == root or path.is_relative_to(root):
                return str(path)
        raise PermissionDenied(f"image {uri} is outside the data roots; not served")


class Thumbnails:
    """Thumbnail bytes with an LRU cache (bounded by bytes)."""

    def __init__(self, roots: DataRoots, storage_options: Mapping[str, str] | None = None,
                 cache_bytes: int = _CACHE_BYTES) -> None:
        self.roots = roots
        self.storage_options = dict(storage_options or {})
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, float, int], tuple[bytes, str]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def get(self, uri: str, size: int = DEFAULT_THUMB_SIZE) -> tuple[bytes, str]:
        """``(bytes, media type)`` of the thumbnail of ``uri``."""
        if size not in THUMB_SIZES:
            raise InvalidArgument(f"thumbnail size {size} is not one of {', '.join(map(str, THUMB_SIZES))}")
        if not self.roots:
            raise PermissionDenied("no data roots are configured: start the server with --data-root to serve images")
        target = self.roots.resolve(uri)
        mtime = 0.0
        if not target.startswith("s3://"):
            try:
                mtime = os.stat(target).st_mtime
            except OSError as exc:
                raise InvalidArgument(f"cannot read image {uri}: no such file") from exc
        key = (target, mtime, size)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        out = encode_thumbnail(target, size, self.storage_options or None)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = out
                self._held += len(out[0])
                while self._held > self.cache_bytes and self._cache:
                    _, (data, _) = self._cache.popitem(last=False)
                    self._held -= len(data)
        return out


def encode_thumbnail(uri: str, size: int, storage_options: Mapping[str, str] | None = None) -> tuple[bytes, str]:
    """Read ``uri`` (with ingest's guards), shrink it to fit ``size`` x ``size`` keeping its
    aspect ratio, and encode it: PNG under 64 px on the long side (JPEG smears tiny images),
    else JPEG at quality 85."""
    from PIL import Image

    im = open_image(uri, storage_options=storage_options)
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if max(im.size) < 64:
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), "image/png"
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), "image/jpeg"
