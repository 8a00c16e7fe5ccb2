"""SQL parameters: ``:name`` placeholders of a filter bound to values as literals.

Where a placeholder is (and is not: inside a string literal, a quoted identifier or a
comment) is decided by :mod:`indexing.filters`, the scanner the server validates filters
with; this module renders the values (:func:`sql_literal`) and checks that every
placeholder has a value and every value a placeholder.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from indexing.filters import PARAM_NAME, placeholders, substitute
from service.client.errors import invalid

__all__ = ["bind_params", "bind_two", "bound", "sql_literal"]


def _scalar_literal(name: str, value: Any) -> str:
    """One value as a SQL literal that cannot change the shape of the expression around it."""
    if value is None:
        return "NULL"
    if isinstance(value, bool | np.bool_):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | np.integer):
        n = int(value)
        if not -(2**63) <= n < 2**63:
            raise invalid(f"param '{name}': {n} does not fit in a 64-bit integer")
        # In parentheses: "x -:n" must not become "x --3" (a comment).
        return str(n) if n >= 0 else f"({n})"
    if isinstance(value, float | np.floating):
        f = float(value)
        if not math.isfinite(f):
            raise invalid(f"param '{name}': {f} is not a finite number (NaN and infinities "
                          "cannot be compared in a filter)")
        text = repr(f)
        return text if f >= 0 else f"({text})"
    if isinstance(value, str):
        if "\x00" in value:
            raise invalid(f"param '{name}': strings cannot contain NUL characters")
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:  # stored timestamps are UTC
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return f"TIMESTAMP '{value.isoformat(sep=' ', timespec='microseconds')}'"
    if isinstance(value, dt.date):
        return f"DATE '{value.isoformat()}'"
    raise invalid(f"param '{name}': cannot bind a {type(value).__name__} (use str, int, float, "
                  "bool, None, datetime, date, or a list of those)")


def sql_literal(name: str, value: Any) -> str:
    """``value`` rendered for the placeholder ``:name``: a scalar literal, or for a list or
    tuple its literals separated by commas (for ``IN (:xs)`` or ``[:xs]``)."""
    if isinstance(value, list | tuple):
        if not value:
            raise invalid(f"param '{name}': an empty list cannot be bound ('IN ()' is not SQL); "
                          "skip the condition instead")
        if any(isinstance(v, list | tuple | dict) for v in value):
            raise invalid(f"param '{name}': lists cannot be nested")
        return ", ".join(_scalar_literal(name, v) for v in value)
    return _scalar_literal(name, value)


def bind_params(where: str, params: Mapping[str, Any]) -> str:
    """``where`` with each ``:name`` placeholder replaced by ``params[name]`` as a literal.

    Placeholders are recognised only outside '...' strings, "..." and `...` identifiers and
    comments, so text inside a literal is never touched; ``::`` (a cast) is not a
    placeholder. The text is read by :func:`indexing.filters.scan`, the scanner the server
    validates filters with, so both read it the same way. Values: str (quoted, quotes
    doubled: ``x' OR '1'='1`` stays one string), int, finite float, bool, None (NULL),
    datetime (TIMESTAMP, in UTC), date, or a list/tuple of those (comma-separated, for
    ``IN (:xs)``). A placeholder without a value,
    a value without a placeholder, a bad name or an unsupported value raise
    :class:`InvalidArgumentError` before anything is sent.

        bind_params("label = :l AND score > :s", {"l": "cat", "s": 0.5})
        # "label = 'cat' AND score > 0.5"
    """
    if not isinstance(where, str):
        raise invalid(f"filter must be a string, got {type(where).__name__}")
    if not isinstance(params, Mapping):
        raise invalid(f"params must be a mapping of name -> value, got {type(params).__name__}")
    for key in params:
        if not isinstance(key, str) or not PARAM_NAME.fullmatch(key):
            raise invalid(f"param name {key!r} is invalid: use letters, digits and '_', "
                          "not starting with a digit")

    def render(name: str) -> str:
        if name not in params:
            given = ", ".join(sorted(params)) or "none"
            raise invalid(f"filter uses :{name} but params has no '{name}' (given: {given})")
        return sql_literal(name, params[name])

    text, used = substitute(where, render)
    unused = sorted(set(params) - used)
    if unused:
        raise invalid(f"param(s) {', '.join(unused)} not used by the filter {where!r} "
                      "(write :name where each value goes)")
    return text


def bound(where: str | None, params: Mapping[str, Any] | None, what: str = "where") -> str | None:
    """``where`` with ``params`` bound (None params: ``where`` as given, unless it has
    placeholders: those would reach the server unbound)."""
    if params is None:
        if isinstance(where, str) and ":" in where and (names := placeholders(where)):
            shown = ", ".join(f":{n}" for n in sorted(names))
            raise invalid(f"filter {where!r} has placeholder(s) {shown} but no params were given "
                          "(pass params={name: value})")
        return where
    if where is None:
        raise invalid(f"params were given without a filter ({what})")
    return bind_params(where, params)


def bind_two(where: str | None, reference_where: str | None,
             params: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Bind ``params`` into two filters that share them."""
    texts = [w for w in (where, reference_where) if w]
    if not texts:
        raise invalid("where_params were given without a filter (where / reference_where)")
    for w in texts:  # a placeholder one of them uses without a value is an error
        for name in placeholders(w):
            if name not in params:
                raise invalid(f"filter uses :{name} but where_params has no '{name}'")
    used = {n for w in texts for n in placeholders(w)}
    unused = sorted(set(params) - used)
    if unused:
        raise invalid(f"param(s) {', '.join(unused)} not used by where or reference_where")

    def bind(w: str | None) -> str | None:
        return bind_params(w, {k: params[k] for k in placeholders(w)}) if w else w

    return bind(where), bind(reference_where)
