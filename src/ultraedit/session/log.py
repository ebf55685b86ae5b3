"""The edit log (``edits.jsonl``): append-only, one JSON record per line, ``seq`` increasing; a torn
last line (a crash mid-append) is cut off before the next append."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from .files import StateError, fsync_dir

LOG = "edits.jsonl"


def repair_log(path: Path) -> int:
    """Cut a torn last line (no newline) off the log; return the last complete record's ``seq``."""
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        end = _last_newline(f, size)
        if end != size - 1:  # torn tail from a crash mid-append
            f.truncate(end + 1)
            f.flush()
            os.fsync(f.fileno())
        if end < 0:
            return 0
        start = _last_newline(f, end) + 1
        f.seek(start)
        line = f.read(end - start)
    try:
        return int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        raise StateError(f"{path}: the last line is not an edit-log record: {line[:200]!r}") from None


def _last_newline(f: Any, before: int) -> int:
    """Offset of the last b"\\n" strictly before ``before`` (-1 if none)."""
    pos = before
    while pos > 0:
        step = min(1 << 16, pos)
        f.seek(pos - step)
        chunk = f.read(step)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return pos - step + i
        pos -= step
    return -1


def append_log(path: Path, records: Sequence[dict[str, Any]], last: int | None = None) -> None:
    """Append the records whose ``seq`` is past ``last`` (default: the log's last, after repair)."""
    if last is None:
        last = repair_log(path)
    new = [r for r in records if r["seq"] > last]
    if not new:
        return
    created = not path.exists()
    with open(path, "ab") as f:
        f.write(b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in new))
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_dir(path.parent)


def read_log(directory: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The edit log of a state directory, record by record (a torn last line is skipped).

    Records: ``{"seq", "time", "event": "turn", "turn", "requests", "edits_total", "edits":
    [{"id", "prompt", "target"}], "shift_norms": {module: Frobenius norm}, "loss", "seconds"}`` or
    ``{"seq", "time", "event": "revert", "turns": [...], ...}``. Records of a saved state that
    have not reached the file yet (crash right after the switch) are in its ``log_tail``.
    """
    path = Path(directory) / LOG
    if not path.exists():
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except ValueError:
                raise StateError(f"{path}, line {number}: not JSON") from None
