"""The lifelong editing benchmark: ``ultraedit bench`` and :func:`run`.

Protocol (the paper's): the first ``turns * turn_size`` requests of a dataset are edited in
``turns`` turns of ``turn_size`` requests (minibatches of ``batch_size``), one turn after another
on the same model; after the whole sequence, every request ever edited is evaluated. With
``eval_every=K`` the requests edited so far are also evaluated after every K-th turn (a curve).
Before editing, the unedited model is scored on the same requests (the ``unedited`` columns and
the reference predictions of "locality vs unedited").

Metrics (``evaluation``): token-level teacher-forced accuracy for efficacy (edit prompts, new
targets), generalization (rephrases, new targets) and specificity (locality prompts with the
dataset's answers), averaged per request then over requests; plus generation exact match of each
and the agreement of locality predictions with the unedited model's.

Outputs in ``out``: ``results.json`` (top-level ``efficacy``, ``generalization``,
``specificity`` in [0, 1], and the config, model fingerprint, all metrics, the curve, timings,
peak memory and edits/s), ``results.md`` (tables) and ``curve.png`` (metrics vs edits).

Editing methods are plug-ins (:data:`METHODS`, :func:`register_method`): a factory gets the model,
the tokenizer and the :class:`BenchConfig` and returns an object with ``edit(requests)`` (apply
one turn) and ``describe()`` (its hyperparameters, for the results).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import sys
import time
from array import array
from collections import abc
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from .batching import EditRequest
from .datasets import read_requests
from .editor import EditConfig, UltraEditor
from .evaluation import MetricTotals, perplexity, score_requests
from .models import DTYPES, load_model, resolve_device
from .preserve import package_text

#: The held-out text whose perplexity is reported before and after editing (ships with the package).
PERPLEXITY_TEXT = "heldout.txt"

__all__ = [
    "BenchConfig",
    "BenchError",
    "DATASETS",
    "EditMethod",
    "PAPER_RESULTS",
    "METHODS",
    "model_fingerprint",
    "paper_reference",
    "register_method",
    "run",
]

#: ``--dataset`` choices: the readable formats plus the built-in testbed's requests.
DATASETS: tuple[str, ...] = ("zsre", "counterfact", "fever", "wikibigedit", "ultraeditbench", "jsonl", "testbed")

#: Headline metrics, in table order, with their display names.
METRIC_NAMES: dict[str, str] = {
    "efficacy": "Efficacy (token acc.)",
    "generalization": "Generalization (token acc.)",
    "specificity": "Specificity (token acc.)",
    "efficacy_exact": "Efficacy (generation exact match)",
    "generalization_exact": "Generalization (generation exact match)",
    "specificity_exact": "Specificity (generation exact match)",
    "locality_vs_unedited": "Locality vs unedited model's predictions",
    "retention": "Retention (locality tokens the unedited model got right, still right)",
    "personas": "Personas (token acc.)",
    "personas_exact": "Personas (generation exact match)",
    "multi_hop": "Multi-hop (token acc.)",
    "multi_hop_exact": "Multi-hop (generation exact match)",
}

#: The paper's reported results (arXiv 2505.14679, as cited on the method page), for comparison:
#: ``(dataset, model name fragment, edits, (efficacy, generalization, specificity) in %)``.
PAPER_RESULTS: tuple[tuple[str, str, int, tuple[float, float, float]], ...] = (
    ("zsre", "llama-3-8b", 20_000, (90.07, 87.36, 49.51)),
    ("ultraeditbench", "llama-3-8b", 2_000_000, (83.45, 79.11, 78.05)),
    ("ultraeditbench", "mistral-7b", 2_000_000, (81.70, 77.25, 77.09)),
    ("ultraeditbench", "gpt-j-6b", 2_000_000, (81.65, 76.80, 76.44)),
    ("ultraeditbench", "qwen2.5-7b", 2_000_000, (80.70, 75.78, 76.01)),
)


def paper_reference(dataset: str, model_name: str) -> dict[str, Any] | None:
    """The paper's numbers for this dataset and model (matched on the model's name), or ``None``."""
    name = model_name.lower()
    for data, fragment, edits, (es, gs, ls) in PAPER_RESULTS:
        if data == dataset and fragment in name:
            return {"source": "arXiv 2505.14679", "edits": edits, "efficacy": es / 100,
                    "generalization": gs / 100, "specificity": ls / 100}
    return None


class BenchError(ValueError):
    """A benchmark cannot run as configured (bad option, too little data, missing testbed)."""


@dataclass
class BenchConfig:
    """One benchmark run (the command line's options).

    Attributes:
        model: Hugging Face model name or local path, or ``"testbed"`` (a label when ``run`` gets a
            model object).
        dataset: one of :data:`DATASETS` (the record format of ``data``).
        data: the dataset file (not needed for ``dataset="testbed"`` or when ``run`` gets requests).
        out: output directory.
        turns: T, the number of turns.
        turn_size: N, requests per turn (paper: 100).
        batch_size: requests per minibatch inside a turn (paper: 10).
        lr, modules, preset: editor hyperparameters (``None``: the method's defaults).
        eval_every: also evaluate after every K-th turn (``None``: only at the end).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: dtype to load the model in (``"auto"``: as stored, float32 for the testbed).
        seed: seeds Python's and torch's generators and FEVER's rephrase choice.
        method: a key of :data:`METHODS`.
        skip_invalid: skip malformed records (written to ``out/rejects.jsonl``) instead of failing.
        eval_batch_size, eval_max_tokens: evaluation forward size, in sequences and padded tokens.
        forward_batch_size: UltraEdit's forward/backward size in requests (speed knob only).
        progress: show progress bars (stderr).
        faithful: run the authors' exact method (their lr unless ``lr`` is given, the family
            preset, no options beyond the paper) instead of ``EditConfig.recommended(model)``.
        refine_steps, preserve, preserve_text, lr_scale, memory, confidence, neighbours, neighbour_weight, prefixes,
            paraphrases, subject_keys, subject_depth, key_outliers, subject_steps, subject_optimise, subject_clamp,
            subject_kl, subject_contexts, subject_stop, preserve_base, subject_preserve: override those
            :class:`EditConfig` options (``None``: the configuration's own).
        method_options: a baseline's hyperparameters by name (``--method-option KEY=VALUE``).
    """

    model: str
    dataset: str
    out: str
    turns: int
    turn_size: int = 100
    batch_size: int = 10
    data: str | None = None
    lr: float | None = None
    modules: list[str] | None = None
    preset: str | None = None
    eval_every: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    method: str = "ultraedit"
    skip_invalid: bool = False
    eval_batch_size: int = 64
    eval_max_tokens: int | None = 16384
    forward_batch_size: int | None = 100
    progress: bool = True
    faithful: bool = False
    refine_steps: int | None = None
    preserve: float | None = None
    preserve_text: str | None = None
    lr_scale: str | None = None
    memory: float | None = None
    confidence: float | None = None
    neighbours: int | None = None
    neighbour_weight: float | None = None
    prefixes: int | None = None
    paraphrases: int | None = None
    subject_keys: float | None = None
    subject_depth: float | None = None
    key_outliers: float | None = None
    subject_steps: int | None = None
    subject_optimise: int | None = None
    subject_clamp: float | None = None
    subject_kl: float | None = None
    subject_contexts: int | None = None
    subject_stop: str | None = None
    preserve_base: float | None = None
    subject_preserve: float | None = None
    method_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise BenchError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name in ("turns", "turn_size", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BenchError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_max_tokens", "forward_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise BenchError(f"{name} must be a positive integer or None, got {value!r}")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise BenchError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise BenchError(f"lr must be a positive finite number, got {self.lr}")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.method not in METHODS:
            raise BenchError(f"unknown method {self.method!r}; registered: {', '.join(sorted(METHODS))}")

    @property
    def edits(self) -> int:
        return self.turns * self.turn_size


# --------------------------------------------------------------------------- methods
class EditMethod(Protocol):
    """What the runner needs from an editing method (UltraEdit, or a baseline plug-in)."""

    def edit(self, requests: Sequence[EditRequest]) -> Any:
        """Apply one turn of requests to the model in place; may return a report with ``loss``."""

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable hyperparameters, including ``"modules"`` (the weights it changes)."""


MethodFactory = Callable[[nn.Module, Any, BenchConfig], EditMethod]


def edit_fields(
    model: str, *, modules: Sequence[str] | None = None, preset: str | None = None, lr: float | None = None
) -> dict[str, Any]:
    """:class:`EditConfig` fields from options given explicitly (``None`` = not given). For
    ``model == "testbed"`` the testbed's recommended modules and step size
    (``ultraedit.testbed.TESTBED_CONFIG``) fill what was not given."""
    kw: dict[str, Any] = {"modules": list(modules) if modules is not None else None, "preset": preset}
    if lr is not None:
        kw["lr"] = lr
    if model == "testbed":
        recommended = getattr(_testbed(), "TESTBED_CONFIG", None)
        if recommended is not None:
            if modules is None and preset is None:
                kw["modules"] = list(recommended.modules)
            if lr is None:
                kw["lr"] = recommended.lr
    return kw


def configuration_name(config: BenchConfig) -> str:
    """Which UltraEdit configuration a run uses: ``"faithful"`` (the authors' method),
    ``"testbed"`` (the testbed's own, ``ultraedit.testbed.TESTBED_CONFIG``) or ``"recommended"``
    (:meth:`EditConfig.recommended` for the model)."""
    if config.faithful:
        return "faithful"
    return "testbed" if config.model == "testbed" else "recommended"


def edit_config(
    model: nn.Module,
    spec: str,
    *,
    faithful: bool = False,
    modules: Sequence[str] | None = None,
    preset: str | None = None,
    lr: float | None = None,
    **options: Any,
) -> EditConfig:
    """The :class:`EditConfig` for editing ``model`` (loaded from ``spec``) with the options given
    explicitly (``None`` = not given) on top of its configuration: the authors' method with
    ``faithful``, the testbed's own for ``spec == "testbed"``, else :meth:`EditConfig.recommended`.
    ``edit``, ``serve`` and ``bench`` all configure a new editor through this."""
    if faithful or spec == "testbed":
        kw = edit_fields("testbed" if spec == "testbed" and not faithful else spec,
                         modules=modules, preset=preset, lr=lr)
    else:
        kw = EditConfig.recommended(model).to_dict()
        if modules is not None or preset is not None:
            kw.update(modules=list(modules) if modules is not None else None, preset=preset)
        if lr is not None:
            kw["lr"] = lr
    kw.update({name: value for name, value in options.items() if value is not None})
    return EditConfig(**kw)


#: The :class:`EditConfig` options a bench run may override (``BenchConfig`` fields and ``--flags`` of the same names).
EDIT_OPTIONS = ("refine_steps", "preserve", "preserve_text", "lr_scale", "memory", "confidence", "neighbours",
                "neighbour_weight", "prefixes", "paraphrases", "subject_keys", "subject_depth", "key_outliers",
                "subject_steps", "subject_optimise", "subject_clamp", "subject_kl", "subject_contexts", "subject_stop",
                "preserve_base", "subject_preserve")


def bench_edit_config(model: nn.Module, config: BenchConfig) -> EditConfig:
    """The :class:`EditConfig` of a run: its configuration (:func:`configuration_name`) with the
    options given explicitly on top."""
    chosen = edit_config(
        model, config.model, faithful=config.faithful, modules=config.modules, preset=config.preset, lr=config.lr,
        **{name: getattr(config, name) for name in EDIT_OPTIONS},
    )
    return replace(chosen, capture_batch_size=config.batch_size, forward_batch_size=config.forward_batch_size)


class UltraEditMethod:
    """UltraEdit (:class:`UltraEditor`) behind the :class:`EditMethod` interface."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: BenchConfig) -> None:
        if config.method_options:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in EDIT_OPTIONS)
            raise BenchError(f"ultraedit takes no --method-option; use --lr, --modules, --preset, --faithful or {flags}")
        self.configuration = configuration_name(config)
        self.config = bench_edit_config(model, config)
        self.editor = UltraEditor(model, self.config, tokenizer=tokenizer)

    def edit(self, requests: Sequence[EditRequest]) -> Any:
        return self.editor.edit(requests)

    def describe(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "modules": list(self.editor.modules), "configuration": self.configuration}


#: Registered editing methods: name -> factory ``(model, tokenizer, config) -> EditMethod``.
METHODS: dict[str, MethodFactory] = {"ultraedit": UltraEditMethod}


def register_method(name: str, factory: MethodFactory) -> None:
    """Make ``--method name`` available (e.g. fine-tuning, MEMIT or AlphaEdit baselines)."""
    if not name or not isinstance(name, str):
        raise ValueError("a method needs a non-empty name")
    METHODS[name] = factory


# --------------------------------------------------------------------------- model and data
def _testbed() -> Any:
    try:
        from . import testbed
    except ImportError as err:
        if err.name in ("ultraedit.testbed", __package__ + ".testbed"):
            raise BenchError("the built-in testbed (ultraedit.testbed) is not part of this installation") from None
        raise
    for attr in ("load_testbed", "requests_path"):
        if not hasattr(testbed, attr):
            raise BenchError(f"ultraedit.testbed has no {attr}(); this installation's testbed is incomplete")
    return testbed


class _Source:
    """The benchmark's requests, re-readable: each pass re-streams the file (memory flat in its size)."""

    def __init__(self, config: BenchConfig, requests: Sequence[EditRequest] | None, out: Path) -> None:
        self.requests = requests
        if requests is not None:
            self.path: Path | None = None
            self.format = "given"
        elif config.dataset == "testbed":
            self.path = Path(_testbed().requests_path())
            self.format = "jsonl"
        else:
            self.path = Path(config.data or "")
            self.format = config.dataset
        self.skip_invalid = config.skip_invalid
        self.seed = config.seed
        self.rejects = out / "rejects.jsonl"
        self.skipped = 0
        self.read = 0

    def take(self, count: int, *, record: bool = False) -> Iterator[EditRequest]:
        """The first ``count`` requests (fewer if the data ends); ``record`` keeps skip counts/rejects."""
        if self.requests is not None:
            yield from islice(self.requests, count)
            return
        assert self.path is not None
        reader = read_requests(
            self.path, self.format, skip_invalid=self.skip_invalid,
            rejects=self.rejects if (record and self.skip_invalid) else None, seed=self.seed,
        )
        with reader:
            yield from islice(reader, count)
            if record:
                self.skipped, self.read = reader.skipped, reader.read

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format, "path": str(self.path) if self.path else None,
            "records_read": self.read, "skipped_invalid": self.skipped,
        }


def _chunks(items: Iterator[EditRequest], size: int) -> Iterator[list[EditRequest]]:
    while True:
        chunk = list(islice(items, size))
        if not chunk:
            return
        yield chunk


class _Predictions:
    """The unedited model's locality predictions, packed in flat integer arrays (about 8 bytes per
    answer token), so that a 2M-request run does not hold millions of Python tuples."""

    def __init__(self) -> None:
        self.tokens = array("q")
        self.pair_lengths = array("q")
        self.pairs_per_request = array("q")
        self._pair_start = array("q", [0])
        self._request_start = array("q", [0])

    def extend(self, per_request: Sequence[Sequence[Sequence[int]]]) -> None:
        for pairs in per_request:
            self.pairs_per_request.append(len(pairs))
            for tokens in pairs:
                self.tokens.extend(tokens)
                self.pair_lengths.append(len(tokens))
                self._pair_start.append(self._pair_start[-1] + len(tokens))
            self._request_start.append(self._request_start[-1] + len(pairs))

    def __len__(self) -> int:
        return len(self.pairs_per_request)

    def get(self, start: int, stop: int) -> list[tuple[tuple[int, ...], ...]]:
        out = []
        for r in range(start, stop):
            a, b = self._request_start[r], self._request_start[r + 1]
            out.append(tuple(tuple(self.tokens[self._pair_start[p] : self._pair_start[p + 1]]) for p in range(a, b)))
        return out


# --------------------------------------------------------------------------- fingerprint and memory
def model_fingerprint(model: nn.Module, modules: Sequence[str], name: str) -> dict[str, Any]:
    """Identity of the benchmarked model: name, class, type, parameter count, dtype, and a SHA-256
    of the edit modules' weights before editing (``ultraedit.state.fingerprint`` when available)."""
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    base: dict[str, Any] = {
        "name_or_path": name,
        "class": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "num_parameters": params,
        "dtype": str(first.dtype).removeprefix("torch."),
        "edit_modules": list(modules),
    }
    try:
        from .state import fingerprint as state_fingerprint
    except ImportError:
        state_fingerprint = None
    if state_fingerprint is not None:
        fp = state_fingerprint(model, list(modules))
        base["weights_sha256"] = fp["weights_sha256"]
        return base
    import hashlib

    digest = hashlib.sha256()
    for name_ in modules:
        w = model.get_submodule(name_).weight.detach().to("cpu").contiguous()
        digest.update(f"{name_}|{w.dtype}|{list(w.shape)}|".encode())
        digest.update(memoryview(w.reshape(-1).view(torch.uint8).numpy()))
    base["weights_sha256"] = digest.hexdigest()
    return base


def _peak_memory(device: torch.device) -> dict[str, Any]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KB, macOS bytes
    out: dict[str, Any] = {"peak_rss_bytes": rss_bytes}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["kind"] = "cuda_max_allocated"
        out["bytes"] = out["cuda_max_allocated_bytes"]
    else:
        out["kind"] = "rss"
        out["bytes"] = rss_bytes
    return out


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy comes with torch/matplotlib
        pass


# --------------------------------------------------------------------------- the run
def run(
    config: BenchConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    requests: Sequence[EditRequest] | None = None,
) -> dict[str, Any]:
    """Run one lifelong benchmark and write ``results.json``, ``results.md`` and ``curve.png``.

    Args:
        config: the run; ``config.model`` is only a label when ``model`` is given.
        model, tokenizer: an already loaded model (edited in place!) and its tokenizer.
        requests: requests to use instead of reading ``config.data``.

    Returns:
        the results dict written to ``results.json``.

    Raises:
        BenchError, DatasetError, EditError: with a message naming what is wrong.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if requests is None and config.dataset != "testbed" and not config.data:
        raise BenchError(f"--dataset {config.dataset} needs --data FILE")
    if requests is not None and not isinstance(requests, abc.Sequence):
        requests = list(requests)  # read more than once (unedited scores, editing, evaluation)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _seed(config.seed)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict[str, float] = {}
    source = _Source(config, requests, out)
    _check_count(source, config)  # before the (slow) model load

    t = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(config.model, device, config.dtype)
    elif tokenizer is None:
        raise BenchError("run(model=...) needs the model's tokenizer too")
    else:
        model = model.to(device).eval()
    timings["load_seconds"] = time.perf_counter() - t
    ppl_text = package_text(PERPLEXITY_TEXT)
    ppl_before = perplexity(model, tokenizer, ppl_text)

    method = METHODS[config.method](model, tokenizer, config)
    description = method.describe()
    fingerprint = model_fingerprint(model, description.get("modules") or [], config.model)
    eval_kw = dict(batch_size=config.eval_batch_size, max_tokens=config.eval_max_tokens)
    chunk = max(config.eval_batch_size * 16, config.turn_size)

    # 1. The unedited model on every request of the run: its scores and reference predictions.
    t = time.perf_counter()
    reference = _Predictions()
    unedited = MetricTotals()
    total = 0
    bar = _bar(config.progress, config.edits, "unedited model", "req")
    for requests_ in _chunks(source.take(config.edits, record=True), chunk):
        scores = score_requests(model, tokenizer, requests_, **eval_kw)
        unedited.add(scores)
        reference.extend(scores.locality_predictions)
        total += len(requests_)
        bar.update(len(requests_))
    bar.close()
    timings["unedited_eval_seconds"] = time.perf_counter() - t
    if total < config.edits:  # the file changed since the count check
        raise _too_few(source, config, total)

    # 2. The lifelong sequence, with curve evaluations every eval_every turns.
    per_turn: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    edit_seconds = 0.0
    curve_seconds = 0.0
    stream = source.take(config.edits)
    bar = _bar(config.progress, config.turns, f"editing ({config.method})", "turn")
    for turn in range(1, config.turns + 1):
        batch = list(islice(stream, config.turn_size))
        t = time.perf_counter()
        report = method.edit(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
        edit_seconds += seconds
        entry: dict[str, Any] = {"turn": turn, "requests": len(batch), "seconds": seconds}
        loss = getattr(report, "loss", None)
        if isinstance(loss, (int, float)):
            entry["loss"] = float(loss)
        per_turn.append(entry)
        bar.update(1)
        if config.eval_every and turn % config.eval_every == 0 and turn != config.turns:
            t = time.perf_counter()
            point = _evaluate(model, tokenizer, source, reference, turn * config.turn_size, chunk, eval_kw, False)
            curve.append({"turns": turn, "edits": turn * config.turn_size, **point.means()})
            curve_seconds += time.perf_counter() - t
    bar.close()
    stream.close()

    # 3. Every request ever edited, after the whole sequence.
    t = time.perf_counter()
    final = _evaluate(model, tokenizer, source, reference, config.edits, chunk, eval_kw, config.progress)
    timings["final_eval_seconds"] = time.perf_counter() - t
    ppl_after = perplexity(model, tokenizer, ppl_text)
    metrics = final.means()
    curve.append({"turns": config.turns, "edits": config.edits, **metrics})
    timings["edit_seconds"] = edit_seconds
    timings["curve_eval_seconds"] = curve_seconds
    timings["total_seconds"] = time.perf_counter() - started

    results: dict[str, Any] = {
        "efficacy": metrics.get("efficacy"),
        "generalization": metrics.get("generalization"),
        "specificity": metrics.get("specificity"),
        "metrics": metrics,
        "counts": final.counts,
        "unedited": unedited.means(),
        "perplexity": {"text": f"ultraedit/data/{PERPLEXITY_TEXT}", "before": ppl_before, "after": ppl_after,
                       "rise": ppl_after / ppl_before - 1},
        "paper": paper_reference(config.dataset, config.model),
        "curve": curve,
        "edits": config.edits,
        "edits_per_second": config.edits / edit_seconds if edit_seconds > 0 else None,
        "seconds_per_edit": edit_seconds / config.edits,
        "timings": timings,
        "peak_memory": _peak_memory(device),
        "config": {**asdict(config), "device": str(device)},
        "method": {"name": config.method, **description},
        "dataset": source.describe(),
        "model": fingerprint,
        "turn_log": per_turn,
        "environment": _environment(),
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot_curve(results, out / "curve.png")
    return results


def _check_count(source: _Source, config: BenchConfig) -> None:
    """Refuse a run asking for more requests than the data holds (reads records, loads no model)."""
    available = sum(1 for _ in source.take(config.edits, record=True))
    if available < config.edits:
        raise _too_few(source, config, available)


def _too_few(source: _Source, config: BenchConfig, available: int) -> BenchError:
    where = f"{source.path}" if source.path else "the given requests"
    skipped = f" (after skipping {source.skipped} invalid records)" if source.skipped else ""
    return BenchError(
        f"{where} provides {available} requests{skipped}; --turns {config.turns} x --turn-size "
        f"{config.turn_size} needs {config.edits}"
    )


def _evaluate(
    model: nn.Module, tokenizer: Any, source: _Source, reference: _Predictions, count: int,
    chunk: int, eval_kw: dict[str, Any], progress: bool,
) -> MetricTotals:
    totals = MetricTotals()
    done = 0
    bar = _bar(progress, count, "evaluating", "req")
    for requests_ in _chunks(source.take(count), chunk):
        ref = reference.get(done, done + len(requests_))
        totals.add(score_requests(model, tokenizer, requests_, reference=ref, **eval_kw))
        done += len(requests_)
        bar.update(len(requests_))
    bar.close()
    return totals


def _bar(enabled: bool, total: int, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=not enabled)


def _environment() -> dict[str, Any]:
    import transformers

    from . import __version__

    env = {
        "ultraedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# --------------------------------------------------------------------------- reports
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The ``results.md`` report: setup, a metrics table (unedited vs edited), timing, the curve."""
    cfg = results["config"]
    timings = results["timings"]
    lines = [
        f"# Lifelong editing benchmark: {cfg['method']} on {cfg['dataset']}",
        "",
        f"- Model: `{results['model']['name_or_path']}` ({results['model']['class']}, "
        f"{results['model']['num_parameters']:,} parameters, {results['model']['dtype']}, "
        f"{len(results['model']['edit_modules'])} edit modules)",
        f"- Protocol: {cfg['turns']} turn{'s' if cfg['turns'] != 1 else ''} x {cfg['turn_size']} requests = "
        f"{results['edits']:,} edits "
        f"(minibatch {cfg['batch_size']}), then every edited request evaluated",
        f"- Method: `{results['method']['name']}` ({results['method'].get('configuration', 'n/a')} configuration), "
        f"lr {results['method'].get('lr', 'n/a')}, seed {cfg['seed']}, device {cfg['device']}",
        f"- Data: `{results['dataset']['path'] or results['dataset']['format']}` "
        f"({results['dataset']['skipped_invalid']} invalid records skipped)",
        "",
        "| Metric (%) | Unedited | After all edits |",
        "|---|---:|---:|",
    ]
    for key, label in METRIC_NAMES.items():
        if key in results["metrics"] or key in results["unedited"]:
            lines.append(f"| {label} | {_pct(results['unedited'].get(key))} | {_pct(results['metrics'].get(key))} |")
    paper = results.get("paper")
    if paper:
        lines += [
            "",
            f"The paper ({paper['source']}) reports, for this model family and dataset after {paper['edits']:,} edits: "
            f"Efficacy {_pct(paper['efficacy'])}, Generalization {_pct(paper['generalization'])}, "
            f"Specificity {_pct(paper['specificity'])}.",
        ]
    ppl = results.get("perplexity")
    if ppl:
        lines += ["", f"Perplexity on the held-out text (`{ppl['text']}`): {ppl['before']:.3f} before, "
                      f"{ppl['after']:.3f} after editing ({100 * ppl['rise']:+.2f}%)."]
    eps = results["edits_per_second"]
    lines += [
        "",
        f"Editing took {timings['edit_seconds']:.2f} s ({'n/a' if eps is None else f'{eps:.2f}'} edits/s, "
        f"{results['seconds_per_edit']:.4f} s/edit); final evaluation {timings['final_eval_seconds']:.2f} s; "
        f"peak memory {results['peak_memory']['bytes'] / 2**20:.0f} MiB ({results['peak_memory']['kind']}).",
    ]
    if len(results["curve"]) > 1:
        lines += ["", "## Curve", "", "| Turns | Edits | Efficacy | Generalization | Specificity |", "|---:|---:|---:|---:|---:|"]
        for p in results["curve"]:
            lines.append(
                f"| {p['turns']} | {p['edits']} | {_pct(p.get('efficacy'))} | {_pct(p.get('generalization'))} | "
                f"{_pct(p.get('specificity'))} |"
            )
    return "\n".join(lines) + "\n"


def plot_curve(results: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """PNG of efficacy, generalization and specificity (%) against the number of edits; dashed
    lines are the unedited model's scores on the same requests."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    edits = [p["edits"] for p in results["curve"]]
    for key, color in (("efficacy", "tab:blue"), ("generalization", "tab:orange"), ("specificity", "tab:green")):
        values = [p.get(key) for p in results["curve"]]
        if all(v is None for v in values):
            continue
        ax.plot(edits, [math.nan if v is None else 100 * v for v in values], marker="o", color=color, label=key.capitalize())
        base = results["unedited"].get(key)
        if base is not None:
            ax.axhline(100 * base, color=color, linestyle="--", linewidth=0.8, alpha=0.7)
    ax.set_xlabel("number of edits")
    ax.set_ylabel("token accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_xlim(0, max(edits) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", title="dashed: unedited", title_fontsize="x-small")
    ax.set_title(f"{results['method']['name']} on {results['config']['dataset']}: {results['model']['name_or_path']}",
                 fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


from . import methods as _methods  # noqa: E402,F401  (registers the baselines: ft, memit, alphaedit, grace)
