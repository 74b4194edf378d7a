"""Which code produced a result: the git commit of this package's checkout, and whether tracked
files differ from it. Kept free of heavy imports so every command can record it cheaply."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(path: Path | None = None) -> dict:
    """`{"commit": sha or None, "dirty": bool or None}` for the checkout holding `path`."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def commit_label() -> str:
    """`<sha>` or `<sha> (uncommitted changes)`, for report headers."""
    info = git_commit()
    return (info["commit"] or "unknown") + (" (uncommitted changes)" if info["dirty"] else "")
