"""Checkpoints that survive a kill at any instant, and the choice of which one a run resumes from.

`AtomicCheckpointIO` (a Lightning `CheckpointIO`) writes each checkpoint to a temporary file in
the same folder, fsyncs it and renames it over the target, so a reader sees the old file or the
complete new one, never a torn one. Beside each checkpoint it keeps a SHA-256 digest of its bytes,
which catches damage that still loads (zeroed or flipped bytes inside a tensor). It refuses to
write a checkpoint whose parameters are not finite.

`find_resumable` picks the newest checkpoint that loads, matches its digest and holds finite
parameters, warning with the name of every newer one it had to pass over.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from ..errors import NonFiniteError, first_line
from ..files import TEMP_NAME, atomic_write_bytes, replace_durably, temp_path, truncate_jsonl

DIGEST_SUFFIX = ".sha256"


class CheckpointWarning(UserWarning):
    """A checkpoint was passed over at resume because it is damaged."""


@dataclass(frozen=True)
class Resumable:
    path: Path
    step: int


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor holding NaN/Inf, or None if all are finite."""
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def save_atomic(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save through a temporary file, fsync and rename; the digest lands before the file."""
    path = Path(path)
    bad = first_nonfinite(checkpoint.get("state_dict", {}))
    if bad is not None:
        step = checkpoint.get("global_step", "?")
        raise NonFiniteError(f"checkpoint {path.name} not written: parameter {bad} is not finite at step {step}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            writer = _HashingWriter(handle)
            torch.save(checkpoint, writer)
            handle.flush()
            os.fsync(handle.fileno())
        # A kill between the two renames leaves a digest that does not match the old file: the
        # checkpoint is then passed over, never trusted while unverified.
        atomic_write_bytes(_digest_path(path), writer.digest.hexdigest().encode())
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with atomic, durable, verified, finite-only local writes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        digest = _digest_path(Path(path))
        if digest.exists():
            digest.unlink()


def _peek(path: Path) -> tuple[int | None, str, dict | None]:
    """(global step, "", checkpoint) from a memory-mapped load (cheap at any size), or (None, why, None)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damage
        first = first_line(err)[:120]
        return None, f"it does not load ({type(err).__name__}: {first})", None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
        return None, "it is not a Lightning checkpoint", None
    return int(ckpt["global_step"]), "", ckpt


def _verify(path: Path, ckpt: dict) -> str:
    """Why a loadable checkpoint is unsound (reads every byte once), or "" if it is sound."""
    digest = _digest_path(path)
    if digest.is_file() and digest.read_text().strip() != file_digest(path):
        return "its bytes do not match its SHA-256 digest"
    bad = first_nonfinite(ckpt["state_dict"])
    return f"parameter {bad} is not finite" if bad is not None else ""


def inspect(path: Path) -> tuple[int | None, str]:
    """(global step, "") for a sound checkpoint, or (None, why it cannot be resumed from)."""
    step, why, ckpt = _peek(path)
    if step is not None:
        why = _verify(path, ckpt)
    return (step, "") if not why else (None, why)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the half-written `.<name>.tmp<pid>` files of writers that are no longer alive (a run
    killed while saving); a live process's file is left alone. Returns the files removed."""
    removed = []
    for path in Path(folder).glob(".*.tmp*"):
        match = TEMP_NAME.fullmatch(path.name)
        if not match or not path.is_file() or _alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def find_resumable(folder: Path, warn: Callable[[str], None] | None = None) -> Resumable | None:
    """The sound checkpoint in `folder` with the highest step (newest file on ties), or None.

    Every checkpoint is opened memory-mapped to read its step; only the best candidates are then
    verified in full (digest, finite parameters), newest first, so a large run pays for one full
    read. Each damaged checkpoint passed over is named in a warning: a fallback is never silent.
    """
    warn = warn or (lambda message: warnings.warn(message, CheckpointWarning, stacklevel=3))
    folder = Path(folder)
    if not folder.is_dir():
        return None
    remove_stale_temps(folder)
    found = []
    for path in folder.glob("*.ckpt"):
        if not path.is_file():
            continue
        step, why, ckpt = _peek(path)
        if step is None:
            warn(f"checkpoint {path} is damaged and is skipped: {why}")
            continue
        found.append((step, path.stat().st_mtime, path.name == "last.ckpt", path, ckpt))
    for step, _, _, path, ckpt in sorted(found, key=lambda item: item[:3], reverse=True):
        why = _verify(path, ckpt)
        if not why:
            return Resumable(path, step)
        warn(f"checkpoint {path} is damaged and is skipped: {why}")
    return None


__all__ = ["AtomicCheckpointIO", "NonFiniteError", "CheckpointWarning", "Resumable", "find_resumable",
           "inspect", "save_atomic", "truncate_jsonl", "first_nonfinite"]
