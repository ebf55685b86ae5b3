"""The serving engine: one model answering generations while one worker thread edits it.

Two module trees share every tensor except the edit modules' weights: the *served* model (what
generations run on) and the *editing* copy (what the :class:`~ultraedit.editor.UltraEditor` owns,
with its capture hooks). A turn is computed, committed and saved atomically on the editing copy
while generations go on; only then, under the exclusive side of a readers-writer lock, are the
new edit-module weights copied into the served model (bit for bit). A generation holds the shared
side for its whole run, so it sees the weights of exactly one saved turn, before or after.

The worker thread owns the editor and the state directory (it holds ``session_lock`` for the
server's life): it loads or creates the state, replays the journal, applies queued submissions
in turns of up to ``turn_size`` requests (whole submissions, in order), and runs reverts.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import EditConfig
from ..core.batching import EditError, EditRequest, tokenize_pair
from ..core.presets import resolve_modules
from ..datasets import DatasetError, parse_record
from ..editor import UltraEditor
from ..session import StateError, info, read_state, save, session_lock
from ..session.memory import Snapshot
from ..session.store import has_state
from .generation import Delta, SamplingParams, sample_ids, stop_token_ids, stream_text
from .journal import Journal, Submission, now, outcome, reconcile
from .metrics import Metrics
from .rwlock import RWLock

log = logging.getLogger("ultraedit.serve")


class ServeError(Exception):
    """An error for the HTTP client: ``status`` code and a message that names what is wrong."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class EngineConfig:
    state: Path
    model_name: str
    turn_size: int = 100
    keep_turn_deltas: int | None = None  # None: the saved state's (0 for a new one)
    edit_fields: dict[str, Any] | None = None  # EditConfig (to_dict form) of a NEW state
    check_fields: dict[str, Any] | None = None  # fields given explicitly: must match a resumed state
    max_queue: int = 10_000  # queued edit requests before POST /v1/edits answers 429


