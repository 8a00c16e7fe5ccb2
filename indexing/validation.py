"""Validation of upsert batches, done in full before anything is written.

`prepare_upsert` turns a user batch into the exact Arrow table that will be merged, or
raises :class:`~indexing.errors.InvalidArgument` naming the column, the row and its id.
Because nothing is written until the whole batch passes, a rejected batch leaves the
table at its previous version.

All checks are vectorised over Arrow buffers (no per-row Python) so that validation costs
a small fraction of the write itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexing.errors import InvalidArgument
from indexing.schema import (
    EMB_PREFIX,
    FLOAT_LIST,
    GT_BOX,
    PRED_PREFIX,
    RESERVED_COLUMNS,
    SEG_CHILDREN,
    STORE_SET_COLUMNS,
    ModelSpec,
    SpaceSpec,
    check_identifier,
    is_user_scalar,
    pred_box_type,
)

PROB_SUM_TOLERANCE = 1e-3
UNIT_TOLERANCE = 1e-5  # vectors of a normalised space whose norm is 1 within this are kept as sent
ID_FIELD = pa.field("id", pa.string(), nullable=False)


@dataclass
class PreparedBatch:
    """A validated batch: the table to merge, and schema changes it needs first."""

    table: pa.Table
    new_fields: list[pa.Field] = field(default_factory=list)
    new_spaces: list[SpaceSpec] = field(default_factory=list)
    generated_ids: int = 0
    # Rows of the batch whose id the store generated (no `id` column, or a null id), in order.
    generated_rows: list[int] = field(default_factory=list)


def to_arrow_table(data: Any) -> pa.Table:
    """Accept a pyarrow Table/RecordBatch, a pandas DataFrame, a list of dicts or a dict of
    columns (a 2-D NumPy array in a dict becomes a fixed-size list column: one vector a row)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    try:
        if isinstance(data, Mapping):
            return pa.table({name: _column(name, values) for name, values in data.items()})
        if isinstance(data, list):
            if data and not all(isinstance(r, Mapping) for r in data):
                raise InvalidArgument("rows must be dicts (column name -> value)")
            return pa.Table.from_pylist(data)
        if type(data).__name__ == "DataFrame" and hasattr(data, "to_dict"):
            return pa.Table.from_pandas(data, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"cannot convert the batch to Arrow: {exc}") from exc
    raise InvalidArgument(
        f"cannot upsert a {type(data).__name__}: pass a pyarrow Table/RecordBatch, "
        "a pandas DataFrame, a list of dicts or a dict of columns"
    )


def _column(name: str, values: Any) -> Any:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        if values.dtype.kind not in "fiu":
            raise InvalidArgument(f"column '{name}': a 2-D array must hold numbers, got {values.dtype}")
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel())
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return values


def prepare_upsert(
    data: Any,
    *,
    current: pa.Schema,
    spaces: Mapping[str, SpaceSpec],
    models: Mapping[str, ModelSpec],
) -> PreparedBatch:
    table = to_arrow_table(data)
    check_arrow_data(table)  # before anything reads the buffers
    table = table.combine_chunks()
    if table.num_rows == 0:
        raise InvalidArgument("the batch has no rows")
    names = table.column_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgument(f"duplicate column names in the batch: {', '.join(dup)}")
    for n in names:
        if n in STORE_SET_COLUMNS:
            raise InvalidArgument(f"column '{n}' is set by the store; remove it from the batch")
        check_identifier(n, "column name")

    out = PreparedBatch(table=table)
    ids, out.generated_rows = _prepare_ids(table)
    out.generated_ids = len(out.generated_rows)
    id_list = ids  # used to name rows in messages
    columns: dict[str, pa.Array] = {"id": ids}

    for name in names:
        if name == "id":
            continue
        # One chunk after the table's combine_chunks (which keeps single-chunk columns as
        # they are); ChunkedArray.combine_chunks would copy even a single chunk.
        chunked = table.column(name)
        col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
        if name.startswith(EMB_PREFIX):
            space = spaces.get(name[len(EMB_PREFIX):])
            if space is None:
                space = _space_from_first_sight(name, col)
                out.new_spaces.append(space)
                out.new_fields.append(space.arrow_field())
            columns[name] = _prepare_vectors(col, space, id_list)
        elif name.startswith(PRED_PREFIX):
            model = models.get(name[len(PRED_PREFIX):])
            if model is None:
                known = ", ".join(sorted(models)) or "none"
                raise InvalidArgument(
                    f"column '{name}': unknown model '{name[len(PRED_PREFIX):]}' (known: {known}); "
                    "register it first with add_model(name, classes=[...])",
                    field=name,
                )
            columns[name] = _prepare_predictions(col, model, id_list)
        elif name in RESERVED_COLUMNS:
            columns[name] = _prepare_reserved(name, col, id_list)
        else:
            existing = current.field(name).type if name in current.names else None
            arr = _prepare_user_field(name, col, existing, id_list)
            if existing is None:
                out.new_fields.append(pa.field(name, arr.type))
            columns[name] = arr

    fields = [ID_FIELD] + [pa.field(n, a.type) for n, a in columns.items() if n != "id"]
    out.table = pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))
    return out


