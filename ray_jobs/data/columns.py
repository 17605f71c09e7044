"""A dataset's own column names mapped onto the ones the row formats read (``data.columns``), before the format is
detected, so a renamed dataset is read exactly as one that used the usual names."""

from __future__ import annotations

from ray_jobs.data.errors import RowProblem
from ray_jobs.data.sources import Records
from ray_jobs.spec import ColumnMap, SpecError


def rename_columns(records: Records, columns: ColumnMap) -> Records:
    """`records` with each mapped column renamed to the name rmdistill reads.

    Refuses, naming ``data.columns.<name>``, a mapped column the data does not have, and a mapping whose target
    name the data already uses for another column (which of the two is meant would be a guess).
    """
    mapping = {theirs: ours for ours, theirs in columns.model_dump(exclude_none=True).items()}
    present = set().union(*(r.keys() for _, r in records if isinstance(r, dict)))
    errors = []
    for theirs, ours in mapping.items():
        if theirs not in present:
            message = f"column {theirs!r} is not in the data; its columns are {', '.join(sorted(present))}"
            errors.append({"field": f"data.columns.{ours}", "message": message})
        elif ours in present and ours not in mapping:
            message = f"the data already has a column {ours!r}: mapping {theirs!r} onto it would hide one of them"
            errors.append({"field": f"data.columns.{ours}", "message": message})
    if errors:
        raise SpecError(errors)
    return [(number, _renamed(record, mapping)) for number, record in records]


def _renamed(record: dict | RowProblem, mapping: dict[str, str]) -> dict | RowProblem:
    if isinstance(record, RowProblem):
        return record
    return {mapping.get(key, key): value for key, value in record.items()}
