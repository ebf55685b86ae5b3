"""The server's edit journal: every accepted edit submission and its outcome, on disk.

``STATE/serve-queue.jsonl`` is append-only; each line is one JSON object, written, flushed and
fsynced before the server answers:

* ``{"op": "submit", "id", "seq", "time", "records": [...]}`` before ``POST /v1/edits`` replies;
* ``{"op": "applied", "ids", "turn", "time"}`` after the turn holding them is saved;
* ``{"op": "failed", "ids", "error", "time"}`` when their turn could not be applied;
* ``{"op": "reverted", "ids", "turn", "time"}`` after a revert of their turn is saved.

The saved state itself (``extra["serve"]``) names the submissions of its last turns (``recent``),
so a crash between saving a turn and journaling it loses nothing: :func:`reconcile` takes the
state's word for those. A submission with no outcome that the state does not hold was never
applied: it is queued again (replayed) in its original order. A torn last line (crash mid-append)
is cut off when the journal is opened.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..core.batching import EditRequest

JOURNAL = "serve-queue.jsonl"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Submission:
    """One ``POST /v1/edits``: its requests are applied together, in one turn."""

    id: str
    seq: int
    records: list[dict[str, Any]]
    submitted_at: str
    requests: list[EditRequest] = field(default_factory=list)
    status: str = "queued"  # queued | applied | failed | reverted
    turn: int | None = None
    error: str | None = None
    resolved_at: str | None = None
    replayed: bool = False

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "object": "edit", "status": self.status, "requests": len(self.records),
            "submitted_at": self.submitted_at,
        }
        if self.turn is not None:
            out["turn"] = self.turn
        if self.error is not None:
            out["error"] = self.error
        if self.resolved_at is not None:
            out["resolved_at"] = self.resolved_at
        if self.replayed:
            out["replayed_after_restart"] = True
        return out


class Journal:
    """Appends fsynced JSON lines to ``STATE/serve-queue.jsonl`` (thread-safe)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / JOURNAL
        self._lock = threading.Lock()
        _cut_torn_tail(self.path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def append(self, *records: dict[str, Any]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        with self._lock, open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a crash mid-append): it was never acknowledged."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def outcome(op: str, subs: list[Submission], **fields: Any) -> dict[str, Any]:
    return {"op": op, "ids": [s.id for s in subs], "time": now(), **fields}


def reconcile(
    records: list[dict[str, Any]], saved: dict[str, Any], turns: int
) -> tuple[dict[str, Submission], list[dict[str, Any]]]:
    """Rebuild every submission's status from the journal and the saved state.

    Args:
        records: the journal's lines, in order.
        saved: the state's ``extra["serve"]`` (``recent``: ``[{"turn", "ids"}]`` of the turns the
            saved weights hold, newest last).
        turns: the saved state's turn count.

    Returns:
        ``(submissions by id in submission order, journal records to append)``: the outcomes the
        journal missed (turns saved but not journaled; reverts saved but not journaled).
    """
    subs: dict[str, Submission] = {}
    for rec in records:
        op = rec.get("op")
        if op == "submit":
            subs[rec["id"]] = Submission(rec["id"], int(rec["seq"]), rec["records"], rec["time"])
            continue
        for sid in rec.get("ids", []):
            sub = subs.get(sid)
            if sub is not None and op in ("applied", "failed", "reverted"):
                sub.status, sub.turn, sub.error = op, rec.get("turn"), rec.get("error")
                sub.resolved_at = rec.get("time")
    fixes: list[dict[str, Any]] = []
    held = set()
    for entry in saved.get("recent", []):
        missed = [subs[i] for i in entry["ids"] if i in subs and (subs[i].status, subs[i].turn) != ("applied", entry["turn"])]
        held.update(entry["ids"])
        if missed:
            fixes.append(outcome("applied", missed, turn=entry["turn"], recovered=True))
            for sub in missed:
                sub.status, sub.turn, sub.error, sub.resolved_at = "applied", entry["turn"], None, fixes[-1]["time"]
    undone = [s for s in subs.values() if s.status == "applied" and s.id not in held and (s.turn or 0) > turns]
    if undone:
        for turn in sorted({s.turn for s in undone}):
            group = [s for s in undone if s.turn == turn]
            fixes.append(outcome("reverted", group, turn=turn, recovered=True))
            for sub in group:
                sub.status, sub.resolved_at = "reverted", fixes[-1]["time"]
    return subs, fixes
