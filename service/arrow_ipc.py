"""Arrow IPC *stream* bytes <-> pyarrow tables: the wire format of every bulk payload.

Shared by the server and the client library, so it imports nothing but pyarrow.

    >>> data = table_to_ipc(pa.table({"id": ["a", "b"]}))
    >>> ipc_to_table(data).num_rows
    2
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["ipc_to_table", "table_to_ipc"]

_READ_OPTIONS = pa.ipc.IpcReadOptions(ensure_alignment=pa.ipc.Alignment.DataTypeSpecific)


def table_to_ipc(table: pa.Table | pa.RecordBatch) -> bytes:
    """Serialise a table or record batch as Arrow IPC stream bytes (schema + batches).

    A sliced table or batch is written without the rows outside the slice.
    """
    if not isinstance(table, pa.Table | pa.RecordBatch):
        raise TypeError(f"expected a pyarrow Table or RecordBatch, got {type(table).__name__}")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(data: bytes | bytearray | memoryview) -> pa.Table:
    """Read Arrow IPC stream bytes into a table.

    Raises ValueError when the bytes are not a complete Arrow IPC stream (empty, truncated,
    the file format instead of the stream format, or not Arrow at all), or when its buffers
    are inconsistent (offsets outside their data, strings that are not UTF-8): the reader
    does not check those, and reading such buffers can crash the process.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"Arrow IPC stream: expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("Arrow IPC stream: got 0 bytes (a stream starts with its schema)")
    try:
        # Buffers are read in place; one that is not aligned for its type (a payload read
        # inside a larger message at an odd offset) is copied to an aligned one: Lance's
        # Rust readers panic on a misaligned buffer.
        with pa.ipc.open_stream(pa.py_buffer(data), options=_READ_OPTIONS) as reader:
            table = reader.read_all()
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid, ArrowIOError, ...
        raise ValueError(f"malformed Arrow IPC stream ({len(data)} bytes): {exc}") from exc
    for name, column in zip(table.column_names, table.columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowException as exc:
            detail = str(exc).split("Invalid: ", 1)[-1]
            raise ValueError(f"invalid Arrow data in column '{name}': {detail}") from None
    return table
