"""Read back an offline W&B run (`run-<id>.wandb`) so tests can check what was logged.

wandb 0.31 ships no Python reader for its record store (it lives in the Go core), but the format
is small (see shared/notes/wandb-offline.md): a 7-byte header (``:W&B``, a 2-byte magic, a 1-byte
version), then 32 KiB blocks of LevelDB-log chunks -- 4-byte CRC, 2-byte little-endian length,
1-byte type (1 full, 2 first, 3 middle, 4 last; a block tail shorter than 7 bytes is padding) --
whose reassembled payloads are `wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

HEADER_LEN = 7
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """Yield the reassembled record payloads of a `.wandb` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B record file (header {data[:4]!r})")
    pos = HEADER_LEN  # the header sits at the start of the first block
    pending: list[bytes] = []
    while pos + CHUNK_HEADER_LEN <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER_LEN:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero fill (preallocated or padded tail)
            pos += left_in_block
            continue
        payload = data[pos + CHUNK_HEADER_LEN: pos + CHUNK_HEADER_LEN + length]
        pos += CHUNK_HEADER_LEN + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = [payload]
        elif kind == MIDDLE:
            pending.append(payload)
        elif kind == LAST:
            pending.append(payload)
            yield b"".join(pending)
            pending = []
        else:
            raise ValueError(f"{path}: bad chunk type {kind} at offset {pos}")


def read_records(path: str | Path) -> list[pb.Record]:
    """All `Record` protobufs of a `.wandb` file."""
    records = []
    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    return None


def history(path: str | Path) -> list[dict[str, Any]]:
    """The logged history rows: one dict per `run.log` commit, values decoded from JSON."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({_item_key(i): _item_value(i) for i in rec.history.item})
    return rows


def summary(path: str | Path) -> dict[str, Any]:
    """The run summary after all summary updates in the file."""
    out: dict[str, Any] = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "summary":
            for i in rec.summary.update:
                out[_item_key(i)] = _item_value(i)
            for i in rec.summary.remove:
                out.pop(_item_key(i), None)
    return out


def config(path: str | Path) -> dict[str, Any]:
    """The run config (W&B stores each key as {"value": ...}; unwrapped here)."""
    out: dict[str, Any] = {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        updates = rec.config.update if kind == "config" else rec.run.config.update if kind == "run" else []
        for i in updates:
            value = _item_value(i)
            out[_item_key(i)] = value.get("value", value) if isinstance(value, dict) else value
    return out


def run_record(path: str | Path) -> pb.RunRecord:
    """The run's `RunRecord` (id, group, job type, display name)."""
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise ValueError(f"{path}: no run record")
