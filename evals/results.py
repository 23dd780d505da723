"""Append-only JSONL result files that survive `kill -9`.

Every line is one JSON object. The first is the protocol (`"type": "protocol"`: exactly
how every number in the file was made); each later line is one job's record, keyed by
`key` = (model, method spec, parameters, document, length). Records are flushed and
fsynced one at a time, so an interrupted run loses at most the line being written; a torn
last line is cut off when the file is opened again, and the run resumes from the records
that are complete. A job that raised is recorded with `"status": "error"` and its message;
it is retried on the next run (the last record for a key wins).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def job_key(model: str, method: str, params: dict, document: str, length: int) -> str:
    """The identity of a job, as text (`params`: the protocol parameters that change the numbers)."""
    return json.dumps([model, method, params, document, int(length)], sort_keys=True, separators=(",", ":"))


class ResultStore:
    """One JSONL file: read what is there (tolerating a torn tail), append records durably."""

    def __init__(self, path: str | Path | None):
        """`path=None` keeps the records in memory only (nothing written)."""
        self.path = Path(path) if path is not None else None
        self.protocol: dict | None = None
        self.records: list[dict] = []
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # Only a crash inside the OS write could leave a bad complete line; skip it.
                continue
            if record.get("type") == "protocol":
                self.protocol = record
            else:
                self.records.append(record)

    def set_protocol(self, protocol: dict) -> None:
        """Record the protocol once; a different protocol for an existing file is refused."""
        protocol = {"type": "protocol", **protocol}
        if self.protocol is None:
            self._append(protocol)
            self.protocol = protocol
            return
        mine = {k: v for k, v in self.protocol.items() if k != "environment"}
        theirs = {k: v for k, v in protocol.items() if k != "environment"}
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"out={str(self.path and self.path.parent)!r}: this run directory was made with a different protocol "
                f"(differs in: {', '.join(changed)}); use a new --out directory"
            )

    def done(self) -> set[str]:
        """Keys whose last record succeeded."""
        last = {r["key"]: r for r in self.records if "key" in r}
        return {k for k, r in last.items() if r.get("status") == "ok"}

    def latest(self) -> list[dict]:
        """The last record per key, in first-seen order."""
        last: dict[str, dict] = {}
        for r in self.records:
            last[r.get("key")] = r
        return list(last.values())

    def append(self, record: dict) -> None:
        self._append(record)
        self.records.append(record)

    def _append(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