def check_arrow_data(table: pa.Table) -> None:
    """Full Arrow validation of every column: offsets inside their buffers, valid UTF-8 in
    strings. A batch decoded from the wire is not validated by the IPC reader, and reading
    inconsistent buffers can crash the process or store bytes Lance cannot read back."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        try:
            column.validate(full=True)
        except (pa.ArrowInvalid, pa.ArrowException) as exc:
            detail = str(exc).split("Invalid: ", 1)[-1]
            if "UTF8" in detail and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                row = _first_invalid_utf8(column)
                if row is not None:
                    raise InvalidArgument(f"column '{name}': row {row} is not valid UTF-8 ({detail})",
                                          field=name, row=row) from None
            raise InvalidArgument(f"column '{name}' holds invalid Arrow data: {detail}",
                                  field=name) from None


def _first_invalid_utf8(column: pa.ChunkedArray) -> int | None:
    """The first row whose bytes are not UTF-8 (only on the error path)."""
    start = 0
    for chunk in column.chunks:
        binary = chunk.view(pa.large_binary() if pa.types.is_large_string(chunk.type) else pa.binary())
        try:
            binary.validate(full=True)  # offsets must hold before the values are read
        except pa.ArrowException:
            return None
        for i, value in enumerate(binary.to_pylist()):
            if value is not None:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return start + i
        start += len(chunk)
    return None


def _row_name(ids: pa.Array, row: int) -> str:
    return f"row {row} (id {ids[row].as_py()!r})"


def _prepare_ids(table: pa.Table) -> tuple[pa.Array, list[int]]:
    """The batch's ids, and the rows whose id was generated here (uuid4 hex)."""
    n = table.num_rows
    if "id" not in table.column_names:
        return pa.array([uuid.uuid4().hex for _ in range(n)], pa.string()), list(range(n))
    col = table.column("id").combine_chunks()
    if pa.types.is_large_string(col.type) or pa.types.is_null(col.type):
        col = col.cast(pa.string())
    if not pa.types.is_string(col.type):
        raise InvalidArgument(f"column 'id' must be strings, got {col.type}", field="id")
    generated: list[int] = []
    if col.null_count:
        # Rows without an id get a fresh one, like rows of a batch with no id column.
        py = col.to_pylist()
        for i, v in enumerate(py):
            if v is None:
                py[i] = uuid.uuid4().hex
                generated.append(i)
        col = pa.array(py, pa.string())
    empty = pc.equal(pc.utf8_length(col), 0)
    if pc.any(empty).as_py():
        row = int(pc.index(empty, True).as_py())
        raise InvalidArgument(f"column 'id': row {row} is an empty string", field="id", row=row)
    if pc.count_distinct(col).as_py() != n:
        counts = pc.value_counts(col)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
        rows = np.flatnonzero(np.asarray(pc.equal(col, dup).to_numpy(zero_copy_only=False)))
        raise InvalidArgument(
            f"column 'id': id {dup!r} appears more than once in the batch (rows "
            f"{', '.join(map(str, rows[:5]))}); each id may appear once per batch",
            field="id",
            row=int(rows[1]),
        )
    return col, generated


