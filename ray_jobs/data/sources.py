"""Read preference data from wherever it lives into numbered raw records, without interpreting the columns.

A record that cannot even be parsed (a JSON Lines line that is not JSON) becomes a `RowProblem` in its place, so
validation can report it with its row number alongside the other bad rows instead of failing the whole file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray_jobs.data.errors import BAD_RECORD, DatasetError, RowProblem

Records = list[tuple[int, dict[str, Any] | RowProblem]]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


DataFiles = str | list[str] | dict[str, str | list[str]]


def read_source(
    source: str,
    split: str = "train",
    *,
    config: str | None = None,
    revision: str | None = None,
    data_files: DataFiles | None = None,
) -> Records:
    """Records numbered from 1 (for JSON Lines the line number) from a file, a folder or a hub id.

    A folder is a save_to_disk folder, or with `data_files` a folder of data files (glob patterns relative to it).
    `config`, `revision` and `data_files` are datasets.load_dataset's `name`, `revision` and `data_files` for a hub
    id. An option that cannot apply to the source raises `SpecError` naming it (``data.config``).
    """
    path = Path(source).expanduser()
    if path.exists():
        for field, value in (("config", config), ("revision", revision)):
            if value is not None:
                _refuse(field, f"applies to hub datasets only; {source!r} is a local {_kind(path)}")
    if path.is_dir():
        return _read_files(path, _patterns(data_files, split)) if data_files else _read_saved(path, split)
    if path.is_file():
        if data_files is not None:
            _refuse("data_files", f"selects files of a folder or a hub dataset; {source!r} is a single file")
        if split != "train":
            _refuse("split", "a single file has no splits; name each split's files with data.data_files")
        return _read_file(path)
    if source.startswith(("/", ".", "~")) or _data_suffix(path) or not _HUB_ID.match(source):
        raise DatasetError(f"data.source {source!r}: no such file or folder (resolved to {path.resolve()})")
    return _read_hub(source, split, config=config, revision=revision, data_files=data_files)


def _refuse(field: str, message: str) -> None:
    from ray_jobs.spec import SpecError

    raise SpecError([{"field": f"data.{field}", "message": message}])


def _kind(path: Path) -> str:
    return "folder" if path.is_dir() else "file"


def _patterns(data_files: DataFiles, split: str) -> list[str]:
    """The glob patterns of `split` in a `data_files` value (a mapping names each split's files)."""
    if isinstance(data_files, dict):
        if split not in data_files:
            _refuse("split", f"{split!r} is not a split of data.data_files (it names {', '.join(data_files)})")
        data_files = data_files[split]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def _read_files(folder: Path, patterns: list[str]) -> Records:
    """The records of every file the patterns match in `folder`, in sorted order, numbered on across files."""
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(p for p in folder.glob(pattern) if p.is_file())
        if not matched:
            _refuse("data_files", f"{pattern!r} matches no file in {folder}")
        files += [p for p in matched if p not in files]
    outside = [p for p in files if not p.resolve().is_relative_to(folder.resolve())]
    if outside:
        _refuse("data_files", f"{outside[0]} lies outside data.source {folder}")
    records: Records = []
    for file in files:
        offset = len(records)
        records += [(offset + number, record) for number, record in _read_file(file)]
    return records


def _data_suffix(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in FILE_SUFFIXES if name.endswith(s)), None)


def _open_text_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.lower().endswith(".gz") else raw


def _read_file(path: Path) -> Records:
    suffix = _data_suffix(path)
    if suffix is None:
        raise DatasetError(
            f"{path}: unsupported file type; expected one of {', '.join(FILE_SUFFIXES)} (optionally .gz)"
        )
    try:
        if suffix == ".jsonl":
            return _read_jsonl(_open_text_bytes(path))
        if suffix == ".json":
            return _read_json(_open_text_bytes(path), path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return _numbered(pq.read_table(path).to_pylist())
        return _read_csv(path)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc


def _numbered(rows: list[Any]) -> Records:
    return [(i, _as_record(row)) for i, row in enumerate(rows, start=1)]


def _as_record(row: Any) -> dict[str, Any] | RowProblem:
    if isinstance(row, dict):
        return row
    return RowProblem(None, BAD_RECORD, f"expected an object with named fields, got {type(row).__name__}")


def _read_jsonl(data: bytes) -> Records:
    records: Records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        # surrogateescape keeps bad bytes as lone surrogates: validation then names the row instead of failing the file.
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            records.append((number, _as_record(json.loads(text))))
        except json.JSONDecodeError as exc:
            records.append((number, RowProblem(None, BAD_RECORD, f"not valid JSON ({exc.msg} at column {exc.colno})")))
    return records


def _read_json(data: bytes, path: Path) -> Records:
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        # Many ".json" files are really JSON Lines.
        return _read_jsonl(data)
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DatasetError(f"{path}: a JSON object must hold exactly one list of rows (e.g. {{'data': [...]}})")
        doc = lists[0]
    if not isinstance(doc, list):
        raise DatasetError(f"{path}: expected a JSON list of rows, got {type(doc).__name__}")
    return _numbered(doc)


def _read_csv(path: Path) -> Records:
    import pandas as pd

    # dtype=str and no NA parsing: an empty cell must stay "" so it is reported as empty text, not turned into NaN.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
    return _numbered(frame.to_dict("records"))


def _read_saved(path: Path, split: str) -> Records:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: a folder must be one written by datasets' save_to_disk ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"{path}: no split {split!r} (data.split); it has {', '.join(loaded)}")
        loaded = loaded[split]
    return _numbered(loaded.to_list())


def hub_reachable(timeout: float = 3.0) -> bool:
    """True unless offline mode is set or the hub's host does not answer within `timeout` seconds."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _read_hub(
    source: str, split: str, *, config: str | None, revision: str | None, data_files: DataFiles | None
) -> Records:
    # datasets retries a dead network for minutes; a job should instead say at once what to do.
    if not hub_reachable():
        raise DatasetError(
            f"data.source {source!r} looks like a Hugging Face hub id, but the hub is unreachable from here "
            "(offline mode or no network). Download the dataset where the hub is reachable and pass a local path "
            "(.jsonl/.json/.parquet/.csv, optionally .gz, a folder of them with data.data_files, or a save_to_disk "
            "folder) as data.source."
        )
    import datasets

    try:
        loaded = datasets.load_dataset(source, name=config, revision=revision, data_files=data_files, split=split)
    except Exception as exc:  # the hub raises many unrelated types; the user needs the id and the cause
        options = ", ".join(
            f"data.{k} {v!r}" for k, v in (("config", config), ("revision", revision), ("split", split)) if v
        )
        raise DatasetError(f"data.source {source!r} ({options}): cannot load it from the hub: {exc}") from exc
    return _numbered(loaded.to_list())
