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
        <stage>.safetensors  (a stage with state, after a turn) its state: memory.safetensors holds
                           the key memory, "<module>" = sum of K^T K over the turns so far, (d_in, d_in)
        undo-<seq>.safetensors   (only with keep_turn_deltas) one per revertible turn: edit-module
                           weights ("w/<module>", model dtype), float32 deltas of bf16/fp16 modules
                           ("d/<module>"), statistics ("n/<d_in>x<d_out>.*") and stage states
                           (the key memory: "m/<module>"; others "s/<stage>/<key>") from before that
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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from .delta import DELTA, EXACT, add_delta, check_delta, delta_on_device
from .files import StateError, StateWarning, checkpoint, fsync_dir, read_safetensors, read_tensor, write_file, write_safetensors
from .identity import fingerprint, hash_diff, mark_applied, refuse, refuse_applied, structure_diffs
from .lock import session_lock
from .log import LOG, append_log, repair_log
from .memory import EditSession, Snapshot, UndoEntry, now

FORMAT = "ultraedit-state"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
STATE_JSON = "state.json"
NORMALIZERS = "normalizers.safetensors"
#: Where a stage's state goes in an undo file: the key memory's prefix predates the others'.
STAGE_PREFIXES = {"memory": "m/"}
_REQUIRED_META = ("config", "turns", "edits", "fingerprint", "delta_dtype", "normalizer_shapes", "log_seq", "log_tail", "sizes")


class Saveable(Protocol):
    """What :func:`save` reads of an editor (sessions never import the editor)."""

    session: EditSession
    modules: dict[str, nn.Module]
    normalizers: dict[tuple[int, int], Any]
    config: Any
    turns: int
    edits: int
    delta_accumulation: str

    def stage_states(self) -> dict[str, dict[str, torch.Tensor]]: ...


def stage_file(name: str) -> str:
    return f"{name}.safetensors"


def stage_prefix(name: str) -> str:
    return STAGE_PREFIXES.get(name, f"s/{name}/")


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


def save(editor: Saveable, directory: str | os.PathLike[str], *, delta_dtype: str = "float32") -> Path:
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
        last_logged = repair_log(directory / LOG)  # a damaged log stops the save here, before anything
        _cleanup(directory, old)
        number = int(old.name[1:]) + 1 if old is not None else 1
        final = directory / f"v{number:08d}"
        tmp = directory / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            meta = _write_version(editor, tmp, delta_dtype, old)
            fsync_dir(tmp)
            checkpoint("rename")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            fsync_dir(directory)
            checkpoint("current")
            pointer_tmp = directory / f".tmp-{CURRENT}-{os.getpid()}"
            write_file(pointer_tmp, (final.name + "\n").encode())
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
        fsync_dir(directory)
        checkpoint("log")
        append_log(directory / LOG, log_tail, last)
        session.pending_log.clear()
        checkpoint("cleanup")
        _cleanup(directory, final)
    except OSError as err:
        warnings.warn(
            f"the state in {directory} was saved ({final.name} is current), but a step after the switch failed: "
            f"{err}; the next save completes the edit log and removes old versions",
            StateWarning,
            stacklevel=3,
        )


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


def _write_version(editor: Saveable, path: Path, delta_dtype: str, previous: Path | None) -> dict[str, Any]:
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
            delta, index, value = delta_on_device(w.detach(), b, dt)
            if index is not None and value is not None:
                fixes[f"{n}/index"], fixes[f"{n}/value"] = index, value
            return delta

        specs.append((name, dtype, tuple(weight.shape), make))
    fixes: dict[str, torch.Tensor] = {}
    sizes[DELTA] = write_safetensors(path / DELTA, specs, {"format": FORMAT, "content": "delta"}, stage="delta")
    if fixes:  # the few float32 elements no float32 delta reproduces exactly (see delta.exact_delta)
        fix_specs = [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in fixes.items()]
        sizes[EXACT] = write_safetensors(path / EXACT, fix_specs, {"format": FORMAT, "content": "exact"})

    norm_specs = []
    for shape, norm in editor.normalizers.items():
        for key, value in norm.state_dict().items():
            norm_specs.append((f"{_norm_key(shape)}.{key}", value.dtype, tuple(value.shape), lambda v=value: v))
    sizes[NORMALIZERS] = write_safetensors(path / NORMALIZERS, norm_specs, {"format": FORMAT, "content": "normalizers"})
    for stage, state in editor.stage_states().items():
        if state:
            specs = [(k, t.dtype, tuple(t.shape), lambda t=t: t.to("cpu")) for k, t in state.items()]
            sizes[stage_file(stage)] = write_safetensors(path / stage_file(stage), specs, {"format": FORMAT, "content": stage})

    undo_meta = []
    for entry in session.undo:
        # One immutable file per snapshot, named by the turn's unique log seq: a snapshot already
        # saved in the previous version is hard-linked, not rewritten (saving every turn with
        # keep_turn_deltas=k writes one snapshot per turn, not k).
        file = f"undo-{entry.seq:010d}.safetensors"
        undo_meta.append({"turn": entry.turn, "requests": entry.requests, "seq": entry.seq, "file": file})
        if previous is not None and (previous / file).exists():
            try:
                os.link(previous / file, path / file)
                sizes[file] = (path / file).stat().st_size
                continue
            except OSError:
                pass  # no hard links here: write it again
        sizes[file] = write_safetensors(path / file, _undo_specs(entry.snapshot),
                                        {"format": FORMAT, "content": "undo", "turn": str(entry.turn)})

    config = editor.config.to_dict()
    config["modules"] = list(editor.modules)  # resolved names, independent of preset changes
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saved_at": now(),
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
    write_file(path / STATE_JSON, json.dumps(meta, indent=1, ensure_ascii=False).encode())
    return meta