def _space_from_first_sight(name: str, col: pa.Array) -> SpaceSpec:
    space_name = name[len(EMB_PREFIX):]
    if pa.types.is_fixed_size_list(col.type) and pa.types.is_floating(col.type.value_type):
        return SpaceSpec(name=space_name, dim=col.type.list_size)
    raise InvalidArgument(
        f"column '{name}': unknown space '{space_name}'; register it first with "
        f"add_space('{space_name}', dim=...) or send the column as fixed_size_list<float32, dim>",
        field=name,
    )


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _list_rows(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row index of each non-null list, its length)."""
    valid = np.flatnonzero(~np.asarray(col.is_null().to_numpy(zero_copy_only=False)))
    lengths = np.asarray(pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False))
    return valid, lengths[valid]


def _float_values(col: pa.Array, name: str) -> np.ndarray:
    values = pc.list_flatten(col)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise InvalidArgument(f"column '{name}': values must be numbers, got {values.type}", field=name)
    if values.null_count:
        raise InvalidArgument(f"column '{name}': vectors must not contain null values", field=name)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)


def _prepare_vectors(col: pa.Array, space: SpaceSpec, ids: pa.Array) -> pa.Array:
    name = space.column
    t = col.type
    if pa.types.is_null(t):
        return pa.nulls(len(col), space.arrow_type())
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise InvalidArgument(
            f"column '{name}': expected a list of {space.dim} floats per row, got {t}", field=name
        )
    valid, lengths = _list_rows(col)
    bad = lengths != space.dim
    if bad.any():
        row = int(valid[_first_row(bad)])
        raise InvalidArgument(
            f"column '{name}': {_row_name(ids, row)} has dimension {int(lengths[_first_row(bad)])}; "
            f"space '{space.name}' has dimension {space.dim}",
            field=name,
            row=row,
        )
    values = _float_values(col, name).reshape(-1, space.dim)
    # One pass over the vectors for both checks: a NaN or infinity makes the squared norm
    # NaN or infinite (which rows, exactly, is then looked up on those rows alone).
    sq = np.einsum("ij,ij->i", values, values)
    suspect = ~np.isfinite(sq)
    if suspect.any():
        rows = np.flatnonzero(suspect)
        bad_rows = rows[~np.isfinite(values[rows]).all(axis=1)]
        if len(bad_rows):
            row = int(valid[bad_rows[0]])
            raise InvalidArgument(
                f"column '{name}': {_row_name(ids, row)} contains NaN or infinity", field=name, row=row
            )
        sq[rows] = np.square(np.linalg.norm(values[rows].astype(np.float64), axis=1))  # overflowed
    if space.normalized:
        zero = sq == 0
        if zero.any():
            row = int(valid[_first_row(zero)])
            raise InvalidArgument(
                f"column '{name}': {_row_name(ids, row)} is the zero vector, which cannot be "
                f"normalised for space '{space.name}' (metric {space.metric})",
                field=name,
                row=row,
            )
        norms = np.sqrt(sq)
        if len(norms) and np.abs(norms - 1.0).max() > UNIT_TOLERANCE:  # unit vectors pass as they are
            values = (values / norms[:, None]).astype(np.float32, copy=False)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), space.dim)
    if len(valid) == len(col):
        return flat
    # Re-insert the null rows: take with null indices yields nulls.
    positions = np.full(len(col), -1, dtype=np.int64)
    positions[valid] = np.arange(len(valid))
    index = pa.array(positions, mask=positions < 0)
    return flat.take(index)


def _check_prob_rows(
    values: np.ndarray, rows: np.ndarray, label: str, ids: pa.Array, name: str
) -> None:
    """values: (m, C) float rows; rows: the batch row of each. Raises on the first bad one."""
    if values.size == 0:
        return
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        row = int(rows[_first_row(~finite)])
        raise InvalidArgument(f"column '{name}': {label} of {_row_name(ids, row)} contains NaN or infinity",
                              field=name, row=row)
    out_of_range = ((values < -PROB_SUM_TOLERANCE) | (values > 1 + PROB_SUM_TOLERANCE)).any(axis=1)
    if out_of_range.any():
        row = int(rows[_first_row(out_of_range)])
        raise InvalidArgument(
            f"column '{name}': {label} of {_row_name(ids, row)} has values outside [0, 1]; "
            "send probabilities, or logits in the 'logits' field",
            field=name,
            row=row,
        )
    sums = values.astype(np.float64).sum(axis=1)
    off = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
    if off.any():
        i = _first_row(off)
        row = int(rows[i])
        raise InvalidArgument(
            f"column '{name}': {label} of {_row_name(ids, row)} sums to {sums[i]:.6f}, not 1 "
            f"(tolerance {PROB_SUM_TOLERANCE}); normalise them, or send logits instead",
            field=name,
            row=row,
        )


def _child(col: pa.StructArray, name: str) -> pa.Array:
    # StructArray.field ignores the parent's validity; a null struct row makes its children
    # null here too.
    return pc.struct_field(col, name) if col.null_count else col.field(name)


def _nested_class_vectors(arr: pa.Array, c: int, label: str, ids: pa.Array, name: str,
                          probs: bool) -> None:
    """Validate list<list<float>> (K x C per row): every inner list has C valid values."""
    inner = pc.list_flatten(arr)
    owner = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False))
    if inner.null_count:
        row = int(owner[_first_row(np.asarray(inner.is_null().to_numpy(zero_copy_only=False)))])
        raise InvalidArgument(f"column '{name}': {label} of {_row_name(ids, row)} has a null entry",
                              field=name, row=row)
    _class_vectors(inner, c, label, ids, name, probs, owner=owner)


def _class_vectors(arr: pa.Array, c: int, label: str, ids: pa.Array, name: str, probs: bool,
                   owner: np.ndarray | None = None) -> None:
    """Validate list<float> entries of C values (probabilities when ``probs``); entry j
    belongs to batch row ``owner[j]`` (default: entry j is row j)."""
    valid, lengths = _list_rows(arr)
    rows = valid if owner is None else owner[valid]
    bad = lengths != c
    if bad.any():
        i = _first_row(bad)
        raise InvalidArgument(
            f"column '{name}': {label} of {_row_name(ids, int(rows[i]))} has a vector of {int(lengths[i])} "
            f"values; the model has {c} classes",
            field=name,
            row=int(rows[i]),
        )
    values = _float_values(arr, name).reshape(-1, c)
    if probs:
        _check_prob_rows(values, rows, label, ids, name)
        return
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        row = int(rows[_first_row(~finite)])
        raise InvalidArgument(f"column '{name}': {label} of {_row_name(ids, row)} contains NaN or infinity",
                              field=name, row=row)


def _prepare_predictions(col: pa.Array, model: ModelSpec, ids: pa.Array) -> pa.Array:
    name = model.column
    struct = model.arrow_type
    allowed = [f.name for f in struct]
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), struct)
    if not pa.types.is_struct(col.type):
        raise InvalidArgument(
            f"column '{name}': expected a struct with fields {', '.join(allowed)}, got {col.type}",
            field=name,
        )
    given = [col.type.field(i).name for i in range(col.type.num_fields)]
    unknown = [g for g in given if g not in allowed]
    if unknown:
        seg = {f.name for f in SEG_CHILDREN}
        hint = (f"; segmentation summaries need a model registered with task='segmentation' ('{model.name}' "
                f"is a {model.task} model)" if set(unknown) & seg else "")
        raise InvalidArgument(
            f"column '{name}': unknown prediction field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}{hint}",
            field=name,
        )
    c = model.num_classes
    children: list[pa.Array] = []
    for f in struct:
        if f.name not in given:
            children.append(pa.nulls(len(col), f.type))
            continue
        arr = _child(col, f.name)
        label = f"{f.name}"
        try:
            if f.name in ("probs", "logits"):
                _class_vectors(arr, c, label, ids, name, probs=f.name == "probs")
                arr = arr.cast(FLOAT_LIST)
            elif f.name in ("samples", "epoch_logits"):
                _nested_class_vectors(arr, c, label, ids, name, probs=f.name == "samples")
                arr = arr.cast(f.type)
            elif f.name == "loss":
                arr = arr.cast(pa.float32())
                vals = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
                bad = ~np.isfinite(vals) & ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
                if bad.any():
                    row = _first_row(bad)
                    raise InvalidArgument(f"column '{name}': loss of {_row_name(ids, row)} is NaN or infinity",
                                          field=name, row=row)
            elif f.name == "boxes":
                arr = _prepare_pred_boxes(arr, model, ids, name)
            elif f.name in SEG_FIELD_NAMES:
                arr = _prepare_seg_child(f, arr, model, ids)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise InvalidArgument(f"column '{name}': field '{f.name}' has the wrong type ({exc})", field=name) from exc
        children.append(arr)
    if model.task == "segmentation":
        _check_topq_over_mean(children, [f.name for f in struct], ids, name)
    return pa.StructArray.from_arrays(children, fields=list(struct), mask=col.is_null())


SEG_FIELD_NAMES = frozenset(f.name for f in SEG_CHILDREN)
# Summaries computed in float32 may overshoot their range by rounding.
SEG_TOLERANCE = 1e-4


def _scalar_values(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, valid mask) of a float32 array."""
    vals = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
    return vals, ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _prepare_seg_child(f: pa.Field, arr: pa.Array, model: ModelSpec, ids: pa.Array) -> pa.Array:
    """A segmentation summary: its type, its length and its range (indexing/segmentation.py),
    or InvalidArgument naming the row, the field and the fix."""
    name = model.column
    if f.name == "mask_uri":
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type)):
            raise InvalidArgument(f"column '{name}': mask_uri must be a string (a PNG or JSON RLE file), "
                                  f"got {arr.type}", field=name)
        arr = arr.cast(pa.string())
        empty = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(arr), 0), False).to_numpy(zero_copy_only=False))
        if empty.any():
            row = _first_row(empty)
            raise InvalidArgument(f"column '{name}': mask_uri of {_row_name(ids, row)} is an empty string; "
                                  "send null for no mask", field=name, row=row)
        return arr
    if f.name in ("class_uncertain_fraction", "uncertainty_map"):
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
                or pa.types.is_fixed_size_list(arr.type) or pa.types.is_null(arr.type)):
            raise InvalidArgument(f"column '{name}': {f.name} must be a list of floats, got {arr.type}", field=name)
        arr = arr.cast(FLOAT_LIST)
        want = model.num_classes if f.name == "class_uncertain_fraction" else model.map_size ** 2
        what = (f"one fraction per class ({model.num_classes})" if f.name == "class_uncertain_fraction"
                else f"{model.map_size}x{model.map_size} = {want} values, row-major (the model's map_size)")
        valid, lengths = _list_rows(arr)
        bad = lengths != want
        if bad.any():
            i = _first_row(bad)
            row = int(valid[i])
            raise InvalidArgument(f"column '{name}': {f.name} of {_row_name(ids, row)} has {int(lengths[i])} "
                                  f"values; it needs {what}", field=name, row=row)
        values = _float_values(arr, name).reshape(-1, want).astype(np.float64) if len(valid) else np.zeros((0, want))
        bad_rows = (~np.isfinite(values) | (values < -SEG_TOLERANCE) | (values > 1 + SEG_TOLERANCE)).any(axis=1)
        if bad_rows.any():
            row = int(valid[_first_row(bad_rows)])
            raise InvalidArgument(f"column '{name}': {f.name} of {_row_name(ids, row)} has a value outside "
                                  "[0, 1] or NaN (fractions / normalised entropies)", field=name, row=row)
        return arr
    arr = arr.cast(pa.float32())
    vals, valid = _scalar_values(arr)
    top = float(np.log(model.num_classes)) if f.name == "bald" else 1.0
    unit = "nats, at most log C" if f.name == "bald" else "a normalised entropy"
    bad = valid & (~np.isfinite(vals) | (vals < -SEG_TOLERANCE) | (vals > top + SEG_TOLERANCE))
    if bad.any():
        row = _first_row(bad)
        raise InvalidArgument(f"column '{name}': {f.name} of {_row_name(ids, row)} is {vals[row]:.6g}; it must lie "
                              f"in [0, {top:.6g}] ({unit})", field=name, row=row)
    return arr


