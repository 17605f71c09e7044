"""Reading a W&B offline run back: its `.wandb` file is a LevelDB-style log of protobuf records (wandb's own Python
reader is gone since its core moved to Go), so tests can check what an offline run holds without any server."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_HEADER = 7  # ":W&B", a two-byte magic number and a version byte
_BLOCK = 32 * 1024
_FULL, _LAST = 1, 4


def _records(path: Path) -> list[bytes]:
    raw, pos, out, part = path.read_bytes(), _HEADER, [], b""
    while pos + 7 <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        part += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            out.append(part)
            part = b""
    return out


def offline_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({name, group, tags}, history rows) of the offline run in `run_dir` (``offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    info: dict[str, Any] = {}
    history = []
    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = {"name": record.run.display_name, "group": record.run.run_group, "tags": list(record.run.tags)}
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return info, history
