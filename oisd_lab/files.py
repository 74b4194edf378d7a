"""Durable writes of a run's files: a whole file replaced atomically, and the rows of a
JSON-lines file appended or trimmed. Torch-free, so every layer can write its files the same way.

An atomic write goes to a temporary file beside the target (`.<name>.tmp<writer pid>`), is
fsynced and renamed over the target: a reader sees the old file or the complete new one, never a
torn one. A JSON-lines row is one `json.dumps` line (non-ASCII escaped), so a file stays valid
whatever the text in it; a line torn by a killed writer is dropped when the file is trimmed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

TEMP_NAME = re.compile(r"\..+\.tmp(\d+)")
"""Name of a writer's temporary file: `.<target>.tmp<writer pid>` (see `temp_path`)."""


def temp_path(path: Path) -> Path:
    """Where this process writes `path` before the rename (matches `TEMP_NAME`)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, target: Path) -> None:
    """Rename `tmp` over `target` and make the rename durable."""
    os.replace(tmp, target)
    fsync_dir(target.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temporary file and a rename."""
    tmp = temp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    replace_durably(tmp, path)


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append each row as one JSON line."""
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of a per-step JSONL file with step <= last_step (torn lines are dropped).

    Returns the number of rows removed. The file is rewritten atomically.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                step = int(json.loads(line).get("step") or 0)
            except (ValueError, AttributeError, TypeError):
                step = None
            if step is not None and step <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        atomic_write_bytes(path, "".join(keep).encode("utf-8"))
    return dropped


__all__ = ["TEMP_NAME", "append_jsonl", "atomic_write_bytes", "fsync_dir", "replace_durably", "temp_path",
           "truncate_jsonl"]