def _check_topq_over_mean(children: list[pa.Array], names: list[str], ids: pa.Array, name: str) -> None:
    """The mean of the most uncertain pixels is at least the mean of all of them: a row where
    it is not has the two summaries swapped or computed on different maps."""
    mean, has_m = _scalar_values(children[names.index("mean_entropy")])
    topq, has_t = _scalar_values(children[names.index("topq_entropy")])
    bad = has_m & has_t & (topq < mean - SEG_TOLERANCE)
    if bad.any():
        row = _first_row(bad)
        raise InvalidArgument(f"column '{name}': {_row_name(ids, row)} has topq_entropy {topq[row]:.6g} < "
                              f"mean_entropy {mean[row]:.6g}; the mean of the most uncertain pixels cannot be "
                              "below the mean of all (are the two swapped?)", field=name, row=row)


def _box_name(ids: pa.Array, owner: np.ndarray, j: int) -> str:
    """"box k of row r (id ...)" for the flattened box ``j`` (``owner``: its row, ascending)."""
    row = int(owner[j])
    return f"box {j - int(np.searchsorted(owner, row))} of {_row_name(ids, row)}"


def _check_box_embeddings(emb: pa.Array, owner: np.ndarray, ids: pa.Array, name: str, model: ModelSpec) -> None:
    """Each non-null box embedding has exactly ``model.box_embedding_dim`` finite values;
    InvalidArgument naming the row, the box and the fix."""
    dim = model.box_embedding_dim
    if pa.types.is_null(emb.type):  # every box sent "embedding": None
        return
    if not (pa.types.is_list(emb.type) or pa.types.is_large_list(emb.type)
            or pa.types.is_fixed_size_list(emb.type)) or not (
            pa.types.is_floating(emb.type.value_type) or pa.types.is_integer(emb.type.value_type)):
        raise InvalidArgument(f"column '{name}': box embeddings must be lists of numbers, got {emb.type}",
                              field=name)
    valid, lengths = _list_rows(emb)
    bad = lengths != dim
    if bad.any():
        j = int(valid[_first_row(bad)])
        raise InvalidArgument(
            f"column '{name}': the embedding of {_box_name(ids, owner, j)} has {int(lengths[_first_row(bad)])} "
            f"values; model '{model.name}' declares box_embedding_dim={dim} (send {dim} values for every box, "
            "or null for a box without an embedding)", field=name, row=int(owner[j]))
    if not len(valid):
        return
    values = pc.list_flatten(emb.filter(pc.invert(emb.is_null())))
    with np.errstate(invalid="ignore", over="ignore"):
        arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        # float32 storage: a finite float64 beyond float32's range would become inf
        finite = np.isfinite(arr) & (np.abs(arr) <= np.finfo(np.float32).max)
    ok = finite.reshape(-1, dim).all(axis=1)
    if values.null_count:
        ok &= ~np.asarray(values.is_null().to_numpy(zero_copy_only=False)).reshape(-1, dim).any(axis=1)
    if not ok.all():
        j = int(valid[_first_row(~ok)])
        raise InvalidArgument(
            f"column '{name}': the embedding of {_box_name(ids, owner, j)} contains NaN, infinity, null or a "
            "value beyond float32; send finite numbers (or null for a box without an embedding)",
            field=name, row=int(owner[j]))


