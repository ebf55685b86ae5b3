"""Saved editing sessions: atomic state on disk, resume, compact deltas, merge, undo, edit log.

A lifelong editing session is a directory::

    STATE/
      CURRENT              name of the complete version below (replaced atomically)
      v00000007/           one complete saved state, never modified after it is named
        state.json         config, counters, base-model fingerprint, pending edit-log records
        delta.safetensors  CUMULATIVE weight shift of every edit module (W_now - W_base), in the
                           layout of ``module.weight`` (nn.Linear: (d_out, d_in); Conv1D:
                           (d_in, d_out)), float32 (float64 models: float64) or the model dtype
        exact.safetensors  (rare, float32 models only) "<module>/index" (flat int64) and
                           "<module>/value": elements where W_base + delta misses W_now by an ulp
        normalizers.safetensors   lifelong statistics per module shape: "<d_in>x<d_out>.{n,mean,var,std}"
        memory.safetensors (only with EditConfig.memory > 0, after a turn) the key memory: "<module>"
                           = sum of K^T K over the turns so far, (d_in, d_in)
        undo-<seq>.safetensors   (only with keep_turn_deltas) one per revertible turn: edit-module
                           weights ("w/<module>", model dtype), float32 deltas of bf16/fp16 modules
                           ("d/<module>"), statistics ("n/<d_in>x<d_out>.*") and key memory
                           ("m/<module>") from before that
                           turn, for exact revert; hard-linked between versions
      edits.jsonl          append-only edit log, one JSON object per line (``seq`` increasing)

Atomicity: a save writes a whole new version into ``.tmp-*``, fsyncs every file and the directory,
renames it to ``vNNNNNNNN``, then replaces ``CURRENT`` (write temp file, fsync, ``os.replace``,
fsync the directory). A reader follows ``CURRENT`` only, so a crash at any instant leaves either
the old or the new state, complete. Older versions and stale temp directories are removed after
the switch (and again at the next save).

Edit log: records reach ``edits.jsonl`` only after the state that contains them is current, and a
record's ``seq`` is appended only if it is larger than the last one in the file; the records not
yet known to be in the file travel inside ``state.json`` (``log_tail``) and are appended by the next
save. So no turn is ever logged twice, and a torn last line (crash mid-append) is cut off.

For bf16/fp16 weights (default ``delta_accumulation="float32"``) the delta saved is the editor's
float32 sum of the turns' shifts, and the weights are ``round(W_base + delta)`` by construction.

Resume is exact: the state stores ``W_now - W_base`` (not a sum of per-turn shifts), so loading it
onto the base weights reproduces the live model bit for bit (bf16/fp16 weights: a float32 delta is
always exact; float32 weights: with the few corrections in ``exact.safetensors``), and the
statistics are stored bit-exactly; later turns then compute exactly what an uninterrupted run does.
With ``delta_dtype="model"`` the delta is rounded to the model dtype and resume is approximate.

Memory: the editor keeps a CPU copy of the ORIGINAL weights of its edit modules (model dtype; a
7-8B model with 12 edited MLP matrices: ~1.4 GB in bf16); it is what the fingerprint hashes and
what deltas are taken against. ``keep_turn_deltas=k`` keeps k more such copies (weights before each
of the last k turns) so that :func:`revert_last` restores them exactly; they are saved too.
Writing streams one module at a time, so a save needs one float32 module of extra memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # pragma: no cover - no advisory locks on this platform (Windows)
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pragma: no cover
    from .editor import PendingTurn, UltraEditor

FORMAT = "ultraedit-state"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
LOG = "edits.jsonl"
STATE_JSON = "state.json"
DELTA = "delta.safetensors"
NORMALIZERS = "normalizers.safetensors"
MEMORY = "memory.safetensors"
EXACT = "exact.safetensors"
LOCK = ".lock"

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}


class StateError(ValueError):
    """A saved state is missing, unreadable, or cannot be used as asked."""


class FingerprintError(StateError):
    """A saved state was made on a different base model than the one it is loaded onto."""


class StateWarning(UserWarning):
    """A save completed (its state is current) but a step after the switch failed; the next save
    retries it."""


# ---------------------------------------------------------------------------------------------
# Test hook: ULTRAEDIT_SAVE_PAUSE=<stage> makes a save announce the stage on stderr and sleep
# there (ULTRAEDIT_SAVE_PAUSE_SECONDS, default 60), so a test can kill the process mid-save.
SAVE_STAGES = ("delta", "rename", "current", "log", "cleanup")


def _checkpoint(stage: str) -> None:
    if os.environ.get("ULTRAEDIT_SAVE_PAUSE") == stage:
        sys.stderr.write(f"ultraedit-save-paused {stage}\n")
        sys.stderr.flush()
        time.sleep(float(os.environ.get("ULTRAEDIT_SAVE_PAUSE_SECONDS", "60")))


# ---------------------------------------------------------------------------------------------
# Session bookkeeping attached to every editor (editor.session)


@dataclass
class TurnSnapshot:
    """What :func:`revert_last` needs to undo one turn exactly.

    Attributes:
        turn: 1-based number of the turn this snapshot undoes.
        requests: requests of that turn.
        weights: edit-module weights BEFORE the turn, name -> CPU tensor (model dtype, weight layout).
        normalizers: statistics before the turn, ``(d_in, d_out)`` -> CPU state dict.
        deltas: the float32 cumulative deltas before the turn (modules that accumulate one; see
            ``UltraEditor(delta_accumulation=...)``), name -> CPU tensor; absent = zero.
        key_memory: ``UltraEditor.key_memory`` before the turn, name -> CPU tensor; empty = zero.
    """

    turn: int
    requests: int
    weights: dict[str, torch.Tensor]
    normalizers: dict[tuple[int, int], dict[str, torch.Tensor]]
    seq: int = 0  # the edit-log seq of the turn: unique even when turn numbers repeat after a revert
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    key_memory: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RevertReport:
    """What :func:`revert_last` did.

    Attributes:
        reverted_turns: the undone turn numbers, in increasing order.
        edits_removed: requests those turns had applied.
        turns, edits: the editor's counters after the revert.
        note: what the revert means (exact for weights and statistics; see the text).
    """

    reverted_turns: list[int]
    edits_removed: int
    turns: int
    edits: int
    note: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _base_copy(t: torch.Tensor) -> torch.Tensor:
    """The host copy of a base weight. Page-locked when the weight is on a GPU: every turn of a bf16
    model reads the base back to the GPU (``round(base + delta)``), and from pageable memory that
    copy took 0.73 s of a 0.95 s Llama-3-8B turn on an H200 (1.4 GB over 12 modules)."""
    if t.device.type != "cuda":
        return _cpu_copy(t)
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    return host.copy_(t.detach())


class EditSession:
    """Saved-state bookkeeping of one :class:`~ultraedit.editor.UltraEditor` (``editor.session``).

    Attributes:
        base: ORIGINAL weights of the edit modules, name -> CPU tensor (model dtype, the layout of
            ``module.weight``), copied when the editor is built.
        delta: the exact cumulative shift ``W - W_base`` in float32 (weight layout, on the weight's
            device) of each module that accumulates one (bf16/fp16 weights, the default); the
            weight is ``round(base + delta)``. Absent until the module's first turn (= zero).
        keep_turn_deltas: how many recent turns can be reverted (0 = none).
        undo: snapshots of the last ``keep_turn_deltas`` turns, oldest first.
        log_seq: edit-log records created over the session's whole life (saved with the state).
        pending_log: records not yet known to be in ``edits.jsonl`` (written by the next save).
        extra: JSON-serializable data saved with the state (the CLI keeps its input progress here).
    """

    def __init__(self, editor: "UltraEditor", keep_turn_deltas: int = 0) -> None:
        if not (isinstance(keep_turn_deltas, int) and keep_turn_deltas >= 0):
            raise ValueError(f"keep_turn_deltas must be a non-negative int, got {keep_turn_deltas!r}")
        self.editor = editor
        self.base: dict[str, torch.Tensor] = {n: _base_copy(m.weight) for n, m in editor.modules.items()}
        self.delta: dict[str, torch.Tensor] = {}
        self.keep_turn_deltas = keep_turn_deltas
        self.undo: deque[TurnSnapshot] = deque()
        self.log_seq = 0
        self.pending_log: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._fingerprint: dict[str, Any] | None = None
        self.session_id = uuid.uuid4().hex  # a state directory holds one session; kept by load()

    def fingerprint(self) -> dict[str, Any]:
        """Fingerprint of the base model this session edits (see :func:`fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint_of(self.editor.model, self.base)
        return self._fingerprint

    # hooks called by UltraEditor.commit ------------------------------------------------------
    def before_commit(self) -> TurnSnapshot | None:
        if self.keep_turn_deltas <= 0:
            return None
        ed = self.editor
        return TurnSnapshot(
            turn=ed.turns + 1,
            requests=0,
            weights={n: _cpu_copy(m.weight) for n, m in ed.modules.items()},
            normalizers={s: {k: _cpu_copy(v) for k, v in nm.state_dict().items()} for s, nm in ed.normalizers.items()},
            deltas={n: _cpu_copy(d) for n, d in self.delta.items()},
            key_memory={n: _cpu_copy(m) for n, m in ed.key_memory.items()},
        )

    def after_commit(self, pending: "PendingTurn", snapshot: TurnSnapshot | None) -> None:
        report = pending.report
        if snapshot is not None:
            snapshot.requests = report.requests
            snapshot.seq = self.log_seq + 1  # the seq of the record logged below
            self.undo.append(snapshot)
            while len(self.undo) > self.keep_turn_deltas:
                self.undo.popleft()
        record: dict[str, Any] = {
            "event": "turn",
            "turn": self.editor.turns,
            "requests": report.requests,
            "edits_total": self.editor.edits,
        }
        if pending.requests is not None:
            record["edits"] = [
                {"id": r.id, "prompt": r.prompt, "target": r.target} for r in pending.requests
            ]
        record.update(
            shift_norms=report.shift_norms, applied_norms=report.applied_norms, loss=report.loss,
            seconds=round(report.seconds, 6),
        )
        self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        """Queue one edit-log record (given ``seq`` and ``time``); saved by the next :func:`save`."""
        self.log_seq += 1
        self.pending_log.append({"seq": self.log_seq, "time": _now(), **record})


# ---------------------------------------------------------------------------------------------
# Fingerprint


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fingerprint_of(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    digest = hashlib.sha256()
    modules = {}
    for name, w in weights.items():
        modules[name] = {"shape": list(w.shape), "dtype": _dtype_name(w.dtype)}
        digest.update(f"{name}|{_dtype_name(w.dtype)}|{list(w.shape)}|".encode())
        digest.update(_tensor_bytes(w))
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "modules": modules,
        "weights_sha256": digest.hexdigest(),
    }


def fingerprint(model: nn.Module, modules: Sequence[str]) -> dict[str, Any]:
    """Fingerprint of ``model`` as seen through the edit ``modules`` (their CURRENT weights).

    Returns:
        ``{"model_type", "architecture", "modules": {name: {"shape", "dtype"}}, "weights_sha256"}``
        where the hash is SHA-256 over each module's name, dtype, shape and raw weight bytes.
    """
    available = dict(model.named_modules())
    missing = [n for n in modules if n not in available]
    if missing:
        raise FingerprintError(f"{type(model).__name__} has no module(s) {missing}")
    return _fingerprint_of(model, {n: available[n].weight for n in modules})


def _structure_diffs(expected: Mapping[str, Any], model: nn.Module) -> list[str]:
    """Differences in architecture, module names, shapes and dtypes (no hashing)."""
    diffs = []
    config = getattr(model, "config", None)
    actual_arch = {"model_type": getattr(config, "model_type", None), "architecture": type(model).__name__}
    for key, value in actual_arch.items():
        if expected.get(key) != value:
            diffs.append(f"{key}: state has {expected.get(key)!r}, model is {value!r}")
    available = dict(model.named_modules())
    for name, spec in expected["modules"].items():
        module = available.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            diffs.append(f"module {name!r}: missing from the model")
            continue
        if list(weight.shape) != list(spec["shape"]):
            diffs.append(f"module {name!r}: shape {list(weight.shape)}, state has {spec['shape']}")
        if _dtype_name(weight.dtype) != spec["dtype"]:
            diffs.append(
                f"module {name!r}: dtype {_dtype_name(weight.dtype)}, state has {spec['dtype']} "
                f"(load the model with dtype={spec['dtype']})"
            )
    return diffs


def _refuse(directory: Path, diffs: list[str]) -> None:
    if diffs:
        lines = "\n  - ".join(diffs)
        raise FingerprintError(f"the state in {directory} was made on a different base model:\n  - {lines}")


def _hash_diff(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    if expected["weights_sha256"] != actual["weights_sha256"]:
        return [
            "the original weights of the edit modules differ (sha256 "
            f"{expected['weights_sha256'][:16]}... in the state, {actual['weights_sha256'][:16]}... in the model): "
            "another checkpoint, or a model that was already edited"
        ]
    return []


# ---------------------------------------------------------------------------------------------
# Low-level durable writes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, torch.dtype, Sequence[int], Callable[[], torch.Tensor]]],
    metadata: Mapping[str, str],
    stage: str | None = None,
) -> int:
    """Write a safetensors file tensor by tensor (one tensor in memory at a time) and fsync it.

    ``entries`` are ``(name, dtype, shape, make)``; ``make()`` produces the tensor when its turn
    comes. Returns the file size in bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, dtype, shape, make) in enumerate(entries):
            tensor = make()
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, announced {dtype} {list(shape)}")
            f.write(_tensor_bytes(tensor))
            if i == 0 and stage:
                f.flush()
                _checkpoint(stage)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def _read_safetensors(path: Path) -> tuple[Any, dict[str, str]]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise StateError(f"cannot read {path}: {err}") from None
    return handle, dict(handle.metadata() or {})


_HELD: dict[str, tuple[int, int]] = {}  # resolved state directory -> (owning thread id, depth)
_HELD_GUARD = threading.Lock()
_NO_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def session_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive lock on a state directory: one writer (one thread of one process) at a time.

    Re-entrant within a thread (:func:`save` takes it too). Another thread of this process, or
    another process (advisory ``flock`` on ``directory/.lock``), holding it makes this raise
    :class:`StateError` at once instead of waiting. Where the file lock is not available (no
    ``fcntl`` on this platform, a file system without ``flock``) it warns (:class:`StateWarning`)
    that other processes are not kept out, and still excludes other threads.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    me = threading.get_ident()
    with _HELD_GUARD:
        owner, depth = _HELD.get(key, (me, 0))
        if owner != me:
            raise StateError(f"another thread of this process is writing the state in {directory}")
        _HELD[key] = (me, depth + 1)
    try:
        if depth:
            yield
            return
        fd = _lock_file(directory)
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)
    finally:
        with _HELD_GUARD:
            _, depth = _HELD.pop(key)
            if depth > 1:
                _HELD[key] = (me, depth - 1)


def _lock_file(directory: Path) -> int | None:
    """Take the inter-process lock on ``directory/.lock``; the open descriptor, or None (warned)
    where file locks are not available."""
    if fcntl is None:
        _warn_unlocked(directory, "this platform has no fcntl file locks")
        return None
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateError(f"another process is writing the state in {directory}") from None
        if err.errno in _NO_LOCK_ERRNOS:
            _warn_unlocked(directory, f"its file system does not support flock ({err.strerror})")
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def _warn_unlocked(directory: Path, reason: str) -> None:
    warnings.warn(
        f"cannot lock the state in {directory}: {reason}; ultraedit cannot keep another process from writing "
        "it at the same time (run one writer per state directory)",
        StateWarning,
        stacklevel=4,
    )


# ---------------------------------------------------------------------------------------------
# Edit log


def _repair_log(path: Path) -> int:
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


def _append_log(path: Path, records: Sequence[dict[str, Any]], last: int | None = None) -> None:
    """Append the records whose ``seq`` is past ``last`` (default: the log's last, after repair)."""
    if last is None:
        last = _repair_log(path)
    new = [r for r in records if r["seq"] > last]
    if not new:
        return
    created = not path.exists()
    with open(path, "ab") as f:
        f.write(b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in new))
        f.flush()
        os.fsync(f.fileno())
    if created:
        _fsync_dir(path.parent)


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


# ---------------------------------------------------------------------------------------------
# Save


def _version_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("v[0-9]*") if p.is_dir())


def _current_dir(directory: Path) -> Path | None:
    pointer = directory / CURRENT
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise StateError(f"{pointer}: malformed ({name!r})")
    path = directory / name
    if not path.is_dir():
        raise StateError(f"{pointer} names {name!r}, which does not exist")
    return path


def has_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a complete saved state."""
    return (Path(directory) / CURRENT).exists()


def _cleanup(directory: Path, keep: Path | None) -> None:
    for path in list(directory.glob(".tmp-*")) + _version_dirs(directory):
        if keep is not None and path.name == keep.name:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _norm_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _parse_norm_key(key: str) -> tuple[int, int]:
    a, b = key.split("x")
    return int(a), int(b)


def save(editor: "UltraEditor", directory: str | os.PathLike[str], *, delta_dtype: str = "float32") -> Path:
    """Save the editor's session into ``directory`` atomically; return the new version's path.

    Args:
        editor: the editor to save.
        directory: the state directory (created if needed).
        delta_dtype: ``"float32"`` (default; float64 models keep float64) or ``"model"`` (the
            model's dtype: half the size for bf16, but a bf16 delta no longer reproduces the
            weights exactly).
    """
    if delta_dtype not in ("float32", "model"):
        raise ValueError(f"delta_dtype must be 'float32' or 'model', got {delta_dtype!r}")
    directory = Path(directory)
    session = editor.session
    with session_lock(directory):
        old = _current_dir(directory)
        if old is not None:
            _check_same_session(directory, old, session.session_id)
        last_logged = _repair_log(directory / LOG)  # a damaged log stops the save here, before anything
        _cleanup(directory, old)
        number = int(old.name[1:]) + 1 if old is not None else 1
        final = directory / f"v{number:08d}"
        tmp = directory / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            meta = _write_version(editor, tmp, delta_dtype, old)
            _fsync_dir(tmp)
            _checkpoint("rename")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            _fsync_dir(directory)
            _checkpoint("current")
            pointer_tmp = directory / f".tmp-{CURRENT}-{os.getpid()}"
            _write_file(pointer_tmp, (final.name + "\n").encode())
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # never named by CURRENT: the old state stays current
            raise
        os.replace(pointer_tmp, directory / CURRENT)
        _after_switch(directory, final, session, meta["log_tail"], last_logged)
    return final


def _after_switch(directory: Path, final: Path, session: EditSession, log_tail: list[dict[str, Any]], last: int) -> None:
    """Steps after ``CURRENT`` names the new version: the save is complete whatever happens here.
    An I/O error is a warning; the records stay pending (they are in the new state's
    ``log_tail`` too) and the next save appends them."""
    try:
        _fsync_dir(directory)
        _checkpoint("log")
        _append_log(directory / LOG, log_tail, last)
        session.pending_log.clear()
        _checkpoint("cleanup")
        _cleanup(directory, final)
    except OSError as err:
        warnings.warn(
            f"the state in {directory} was saved ({final.name} is current), but a step after the switch failed: "
            f"{err}; the next save completes the edit log and removes old versions",
            StateWarning,
            stacklevel=3,
        )


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _exact_delta(
    weight: torch.Tensor, base: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(delta, fix_index, fix_value)``: ``weight - base`` in ``dtype`` such that ``base + delta``
    (computed as :func:`_add_delta` does) reproduces ``weight`` bit for bit.

    For bf16/fp16 weights a float32 difference is exact unless a weight moved across more than
    ~16 binary orders of magnitude. For float32 weights it can be one rounding off; a few
    ``nextafter`` steps fix most such elements. The rest (where the shift dwarfs the result, so no
    delta of this dtype can land exactly) are returned as flat indices and exact values (model
    dtype), verified by rebuilding the weight. A ``dtype`` narrower than float32
    (``delta_dtype="model"``) is returned as is, without fixes: approximate by choice.
    """
    wide = _wide(dtype, weight.dtype)
    delta = (weight.to(wide) - base.to(wide)).to(dtype)
    if dtype not in (torch.float32, torch.float64):
        return delta, None, None
    target = weight.to(wide)
    for _ in range(4):
        rebuilt = (base.to(wide) + delta.to(wide)).to(weight.dtype).to(wide)
        bad = rebuilt != target
        if not bool(bad.any()):
            return delta, None, None
        direction = torch.where(rebuilt < target, math.inf, -math.inf).to(dtype)
        delta = torch.where(bad, torch.nextafter(delta, direction), delta)
    rebuilt = (base.to(wide) + delta.to(wide)).to(weight.dtype)
    index = (rebuilt != weight).reshape(-1).nonzero().squeeze(1)
    if index.numel() == 0:
        return delta, None, None
    return delta, index, weight.reshape(-1)[index].clone()


def _delta_on_device(
    weight: torch.Tensor, base: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`_exact_delta` on the weight's device (a GPU is much faster at it; the transient
    float32 copies of one module then live there), falling back to the CPU when that device is
    out of memory. Results are on the CPU."""
    if weight.device.type != "cpu":
        try:
            out = _exact_delta(weight, base.to(weight.device), dtype)
            return tuple(t.cpu() if t is not None else None for t in out)  # type: ignore[return-value]
        except torch.OutOfMemoryError:
            pass
    return _exact_delta(weight.cpu(), base, dtype)


def _check_same_session(directory: Path, version: Path, session_id: str) -> None:
    """Refuse to save one session over another (their edit logs and counters would mix)."""
    try:
        meta = json.loads((version / STATE_JSON).read_text())
    except (OSError, ValueError) as err:
        raise StateError(
            f"{version / STATE_JSON} is damaged ({err}); not saving over it. Move {directory} away, or restore "
            "the file, to save here"
        ) from None
    if not isinstance(meta, dict):
        raise StateError(f"{version / STATE_JSON} is damaged (not a JSON object); not saving over it")
    if meta.get("session_id") not in (None, session_id):
        raise StateError(
            f"{directory} holds another editing session ({meta.get('turns')} turns, {meta.get('edits')} edits, "
            f"saved {meta.get('saved_at')}): resume it with UltraEditor.load(model, dir) or save to a new directory"
        )


def _write_version(editor: "UltraEditor", path: Path, delta_dtype: str, previous: Path | None) -> dict[str, Any]:
    session = editor.session
    fp = session.fingerprint()
    sizes = {}
    specs = []
    for name, module in editor.modules.items():
        weight = module.weight
        base = session.base[name]
        if delta_dtype == "model":
            dtype = weight.dtype
        else:
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

        def make(w: torch.Tensor = weight, b: torch.Tensor = base, dt: torch.dtype = dtype, n: str = name) -> torch.Tensor:
            if n in session.delta:  # the exact float32 sum of the turns; the weight is round(base + it)
                return session.delta[n].to(device="cpu", dtype=dt)
            delta, index, value = _delta_on_device(w.detach(), b, dt)
            if index is not None and value is not None:
                fixes[f"{n}/index"], fixes[f"{n}/value"] = index, value
            return delta

        specs.append((name, dtype, tuple(weight.shape), make))
    fixes: dict[str, torch.Tensor] = {}
    sizes[DELTA] = _write_safetensors(path / DELTA, specs, {"format": FORMAT, "content": "delta"}, stage="delta")
    if fixes:  # the few float32 elements no float32 delta reproduces exactly (see _exact_delta)
        fix_specs = [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in fixes.items()]
        sizes[EXACT] = _write_safetensors(path / EXACT, fix_specs, {"format": FORMAT, "content": "exact"})

    norm_specs = []
    for shape, norm in editor.normalizers.items():
        for key, value in norm.state_dict().items():
            norm_specs.append((f"{_norm_key(shape)}.{key}", value.dtype, tuple(value.shape), lambda v=value: v))
    sizes[NORMALIZERS] = _write_safetensors(path / NORMALIZERS, norm_specs, {"format": FORMAT, "content": "normalizers"})
    if editor.key_memory:
        memory_specs = [(n, m.dtype, tuple(m.shape), lambda m=m: m.to("cpu")) for n, m in editor.key_memory.items()]
        sizes[MEMORY] = _write_safetensors(path / MEMORY, memory_specs, {"format": FORMAT, "content": "memory"})

    undo_meta = []
    for snap in session.undo:
        # One immutable file per snapshot, named by the turn's unique log seq: a snapshot already
        # saved in the previous version is hard-linked, not rewritten (saving every turn with
        # keep_turn_deltas=k writes one snapshot per turn, not k).
        file = f"undo-{snap.seq:010d}.safetensors"
        undo_meta.append({"turn": snap.turn, "requests": snap.requests, "seq": snap.seq, "file": file})
        if previous is not None and (previous / file).exists():
            try:
                os.link(previous / file, path / file)
                sizes[file] = (path / file).stat().st_size
                continue
            except OSError:
                pass  # no hard links here: write it again
        specs = [(f"w/{name}", w.dtype, tuple(w.shape), lambda w=w: w) for name, w in snap.weights.items()]
        specs += [(f"d/{name}", d.dtype, tuple(d.shape), lambda d=d: d) for name, d in snap.deltas.items()]
        specs += [(f"m/{name}", m.dtype, tuple(m.shape), lambda m=m: m) for name, m in snap.key_memory.items()]
        for shape, sd in snap.normalizers.items():
            for key, value in sd.items():
                specs.append((f"n/{_norm_key(shape)}.{key}", value.dtype, tuple(value.shape), lambda v=value: v))
        sizes[file] = _write_safetensors(path / file, specs, {"format": FORMAT, "content": "undo", "turn": str(snap.turn)})

    config = editor.config.to_dict()
    config["modules"] = list(editor.modules)  # resolved names, independent of preset changes
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saved_at": _now(),
        "config": config,
        "turns": editor.turns,
        "edits": editor.edits,
        "fingerprint": fp,
        "delta_dtype": delta_dtype,
        "normalizer_shapes": [list(s) for s in editor.normalizers],
        "keep_turn_deltas": session.keep_turn_deltas,
        "delta_accumulation": editor.delta_accumulation,
        "undo": undo_meta,
        "session_id": session.session_id,
        "log_seq": session.log_seq,
        "log_tail": list(session.pending_log),
        "extra": session.extra,
        "sizes": sizes,
    }
    _write_file(path / STATE_JSON, json.dumps(meta, indent=1, ensure_ascii=False).encode())
    return meta


# ---------------------------------------------------------------------------------------------
# Load, apply, merge, info


_REQUIRED_META = ("config", "turns", "edits", "fingerprint", "delta_dtype", "normalizer_shapes", "log_seq", "log_tail", "sizes")
APPLIED = "_ultraedit_applied"  # set on a model that carries a saved state's delta (load, apply_delta)


def read_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """``(meta, version_dir)`` of the current saved state (``state.json`` as a dict)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StateError(f"no saved state in {directory} (no such directory)")
    version = _current_dir(directory)
    if version is None:
        raise StateError(f"no saved state in {directory} (no {CURRENT} file)")
    path = version / STATE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StateError(f"cannot read {path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{path} is not an ultraedit state")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StateError(
            f"{version} has state format {meta['format_version']}; this ultraedit reads up to {FORMAT_VERSION}"
        )
    missing = [key for key in _REQUIRED_META if key not in meta]
    fp = meta.get("fingerprint")
    if not missing and not (isinstance(fp, dict) and isinstance(fp.get("modules"), dict) and "weights_sha256" in fp
                            and all(isinstance(m, dict) and {"shape", "dtype"} <= set(m) for m in fp["modules"].values())):
        missing.append("fingerprint.modules (shape, dtype)/weights_sha256")
    if missing:
        raise StateError(f"{path}: incomplete state, missing {missing}")
    return meta, version


def load(
    model: nn.Module,
    directory: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    keep_turn_deltas: int | None = None,
) -> "UltraEditor":
    """Resume a saved session on ``model``, a freshly loaded copy of the SAME base model.

    The model's edit modules must have the fingerprint stored in the state (architecture, names,
    shapes, dtypes, SHA-256 of the original weights); otherwise :class:`FingerprintError` says
    what differs. Every file of the state is read and checked before the model is touched; then
    the model is edited in place (``W = W_base + delta``; restored if that fails midway) and the
    returned editor carries the statistics, counters, undo snapshots and edit-log position of the
    saved session. Errors are :class:`StateError` naming the file.

    Args:
        keep_turn_deltas: override the saved setting (None keeps it; smaller drops old snapshots).
    """
    from .editor import EditConfig, UltraEditor

    meta, version, files = _open_version(directory)
    directory = Path(directory)
    _refuse_applied(model)
    _refuse(directory, _structure_diffs(meta["fingerprint"], model))
    meta_path = version / STATE_JSON
    try:
        config = EditConfig.from_dict(meta["config"])
        keep = int(meta.get("keep_turn_deltas", 0) if keep_turn_deltas is None else keep_turn_deltas)
        counters = int(meta["turns"]), int(meta["edits"]), int(meta["log_seq"])
        editor = UltraEditor(
            model, config, tokenizer, keep_turn_deltas=keep, delta_accumulation=meta.get("delta_accumulation", "float32")
        )
        saved_undo = [(int(u["turn"]), int(u["requests"]), int(u["seq"]), str(u["file"])) for u in meta.get("undo") or []]
    except StateError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{meta_path}: malformed ({type(err).__name__}: {err})") from None
    session = editor.session
    _refuse(directory, _hash_diff(meta["fingerprint"], session.fingerprint()))

    # Read and check everything first ...
    expected_shapes = sorted(tuple(s) for s in meta["normalizer_shapes"])
    if sorted(editor.normalizers) != expected_shapes:
        raise StateError(f"{meta_path}: normalizer shapes {expected_shapes} do not match the edit modules")
    path = version / NORMALIZERS
    statistics = {shape: _read_statistics(files[NORMALIZERS], path, "", shape) for shape in editor.normalizers}
    memory = _read_memory(editor, files.get(MEMORY), version / MEMORY, "")
    if config.memory > 0 and counters[0] > 0 and not memory:
        raise StateError(f"{meta_path}: the configuration keeps a key memory (memory={config.memory}) "
                         f"but the state has no {MEMORY} for its {counters[0]} turns")
    _check_delta(editor.modules, files, version)
    snapshots = [
        _read_snapshot(editor, files[file], version / file, turn, requests, seq)
        for turn, requests, seq, file in (saved_undo[-keep:] if keep > 0 else [])
    ]

    # ... then apply.
    for shape, norm in editor.normalizers.items():
        norm.load_state_dict(statistics[shape])
    editor.key_memory = memory
    accumulating = {n for n, m in editor.modules.items() if editor.accumulates(m)}
    session.delta = _add_delta(editor.modules, session.base, files, version, keep_deltas=accumulating)
    editor.turns, editor.edits, session.log_seq = counters
    session.pending_log = list(meta["log_tail"])
    session.extra = dict(meta.get("extra") or {})
    session.session_id = meta.get("session_id") or session.session_id
    session.undo.extend(snapshots)
    _mark_applied(model, directory, meta)
    return editor


def _refuse_applied(model: nn.Module) -> None:
    """A model that already carries a state's delta cannot take one again (it would add twice)."""
    applied = getattr(model, APPLIED, None)
    if applied is not None:
        raise FingerprintError(
            f"the model was already edited: it carries the delta of {applied['state']} ({applied['turns']} turns), "
            "applied to it before; apply or load a state on a freshly loaded base model (twice would double the edit)"
        )


def _mark_applied(model: nn.Module, directory: Path, meta: Mapping[str, Any]) -> None:
    setattr(model, APPLIED, {"state": str(directory), "turns": meta["turns"], "session_id": meta.get("session_id")})


def _tensor(handle: Any, path: Path, key: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Tensor ``key`` of an open safetensors file; a missing key or another shape is a StateError."""
    try:
        tensor = handle.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise StateError(f"{path}: cannot read {key!r} ({err})") from None
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise StateError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def _read_statistics(handle: Any, path: Path, prefix: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    key = f"{prefix}{_norm_key(shape)}"
    state = {"n": _tensor(handle, path, f"{key}.n", ())}
    state.update({k: _tensor(handle, path, f"{key}.{k}", (sum(shape),)) for k in ("mean", "var", "std")})
    return state


def _read_memory(editor: "UltraEditor", handle: Any, path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The key memory stored under ``prefix<module>`` (all modules, or none = zero memory), on the
    modules' devices in the editor's compute dtype."""
    from .editor import module_shape

    if handle is None or not any(k.startswith(prefix) and k[len(prefix):] in editor.modules for k in handle.keys()):
        return {}
    dtype = editor.config.torch_dtype
    return {
        n: _tensor(handle, path, f"{prefix}{n}", (module_shape(m)[0],) * 2).to(m.weight.device, dtype)
        for n, m in editor.modules.items()
    }


def _read_snapshot(
    editor: "UltraEditor", handle: Any, path: Path, turn: int, requests: int, seq: int
) -> TurnSnapshot:
    weights = {n: _tensor(handle, path, f"w/{n}", tuple(m.weight.shape)) for n, m in editor.modules.items()}
    keys = set(handle.keys())
    deltas = {}
    for name, module in editor.modules.items():
        if not editor.accumulates(module):
            continue
        if f"d/{name}" in keys:
            deltas[name] = _tensor(handle, path, f"d/{name}", tuple(module.weight.shape)).float()
        else:  # a state saved before float32 deltas: weights - base is exact for bf16/fp16
            deltas[name] = weights[name].float() - editor.session.base[name].float()
    return TurnSnapshot(
        turn=turn,
        requests=requests,
        weights=weights,
        normalizers={s: _read_statistics(handle, path, "n/", s) for s in editor.normalizers},
        seq=seq,
        deltas=deltas,
        key_memory={n: m.cpu() for n, m in _read_memory(editor, handle, path, "m/").items()},
    )


def _open_version(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """``(meta, version_dir, {file name: open safetensors handle})`` of the current state.

    Every file is opened (memory-mapped) before anything is read from it, so a writer that
    removes this version right after switching to a newer one cannot pull a file away midway; if
    the version vanished before the files were opened, the newer state is read instead.
    """
    for attempt in range(3):
        meta, version = read_state(directory)
        try:
            names = [n for n in (NORMALIZERS, DELTA, EXACT, MEMORY) if n in meta["sizes"]]
            names += [item["file"] for item in meta.get("undo") or []]
        except (KeyError, TypeError) as err:
            raise StateError(f"{version / STATE_JSON}: malformed ({type(err).__name__}: {err})") from None
        for required in (NORMALIZERS, DELTA):
            if required not in names:
                raise StateError(f"{version / STATE_JSON}: the state lists no {required}")
        try:
            return meta, version, {n: _read_safetensors(version / n)[0] for n in names}
        except StateError:
            if version.exists() or attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _check_delta(modules: Mapping[str, nn.Module], files: Mapping[str, Any], version: Path) -> None:
    """The delta file holds exactly the modules' shifts, each of its weight's shape (headers only)."""
    path = version / DELTA
    handle = files[DELTA]
    names = set(handle.keys())
    if names != set(modules):
        raise StateError(f"{path}: holds shifts for {sorted(names)}, expected {sorted(modules)}")
    for name, module in modules.items():
        shape = tuple(handle.get_slice(name).get_shape())
        if shape != tuple(module.weight.shape):
            raise StateError(f"{path}: shift of {name!r} has shape {shape}, weight {tuple(module.weight.shape)}")
    fixes = files.get(EXACT)
    if fixes is not None:
        unknown = sorted(k for k in fixes.keys() if k.rsplit("/", 1)[0] not in modules)
        if unknown:
            raise StateError(f"{version / EXACT}: fixes for unknown modules {unknown}")


def _add_delta(
    modules: Mapping[str, nn.Module],
    base: Mapping[str, torch.Tensor] | None,
    files: Mapping[str, Any],
    version: Path,
    keep_deltas: frozenset[str] | set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """``W = base + delta`` per module (``base`` None: the module's current weight), one at a time.
    All or nothing: on any error the modules already written are restored. Returns the deltas of
    ``keep_deltas`` in float32 on their weights' devices."""
    path = version / DELTA
    handle = files[DELTA]
    fixes = files.get(EXACT)
    fix_keys = set(fixes.keys()) if fixes is not None else set()
    written: list[tuple[torch.Tensor, torch.Tensor]] = []
    kept: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        try:
            for name, module in modules.items():
                weight = module.weight
                delta = _tensor(handle, path, name, tuple(weight.shape))
                wide = _wide(delta.dtype, weight.dtype)
                origin = base[name] if base is not None else weight
                new = (origin.to(device=weight.device, dtype=wide) + delta.to(device=weight.device, dtype=wide)).to(weight.dtype)
                if f"{name}/index" in fix_keys:
                    index = _tensor(fixes, version / EXACT, f"{name}/index").to(weight.device)
                    value = _tensor(fixes, version / EXACT, f"{name}/value", tuple(index.shape))
                    new.view(-1)[index] = value.to(device=weight.device, dtype=weight.dtype)
                if name in keep_deltas:
                    kept[name] = delta.to(device=weight.device, dtype=torch.float32)
                written.append((weight, weight.detach().to("cpu", copy=True)))
                weight.copy_(new)
        except BaseException:
            for weight, previous in reversed(written):
                weight.copy_(previous.to(weight.device))
            raise
    return kept


def apply_delta(model: nn.Module, directory: str | os.PathLike[str], *, strict: bool = True) -> dict[str, Any]:
    """Add a saved state's cumulative shift to a freshly loaded base ``model``, in place.

    The model is marked as carrying the state (``model._ultraedit_applied``): applying a state
    (or loading one) onto it again raises :class:`FingerprintError` instead of adding twice.

    Args:
        strict: check the full fingerprint (including the SHA-256 of the original weights). With
            ``False`` only module names and shapes are checked, e.g. to apply a delta made on a
            float32 model to the same checkpoint loaded in bf16.

    Returns:
        the state's ``state.json`` as a dict (turns, edits, config, fingerprint, ...).
    """
    meta, version, files = _open_version(directory)
    directory = Path(directory)
    _refuse_applied(model)
    diffs = _structure_diffs(meta["fingerprint"], model)
    if not strict:
        diffs = [d for d in diffs if "dtype" not in d and not d.startswith(("model_type", "architecture"))]
    _refuse(directory, diffs)
    names = list(meta["fingerprint"]["modules"])
    if strict:
        _refuse(directory, _hash_diff(meta["fingerprint"], fingerprint(model, names)))
    available = dict(model.named_modules())
    modules = {n: available[n] for n in names}
    _check_delta(modules, files, version)
    _add_delta(modules, None, files, version)
    _mark_applied(model, directory, meta)
    return meta


def merge(
    model: nn.Module,
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    strict: bool = True,
    **save_kwargs: Any,
) -> Path:
    """Apply a saved state to the base ``model`` and write a full Hugging Face model directory.

    The result loads anywhere with ``AutoModelForCausalLM.from_pretrained(out)``; the tokenizer
    is saved beside it when given, and ``ultraedit_merge.json`` records what was merged.
    ``save_kwargs`` go to ``model.save_pretrained`` (e.g. ``max_shard_size``).
    """
    meta = apply_delta(model, directory, strict=strict)
    out = Path(out)
    model.save_pretrained(out, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    provenance = {
        "merged_at": _now(),
        "state": str(Path(directory).resolve()),
        "turns": meta["turns"],
        "edits": meta["edits"],
        "config": meta["config"],
        "fingerprint": meta["fingerprint"],
    }
    _write_file(out / "ultraedit_merge.json", json.dumps(provenance, indent=1).encode())
    return out


def info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a saved state: counters, modules, sizes on disk, fingerprint, log, progress."""
    meta, version = read_state(directory)
    files = dict(sorted(meta["sizes"].items()))  # from state.json: no race with a writer's cleanup
    with contextlib.suppress(OSError):
        files[STATE_JSON] = (version / STATE_JSON).stat().st_size
    log_path = Path(directory) / LOG
    fp = meta["fingerprint"]
    return {
        "state": str(Path(directory)),
        "version": version.name,
        "saved_at": meta["saved_at"],
        "turns": meta["turns"],
        "edits": meta["edits"],
        "modules": fp["modules"],
        "module_parameters": sum(math.prod(m["shape"]) for m in fp["modules"].values()),
        "config": meta["config"],
        "fingerprint": {k: fp[k] for k in ("model_type", "architecture", "weights_sha256")},
        "delta_dtype": meta["delta_dtype"],
        "keep_turn_deltas": meta.get("keep_turn_deltas", 0),
        "revertible_turns": [u["turn"] for u in meta.get("undo", [])],
        "files": files,
        "state_bytes": sum(files.values()),
        "log_bytes": log_path.stat().st_size if log_path.exists() else 0,
        "log_records": meta["log_seq"],
        "extra": meta.get("extra") or {},
    }


# ---------------------------------------------------------------------------------------------
# Undo


def revert_last(editor: "UltraEditor", k: int = 1) -> RevertReport:
    """Undo the last ``k`` turns: restore the edit modules' weights and the normalizer statistics
    to exactly what they were before the earliest of those turns.

    Needs ``keep_turn_deltas >= k`` (the editor keeps the weights from before each recent turn on
    the CPU, model dtype). The revert is exact for weights and statistics: the editor is
    bit-for-bit in the state it had after turn ``turns - k``. It undoes whole turns, not single
    facts: each reverted turn had been computed on the model as edited by all turns before it, so
    it cannot be removed from the middle of a sequence; later turns then continue from the
    restored state. The edit log keeps the reverted turns and records a ``revert`` event.
    """
    session = editor.session
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"revert_last needs k >= 1, got {k!r}")
    if k > editor.turns:
        raise StateError(f"cannot revert {k} turns: the editor has applied {editor.turns}")
    if k > len(session.undo):
        raise StateError(
            f"cannot revert {k} turns: only the last {len(session.undo)} are kept "
            f"(keep_turn_deltas={session.keep_turn_deltas}; build the editor with a larger keep_turn_deltas)"
        )
    snaps = [session.undo[-i] for i in range(1, k + 1)]  # newest first
    expected = list(range(editor.turns, editor.turns - k, -1))
    if [s.turn for s in snaps] != expected:
        raise StateError(f"undo snapshots {[s.turn for s in snaps]} do not match turns {expected}")
    target = snaps[-1]
    with torch.no_grad():
        for name, module in editor.modules.items():
            module.weight.copy_(target.weights[name].to(module.weight.device))
    session.delta = {n: d.to(editor.modules[n].weight.device) for n, d in target.deltas.items()}
    for shape, norm in editor.normalizers.items():
        norm.load_state_dict(target.normalizers[shape])
    editor.key_memory = {n: m.to(editor.modules[n].weight.device) for n, m in target.key_memory.items()}
    for _ in range(k):
        session.undo.pop()
    editor.generation += 1  # turns prepared before the revert are stale
    removed = sum(s.requests for s in snaps)
    turns = sorted(s.turn for s in snaps)
    editor.turns -= k
    editor.edits -= removed
    note = (
        f"turns {turns[0]}-{turns[-1]} undone exactly: weights and statistics are those after turn "
        f"{editor.turns}. Each undone turn had been computed on the model edited by all earlier turns; "
        "a revert removes whole turns, and later turns continue from the restored model."
    )
    session.log({"event": "revert", "turns": turns, "edits_removed": removed, "turns_after": editor.turns,
                 "edits_total": editor.edits})
    return RevertReport(reverted_turns=turns, edits_removed=removed, turns=editor.turns, edits=editor.edits, note=note)
