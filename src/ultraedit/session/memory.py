"""An editing session in memory: the unedited weights, the exact cumulative shift, the undo history
and the edit-log records not yet on disk. One :class:`Snapshot` of the editor's state (weights,
float32 deltas, statistics, stage states, counters) serves undo, refinement and the server's
rollback alike.

Memory: the session keeps a CPU copy of the ORIGINAL weights of its edit modules (model dtype; a
7-8B model with 12 edited MLP matrices: about 1.4 GB in bf16); it is what the fingerprint hashes and
what deltas are taken against. ``keep_turn_deltas=k`` keeps k snapshots (from before each of the last
k turns) so that a revert restores them exactly; they are saved too.
"""

from __future__ import annotations

import copy
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from .identity import fingerprint_of, model_info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def base_copy(t: torch.Tensor) -> torch.Tensor:
    """The host copy of a base weight. Page-locked when the weight is on a GPU: every turn of a bf16
    model reads the base back to the GPU (``round(base + delta)``), and from pageable memory that
    copy took 0.73 s of a 0.95 s Llama-3-8B turn on an H200 (1.4 GB over 12 modules)."""
    if t.device.type != "cuda":
        return cpu_copy(t)
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    return host.copy_(t.detach())


@dataclass
class Bookmark:
    """The session's bookkeeping at one moment (undo history, log position, records, extra data)."""

    undo: list["UndoEntry"]
    log_seq: int
    pending_log: list[dict[str, Any]]
    extra: dict[str, Any]


@dataclass
class Snapshot:
    """The editor's state at one moment, enough to put it back exactly.

    Attributes:
        weights: edit-module weights (weight layout, model dtype), name -> tensor.
        deltas: the float32 cumulative shifts of the modules that accumulate one; absent = zero.
        normalizers: statistics per module shape ``(d_in, d_out)``, as state dicts (``None``: a
            snapshot of the weights alone, which refinement takes within a turn).
        stages: each stateful stage's ``state_dict`` (the key memory), by stage name.
        turns, edits: the counters.
        bookmark: the session's bookkeeping too (the server's rollback of a turn it could not save).
    """

    weights: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    normalizers: dict[tuple[int, int], dict[str, torch.Tensor]] | None = None
    stages: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    turns: int = 0
    edits: int = 0
    bookmark: Bookmark | None = None


@dataclass
class UndoEntry:
    """What a revert needs to undo one turn: the snapshot from before it, the turn's number, its
    request count and its edit-log ``seq`` (unique even when turn numbers repeat after a revert)."""

    turn: int
    requests: int
    seq: int
    snapshot: Snapshot


@dataclass
class RevertReport:
    """What a revert did: the undone turn numbers (increasing), the requests they had applied, the
    counters after it, and what the revert means."""

    reverted_turns: list[int]
    edits_removed: int
    turns: int
    edits: int
    note: str


@dataclass
class EditSession:
    """Saved-state bookkeeping of one editor (``editor.session``).

    Attributes:
        base: ORIGINAL weights of the edit modules, name -> CPU tensor (model dtype, weight layout).
        delta: the exact cumulative shift ``W - W_base`` in float32 (weight layout, on the weight's
            device) of each module that accumulates one (bf16/fp16 weights, the default); the weight
            is ``round(base + delta)``. Absent until the module's first turn (= zero).
        keep_turn_deltas: how many recent turns can be reverted (0 = none).
        undo: the last ``keep_turn_deltas`` turns' :class:`UndoEntry`, oldest first.
        log_seq: edit-log records created over the session's whole life (saved with the state).
        pending_log: records not yet known to be in ``edits.jsonl`` (written by the next save).
        extra: JSON-serializable data saved with the state (the CLI keeps its input progress here).
        model_info: ``model_type`` and class name of the model (for the fingerprint).
        session_id: a state directory holds one session; kept by a resume.
    """

    base: dict[str, torch.Tensor]
    keep_turn_deltas: int = 0
    delta: dict[str, torch.Tensor] = field(default_factory=dict)
    undo: deque[UndoEntry] = field(default_factory=deque)
    log_seq: int = 0
    pending_log: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    fingerprint_cache: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model: nn.Module, modules: dict[str, nn.Module], keep_turn_deltas: int = 0) -> "EditSession":
        if not (isinstance(keep_turn_deltas, int) and keep_turn_deltas >= 0):
            raise ValueError(f"keep_turn_deltas must be a non-negative int, got {keep_turn_deltas!r}")
        return cls({n: base_copy(m.weight) for n, m in modules.items()}, keep_turn_deltas, model_info=model_info(model))

    def fingerprint(self) -> dict[str, Any]:
        """Fingerprint of the base model this session edits (:func:`ultraedit.session.identity.fingerprint`)."""
        if self.fingerprint_cache is None:
            self.fingerprint_cache = fingerprint_of(self.model_info, self.base)
        return self.fingerprint_cache

    def remember(self, entry: UndoEntry) -> None:
        """Keep ``entry`` as the newest revertible turn (dropping the oldest beyond ``keep_turn_deltas``)."""
        self.undo.append(entry)
        while len(self.undo) > self.keep_turn_deltas:
            self.undo.popleft()

    def log(self, record: dict[str, Any]) -> None:
        """Queue one edit-log record (given ``seq`` and ``time``); saved by the next save."""
        self.log_seq += 1
        self.pending_log.append({"seq": self.log_seq, "time": now(), **record})

    def bookmark(self) -> Bookmark:
        return Bookmark(list(self.undo), self.log_seq, list(self.pending_log), copy.deepcopy(self.extra))

    def rewind(self, mark: Bookmark) -> None:
        self.undo.clear()
        self.undo.extend(mark.undo)
        self.log_seq = mark.log_seq
        self.pending_log[:] = mark.pending_log
        self.extra = mark.extra