def _prepare_pred_boxes(arr: pa.Array, model: ModelSpec, ids: pa.Array, name: str) -> pa.Array:
    c = model.num_classes
    if not (pa.types.is_list(arr.type) and pa.types.is_struct(arr.type.value_type)):
        raise InvalidArgument(f"column '{name}': boxes must be a list of structs, got {arr.type}", field=name)
    boxes = pc.list_flatten(arr)
    owner = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False))
    for coord in ("x1", "y1", "x2", "y2", "score"):
        if boxes.type.get_field_index(coord) < 0:
            raise InvalidArgument(f"column '{name}': every box needs '{coord}'", field=name)
    if boxes.type.get_field_index("embedding") >= 0:
        if not model.box_embedding_dim:
            raise InvalidArgument(
                f"column '{name}': boxes carry 'embedding' but model '{model.name}' was declared without "
                "box_embedding_dim; declare a detection model with box_embedding_dim=<d> (add_model(..., "
                "box_embedding_dim=d), or {'task': 'detection', 'box_embedding_dim': d} in create) to store "
                "per-object embeddings, or leave 'embedding' out", field=name)
        if len(boxes):
            _check_box_embeddings(boxes.field("embedding"), owner, ids, name, model)
    if len(boxes):
        _check_box_coords(boxes, owner, ids, name, score=True)
        if boxes.type.get_field_index("probs") >= 0:
            probs = boxes.field("probs")
            pvalid, plen = _list_rows(probs)
            badlen = plen != c
            if badlen.any():
                row = int(owner[pvalid[_first_row(badlen)]])
                raise InvalidArgument(f"column '{name}': box probs of {_row_name(ids, row)} need {c} values",
                                      field=name, row=row)
            _check_prob_rows(_float_values(probs, name).reshape(-1, c), owner[pvalid], "box probs", ids, name)
    return arr.cast(pa.list_(pred_box_type(model.box_embedding_dim)))


