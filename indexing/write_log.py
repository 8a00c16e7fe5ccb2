"""A collection's write-ahead log: small upserts acknowledged once they are written here,
applied to the Lance table right after in larger commits.

Why: acknowledged after their LanceDB commit (:mod:`indexing.group_commit`), 16 clients
sending 20-row upserts in a loop commit at most their 16 writes at a time, and a commit
costs about the same whatever it holds (the soak's rows merged into a 60k-row table: 320
rows 30–48 ms, 3,200 rows 44–66 ms, 6,400 rows 66–92 ms on 2 cores). Acknowledged from
this log, writers come back at once, the writes logged while one commit runs go into the
next, and a commit carries a hundred writes or more.

Format (local folders only; an object store has no cheap append): a folder per collection
holding

* segments ``<first seq, 20 digits>.log``: frames of ``seq`` (u64), ``length`` (u64),
  ``crc32`` (u32) and the batch as an Arrow IPC stream, appended to the newest segment; a
  segment past ``SEGMENT_BYTES`` is followed by a new one. A frame cut short or failing
  its checksum ends the log (its writer was never answered): the tail from there is cut
  off when the log is opened.
* ``applied``: the last seq applied to the table, written after each commit that applied
  log records and before the next commit of the collection. Opening the log returns the
  records after it, which the collection applies before it serves; a record applied but
  not yet marked is applied again, which an upsert by ``id`` makes harmless (no other
  commit of the collection can have come in between).
* ``lock``: held (``flock``) by the one process that writes this log; another process on
  the same root finds it held and writes without a log (acknowledged after the commit).

Closed segments whose records are all applied are deleted; the open one when the log is
closed with everything applied.

Durability: a record is in the file (the kernel's page cache) when :meth:`WriteLog.append`
returns, so an acknowledged write survives the server process dying in any way (SIGKILL,
out of memory, a crash) — the same guarantee as a LanceDB commit on a local folder, whose
object store calls no ``fsync`` either (traced: none in 20 upserts' commits). Neither
survives the machine losing power before the kernel wrote its pages back. An
``fdatasync`` per append (shared by concurrent writers) was tried: in the writes-only
soak most request threads were found waiting for it (stack samples), and it gave 5,325
rows/s against 6,014 without it (one run each) — likely because on ext4 it also waits
for the Lance files written meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator

import pyarrow as pa

SEGMENT_BYTES = 16 << 20
_HEADER = struct.Struct("<QQI")
_SUFFIX = ".log"


class WriteLogBusy(RuntimeError):
    """Another process holds this log."""


class WriteLog:
    """The write-ahead log of one collection (see the module docstring). Thread-safe."""

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self._lock = threading.Lock()  # the segments, appends and the applied mark
        self._lock_fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise WriteLogBusy(f"the write log {folder} is held by another process") from None
        self._applied_fd = os.open(os.path.join(folder, "applied"), os.O_RDWR | os.O_CREAT, 0o644)
        raw = os.pread(self._applied_fd, 8, 0)
        self.applied_seq = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        self.last_seq = self.applied_seq
        self._segments: list[tuple[int, str]] = []  # (first seq, path), oldest first
        self._fd: int | None = None
        self._size = 0
        self._closed = False

    # -- opening -------------------------------------------------------------------------

    def unapplied(self) -> Iterator[tuple[int, pa.Table]]:
        """The records not applied yet, in order: (seq, batch). Reads every segment once
        (call it once, right after opening); cuts off a torn tail; ends with the log ready
        for appends after the last record."""
        names = sorted(n for n in os.listdir(self.folder) if n.endswith(_SUFFIX))
        self._segments = [(int(n[:-len(_SUFFIX)]), os.path.join(self.folder, n)) for n in names]
        for i, (_, path) in enumerate(self._segments):
            with open(path, "rb") as fh:
                data = fh.read()
            at, previous = 0, 0
            while at + _HEADER.size <= len(data):
                seq, length, crc = _HEADER.unpack_from(data, at)
                body = data[at + _HEADER.size:at + _HEADER.size + length]
                if len(body) != length or zlib.crc32(body) != crc or seq <= previous:
                    break
                at += _HEADER.size + length
                previous = seq
                self.last_seq = max(self.last_seq, seq)
                if seq > self.applied_seq:
                    yield seq, pa.ipc.open_stream(body).read_all()
            if at < len(data):  # a torn append (never acknowledged): nothing after it counts
                with open(path, "r+b") as fh:
                    fh.truncate(at)
                for _, later in self._segments[i + 1:]:
                    os.remove(later)
                self._segments = self._segments[:i + 1]
                break

    # -- writing -------------------------------------------------------------------------

    def append(self, table: pa.Table) -> int:
        """Write ``table`` as the next record; returns its seq once the record is in the
        file (see *Durability*). A full disk raises the OSError (ENOSPC) and leaves the log
        as it was (a partial frame is cut off)."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        body = sink.getvalue().to_pybytes()
        with self._lock:
            if self._closed:
                raise RuntimeError("the write log is closed")
            seq = self.last_seq + 1
            if self._fd is None or self._size >= SEGMENT_BYTES:
                self._new_segment(seq)
            assert self._fd is not None
            frame = _HEADER.pack(seq, len(body), zlib.crc32(body)) + body
            try:
                if os.write(self._fd, frame) != len(frame):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.folder)
            except OSError:  # (a full disk: indexing.errors.classify_error answers RESOURCE_EXHAUSTED)
                os.ftruncate(self._fd, self._size)
                raise
            self._size += len(frame)
            self.last_seq = seq
            return seq

    def _new_segment(self, first_seq: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        path = os.path.join(self.folder, f"{first_seq:020d}{_SUFFIX}")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        if not self._segments or self._segments[-1][1] != path:  # not an empty one left by a cut
            self._segments.append((first_seq, path))

    def mark_applied(self, seq: int) -> None:
        """Records up to ``seq`` are in the table: say so, and delete the closed segments
        holding only such records (the open one grows to ``SEGMENT_BYTES``; :meth:`close`
        removes it when everything is applied)."""
        with self._lock:
            if seq <= self.applied_seq:
                return
            os.pwrite(self._applied_fd, struct.pack("<Q", seq), 0)
            self.applied_seq = seq
            keep = []
            for k, (first, path) in enumerate(self._segments):
                if k + 1 < len(self._segments) and self._segments[k + 1][0] - 1 <= seq:
                    os.remove(path)
                else:
                    keep.append((first, path))
            self._segments = keep

    @property
    def backlog(self) -> int:
        """Records acknowledged and not applied yet."""
        return self.last_seq - self.applied_seq

    def close(self) -> None:
        """Let go of the log: its segments are deleted when everything is applied; what is
        not stays for the next open."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self.applied_seq >= self.last_seq:
                for _, path in self._segments:
                    os.remove(path)
                self._segments = []
            os.close(self._applied_fd)
            os.close(self._lock_fd)



__all__ = ["SEGMENT_BYTES", "WriteLog", "WriteLogBusy"]
