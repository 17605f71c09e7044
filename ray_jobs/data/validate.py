"""Row-level checks, and the fail-or-skip policy that turns bad rows into one readable error or counted skips."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ray_jobs.data.errors import (
    BAD_LABEL,
    EMPTY,
    IDENTICAL,
    MISSING,
    NOT_STRING,
    UNDECODABLE,
    DatasetError,
    RowProblem,
    row_error,
)

T = TypeVar("T")


def require(record: dict[str, Any], key: str, where: str | None = None) -> Any:
    """record[key], or a 'missing field' problem naming `where` (the field's path as the user wrote it)."""
    value = record.get(key)
    if value is None:
        raise RowProblem(where or key, MISSING, "missing field" if key not in record else "null value")
    return value


def check_text(value: Any, where: str) -> str:
    """A usable text: a non-empty str that is valid Unicode (bytes are accepted when they are UTF-8)."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowProblem(where, UNDECODABLE, f"bytes are not valid UTF-8 (at byte {exc.start})") from None
    if value is None:
        raise RowProblem(where, MISSING, "missing field")
    if not isinstance(value, str):
        raise RowProblem(where, NOT_STRING, f"expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Lone surrogates: the reader kept undecodable source bytes (or the JSON escaped half a character).
        raise RowProblem(where, UNDECODABLE, f"undecodable bytes at character {exc.start}") from None
    # Only "" is empty: whitespace can be a real response (TL;DR summaries start with a space, so " " is the
    # empty summary a labeller judged), and the pair still carries a valid preference.
    if not value:
        raise RowProblem(where, EMPTY, "empty text")
    return value


def check_distinct(a: str, b: str, where: str) -> None:
    if a == b:
        raise RowProblem(where, IDENTICAL, "identical responses: a pair must compare two different texts")


def check_label(value: Any, where: str, *, allow_null: bool) -> int | None:
    """0/1 label (also bool, integral float, or '0'/'1' from a CSV); None where the format allows no label."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        if allow_null:
            return None
        raise RowProblem(where, MISSING, "missing field")
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    if isinstance(value, bool | int | float) and value in (0, 1):
        return int(value)
    raise RowProblem(where, BAD_LABEL, f"expected 0 or 1, got {value!r}")


@dataclass
class Collected:
    rows: list[Any]
    rows_read: int
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)


def collect(
    records: Iterable[tuple[int, Any]],
    convert: Callable[[Any], T],
    *,
    on_error: Literal["fail", "skip"],
    source: str,
) -> Collected:
    """Convert every record; bad ones raise one DatasetError (fail) or are counted by reason (skip)."""
    rows: list[T] = []
    errors: list[dict[str, Any]] = []
    total = 0
    for number, record in records:
        total += 1
        try:
            if isinstance(record, RowProblem):
                raise record
            rows.append(convert(record))
        except RowProblem as problem:
            errors.append(row_error(number, problem.field, problem.reason, problem.message))
    if errors and on_error == "fail":
        raise DatasetError.from_rows(source, errors, total)
    skipped = dict(Counter(e["reason"] for e in errors).most_common())
    return Collected(rows=rows, rows_read=total, skipped=skipped, errors=errors)