def _check_box_coords(boxes: pa.StructArray, owner: np.ndarray, ids: pa.Array, name: str, *,
                      score: bool) -> None:
    """Finite coordinates with x2 >= x1 and y2 >= y1 (and a score in [0, 1]); InvalidArgument
    naming the first row at fault."""
    keys = ("x1", "y1", "x2", "y2", "score") if score else ("x1", "y1", "x2", "y2")
    coords = np.stack([np.asarray(boxes.field(k).to_numpy(zero_copy_only=False), dtype=np.float64)
                       for k in keys], axis=1)
    bad = ~np.isfinite(coords).all(axis=1) | (coords[:, 2] < coords[:, 0]) | (coords[:, 3] < coords[:, 1])
    if score:
        bad |= (coords[:, 4] < 0) | (coords[:, 4] > 1)
    if bad.any():
        row = int(owner[_first_row(bad)])
        raise InvalidArgument(
            f"column '{name}': a box of {_row_name(ids, row)} is invalid (coordinates must be finite "
            f"with x2 >= x1 and y2 >= y1{'; score in [0, 1]' if score else ''})",
            field=name,
            row=row,
        )


def _prepare_reserved(name: str, col: pa.Array, ids: pa.Array) -> pa.Array:
    targets = {"uri": pa.string(), "text": pa.string(), "label": pa.string(),
               "tags": pa.list_(pa.string()), "gt_boxes": pa.list_(GT_BOX)}
    target = targets[name]
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), target)
    if name in ("uri", "text", "label") and not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InvalidArgument(f"column '{name}' must be strings, got {col.type}", field=name)
    if name == "tags" and not (
        (pa.types.is_list(col.type) or pa.types.is_large_list(col.type))
        and (pa.types.is_string(col.type.value_type) or pa.types.is_large_string(col.type.value_type)
             or pa.types.is_null(col.type.value_type))
    ):
        raise InvalidArgument(f"column 'tags' must be lists of strings, got {col.type}", field=name)
    try:
        out = col.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise InvalidArgument(f"column '{name}': cannot convert {col.type} to {target} ({exc})", field=name) from exc
    if name == "gt_boxes":
        boxes = pc.list_flatten(out)
        if len(boxes):
            owner = np.asarray(pc.list_parent_indices(out).to_numpy(zero_copy_only=False))
            _check_box_coords(boxes, owner, ids, name, score=False)
    return out


