"""W&B run files read back offline: which history steps a `wandb sync` would upload.

A W&B run writes a transaction log, `<run folder>/run-<id>.wandb`: a 7-byte header (`:W&B`, a
2-byte magic, a version byte), then LevelDB-log records in 32 KiB blocks. Each record has a 7-byte
header (CRC-32 of type byte + data, length, type: full / first / middle / last) and holds a
protobuf `wandb.proto.wandb_internal_pb2.Record`; `wandb sync` replays these records to the server.
Every `wandb.init` writes a new run folder, so a resumed run has one folder per start (its
"fragments"), all with the same run id. wandb 0.31 ships no Python reader for these files.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
FILE_HEADER = 7
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every sound record chunk; stops at the first torn or corrupt one, as a
    killed writer leaves the tail (sync stops reading there too)."""
    pos = FILE_HEADER
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:  # the rest of a block too small for a header is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0 and length == 0:  # zero fill after the last record of a block
            pos += left
            continue
        payload = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return
        yield kind, payload
        pos += RECORD_HEADER + length


def read_records(path: str | Path) -> Iterator:
    """Every complete `Record` of a `.wandb` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:4]!r})")
    parts: list[bytes] = []
    for kind, payload in _chunks(data):
        if kind in (FULL, FIRST):
            parts = [payload]
        else:
            parts.append(payload)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record
            parts = []


def history(path: str | Path) -> list[dict]:
    """The history rows of one transaction log: {key: value} with `_step` (W&B's step)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                   for item in record.history.item}
            rows.append({**row, "_step": record.history.step.num})
    return rows


def run_logs(wandb_dir: str | Path, run_id: str) -> list[Path]:
    """The transaction logs of run `run_id` under `wandb_dir` (offline and online folders), oldest first."""
    logs = Path(wandb_dir).glob(f"*run-*-{run_id}*/run-{run_id}.wandb")
    return sorted(logs, key=lambda p: (_started(p.parent.name), p.parent.name))


def _started(folder: str) -> str:
    """The start time in a run folder's name (`offline-run-YYYYMMDD_HHMMSS-<id>`, `run-...`)."""
    found = re.search(r"\d{8}_\d{6}", folder)
    return found.group() if found else ""


def last_logged_step(wandb_dir: str | Path, run_id: str) -> int:
    """The highest W&B step in any earlier run folder of `run_id` (-1 when none)."""
    steps = [row["_step"] for path in run_logs(wandb_dir, run_id) for row in history(path)]
    return max(steps, default=-1)
