"""Arrow and protobuf conversions of the client (pure functions).

Request side: what users pass (pyarrow Tables or RecordBatches, pandas DataFrames, dicts
of columns, lists of row dicts, NumPy arrays) as Arrow tables, with ``emb_*`` columns as
``fixed_size_list<float32, d>``; job parameters as protobuf Structs. Response side: Arrow
IPC pages as tables, messages and Structs as plain dicts.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from protos.assay.v1 import common_pb2, search_pb2
from service.arrow_ipc import ipc_to_table
from service.client.errors import invalid

__all__ = [
    "concat_pages", "dict_to_struct", "fix_embedding_columns", "histogram_stats", "is_dataframe",
    "is_rows", "items_to_arrow", "matrix_to_arrow", "message_to_dict", "nested_to_arrow",
    "page_or_empty", "page_to_table", "parse_search", "sorted_by_id", "struct_to_dict", "to_arrow",
    "uncertainty_quality_stats",
]


def message_to_dict(message: Message) -> dict[str, Any]:
    """A response message as a plain dict: proto field names, zero values included, 64-bit
    integers as ints (not JSON strings), Structs as dicts."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _plain(value: Any) -> Any:
    """Struct values come back as floats: give integral ones back as ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return _plain(json_format.MessageToDict(struct))


def dict_to_struct(params: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """Job parameters as a Struct; None values are left out (server default)."""
    struct = struct_pb2.Struct()
    try:
        struct.update({k: v for k, v in (params or {}).items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise invalid(f"job params must be JSON-like (str, number, bool, list, dict): {exc}") \
            from None
    return struct


def concat_pages(pages: list[pa.Table]) -> pa.Table:
    """Pages of one scan as one table (an empty table when there were none)."""
    if not pages:
        return pa.table({})
    return pages[0] if len(pages) == 1 else pa.concat_tables(pages)


def page_to_table(page: common_pb2.ArrowPage) -> pa.Table:
    return ipc_to_table(page.arrow_ipc)


def parse_search(response: search_pb2.SearchResponse, *, single: bool) -> pa.Table:
    """The result table; a single query's result has no ``query_index`` column."""
    table = ipc_to_table(response.arrow_ipc)
    if single and "query_index" in table.column_names:
        table = table.drop_columns(["query_index"])
    return table


def page_or_empty(page: common_pb2.ArrowPage) -> pa.Table:
    """An ArrowPage as a table; a page without bytes as an empty table."""
    return ipc_to_table(page.arrow_ipc) if page.arrow_ipc else pa.table({})


def histogram_stats(table: pa.Table) -> dict[str, Any]:
    """What a histogram left out of its bins, from its schema metadata: ``total`` rows
    matched, ``nulls``, ``non_finite``, ``below``/``above`` an explicit range, ``min``/``max``
    of the data and the binned ``low``/``high``."""
    import json

    meta = table.schema.metadata or {}
    if b"assay.histogram" not in meta:
        raise invalid("not a histogram table (no assay.histogram metadata)")
    return json.loads(meta[b"assay.histogram"])


def uncertainty_quality_stats(table: pa.Table) -> dict[str, Any]:
    """The correlation and counts of an uncertainty_quality table, from its schema metadata:
    ``rho`` (Spearman, uncertainty vs the quality as named), ``rho_error`` (positive = the
    uncertain rows are the bad ones), ``p_value``, ``n`` (rows with both values), ``rows``
    (labeled rows matched), ``missing``, ``unknown_label``, ``non_finite``, the thresholds
    and the options used (``model``, ``uncertainty``, ``quality``, ``higher_is_better``...)."""
    import json

    meta = table.schema.metadata or {}
    if b"assay.uncertainty_quality" not in meta:
        raise invalid("not an uncertainty_quality table (no assay.uncertainty_quality metadata)")
    return json.loads(meta[b"assay.uncertainty_quality"])


def nested_to_arrow(values: np.ndarray) -> pa.Array:
    """(N, K, C) -> list<list<float32>> (MC-dropout or committee samples)."""
    n, k, c = values.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k * c + 1, c, dtype=np.int32)),
                                     pa.array(np.ascontiguousarray(values, np.float32).reshape(-1)))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), inner)