def _prepare_user_field(name: str, col: pa.Array, existing: pa.DataType | None, ids: pa.Array) -> pa.Array:
    t = col.type
    if existing is None:
        if pa.types.is_null(t):
            raise InvalidArgument(
                f"column '{name}': new field with only null values; its type cannot be inferred "
                "(send at least one value, or a typed Arrow column)",
                field=name,
            )
        if not is_user_scalar(t):
            raise InvalidArgument(
                f"column '{name}': user fields must be scalars (bool, int, float, string, "
                f"timestamp, date, decimal), got {t}",
                field=name,
            )
        return col.cast(pa.string()) if pa.types.is_large_string(t) else col
    if t == existing:
        return col
    if not _same_kind(t, existing):
        raise InvalidArgument(
            f"column '{name}': the collection stores {existing} here; got {t} "
            "(convert the values, or use a new field name)",
            field=name,
        )
    try:
        return col.cast(existing, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        row = _first_uncastable(col, existing)
        where = f" at {_row_name(ids, row)}" if row is not None else ""
        raise InvalidArgument(
            f"column '{name}': cannot store {t} values in the existing {existing} column{where} ({exc})",
            field=name,
            row=row,
        ) from exc


def _same_kind(src: pa.DataType, dst: pa.DataType) -> bool:
    """Casts we do implicitly: within numbers (int -> float, widening), within strings,
    within timestamps/dates. Anything else (e.g. int -> string) is a caller mistake."""
    number = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)
    if any(f(src) for f in number) and any(f(dst) for f in number):
        return not (pa.types.is_floating(src) and pa.types.is_integer(dst))
    text = (pa.types.is_string, pa.types.is_large_string)
    if any(f(src) for f in text) and any(f(dst) for f in text):
        return True
    when = (pa.types.is_timestamp, pa.types.is_date)
    return any(f(src) for f in when) and any(f(dst) for f in when) or pa.types.is_null(src)


def _first_uncastable(col: pa.Array, target: pa.DataType) -> int | None:
    # Only on the error path: find the first row that does not convert.
    for i in range(len(col)):
        try:
            col.slice(i, 1).cast(target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return None
