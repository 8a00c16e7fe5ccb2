"""SQL filters: the one scanner, validation, quoting and id predicates.

Every ``where`` of the API (search prefilters, scans, counts, deletes, tags, mining pools,
dataset members, exports, reindex) is a SQL boolean expression that Lance plans and runs.
This module is where such a filter is read, checked and built:

* :func:`scan` splits SQL text into code, string literals, quoted identifiers and comments
  the way Lance's tokenizer (sqlparser) does: ``'...'`` strings (a quote is doubled inside:
  ``'it''s'``; no backslash escapes), ``"..."`` and ```...``` identifiers, ``--`` comments to
  the end of the line and ``/* ... */`` comments (not nested). :func:`placeholders` and
  :func:`substitute` find ``:name`` placeholders in the code only (``::`` is a cast) —
  the client's parameter binding (``service.client.sql.bind_params``) is built on them, so
  the client and the server read a filter the same way.
* :func:`check_filter` refuses what Lance would silently ignore and returns the form that
  must be sent; :func:`validate_filter` also plans it on a table.
  ``indexing.store.Collection.validate_filter`` is that, memoised per table version.
* :func:`sql_quote` and :func:`ids_predicate` build filters from values.
* :func:`object_clauses` finds the ``any_object(<predicate>)`` clauses of a filter (an image
  with any box where the predicate holds; ``indexing.objects.expand`` turns them into id
  predicates at the version read) and :func:`with_objects` builds one from an
  ``objects_where`` option.

Standard library only (the light client imports it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, NamedTuple

from indexing.errors import InvalidArgument

__all__ = [
    "CODE", "COMMENT", "IDENTIFIER", "STRING", "Segment", "check_filter", "ids_predicate",
    "lance_message", "object_clauses", "placeholders", "scan", "sql_quote", "substitute",
    "validate_filter", "with_objects",
]

CODE: Final = "code"
STRING: Final = "string"  # '...'
IDENTIFIER: Final = "identifier"  # "..." or `...`
COMMENT: Final = "comment"  # -- to the end of the line, or /* ... */

PARAM_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPENERS: Final = re.compile(r"'|\"|`|--|/\*")


class Segment(NamedTuple):
    """A piece of SQL text: its ``kind`` and its ``text`` (delimiters included)."""

    kind: str
    text: str


def _skip_to(sql: str, start: int, end: str) -> int:
    """The index just past ``end`` searched from ``start`` (the end of ``sql`` if absent:
    an unterminated literal or comment runs to the end, as for Lance, which refuses it)."""
    i = sql.find(end, start)
    return len(sql) if i < 0 else i + len(end)


def scan(sql: str) -> Iterator[Segment]:
    """The segments of ``sql`` in order; their texts joined give ``sql`` back.

    A doubled quote inside a literal (``'it''s'``) comes out as two adjacent STRING
    segments: a quote inside one always closes it, as in Lance's tokenizer.
    """
    i, n = 0, len(sql)
    while i < n:
        m = _OPENERS.search(sql, i)
        if m is None:
            yield Segment(CODE, sql[i:])
            return
        if m.start() > i:
            yield Segment(CODE, sql[i:m.start()])
        opener = m.group()
        if opener == "--":
            j, kind = _skip_to(sql, m.end(), "\n"), COMMENT
        elif opener == "/*":
            j, kind = _skip_to(sql, m.end(), "*/"), COMMENT
        else:
            j, kind = _skip_to(sql, m.end(), opener), STRING if opener == "'" else IDENTIFIER
        yield Segment(kind, sql[m.start():j])
        i = j


def _code_placeholders(code: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, name) of each ``:name`` in a CODE segment; ``::`` is a cast."""
    i = code.find(":")
    while i >= 0:
        if code.startswith("::", i):
            i = code.find(":", i + 2)
            continue
        m = PARAM_NAME.match(code, i + 1)
        if m is None:
            i = code.find(":", i + 1)
            continue
        yield i, m.end(), m.group()
        i = code.find(":", m.end())


def substitute(sql: str, render: Callable[[str], str]) -> tuple[str, set[str]]:
    """``sql`` with each ``:name`` placeholder of its code (not inside literals, quoted
    identifiers or comments) replaced by ``render(name)``; and the names seen."""
    out: list[str] = []
    used: set[str] = set()
    for seg in scan(sql):
        if seg.kind != CODE or ":" not in seg.text:
            out.append(seg.text)
            continue
        at = 0
        for start, end, name in _code_placeholders(seg.text):
            out.append(seg.text[at:start])
            out.append(render(name))
            used.add(name)
            at = end
        out.append(seg.text[at:])
    return "".join(out), used


def placeholders(sql: str) -> set[str]:
    """The names of the ``:name`` placeholders in ``sql``'s code."""
    if ":" not in sql:
        return set()
    return substitute(sql, lambda _name: "")[1]


def _structure(sql: str) -> str:
    """The text where ';' and parentheses count: everything but string literals and
    quoted identifiers. Comments count: a comment must not hide half of a pair of
    parentheses or a ';' (``n = 1 -- ) OR (1 = 1`` is refused, not read as ``n = 1``)."""
    return "".join(seg.text for seg in scan(sql) if seg.kind in (CODE, COMMENT))


