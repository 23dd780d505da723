"""Helpers for the bad-input, store and concurrency tests: directory snapshots."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(root) -> dict | None:
    """{relative path: sha256 of the bytes (None for a folder)} of everything under root; None if absent."""
    root = Path(root)
    if not root.exists():
        return None
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}