def _undo_specs(snap: Snapshot) -> list[tuple[str, torch.dtype, tuple[int, ...], Any]]:
    specs = [(f"w/{name}", w.dtype, tuple(w.shape), lambda w=w: w) for name, w in snap.weights.items()]
    specs += [(f"d/{name}", d.dtype, tuple(d.shape), lambda d=d: d) for name, d in snap.deltas.items()]
    for stage, state in snap.stages.items():
        specs += [(f"{stage_prefix(stage)}{k}", t.dtype, tuple(t.shape), lambda t=t: t) for k, t in state.items()]
    for shape, sd in snap.normalizers.items():
        for key, value in sd.items():
            specs.append((f"n/{_norm_key(shape)}.{key}", value.dtype, tuple(value.shape), lambda v=value: v))
    return specs


# ---------------------------------------------------------------------------------------------
# Read


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


@dataclass
class Saved:
    """The current version of a state directory, every file open (memory-mapped)."""

    directory: Path
    meta: dict[str, Any]
    version: Path
    files: dict[str, Any]

    @property
    def meta_path(self) -> Path:
        return self.version / STATE_JSON


def open_saved(directory: str | os.PathLike[str]) -> Saved:
    """The current state with every file opened before anything is read from it, so a writer that
    removes this version right after switching to a newer one cannot pull a file away midway; if
    the version vanished before the files were opened, the newer state is read instead."""
    for attempt in range(3):
        meta, version = read_state(directory)
        try:
            names = [n for n in meta["sizes"] if n.endswith(".safetensors") and not n.startswith("undo-")]
            names += [item["file"] for item in meta.get("undo") or []]
        except (KeyError, TypeError, AttributeError) as err:
            raise StateError(f"{version / STATE_JSON}: malformed ({type(err).__name__}: {err})") from None
        for required in (NORMALIZERS, DELTA):
            if required not in names:
                raise StateError(f"{version / STATE_JSON}: the state lists no {required}")
        try:
            return Saved(Path(directory), meta, version, {n: read_safetensors(version / n)[0] for n in names})
        except StateError:
            if version.exists() or attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def check_model(saved: Saved, model: nn.Module) -> None:
    """Refuse a model that already carries a state, or whose architecture, edit-module names, shapes
    or dtypes differ from the state's base model (no hashing yet)."""
    refuse_applied(model)
    refuse(saved.directory, structure_diffs(saved.meta["fingerprint"], model))


@dataclass
class Layout:
    """What reading a state's contents needs to know of the editor it goes into."""

    modules: dict[str, nn.Module]
    normalizer_shapes: list[tuple[int, int]]
    stages: dict[str, dict[str, tuple[int, ...] | None]]  # stateful stage -> {key: shape (None: any)}
    accumulating: set[str]  # modules that keep a float32 delta
    base: dict[str, torch.Tensor]


@dataclass
class Contents:
    """A state's contents, read and checked: statistics, stage states, undo history, counters."""

    statistics: dict[tuple[int, int], dict[str, torch.Tensor]]
    stages: dict[str, dict[str, torch.Tensor]]
    undo: list[UndoEntry]
    turns: int
    edits: int
    log_seq: int