def items_to_arrow(items: Any) -> pa.Table:
    """Items to score as Arrow: a Table/RecordBatch, a DataFrame, a list of row dicts or a
    dict of columns (``probs``/``logits`` (N, C), ``samples`` (N, K, C), ``embedding`` (N, d)
    NumPy arrays or lists; ``boxes``; ``id``)."""
    if isinstance(items, Mapping):
        items = {k: nested_to_arrow(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v
                 for k, v in items.items()}
    return to_arrow(items)


def is_dataframe(obj: Any) -> bool:
    pd = sys.modules.get("pandas")  # never imported here: a DataFrame implies pandas is loaded
    return pd is not None and isinstance(obj, pd.DataFrame)


def matrix_to_arrow(name: str, matrix: np.ndarray) -> pa.Array:
    """A 2-D array as fixed_size_list<d> (of float32 for ``emb_*`` columns)."""
    if name.startswith("emb_"):
        matrix = matrix.astype(np.float32, copy=False)
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def _column_to_arrow(name: str, values: Any) -> Any:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    if values is None or isinstance(values, str | bytes | int | float | Mapping):
        raise invalid(f"column '{name}': a dict of columns needs a list or array per column, "
                      f"got {type(values).__name__} (for one row, pass a list: [row])")
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return matrix_to_arrow(name, values)
    if name.startswith("emb_") and isinstance(values, list | tuple) and values \
            and all(v is not None for v in values):
        try:  # a list of equal-length vectors: stack them once instead of a list per row
            matrix = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            matrix = None
        if matrix is not None and matrix.ndim == 2:
            return matrix_to_arrow(name, matrix)
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise invalid(f"column '{name}': cannot convert to Arrow: {exc}") from None


def fix_embedding_columns(table: pa.Table) -> pa.Table:
    """``emb_*`` columns as fixed_size_list<float32, d> where the vectors have one length
    (lists of floats or ints, fixed-size lists of float64 ...); other shapes are left for
    the server to reject with a row-level message."""
    for i, f in enumerate(table.schema):
        if not f.name.startswith("emb_"):
            continue
        t = f.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            continue
        vt = t.value_type
        if not (pa.types.is_floating(vt) or pa.types.is_integer(vt)):
            continue
        if pa.types.is_fixed_size_list(t):
            dim = t.list_size
        else:
            lengths = pc.unique(pc.drop_null(pc.list_value_length(table.column(i))))
            if len(lengths) != 1 or lengths[0].as_py() == 0:
                continue
            dim = lengths[0].as_py()
        target = pa.list_(pa.field("item", pa.float32()), dim)
        if t != target:
            table = table.set_column(i, pa.field(f.name, target, f.nullable, f.metadata),
                                     table.column(i).cast(target))
    return table


def _rows_to_columns(rows: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {n: [row.get(n) for row in rows] for n in names}


def is_rows(data: Any) -> bool:
    return isinstance(data, list | tuple) and (not data or isinstance(data[0], Mapping))


def to_arrow(data: Any) -> pa.Table:
    """One chunk of upsert input as an Arrow table: a pyarrow Table or RecordBatch, a pandas
    DataFrame, a dict of columns (lists, numpy arrays: 2-D ones become fixed-size lists) or
    a list of row dicts."""
    if isinstance(data, pa.RecordBatch):
        table = pa.Table.from_batches([data])
    elif isinstance(data, pa.Table):
        table = data
    elif is_dataframe(data):
        try:
            table = pa.Table.from_pandas(data, preserve_index=False).replace_schema_metadata(None)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise invalid(f"DataFrame: cannot convert to Arrow: {exc}") from None
    elif isinstance(data, Mapping) or is_rows(data):
        columns = data if isinstance(data, Mapping) else _rows_to_columns(list(data))
        arrays = {str(n): _column_to_arrow(str(n), v) for n, v in columns.items()}
        try:
            table = pa.table(arrays)
        except (pa.ArrowException, ValueError) as exc:
            raise invalid(f"columns: {exc}") from None
    else:
        raise invalid(
            "upsert data: expected a pyarrow Table/RecordBatch, a pandas DataFrame, a dict of "
            f"columns, a list of row dicts or an iterable of those, got {type(data).__name__}"
        )
    return fix_embedding_columns(table)


def sorted_by_id(table: pa.Table) -> pa.Table:
    """Checkout pages arrive in no particular order: the table sorted by ``id``."""
    if "id" not in table.column_names or table.num_rows < 2:
        return table
    return table.take(pc.sort_indices(table.column("id")))
