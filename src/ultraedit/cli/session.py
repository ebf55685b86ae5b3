"""``ultraedit edit``, ``ask``, ``info``, ``merge`` and ``revert``: lifelong sessions on a saved state
(:mod:`ultraedit.session`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..configs import default_for
from .common import (
    EXIT_INTERRUPTED,
    CliError,
    check_preset,
    check_resumed,
    config_args,
    human_bytes,
    load_model,
    model_args,
    plural,
    reporting,
    resolve_config,
    state_dtype,
)

_PREFIX_BYTES = 16 << 20  # an edits file is recognised by the SHA-256 of its first 16 MiB


def _prefix_digest(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _input_entry(progress: dict[str, Any], path: Path) -> dict[str, Any]:
    """The saved progress record of this edits file (matched by content, not by name), or a new one."""
    size = path.stat().st_size
    for entry in progress.setdefault("inputs", []):
        length = entry["prefix_bytes"]
        if size >= length and _prefix_digest(path, length) == entry["prefix_sha256"]:
            entry["path"] = str(path.resolve())
            return entry
    length = min(size, _PREFIX_BYTES)
    entry = {
        "path": str(path.resolve()), "prefix_bytes": length, "prefix_sha256": _prefix_digest(path, length),
        "records": 0, "rejected": 0, "rejected_tokenize": 0, "turns": 0, "done": False,
    }
    progress["inputs"].append(entry)
    return entry


def _count_records(path: Path) -> int | None:
    """Non-blank lines of a JSON Lines file (the progress bar's total); None for a JSON list."""
    if path.suffix == ".gz":
        return None
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head[:1] == b"[":
            return None
        f.seek(0)
        return sum(1 for line in f if line.strip())


class _RejectsSink:
    """Where the reader (always run with ``skip_invalid=True``) reports bad records.

    With a ``path`` (``--skip-invalid``) it is the rejects file: on resume it is cut back to the
    rejects of the records already consumed, and reports for those records (re-read while
    skipping) are dropped, so every bad record appears once. Without one (strict mode) it keeps
    the first bad record past the consumed ones, and :meth:`check` raises it; bad records among
    the consumed ones (an earlier run used ``--skip-invalid``) are not errors again.
    """

    def __init__(self, path: Path | None, keep_lines: int, skip_through: int) -> None:
        self.skip_through = skip_through
        self.reader: Any = None
        self.violation: dict[str, Any] | None = None
        self._file = None
        if path is not None:
            lines = []
            if keep_lines and path.exists():
                with open(path, encoding="utf-8") as f:
                    lines = [line for _, line in zip(range(keep_lines), f)]
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")
            self._file.writelines(lines)

    def write(self, text: str) -> int:
        if self.reader is not None and self.reader.read <= self.skip_through:
            return len(text)
        if self._file is None:
            if self.violation is None:
                self.violation = json.loads(text)
            return len(text)
        return self._file.write(text)

    def check(self, path: Path) -> None:
        """Strict mode: raise the first bad record (a :class:`DatasetError` naming file, line, field)."""
        from ..datasets import DatasetError

        if self.violation is not None:
            v = self.violation
            raise DatasetError(path, v["index"], v["field"], v["error"], unit=v["unit"])

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _check_options(args: argparse.Namespace) -> None:
    """The configuration's options, checked before the model is loaded: the named configuration or file,
    each --set and the values they give, the preset."""
    from ..configs import check

    check_preset(args.preset)
    check(args.config or default_for(args.model), lr=args.lr, sets=args.sets)


@reporting
def _edit_command(args: argparse.Namespace) -> int:
    import signal

    from tqdm import tqdm

    from ..core.batching import EditError, tokenize_pair
    from ..datasets import DatasetError, read_requests
    from ..editor import UltraEditor
    from ..session import has_state, read_state, save, session_lock

    edits_path = Path(args.edits)
    if not edits_path.is_file():
        raise CliError(f"--edits {args.edits}: no such file")
    if args.turn_size < 1 or args.save_every < 1:
        raise CliError("--turn-size and --save-every must be >= 1")
    if args.keep_turn_deltas is not None and args.keep_turn_deltas < 0:
        raise CliError(f"--keep-turn-deltas must be >= 0, got {args.keep_turn_deltas}")
    if args.max_turns is not None and args.max_turns < 1:
        raise CliError(f"--max-turns must be >= 1, got {args.max_turns}")
    state_dir = Path(args.state)
    resuming = has_state(state_dir)
    _check_options(args)  # bad options fail before the model is loaded
    dtype = args.dtype if args.dtype != "auto" or not resuming else (state_dtype(args.state) or "auto")
    model, tokenizer = load_model(args.model, args.device, dtype)

    with session_lock(state_dir):
        if resuming:
            check_resumed(read_state(state_dir)[0]["config"], args, model)
            editor = UltraEditor.load(model, state_dir, tokenizer, keep_turn_deltas=args.keep_turn_deltas)
        else:
            editor = UltraEditor(model, resolve_config(args, model), tokenizer, keep_turn_deltas=args.keep_turn_deltas or 0)
        delta_dtype = args.delta_dtype or (read_state(state_dir)[0]["delta_dtype"] if resuming else "float32")
        entry = _input_entry(editor.session.extra.setdefault("cli", {}), edits_path)
        start_records, start_turns, start_edits = entry["records"], editor.turns, editor.edits
        if entry["done"] and edits_path.stat().st_size > entry.get("bytes", 0):
            entry["done"] = False  # records were appended to the file since it was finished
        if entry["done"]:
            print(f"all {entry['records']} records of {edits_path} are already applied "
                  f"(state: {editor.turns} turns, {editor.edits} edits); nothing to do")
            return 0
        if resuming:
            print(f"resuming {state_dir}: {editor.turns} turns, {editor.edits} edits; "
                  f"{start_records} records of {edits_path} already consumed", file=sys.stderr)

        rejects_path = Path(args.rejects) if args.rejects else state_dir / f"rejects-{edits_path.stem}.jsonl"
        sink = _RejectsSink(rejects_path if args.skip_invalid else None, entry["rejected"], start_records)
        reader = read_requests(edits_path, args.format, skip_invalid=True, rejects=sink, seed=args.seed)
        sink.reader = reader
        tokenize_rejects = entry["rejected_tokenize"]
        unsaved = 0
        position = start_records

        saving = {"now": False}

        def checkpoint() -> None:
            nonlocal unsaved
            saving["now"] = True
            sink.flush()
            save(editor, state_dir, delta_dtype=delta_dtype)
            unsaved = 0
            saving["now"] = False

        stop = {"requested": False}

        def on_sigint(signum: int, frame: Any) -> None:
            if stop["requested"]:
                raise KeyboardInterrupt
            stop["requested"] = True
            tqdm.write("ultraedit: stopping after this turn (Ctrl-C again aborts now; the next run resumes "
                       "from the last saved turn)", file=sys.stderr)

        previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
        bar = tqdm(total=_count_records(edits_path), initial=start_records, unit="edit", dynamic_ncols=True,
                   disable=args.quiet, desc="editing")
        began = time.perf_counter()
        turn: list[Any] = []
        finished = False
        try:
            def apply(requests: list[Any]) -> None:
                nonlocal unsaved, position
                report = editor.edit(requests)
                entry["records"] = reader.read
                entry["rejected"] = reader.skipped + tokenize_rejects
                entry["rejected_tokenize"] = tokenize_rejects
                entry["turns"] += 1
                unsaved += 1
                if unsaved >= args.save_every:
                    checkpoint()
                bar.set_postfix(turn=editor.turns, loss=f"{report.loss:.3f}", refresh=False)
                bar.update(reader.read - position)
                position = reader.read

            for request in reader:
                sink.check(edits_path)  # strict mode: a bad record before this one ends the run here
                if reader.read <= start_records:
                    continue  # applied by an earlier run (resume)
                try:
                    tokenize_pair(tokenizer, request.prompt, request.target)
                except EditError as err:
                    where = f"{edits_path}: record {reader.read} (id={request.id!r})"
                    if not args.skip_invalid:
                        raise CliError(f"{where}: {err}; nothing from its turn was applied") from None
                    tokenize_rejects += 1
                    sink.write(json.dumps({"index": reader.read, "unit": "record", "field": "prompt/target",
                                           "error": str(err), "record": {"prompt": request.prompt,
                                                                         "target": request.target}}) + "\n")
                    continue
                turn.append(request)
                if len(turn) == args.turn_size:
                    apply(turn)
                    turn = []
                    if stop["requested"] or (args.max_turns and editor.turns - start_turns >= args.max_turns):
                        break
            else:
                sink.check(edits_path)
                if turn:
                    apply(turn)
                    turn = []
                entry["records"] = reader.read
                entry["rejected"] = reader.skipped + tokenize_rejects
                finished = True
                entry["done"] = True
                entry["bytes"] = edits_path.stat().st_size
            if unsaved or finished:
                checkpoint()
        except KeyboardInterrupt:
            bar.close()
            print(f"ultraedit edit: aborted; {state_dir} holds the last saved turn", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BaseException as err:
            bar.close()
            if unsaved and not saving["now"]:
                checkpoint()  # the turns applied before the error are complete: keep them
            if isinstance(err, DatasetError):
                raise CliError(
                    f"{err}\n  nothing from the turn containing it was applied; {state_dir} holds "
                    f"{editor.turns} turns ({editor.edits} edits). Fix the record or pass --skip-invalid, "
                    "then run the same command again to continue."
                ) from None
            raise
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            reader.close()
            sink.close()
        seconds = time.perf_counter() - began
        applied = editor.edits - start_edits
        rejected = entry["rejected"]
        print(
            f"applied {applied} edits in {plural(editor.turns - start_turns, 'turn')} ({applied / max(seconds, 1e-9):.1f} edits/s); "
            f"state {state_dir}: {editor.turns} turns, {editor.edits} edits"
            + (f"; {rejected} invalid records skipped -> {rejects_path}" if args.skip_invalid else "")
        )
        if stop["requested"] and not finished:
            print("ultraedit edit: interrupted; run the same command again to continue", file=sys.stderr)
            return EXIT_INTERRUPTED
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@reporting
def _ask_command(args: argparse.Namespace) -> int:
    from ..contexts import check_contexts
    from ..generation import generate_answers
    from ..session import apply_delta

    dtype = args.dtype if args.dtype != "auto" else (state_dtype(args.state) or "auto")
    model, tokenizer = load_model(args.model, args.device, dtype)
    check_contexts([args.context], tokenizer)

    def answers() -> list[str]:
        return generate_answers(model, tokenizer, args.prompt, args.context, max_new_tokens=args.max_new_tokens)

    before = answers() if args.compare else None
    apply_delta(model, args.state)
    after = answers()
    for i, prompt in enumerate(args.prompt):
        if before is None:
            print(after[i] if len(args.prompt) == 1 else f"{prompt} -> {after[i]}")
        else:
            print(f"prompt: {prompt}\n  before: {before[i]}\n  after:  {after[i]}")
    return 0


@reporting
def _info_command(args: argparse.Namespace) -> int:
    from ..session import info

    data = info(args.state)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    fp = data["fingerprint"]
    cfg = data["config"]
    print(f"state:        {data['state']} ({data['version']}, saved {data['saved_at']})")
    print(f"edits:        {data['edits']} in {data['turns']} turns")
    print(f"base model:   {fp['architecture']} ({fp['model_type']}), edit-module sha256 {fp['weights_sha256']}")
    from ..legacy import nested

    try:
        cfg = nested(cfg)
        stages = ", ".join(k for k in ("refine", "generic", "memory", "neighbours", "subject", "outliers",
                                       "paraphrases") if cfg.get(k)) or "none (the authors' method)"
    except ValueError as err:  # a state from an earlier version with an option since removed
        stages = f"unreadable by this version ({err})"
    print(f"config:       lr={cfg['lr']} ridge={cfg['ridge']} capture_batch_size={cfg['capture_batch_size']} "
          f"normalizer={cfg['normalizer']}; stages: {stages}")
    print(f"modules:      {len(data['modules'])} ({data['module_parameters']:,} parameters)")
    for name, spec in data["modules"].items():
        print(f"  {name:48s} {'x'.join(map(str, spec['shape'])):>14s} {spec['dtype']}")
    files = ", ".join(f"{k} {human_bytes(v)}" for k, v in data["files"].items())
    print(f"size:         {human_bytes(data['state_bytes'])} ({files}); delta dtype {data['delta_dtype']}")
    print(f"edit log:     {data['log_records']} records, {human_bytes(data['log_bytes'])}")
    undo = data["revertible_turns"]
    print(f"revertible:   {f'turns {undo[0]}-{undo[-1]}' if undo else 'none'} (keep_turn_deltas={data['keep_turn_deltas']})")
    for entry in data["extra"].get("cli", {}).get("inputs", []):
        status = "done" if entry["done"] else "in progress"
        print(f"input:        {entry['path']}: {entry['records']} records consumed, {entry['rejected']} rejected ({status})")
    return 0


@reporting
def _merge_command(args: argparse.Namespace) -> int:
    from ..session import merge

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CliError(f"--out {out} exists and is not empty (pass --overwrite to write into it)")
    dtype = args.dtype if args.dtype != "auto" else (state_dtype(args.state) or "auto")
    model, tokenizer = load_model(args.model, args.device, dtype)
    kwargs = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
    merge(model, args.state, out, tokenizer=tokenizer, **kwargs)
    print(f"wrote the edited model to {out}")
    return 0


@reporting
def _revert_command(args: argparse.Namespace) -> int:
    from ..editor import UltraEditor
    from ..session import read_state, save, session_lock

    dtype = args.dtype if args.dtype != "auto" else (state_dtype(args.state) or "auto")
    model, _ = load_model(args.model, args.device, dtype, tokenizer=False)
    with session_lock(args.state):
        delta_dtype = read_state(args.state)[0]["delta_dtype"]
        editor = UltraEditor.load(model, args.state)
        report = editor.revert_last(args.turns)
        save(editor, args.state, delta_dtype=delta_dtype)
    first, last = report.reverted_turns[0], report.reverted_turns[-1]
    print(f"reverted turn{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''} "
          f"({report.edits_removed} edits); {args.state} now holds {report.turns} turns, {report.edits} edits")
    print(report.note)
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``edit``, ``ask``, ``info``, ``merge`` and ``revert``."""
    from ..datasets import DATASET_FORMATS

    p = sub.add_parser(
        "edit", help="apply edit requests from a file in turns, saving a resumable state",
        description="Stream edit requests from FILE in turns, saving the state after every turn (or every K). "
        "Run the same command again after Ctrl-C or a crash: it resumes after the last saved turn. "
        "Input: JSON Lines with 'prompt', 'target', optional 'rephrases' [str] and 'locality' "
        "[{prompt, answer}], 'id'; or the published ZsRE, CounterFact, FEVER, WikiBigEdit, "
        "UltraEditBench files (JSON list or JSONL, field names as published).",
    )
    model_args(p)
    p.add_argument("--edits", required=True, metavar="FILE", help="edit requests (JSONL or JSON list, .gz ok)")
    p.add_argument("--state", required=True, metavar="DIR", help="state directory (created, or resumed)")
    p.add_argument("--format", default="auto", choices=["auto", *DATASET_FORMATS], help="input format (default: detect)")
    config_args(p, new=" of a new state")
    p.add_argument("--turn-size", type=int, default=100, help="edit requests per turn (default 100, as the paper)")
    p.add_argument("--save-every", type=int, default=1, metavar="K", help="save the state every K turns (default 1)")
    p.add_argument("--max-turns", type=int, help="stop (and save) after this many turns in this run")
    p.add_argument("--keep-turn-deltas", type=int, metavar="K",
                   help="keep the last K turns revertible (costs K copies of the edit modules, CPU and on disk)")
    p.add_argument("--delta-dtype", choices=["float32", "model"],
                   help="dtype of the saved weight shift (float32, the default: exact resume; model: half size "
                   "for bf16, approximate); a resumed state keeps its own unless given")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed records (written to the rejects file) instead of stopping")
    p.add_argument("--rejects", metavar="FILE", help="rejects file (default DIR/rejects-<edits file stem>.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="seed of FEVER's per-record rephrase choice")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_edit_command)

    p = sub.add_parser("ask", help="greedy answer of the edited model (before/after with --compare)",
                       description="The edited model's greedy answer to each prompt, cut at its first sentence end or "
                       "newline (what the benchmark's generation scores read).")
    model_args(p)
    p.add_argument("--state", required=True, metavar="DIR", help="saved state to apply to --model")
    p.add_argument("prompt", nargs="+", help="prompt(s) to continue")
    p.add_argument("--compare", action="store_true", help="also show the base model's answer")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--context", default="plain", choices=["plain", "qa", "chat"],
                   help="how the prompt is asked: as written (default), as a QA instruction, or through the chat template")
    p.set_defaults(func=_ask_command)

    p = sub.add_parser("info", help="edits, turns, modules, sizes and base-model fingerprint of a state")
    p.add_argument("--state", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info_command)

    p = sub.add_parser("merge", help="write the full edited model (save_pretrained) for serving anywhere")
    model_args(p)
    p.add_argument("--state", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--max-shard-size", help="passed to save_pretrained, e.g. 5GB")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_merge_command)

    p = sub.add_parser(
        "revert", help="undo the last turns of a state exactly (needs edit --keep-turn-deltas)",
        description="Restore the weights and statistics from before the last K turns and save the state. "
        "The reverted requests count as consumed: running 'ultraedit edit' on the same file does not "
        "apply them again.",
    )
    model_args(p)
    p.add_argument("--state", required=True, metavar="DIR")
    p.add_argument("--turns", type=int, default=1, metavar="K", help="how many of the last turns to undo (default 1)")
    p.set_defaults(func=_revert_command)