def editing_copy(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A second module tree over ``model`` sharing every parameter and buffer except the weights
    of the modules ``names`` (those are copied)."""
    modules = dict(model.named_modules())
    own = {id(modules[n].weight) for n in names}
    shared = itertools.chain(model.parameters(), model.buffers())
    memo: dict[int, Any] = {id(t): t for t in shared if id(t) not in own}
    return copy.deepcopy(model, memo)


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, config: EngineConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.state_dir = Path(config.state)
        self.metrics = Metrics()
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.editor: Any = None
        self.served_turn = 0
        self.started = time.time()
        self._rw = RWLock()
        self._cond = threading.Condition()
        self._queue: deque[Submission] = deque()
        self._reverts: deque[tuple[int, Future]] = deque()
        self.submissions: dict[str, Submission] = {}
        self._seq = 0
        self._stopping = False
        self._ready = threading.Event()
        self.failure: BaseException | None = None
        self._journal: Journal | None = None
        self._worker = threading.Thread(target=self._run, name="ultraedit-editor", daemon=True)
        self.metrics.gauge("ultraedit_edit_queue_length", "edit requests queued, not yet applied", self.queued_requests)
        self.metrics.gauge("ultraedit_model_turn", "turns held by the weights being served", lambda: self.served_turn)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> None:
        """Start the editing worker and wait until the state is loaded and the journal replayed."""
        self._worker.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the editing worker did not start in time")
        if self.failure is not None:
            raise self.failure

    def stop(self, timeout: float | None = None) -> None:
        """Finish the turn in progress (queued edits stay in the journal for the next start)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._worker.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and self.failure is None and self._worker.is_alive()

    def queued_requests(self) -> int:
        with self._cond:
            return sum(len(s.records) for s in self._queue)

    # ------------------------------------------------------------------ generation
    @contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the served weights still (no turn lands meanwhile); yields their turn number."""
        with self._rw.read():
            yield self.served_turn

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def check_length(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Refuse a prompt + ``max_tokens`` past the model's context (a default ``max_tokens`` is cut to fit)."""
        if self.max_positions and not params.max_tokens_given and len(prompt_ids) < self.max_positions:
            params.max_tokens = min(params.max_tokens, self.max_positions - len(prompt_ids))
        if self.max_positions and len(prompt_ids) + params.max_tokens > self.max_positions:
            raise ServeError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                  f"the model's context of {self.max_positions} tokens", param="max_tokens")

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: Callable[[], bool] = lambda: False
    ) -> Iterator[Delta]:
        """Text deltas of one generation; call inside :meth:`reading` and consume it there."""
        ids = sample_ids(self.model, prompt_ids, params, self.stop_ids, cancelled)
        for delta in stream_text(self.tokenizer, ids, self.stop_ids, params.stop, params.max_tokens):
            if delta.finish_reason is not None:
                self.metrics.add("ultraedit_generated_tokens_total", delta.completion_tokens)
            yield delta

    # ------------------------------------------------------------------ edits (HTTP side)
    def validate(self, records: Any) -> list[EditRequest]:
        """Parse and tokenize every record now; the first problem is a 4xx naming index and field."""
        if not isinstance(records, list) or not records:
            raise ServeError(400, "the body must be a non-empty JSON list of edit requests, or {\"requests\": [...]}",
                             param="requests")
        if len(records) > self.config.turn_size:
            raise ServeError(413, f"{len(records)} edit requests in one POST; at most {self.config.turn_size} "
                                  "(--turn-size: a submission is applied in one turn)", param="requests")
        out = []
        for index, record in enumerate(records):
            try:
                request = parse_record(record, "jsonl", index=index)
            except DatasetError as err:
                field = f".{err.field}" if err.field else ""
                raise ServeError(400, f"requests[{index}]{field}: {err.problem}", param=f"requests[{index}]{field}") from None
            try:
                tokenize_pair(self.tokenizer, request.prompt, request.target)
            except EditError as err:
                field = "target" if str(err).startswith("target") else "prompt"
                raise ServeError(400, f"requests[{index}].{field}: {err}", param=f"requests[{index}].{field}") from None
            out.append(request)
        return out

    def submit(self, records: Any) -> Submission:
        """Validate, journal (fsynced) and queue one submission; nothing is queued on any error."""
        requests = self.validate(records)
        self._check_worker()
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down", kind="server_error")
            queued = sum(len(s.records) for s in self._queue)
            if queued + len(requests) > self.config.max_queue:
                raise ServeError(429, f"the edit queue is full ({queued} requests queued); retry later",
                                 kind="rate_limit_error")
            self._seq += 1
            sub = Submission(f"edit-{uuid.uuid4().hex[:24]}", self._seq, list(records), now(), requests)
            assert self._journal is not None
            self._journal.append({"op": "submit", "id": sub.id, "seq": sub.seq, "time": sub.submitted_at,
                                  "records": sub.records})
            self.submissions[sub.id] = sub
            self._queue.append(sub)
            self._cond.notify_all()
        self.metrics.add("ultraedit_edits_submitted_total", len(requests))
        return sub

    def status(self, edit_id: str) -> dict[str, Any]:
        sub = self.submissions.get(edit_id)
        if sub is None:
            raise ServeError(404, "no edit with this id", param="id", kind="not_found_error")
        with self._cond:
            out = sub.public()
            if sub.status == "queued":
                out["queue_position"] = next((i for i, s in enumerate(self._queue) if s is sub), 0)
        return out

    def revert(self, turns: int) -> Future:
        """Ask the worker to undo the last ``turns`` turns; the future holds the report or a ServeError."""
        self._check_worker()
        future: Future = Future()
        with self._cond:
            self._reverts.append((turns, future))
            self._cond.notify_all()
        return future

    def _check_worker(self) -> None:
        if not self.healthy:
            why = f": {self.failure}" if self.failure else ""
            raise ServeError(503, f"the editing worker is not running{why}", kind="server_error")

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        try:
            with session_lock(self.state_dir):
                self._open_state()
                self._ready.set()
                while (job := self._next_job()) is not None:
                    job()
        except BaseException as err:  # noqa: BLE001 - reported by start() / health
            log.exception("editing worker stopped")
            self.failure = err
        finally:
            self._ready.set()
            with self._cond:
                for _, future in self._reverts:
                    future.set_exception(ServeError(503, "the server is shutting down", kind="server_error"))
                self._reverts.clear()

    def _next_job(self) -> Callable[[], None] | None:
        with self._cond:
            while not (self._stopping or self._reverts or self._queue):
                self._cond.wait()
            if self._stopping:
                return None
            if self._reverts:
                k, future = self._reverts.popleft()
                return lambda: self._revert_job(k, future)
            turn, size = [], 0
            while self._queue and size + len(self._queue[0].records) <= self.config.turn_size:
                sub = self._queue.popleft()
                turn.append(sub)
                size += len(sub.records)
            return lambda: self._turn(turn)

    def _open_state(self) -> None:
        cfg = self.config
        if has_state(self.state_dir):
            meta = read_state(self.state_dir)[0]
            self._check_same(meta["config"])
            self.delta_dtype = meta["delta_dtype"]
            names = list(meta["config"]["modules"])
            self.editor = UltraEditor.load(editing_copy(self.model, names), self.state_dir, self.tokenizer,
                                           keep_turn_deltas=cfg.keep_turn_deltas)
        else:
            config = EditConfig.from_dict(cfg.edit_fields or {})
            names = config.modules or resolve_modules(self.model, config.preset)
            self.delta_dtype = "float32"
            self.editor = UltraEditor(editing_copy(self.model, names), config, self.tokenizer,
                                      keep_turn_deltas=cfg.keep_turn_deltas or 0)
            self.editor.session.extra["serve"] = {"recent": []}
            save(self.editor, self.state_dir)
        self._sync_weights()
        self._journal = Journal(self.state_dir)
        subs, fixes = reconcile(self._journal.read(), self.editor.session.extra.get("serve", {}), self.editor.turns)
        if fixes:
            self._journal.append(*fixes)
        self.submissions = subs
        self._seq = max((s.seq for s in subs.values()), default=0)
        for sub in subs.values():
            if sub.status == "queued":
                self._replay(sub)

    def _replay(self, sub: Submission) -> None:
        """Queue again a submission accepted before a restart and never applied."""
        sub.replayed = True
        try:
            sub.requests = self.validate(sub.records)
        except ServeError as err:
            self._resolve([sub], "failed", error=f"no longer valid after the restart: {err.message}")
            return
        self._queue.append(sub)

    def _check_same(self, saved: dict[str, Any]) -> None:
        for key, value in (self.config.check_fields or {}).items():
            if value is not None and value != saved.get(key):
                raise StateError(
                    f"{key}={value!r} differs from the saved state's {key}={saved.get(key)!r}; a lifelong "
                    "session keeps its hyperparameters (use a new --state directory to change them)"
                )

    def _sync_weights(self) -> None:
        """Copy the editing copy's edit-module weights into the served model (exclusive lock)."""
        served = dict(self.model.named_modules())
        with self._rw.write(), torch.no_grad():
            for name, module in self.editor.modules.items():
                served[name].weight.copy_(module.weight)
            self.served_turn = self.editor.turns

    def _recent(self, new: list[Submission] = (), gone: list[Submission] = ()) -> list[dict[str, Any]]:
        """Which submissions the last turns hold (saved with the state; see :func:`reconcile`), with
        ``new`` in the editor's latest turn and without ``gone`` (statuses change only once saved)."""
        turns = self.editor.turns
        window = range(max(1, turns - max(1, self.editor.session.keep_turn_deltas) + 1), turns + 1)
        held = {t: [s.id for s in self.submissions.values() if s.status == "applied" and s.turn == t and s not in gone]
                for t in window}
        if new:
            held[turns] = [s.id for s in new]
        return [{"turn": t, "ids": ids} for t, ids in held.items()]

    def _save_or_restore(self, snapshot: Snapshot) -> None:
        """Save the editor's state; on failure put the editor back as it was and re-raise."""
        try:
            save(self.editor, self.state_dir, delta_dtype=self.delta_dtype)
        except BaseException:
            try:  # the new version may already be current (a failure after the switch): then it is saved
                if read_state(self.state_dir)[0]["log_seq"] == self.editor.session.log_seq:
                    return
            except Exception:  # noqa: BLE001
                pass
            self.editor.restore(snapshot)
            raise

    def _turn(self, subs: list[Submission]) -> None:
        start = time.perf_counter()
        requests = [r for s in subs for r in s.requests]
        snapshot = self.editor.snapshot(bookmark=True)
        try:
            self.editor.edit(requests)
            self.editor.session.extra["serve"] = {"recent": self._recent(new=subs)}
            self._save_or_restore(snapshot)
        except Exception as err:  # noqa: BLE001 - any failure fails the turn, nothing is applied
            if self.editor.turns != snapshot.turns:
                self.editor.restore(snapshot)
            log.warning("turn failed: %s", err)
            self._resolve(subs, "failed", error=f"{type(err).__name__}: {err}")
            return
        self._sync_weights()
        self._resolve(subs, "applied", turn=self.editor.turns)
        self.metrics.add("ultraedit_turns_total")
        self.metrics.observe("ultraedit_turn_seconds", time.perf_counter() - start)

    def _resolve(self, subs: list[Submission], status: str, **fields: Any) -> None:
        record = outcome(status, subs, **fields)
        try:
            assert self._journal is not None
            self._journal.append(record)
        except OSError as err:  # the state (saved first) still says what was applied
            log.error("could not journal %s of %s: %s", status, record["ids"], err)
        with self._cond:  # status() reads a submission's fields together
            for sub in subs:
                sub.status, sub.turn, sub.error = status, fields.get("turn", sub.turn), fields.get("error")
                sub.resolved_at = record["time"]
        self.metrics.add(f"ultraedit_edits_{status}_total", sum(len(s.records) for s in subs))

    def _revert_job(self, k: int, future: Future) -> None:
        try:
            future.set_result(self._revert(k))
        except ServeError as err:
            future.set_exception(err)
        except Exception as err:  # noqa: BLE001
            future.set_exception(ServeError(500, f"revert failed: {type(err).__name__}: {err}", kind="server_error"))

    def _revert(self, k: int) -> dict[str, Any]:
        editor = self.editor
        if editor.session.keep_turn_deltas < 1:
            raise ServeError(409, "reverts need the server started with --keep-turn-deltas K", param="turns")
        snapshot = editor.snapshot(bookmark=True)
        try:
            report = editor.revert_last(k)
        except (StateError, ValueError) as err:
            raise ServeError(409, str(err), param="turns") from None
        undone = [s for s in self.submissions.values() if s.status == "applied" and s.turn in report.reverted_turns]
        editor.session.extra["serve"] = {"recent": self._recent(gone=undone)}
        self._save_or_restore(snapshot)
        self._sync_weights()
        for turn in report.reverted_turns:
            group = [s for s in undone if s.turn == turn]
            if group:
                self._resolve(group, "reverted", turn=turn)
        return {"object": "revert", "reverted_turns": report.reverted_turns, "edits_removed": report.edits_removed,
                "turns": report.turns, "edits": report.edits, "edit_ids": [s.id for s in undone], "note": report.note}

    # ------------------------------------------------------------------ state
    def state_info(self) -> dict[str, Any]:
        data = info(self.state_dir)
        data["served_turn"] = self.served_turn
        data["queued_requests"] = self.queued_requests()
        data["queued_submissions"] = len(self._queue)
        data["turn_size"] = self.config.turn_size
        return data