def check_filter(where: str | None) -> str | None:
    """``where`` in the form it must be sent to Lance, ``(<where>\\n)``, after the checks
    that need no table; InvalidArgument if it fails them. None stays None.

    Lance's parser stops at the end of the first complete expression and ignores the
    rest: ``a = 1; DROP ...``, ``n = 1) OR (n = 3`` and ``n = 1 n = 2`` would all run as
    their first part. So ';' and unbalanced parentheses outside literals are refused, and
    the filter is planned and run parenthesised: parsing that form is what rejects any
    tail (the newline ends a ``--`` comment), so what runs is what was validated. Run the
    returned text, never ``where`` itself.
    """
    if where is None:
        return None
    if not isinstance(where, str) or not where.strip():
        raise InvalidArgument("filter must be a non-empty SQL expression")
    bare = _structure(where)
    if ";" in bare:
        raise InvalidArgument(f"filter {where!r}: ';' is not allowed (one boolean expression only)")
    depth = 0
    for ch in bare:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            break
    if depth != 0:
        raise InvalidArgument(f"filter {where!r} has unbalanced parentheses")
    return f"({where}\n)"


def lance_message(exc: BaseException) -> str:
    """Lance's error text without the Rust source location it appends after ", /"."""
    msg = str(exc).replace("Invalid user input: ", "")
    return msg.split(", /")[0].strip()


def any_row(table: Any, where: str | None) -> bool:
    """Whether a row of ``table`` (a LanceDB table) matches ``where``: a scan that stops at
    the first match. ``count_rows`` reads every row the filter touches — on a 10M x 384
    table ``emb IS NOT NULL`` took 19.9 s counted, 0.11 s this way (the scan runs to the end
    only when nothing matches)."""
    if not where:
        return table.count_rows() > 0
    return table.search().where(where).select(["id"]).limit(1).to_arrow().num_rows > 0


def plan_error(table: Any, where: str, wrapped: str) -> str | None:
    """Why Lance cannot plan ``wrapped`` (the checked form of ``where``) on ``table``, or
    None when it can. ``table``: a LanceDB table (anything with ``search()``)."""

    def explain(sql: str) -> None:
        table.search().where(sql).select(["id"]).limit(1).explain_plan()

    # Exception, not narrower: Lance *panics* on some input (SQL placeholders such as `$1`
    # or `:name`), which surfaces as pyo3's RustPanic, not a RuntimeError.
    try:
        explain(wrapped)
    except Exception as exc:
        message = lance_message(exc)
        try:  # name the fault in the user's own text when it parses on its own
            explain(where)
        except Exception as inner:
            message = lance_message(inner)
        else:
            message = "unexpected text after the end of the expression (one boolean expression only)"
        return f"filter {where!r} is invalid: {message}"
    return None


def validate_filter(table: Any, where: str | None,
                    memo: Callable[[Any, Callable[[], str | None]], str | None] | None = None
                    ) -> str | None:
    """:func:`check_filter`, then plan the filter on ``table``; InvalidArgument if either
    fails. Returns the form to run. ``memo(key, compute)`` may cache the planning (see
    ``Collection.validate_filter``)."""
    wrapped = check_filter(where)
    if wrapped is None:
        return None
    assert where is not None
    compute = lambda: plan_error(table, where, wrapped)  # noqa: E731
    error = memo(("filter", where), compute) if memo is not None else compute()
    if error:
        raise InvalidArgument(error)
    return wrapped


def sql_quote(value: str) -> str:
    """A SQL string literal for ``value`` (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def ids_predicate(ids: Iterable[str]) -> str:
    """``id IN ('a', 'b', ...)`` for these ids (give at least one)."""
    return "id IN (" + ", ".join(sql_quote(i) for i in ids) + ")"


OBJECT_FUNCTION: Final = "any_object"
_OBJECT_CALL: Final = re.compile(r"\bany_object\s*\(", re.IGNORECASE)


def object_clauses(where: str) -> list[tuple[int, int, str]]:
    """``(start, end, predicate)`` of each ``any_object(<predicate>)`` clause in ``where``'s
    code (not inside literals, quoted identifiers or comments); ``where[start:end]`` is the
    whole clause. InvalidArgument for a clause without its closing parenthesis."""
    if "any_object" not in where.lower():
        return []
    # string literals and identifiers blanked out: their parentheses and words do not count
    masked = "".join(seg.text if seg.kind == CODE else " " * len(seg.text) for seg in scan(where))
    out: list[tuple[int, int, str]] = []
    at = 0
    while (m := _OBJECT_CALL.search(masked, at)) is not None:
        depth, i = 1, m.end()
        while i < len(masked) and depth:
            depth += (masked[i] == "(") - (masked[i] == ")")
            i += 1
        if depth:
            raise InvalidArgument(f"filter {where!r}: any_object( has no closing parenthesis")
        out.append((m.start(), i, where[m.end():i - 1]))
        at = i
    return out


def with_objects(where: str | None, objects_where: str | None) -> str | None:
    """``where`` restricted to images with an object matching ``objects_where`` (SQL over
    the object columns, see ``indexing.objects``): ``(<where>) AND any_object(<objects_where>)``."""
    if objects_where is None or objects_where == "":
        return where
    if not isinstance(objects_where, str) or not objects_where.strip():
        raise InvalidArgument("objects_where must be a non-empty SQL predicate over the object columns")
    try:
        check_filter(objects_where)
    except InvalidArgument as exc:
        raise InvalidArgument(f"objects_where: {exc}") from None
    clause = f"{OBJECT_FUNCTION}({objects_where}\n)"
    return clause if where is None or where == "" else f"({where}\n) AND {clause}"
