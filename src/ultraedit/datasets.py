"""Editing datasets, read streaming in their published formats, as :class:`EditRequest` objects.

Formats (field names exactly as published; ``docs/datasets.md`` says where to get the files).
Each maps to ``EditRequest(prompt, target, rephrases, locality, id, extra)`` as follows:

- ``jsonl`` (ours): ``prompt`` -> ``target``; ``rephrases`` (list); ``locality`` (list of
  ``{"prompt", "answer"}``); ``id``; ``subject`` (optional, must occur in the prompt) ->
  ``extra["subject"]``.
- ``zsre``: ``src`` -> ``ans`` (or ``alt``); ``rephrase``; ``loc + "?"`` -> ``loc_ans``; ``extra``
  keeps ``subject`` and the first of ``answers`` (the true answer) as ``target_true``.
- ``fever``: ``prompt`` -> ``alt``; one of the list ``equiv_prompt`` (seeded choice);
  ``unrel_prompt`` -> ``unrel_ans``; ``extra["equiv_prompts"]`` keeps them all.
- ``wikibigedit``: ``update`` -> ``ans``; ``rephrase``; ``loc`` -> ``loc_ans``;
  ``extra["personas"]`` = ``(personas, ans)`` pairs, ``extra["mhop"]`` = ``(mhop, mhop_ans)``
  pairs (empty when the record has no ``mhop``).
- ``ultraeditbench``: ``prompt`` -> ``ans``; ``rephrase_prompt``; ``loc`` -> ``loc_ans``.
- ``counterfact``: ``requested_rewrite.prompt`` with ``{}`` := ``requested_rewrite.subject`` ->
  ``requested_rewrite.target_new.str``; ``paraphrase_prompts``; each of ``neighborhood_prompts``
  -> ``requested_rewrite.target_true.str``; ``id`` = ``case_id``. Also the flat layout of
  editing toolkits (detected per record by ``target_new`` without ``requested_rewrite``):
  ``prompt`` (subject filled in) -> ``target_new``; ``rephrase_prompt``; ``locality_prompt`` ->
  ``locality_ground_truth``; ``extra`` keeps ``subject`` and ``ground_truth`` as ``target_true``.

Files may be one JSON list (the published layout) or JSON Lines (one object per line), optionally
gzip-compressed (``.gz``). JSON lists are parsed incrementally with ``ijson``: a 2M-record file is
never loaded whole and memory stays flat in the file size. Record numbers in errors are 0-based
indices into the JSON list, or 1-based line numbers for JSON Lines files.

Usage::

    reader = read_requests("zsre_eval_20k.json")            # format detected from the first record
    for request in reader: ...
    reader.format, reader.read, reader.skipped             # after (or during) iteration
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import contextlib
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence, TextIO

from .core.batching import EditRequest

__all__ = [
    "DATASET_FORMATS",
    "DatasetError",
    "RequestReader",
    "detect_format",
    "iter_requests",
    "parse_record",
    "read_requests",
]

#: Formats :func:`read_requests` understands (plus ``"auto"``).
DATASET_FORMATS: tuple[str, ...] = ("jsonl", "zsre", "counterfact", "fever", "wikibigedit", "ultraeditbench")


class DatasetError(ValueError):
    """A record (or the file) cannot be read as an edit request.

    Attributes:
        path: the file.
        index: 0-based record index in a JSON list, 1-based line number in a JSON Lines file,
            ``None`` for whole-file problems.
        field: dotted field path, e.g. ``"requested_rewrite.target_new.str"`` (``None`` if the
            problem is not one field).
        problem: what is wrong, without the location.
    """

    def __init__(self, path: str | os.PathLike[str], index: int | None, field: str | None, problem: str,
                 *, unit: str = "record") -> None:
        self.path = str(path)
        self.index = index
        self.field = field
        self.problem = problem
        where = self.path
        if index is not None:
            where += f": {unit} {index}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")


class _FieldError(Exception):
    """Internal: a record-level problem, located later by the reader."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


