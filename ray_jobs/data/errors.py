"""Errors that point at the data, not the code: every bad row is reported with its number, field and reason."""

from __future__ import annotations

from collections import Counter
from typing import Any

# Reason categories: skip mode counts dropped rows by these, so the summary says *why* rows went missing.
MISSING = "missing field"
EMPTY = "empty text"
NOT_STRING = "non-string"
IDENTICAL = "identical responses"
UNDECODABLE = "undecodable bytes"
BAD_LABEL = "bad label"
BAD_RECORD = "bad record"

MAX_LISTED = 20


class RowProblem(ValueError):
    """Raised while reading one row; the caller turns it into a row error with the row number."""

    def __init__(self, field: str | None, reason: str, message: str):
        self.field, self.reason, self.message = field, reason, message
        super().__init__(message)


def row_error(row: int, field: str | None, reason: str, message: str) -> dict[str, Any]:
    return {"row": row, "field": field, "reason": reason, "message": message}


class DatasetError(ValueError):
    """Data that cannot be used. `errors` lists ``{row, field, reason, message}`` (empty for whole-source problems).

    Row numbers are 1-based record numbers in the source; for JSON Lines they are line numbers.
    """

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None, total_rows: int | None = None):
        self.errors = list(errors or [])
        self.total_rows = total_rows
        super().__init__(message)

    @classmethod
    def from_rows(cls, source: str, errors: list[dict[str, Any]], total_rows: int) -> DatasetError:
        bad_rows = len({e["row"] for e in errors})
        by_reason = ", ".join(f"{n} {reason}" for reason, n in Counter(e["reason"] for e in errors).most_common())
        lines = [f"{source}: {bad_rows} of {total_rows} rows are invalid ({by_reason})"]
        lines += [f"  {describe(e)}" for e in errors[:MAX_LISTED]]
        if len(errors) > MAX_LISTED:
            lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
        lines.append("Fix those rows, or set data.on_error: skip to drop them (they are counted in data/summary.json).")
        return cls("\n".join(lines), errors, total_rows)


def describe(error: dict[str, Any]) -> str:
    where = f"row {error['row']}"
    if error.get("field"):
        where += f", field {error['field']!r}"
    return f"{where}: {error['message']}"
