"""Streamed downloads written to files: an export, a scorer bundle.

Chunks go to a temporary file next to the target, renamed to it only once the last chunk
has arrived: a failed or cut stream leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

from protos.assay.v1 import query_pb2, scoring_pb2
from service.client.errors import error_for

__all__ = ["ExportFile", "ScorerFile"]


class ExportFile:
    """Export chunks written to a temporary file next to ``path``, renamed to ``path`` only
    when the last chunk has arrived: a failed export leaves no partial file."""

    def __init__(self, path: str | os.PathLike[str], format: str) -> None:  # noqa: A002
        self.path = os.fspath(path)
        self.format = format
        target = os.path.abspath(self.path)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial",
                                        dir=folder)
        self.target = target
        self.fh = os.fdopen(fd, "wb")
        self.result: dict[str, Any] | None = None

    def __enter__(self) -> ExportFile:
        return self

    def write(self, chunk: query_pb2.ExportChunk) -> None:
        if self.result is not None:
            raise error_for("INTERNAL", "export: the server sent data after the last chunk")
        self.fh.write(chunk.data)
        if chunk.last:
            self.result = {"rows": int(chunk.rows), "annotations": int(chunk.annotations),
                           "path": self.path, "format": self.format}
            if chunk.label_config:
                self.result["label_config"] = chunk.label_config

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self.fh.close()
        if exc_type is None and self.result is None:
            os.unlink(self.tmp)
            raise error_for("INTERNAL", "export: the stream ended before its last chunk")
        if exc_type is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            return
        os.replace(self.tmp, self.target)
        if self.result and self.result.get("label_config"):
            # the labeling config that matches the tasks, next to them: tasks.label_config.xml
            config = os.path.splitext(self.target)[0] + ".label_config.xml"
            with open(config, "w", encoding="utf-8") as fh:
                fh.write(self.result["label_config"])
            self.result["label_config_path"] = config


class ScorerFile:
    """Bundle chunks gathered, then written to ``path`` through a temporary file once the
    last chunk has arrived (a failed export leaves no partial file)."""

    def __init__(self, path: str | os.PathLike[str], fmt: str) -> None:
        self.path, self.format = os.fspath(path), fmt
        self.parts: list[bytes] = []
        self.result: dict[str, Any] | None = None

    def write(self, chunk: scoring_pb2.ExportScorerChunk) -> None:
        if self.result is not None:
            raise error_for("INTERNAL", "export_scorer: the server sent data after the last chunk")
        self.parts.append(chunk.data)
        if chunk.last:
            self.result = {"path": self.path, "format": self.format, "thresholds": dict(chunk.thresholds),
                           "reference_rows": int(chunk.reference_rows), "bytes": int(chunk.bytes),
                           "kept_fraction": chunk.kept_fraction}

    def finish(self) -> dict[str, Any]:
        if self.result is None:
            raise error_for("INTERNAL", "export_scorer: the stream ended before its last chunk")
        target = os.path.abspath(self.path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial",
                                   dir=os.path.dirname(target))
        try:
            with os.fdopen(fd, "wb") as fh:
                for part in self.parts:
                    fh.write(part)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.result