# --------------------------------------------------------------------------- field access
def _text(record: dict[str, Any], key: str, path: str | None = None) -> str:
    path = path or key
    if key not in record:
        raise _FieldError(path, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise _FieldError(path, f"must be a string, got {type(value).__name__} {_short(value)}")
    if not value.strip():
        raise _FieldError(path, "must be a non-empty string")
    return value


def _optional_text(record: dict[str, Any], key: str) -> str | None:
    if record.get(key) is None:
        return None
    return _text(record, key)


def _text_list(record: dict[str, Any], key: str, *, required: bool, allow_str: bool = False) -> list[str]:
    if key not in record or record[key] is None:
        if required:
            raise _FieldError(key, "missing")
        return []
    value = record[key]
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _FieldError(key, f"must be a list of strings, got {type(value).__name__} {_short(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _FieldError(f"{key}[{i}]", f"must be a non-empty string, got {_short(item)}")
        out.append(item)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _record_id(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldError(key, f"must be a string or an integer, got {type(value).__name__}")
    return str(value)


# --------------------------------------------------------------------------- one record per format
def _parse_jsonl(record: dict[str, Any], index: int, seed: int) -> EditRequest:
    prompt = _text(record, "prompt")
    target = _text(record, "target")
    rephrases = _text_list(record, "rephrases", required=False)
    locality = []
    items = record.get("locality")
    if items is not None:
        if not isinstance(items, list):
            raise _FieldError("locality", f"must be a list of {{prompt, answer}} objects, got {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _FieldError(f"locality[{i}]", f"must be an object with 'prompt' and 'answer', got {_short(item)}")
            locality.append((_text(item, "prompt", f"locality[{i}].prompt"), _text(item, "answer", f"locality[{i}].answer")))
    extra = {}
    if record.get("subject") is not None:
        subject = _text(record, "subject")
        if subject not in prompt:
            raise _FieldError("subject", f"{_short(subject)} does not occur in the prompt {_short(prompt)}")
        extra["subject"] = subject
    return EditRequest(prompt, target, tuple(rephrases), tuple(locality), id=_record_id(record, "id"), extra=extra)


def _parse_zsre(record: dict[str, Any], index: int, seed: int) -> EditRequest:
    prompt = _text(record, "src")
    if "ans" in record:
        target = _text(record, "ans")
    elif "alt" in record:
        target = _text(record, "alt")
    else:
        raise _FieldError("ans", "missing (neither 'ans' nor 'alt' is present)")
    rephrase = _text(record, "rephrase")
    loc = _text(record, "loc")
    loc_ans = _text(record, "loc_ans")
    extra = {"subject": record["subject"]} if isinstance(record.get("subject"), str) else {}
    answers = record.get("answers")
    if isinstance(answers, list) and answers and isinstance(answers[0], str) and answers[0].strip():
        extra["target_true"] = answers[0]
    return EditRequest(prompt, target, (rephrase,), ((loc + "?", loc_ans),), id=None, extra=extra)


def _parse_fever(record: dict[str, Any], index: int, seed: int) -> EditRequest:
    prompt = _text(record, "prompt")
    target = _text(record, "alt")
    equiv = _text_list(record, "equiv_prompt", required=True, allow_str=True)
    if not equiv:
        raise _FieldError("equiv_prompt", "must list at least one rephrased claim")
    # The authors pick one rephrase at random; seeding per (seed, record) keeps the choice the
    # same whether or not earlier records were skipped.
    chosen = random.Random(seed * 1_000_003 + index).choice(equiv)
    locality = ((_text(record, "unrel_prompt"), _text(record, "unrel_ans")),)
    return EditRequest(prompt, target, (chosen,), locality, extra={"equiv_prompts": tuple(equiv)})


def _pairs(record: dict[str, Any], key: str, answer_key: str) -> list[tuple[str, str]]:
    """``key`` (a string or a list of strings) paired with ``answer_key`` (a string or a parallel list)."""
    prompts = _text_list(record, key, required=False, allow_str=True)
    if not prompts:
        return []
    if answer_key not in record:
        raise _FieldError(answer_key, f"missing (needed by '{key}')")
    answers = record[answer_key]
    if isinstance(answers, str):
        answers = [answers] * len(prompts)
    answers = _text_list({answer_key: answers}, answer_key, required=True)
    if len(answers) != len(prompts):
        raise _FieldError(answer_key, f"has {len(answers)} answers for {len(prompts)} '{key}' prompts")
    return list(zip(prompts, answers))


def _parse_wikibigedit(record: dict[str, Any], index: int, seed: int) -> EditRequest:
    prompt = _text(record, "update")
    target = _text(record, "ans")
    rephrase = _text(record, "rephrase")
    locality = ((_text(record, "loc"), _text(record, "loc_ans")),)
    extra: dict[str, Any] = {
        "personas": tuple(_pairs(record, "personas", "ans")),
        "mhop": tuple(_pairs(record, "mhop", "mhop_ans")),
    }
    if isinstance(record.get("subject"), str):
        extra["subject"] = record["subject"]
    return EditRequest(prompt, target, (rephrase,), locality, extra=extra)


def _parse_ultraeditbench(record: dict[str, Any], index: int, seed: int) -> EditRequest:
    prompt = _text(record, "prompt")
    target = _text(record, "ans")
    rephrase = _text(record, "rephrase_prompt")
    locality = ((_text(record, "loc"), _text(record, "loc_ans")),)
    extra = {"subject": record["subject"]} if isinstance(record.get("subject"), str) else {}
    return EditRequest(prompt, target, (rephrase,), locality, id=_record_id(record, "case_id"), extra=extra)


def _parse_counterfact(record: dict[str, Any], index: int, seed: int) -> EditRequest:
    if "requested_rewrite" not in record and "target_new" in record:
        return _parse_counterfact_flat(record)
    rewrite = record.get("requested_rewrite")
    if rewrite is None:
        raise _FieldError("requested_rewrite", "missing (nor is this the flat layout: no 'target_new')")
    if not isinstance(rewrite, dict):
        raise _FieldError("requested_rewrite", f"must be an object, got {type(rewrite).__name__}")
    template = _text(rewrite, "prompt", "requested_rewrite.prompt")
    subject = _text(rewrite, "subject", "requested_rewrite.subject")
    if "{}" not in template:
        raise _FieldError("requested_rewrite.prompt", f"has no '{{}}' placeholder for the subject: {_short(template)}")
    prompt = template.replace("{}", subject)
    targets = {}
    for key in ("target_new", "target_true"):
        value = rewrite.get(key)
        if not isinstance(value, dict):
            problem = "missing" if value is None else f"must be an object with 'str', got {type(value).__name__}"
            raise _FieldError(f"requested_rewrite.{key}", problem)
        targets[key] = _text(value, "str", f"requested_rewrite.{key}.str")
    paraphrases = _text_list(record, "paraphrase_prompts", required=False)
    neighborhood = _text_list(record, "neighborhood_prompts", required=False)
    extra = {"subject": subject, "target_true": targets["target_true"]}
    return EditRequest(
        prompt,
        targets["target_new"],
        tuple(paraphrases),
        tuple((p, targets["target_true"]) for p in neighborhood),
        id=_record_id(record, "case_id"),
        extra=extra,
    )


def _parse_counterfact_flat(record: dict[str, Any]) -> EditRequest:
    """The flat CounterFact layout of editing toolkits: ``prompt`` (subject filled in) ->
    ``target_new``; ``rephrase_prompt``; ``locality_prompt`` -> ``locality_ground_truth``."""
    prompt = _text(record, "prompt")
    target = _text(record, "target_new")
    rephrases = _text_list(record, "rephrase_prompt", required=False, allow_str=True)
    locality_prompts = _text_list(record, "locality_prompt", required=False, allow_str=True)
    locality_answer = _optional_text(record, "locality_ground_truth")
    if locality_prompts and locality_answer is None:
        raise _FieldError("locality_ground_truth", "missing while 'locality_prompt' is given")
    extra = {k: v for k, v in (("subject", record.get("subject")), ("target_true", record.get("ground_truth"))) if isinstance(v, str)}
    return EditRequest(
        prompt, target, tuple(rephrases), tuple((p, locality_answer) for p in locality_prompts),
        id=_record_id(record, "case_id"), extra=extra,
    )


_PARSERS: dict[str, Callable[[dict[str, Any], int, int], EditRequest]] = {
    "jsonl": _parse_jsonl,
    "zsre": _parse_zsre,
    "counterfact": _parse_counterfact,
    "fever": _parse_fever,
    "wikibigedit": _parse_wikibigedit,
    "ultraeditbench": _parse_ultraeditbench,
}


def detect_format(record: Any) -> str | None:
    """The dataset format a record's fields identify, or ``None`` if none matches."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "requested_rewrite" in keys or {"target_new", "locality_prompt"} <= keys:
        return "counterfact"
    if "src" in keys and "loc" in keys:
        return "zsre"
    if "update" in keys:
        return "wikibigedit"
    if "equiv_prompt" in keys or "unrel_prompt" in keys:
        return "fever"
    if "rephrase_prompt" in keys:
        return "ultraeditbench"
    if "prompt" in keys and "target" in keys:
        return "jsonl"
    return None


def parse_record(record: Any, format: str, *, index: int = 0, seed: int = 0) -> EditRequest:
    """Map one decoded record of ``format`` onto an :class:`EditRequest`.

    Raises:
        DatasetError: naming ``<record>``, the index and the field (``path`` is ``"<record>"``).
    """
    if format not in _PARSERS:
        raise ValueError(f"unknown dataset format {format!r}; known: {', '.join(DATASET_FORMATS)}")
    try:
        if not isinstance(record, dict):
            raise _FieldError(None, f"must be a JSON object, got {type(record).__name__} {_short(record)}")
        return _PARSERS[format](record, index, seed)
    except _FieldError as err:
        raise DatasetError("<record>", index, err.field, err.problem) from None


# --------------------------------------------------------------------------- streaming reader
def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _sniff(stream: IO[bytes]) -> str:
    """``"list"`` (a JSON array), ``"lines"`` (JSON Lines) or ``"empty"``; leaves the stream after any BOM."""
    head = stream.read(4096)
    offset = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    stripped = head[offset:].lstrip()
    while not stripped and len(head) == 4096:  # a file that starts with a lot of whitespace
        head = stream.read(4096)
        stripped = head.lstrip()
    stream.seek(offset)
    if not stripped:
        return "empty"
    return "list" if stripped[:1] == b"[" else "lines"


class RequestReader(Iterator[EditRequest]):
    """Iterator over the edit requests of one file (see :func:`read_requests`).

    Attributes:
        path: the file.
        format: the record format; resolved from the first record when ``"auto"`` was asked.
        read: records decoded so far (valid or not).
        skipped: invalid records skipped so far (``skip_invalid=True`` only).
        errors: messages of the skipped records (the first 100).
    """

    MAX_ERRORS_KEPT = 100

    def __init__(
        self,
        path: str | os.PathLike[str],
        format: str = "auto",
        *,
        skip_invalid: bool = False,
        rejects: str | os.PathLike[str] | TextIO | None = None,
        seed: int = 0,
    ) -> None:
        if format != "auto" and format not in _PARSERS:
            raise ValueError(f"unknown dataset format {format!r}; known: auto, {', '.join(DATASET_FORMATS)}")
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(self.path, None, None, "no such file" if not self.path.exists() else "not a file")
        self.format = format
        self.skip_invalid = skip_invalid
        self.seed = seed
        self.read = 0
        self.skipped = 0
        self.errors: list[str] = []
        self._rejects_target = rejects
        self._rejects: TextIO | None = None
        self._owns_rejects = False
        self._stream: IO[bytes] | None = None
        self._unit = "record"
        self._it = self._generate()

    # Iterator protocol
    def __iter__(self) -> "RequestReader":
        return self

    def __next__(self) -> EditRequest:
        return next(self._it)

    def __enter__(self) -> "RequestReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file and the rejects file (if this reader opened it)."""
        self._it.close()
        self._close_files()

    def _close_files(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._rejects is not None:
            if self._owns_rejects:
                self._rejects.close()
            else:
                self._rejects.flush()
            self._rejects = None

    # decoding
    def _records(self, stream: IO[bytes]) -> Iterator[tuple[int, Any, str | None]]:
        """``(index, record, raw_text_or_None)``; a decode error becomes a ``_FieldError`` record."""
        layout = _sniff(stream)
        if layout == "empty":
            return
        if layout == "list":
            import ijson

            self._unit = "record"
            count = 0
            try:
                for record in ijson.items(stream, "item", use_float=True):
                    yield count, record, None
                    count += 1
            except ijson.JSONError as err:
                # A JSON list cannot be resynchronised after a syntax error: always fatal.
                raise DatasetError(self.path, count, None,
                                   f"malformed JSON ({err}); the rest of the file cannot be read") from None
            return
        self._unit = "line"
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline=None)
        try:
            for lineno, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    problem = f"malformed JSON ({err.msg} at column {err.colno})"
                    if not self.read:
                        problem += "; a dataset file is a JSON list of records or JSON Lines (one record per line)"
                    yield lineno, _FieldError(None, problem), line
                    continue
                yield lineno, record, line
        except UnicodeDecodeError as err:
            raise DatasetError(self.path, None, None, f"not UTF-8 text ({err})") from None
        finally:
            text.detach()

    def _generate(self) -> Iterator[EditRequest]:
        self._stream = _open_binary(self.path)
        try:
            for index, record, raw in self._records(self._stream):
                self.read += 1
                try:
                    if isinstance(record, _FieldError):
                        raise record
                    if self.format == "auto":
                        detected = detect_format(record)
                        if detected is None:
                            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                            raise DatasetError(
                                self.path, index, None,
                                f"cannot tell the dataset format from the fields {fields}; pass the format "
                                f"explicitly (one of {', '.join(DATASET_FORMATS)})", unit=self._unit,
                            )
                        self.format = detected
                    if not isinstance(record, dict):
                        raise _FieldError(None, f"must be a JSON object, got {type(record).__name__} {_short(record)}")
                    request = _PARSERS[self.format](record, index, self.seed)
                except _FieldError as err:
                    error = DatasetError(self.path, index, err.field, err.problem, unit=self._unit)
                    if not self.skip_invalid:
                        raise error from None
                    self._reject(index, error, record, raw)
                    continue
                yield request
        finally:
            self._close_files()

    def _reject(self, index: int, error: DatasetError, record: Any, raw: str | None) -> None:
        self.skipped += 1
        if len(self.errors) < self.MAX_ERRORS_KEPT:
            self.errors.append(str(error))
        if self._rejects_target is None:
            return
        if self._rejects is None:
            if isinstance(self._rejects_target, (str, os.PathLike)):
                self._rejects = open(self._rejects_target, "w", encoding="utf-8")
                self._owns_rejects = True
            else:
                self._rejects = self._rejects_target
        entry: dict[str, Any] = {"index": index, "unit": self._unit, "field": error.field, "error": error.problem}
        if isinstance(record, _FieldError):
            entry["raw"] = raw.rstrip("\n") if raw is not None else None
        else:
            entry["record"] = record
        self._rejects.write(json.dumps(entry, ensure_ascii=False) + "\n")


def read_requests(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    skip_invalid: bool = False,
    rejects: str | os.PathLike[str] | TextIO | None = None,
    seed: int = 0,
) -> RequestReader:
    """Stream the edit requests of a dataset file.

    Args:
        path: a JSON list (published layout) or JSON Lines file, optionally ``.gz``.
        format: ``"auto"`` (detected from the first record's fields) or one of
            :data:`DATASET_FORMATS`.
        skip_invalid: skip malformed records instead of raising; they are counted in
            ``reader.skipped`` and written to ``rejects``. A syntax error inside a JSON list is
            always fatal (the rest of the list cannot be located).
        rejects: a path or a text file object receiving one JSON line per skipped record
            (``{"index": ..., "unit": "record"|"line", "field": ..., "error": ...,
            "record": <the decoded record> | "raw": <the undecodable line>}``).
        seed: seeds the per-record choice of FEVER's rephrase (``equiv_prompt`` is a list).

    Returns:
        a :class:`RequestReader`, an iterator of :class:`EditRequest` that streams the file.

    Raises:
        DatasetError: (a ``ValueError``) naming the file, the record index (line number for JSON
            Lines) and the field, at the first bad record unless ``skip_invalid``.
    """
    return RequestReader(path, format, skip_invalid=skip_invalid, rejects=rejects, seed=seed)


def iter_requests(
    sources: Sequence[str | os.PathLike[str]],
    format: str = "auto",
    *,
    rejects: str | os.PathLike[str] | TextIO | None = None,
    **kw: Any,
) -> Iterator[EditRequest]:
    """Requests of several files, one after another (each file's format detected on its own).

    Each file's reader is closed when the file is done, or when this iterator is closed or
    dropped early. A ``rejects`` path is opened once and receives the rejects of every file."""
    with contextlib.ExitStack() as stack:
        if isinstance(rejects, (str, os.PathLike)):
            rejects = stack.enter_context(open(rejects, "w", encoding="utf-8"))
        for source in sources:
            with read_requests(source, format, rejects=rejects, **kw) as reader:
                yield from reader