def read_contents(saved: Saved, layout: Layout, keep: int) -> Contents:
    """Read and check every file of ``saved`` for an editor of ``layout`` (the delta headers too;
    the delta itself is added by :func:`add_saved_delta`), keeping the last ``keep`` undo entries."""
    meta, version, files = saved.meta, saved.version, saved.files
    try:
        turns, edits, log_seq = int(meta["turns"]), int(meta["edits"]), int(meta["log_seq"])
        undo = [(int(u["turn"]), int(u["requests"]), int(u["seq"]), str(u["file"])) for u in meta.get("undo") or []]
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{saved.meta_path}: malformed ({type(err).__name__}: {err})") from None
    expected = sorted(tuple(s) for s in meta["normalizer_shapes"])
    if sorted(layout.normalizer_shapes) != expected:
        raise StateError(f"{saved.meta_path}: normalizer shapes {expected} do not match the edit modules")
    statistics = {s: _read_statistics(files[NORMALIZERS], version / NORMALIZERS, "", s) for s in layout.normalizer_shapes}
    stages = {}
    for name, shapes in layout.stages.items():
        stages[name] = _read_stage(files.get(stage_file(name)), version / stage_file(name), "", shapes)
        if turns > 0 and not stages[name]:
            raise StateError(f"{saved.meta_path}: the configuration's {name} stage keeps a state, but the state has "
                             f"no {stage_file(name)} for its {turns} turns")
    check_delta(layout.modules, files, version)
    kept = undo[-keep:] if keep > 0 else []
    entries, after = [], edits
    for turn, requests, seq, file in reversed(kept):  # counters before each turn, newest first
        after -= requests
        entries.append(_read_undo(files[file], version / file, layout, UndoEntry(turn, requests, seq, None), after))
    return Contents(statistics, stages, entries[::-1], turns, edits, log_seq)


def add_saved_delta(saved: Saved, layout: Layout) -> dict[str, torch.Tensor]:
    """``W = W_base + delta`` for every edit module (all or nothing); the float32 deltas of the
    accumulating modules are returned."""
    return add_delta(layout.modules, layout.base, saved.files, saved.version, keep_deltas=layout.accumulating)


def _read_statistics(handle: Any, path: Path, prefix: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    key = f"{prefix}{_norm_key(shape)}"
    state = {"n": read_tensor(handle, path, f"{key}.n", ())}
    state.update({k: read_tensor(handle, path, f"{key}.{k}", (sum(shape),)) for k in ("mean", "var", "std")})
    return state


def _read_stage(handle: Any, path: Path, prefix: str, shapes: Mapping[str, Sequence[int] | None]) -> dict[str, torch.Tensor]:
    """A stage's state stored under ``prefix<key>``: every key of ``shapes`` (a ``None`` shape: any), or
    none (an empty state)."""
    if handle is None or not any(k.startswith(prefix) and k[len(prefix):] in shapes for k in handle.keys()):
        return {}
    return {k: read_tensor(handle, path, f"{prefix}{k}", shape) for k, shape in shapes.items()}


def _read_undo(handle: Any, path: Path, layout: Layout, entry: UndoEntry, edits: int) -> UndoEntry:
    weights = {n: read_tensor(handle, path, f"w/{n}", tuple(m.weight.shape)) for n, m in layout.modules.items()}
    keys = set(handle.keys())
    deltas = {}
    for name in layout.accumulating:
        if f"d/{name}" in keys:
            deltas[name] = read_tensor(handle, path, f"d/{name}", tuple(layout.modules[name].weight.shape)).float()
        else:  # a state saved before float32 deltas: weights - base is exact for bf16/fp16
            deltas[name] = weights[name].float() - layout.base[name].float()
    entry.snapshot = Snapshot(
        weights=weights,
        deltas=deltas,
        normalizers={s: _read_statistics(handle, path, "n/", s) for s in layout.normalizer_shapes},
        stages={name: _read_stage(handle, path, stage_prefix(name), shapes) for name, shapes in layout.stages.items()},
        turns=entry.turn - 1,
        edits=edits,
    )
    return entry


# ---------------------------------------------------------------------------------------------
# Apply, merge, info


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
    saved = open_saved(directory)
    directory = Path(directory)
    refuse_applied(model)
    diffs = structure_diffs(saved.meta["fingerprint"], model)
    if not strict:
        diffs = [d for d in diffs if "dtype" not in d and not d.startswith(("model_type", "architecture"))]
    refuse(directory, diffs)
    names = list(saved.meta["fingerprint"]["modules"])
    if strict:
        refuse(directory, hash_diff(saved.meta["fingerprint"], fingerprint(model, names)))
    available = dict(model.named_modules())
    modules = {n: available[n] for n in names}
    check_delta(modules, saved.files, saved.version)
    add_delta(modules, None, saved.files, saved.version)
    mark_applied(model, directory, saved.meta)
    return saved.meta


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
        "merged_at": now(),
        "state": str(Path(directory).resolve()),
        "turns": meta["turns"],
        "edits": meta["edits"],
        "config": meta["config"],
        "fingerprint": meta["fingerprint"],
    }
    write_file(out / "ultraedit_merge.json", json.dumps(provenance, indent=1).encode())
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
