"""The lifelong editing benchmark: ``ultraedit bench`` and :func:`run`.

Protocol (the paper's): the first ``turns * turn_size`` requests of a dataset are edited in
``turns`` turns of ``turn_size`` requests (minibatches of ``batch_size``), one turn after another
on the same model; after the whole sequence, every request ever edited is evaluated. With
``eval_every=K`` the requests edited so far are also evaluated after every K-th turn (a curve).
Before editing, the unedited model is scored on the same requests (the ``unedited`` columns and
the reference predictions of "locality vs unedited").

Metrics (``evaluation``): token-level teacher-forced accuracy for efficacy (edit prompts, new
targets), generalization (rephrases, new targets) and specificity (locality prompts with the
dataset's answers), averaged per request then over requests; whether every answer token is right,
and the agreement of locality predictions with the unedited model's. Beside them, by default, what
the model says (:mod:`ultraedit.generation`): greedy answers in each context (``plain``, and
``chat`` where the model has a chat template), before editing and after the whole sequence,
matched to the targets, and the locality prompts' answers compared with the unedited model's.

Outputs in ``out``: ``results.json`` (top-level ``efficacy``, ``generalization``,
``specificity`` in [0, 1] (teacher forced), ``generation`` (per context), and the config, model fingerprint, all metrics, the curve, timings,
peak memory and edits/s), ``results.md`` (tables) and ``curve.png`` (metrics vs edits).

Editing methods are plug-ins (:data:`ultraedit.methods.METHODS`, :func:`ultraedit.methods.register_method`):
a factory gets the model, the tokenizer and the :class:`BenchConfig` and returns an object with
``edit(requests)`` (apply one turn) and ``describe()`` (its hyperparameters, for the results).
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import resource
import sys
import time
from array import array
from collections import abc
from dataclasses import asdict
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .. import testbed
from ..core.batching import EditRequest
from ..datasets import read_requests
from ..contexts import check_contexts, default_contexts
from ..evaluation import MetricTotals, perplexity, score_requests
from ..cache import cache_dir, cached_json, model_hash
from ..generation import (MAX_NEW_TOKENS, GenerationTotals, evaluate_generation, generate_answers, request_prompts,
                          score_generations)
from ..methods import METHODS
from ..models import load_model, resolve_device
from ..session import fingerprint as state_fingerprint
from ..texts import package_text
from .config import BenchConfig, BenchError, paper_reference
from .report import markdown, plot_curve

#: Requests whose generations (edit prompt, rephrases, locality prompts) are kept in the results.
EXAMPLES = 10

#: The held-out text whose perplexity is reported before and after editing (ships with the package).
PERPLEXITY_TEXT = "heldout.txt"

# --------------------------------------------------------------------------- model and data
class _Source:
    """The benchmark's requests, re-readable: each pass re-streams the file (memory flat in its size)."""

    def __init__(self, config: BenchConfig, requests: Sequence[EditRequest] | None, out: Path) -> None:
        self.requests = requests
        if requests is not None:
            self.path: Path | None = None
            self.format = "given"
        elif config.dataset == "testbed":
            self.path = Path(testbed.requests_path())
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
    of the edit modules' weights before editing (:func:`ultraedit.session.fingerprint`)."""
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
    base["weights_sha256"] = state_fingerprint(model, list(modules))["weights_sha256"]
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
    said = _Said(config, tokenizer)

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
        said.before(model, tokenizer, requests_)
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
        guard = (getattr(report, "stages", None) or {}).get("guard")
        if guard is not None:  # the damage guard's verdict: the scale committed, what it measured
            entry["guard"] = guard
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
    t = time.perf_counter()
    for index, requests_ in enumerate(_chunks(source.take(config.edits), chunk)):
        said.after(model, tokenizer, requests_, index)
    timings["generation_eval_seconds"] = time.perf_counter() - t + said.seconds_before
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
        **said.results(),
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


class _Said:
    """Generation-based scores (:mod:`ultraedit.generation`): the unedited model's answers (kept as
    the locality reference) and the edited model's, per context."""

    def __init__(self, config: BenchConfig, tokenizer: Any) -> None:
        self.on = config.generation
        self.contexts = check_contexts(config.contexts or default_contexts(tokenizer), tokenizer) if self.on else []
        self.batch_size = config.eval_batch_size
        self.judge = None
        if config.judge:
            from ..judge import Judge

            self.judge = Judge(config.judge)
        self.unedited = {c: GenerationTotals(c) for c in self.contexts}
        self.edited = {c: GenerationTotals(c) for c in self.contexts}
        self.reference: list[dict[str, list[str]]] = []  # per chunk of requests, per context
        self.examples: dict[str, list[dict[str, Any]]] = {c: [] for c in self.contexts}
        self.model_key: str | None = None
        self.seconds_before = 0.0

    def before(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> None:
        """Score the unedited model on a chunk of requests and keep its answers (read from the cache
        when this model was asked these prompts before: they depend on nothing else)."""
        if not self.on:
            return
        t = time.perf_counter()
        if self.judge is not None:
            totals, texts = evaluate_generation(model, tokenizer, requests, self.contexts, batch_size=self.batch_size,
                                                judge=self.judge)
        else:
            texts = {c: self._unedited_answers(model, tokenizer, requests, c) for c in self.contexts}
            totals = {c: GenerationTotals(c) for c in self.contexts}
            for c in self.contexts:
                score_generations(totals[c], requests, texts[c])
        for c in self.contexts:
            self.unedited[c].merge(totals[c])
        self.reference.append(texts)
        self.seconds_before += time.perf_counter() - t

    def _unedited_answers(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], context: str) -> list[str]:
        prompts, _ = request_prompts(requests)
        if self.model_key is None:
            self.model_key = model_hash(model)
        key = hashlib.sha256(json.dumps([self.model_key, context, getattr(tokenizer, "chat_template", None),
                                         MAX_NEW_TOKENS, prompts]).encode()).hexdigest()
        return cached_json(cache_dir() / "generations" / f"{key}.json",
                           lambda: generate_answers(model, tokenizer, prompts, context, batch_size=self.batch_size))

    def after(self, model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], chunk: int) -> None:
        """Score the edited model on the ``chunk``-th chunk of requests (the same chunks as :meth:`before`)."""
        if not self.on:
            return
        totals, texts = evaluate_generation(model, tokenizer, requests, self.contexts, reference=self.reference[chunk],
                                            batch_size=self.batch_size, judge=self.judge)
        prompts, spans = request_prompts(requests)
        wanted = [requests[k // 3].target if group != "locality" else None
                  for k, (group, a, b) in enumerate(spans) for _ in range(a, b)]
        for c in self.contexts:
            self.edited[c].merge(totals[c])
            for i in range(min(len(prompts), 3 * EXAMPLES - len(self.examples[c]))):
                self.examples[c].append({"prompt": prompts[i], "wanted": wanted[i],
                                         "before": self.reference[chunk][c][i], "after": texts[c][i]})

    def results(self) -> dict[str, Any]:
        if not self.on:
            return {}
        settings: dict[str, Any] = {
            "contexts": self.contexts, "decoding": "greedy", "max_new_tokens": MAX_NEW_TOKENS,
            "stop": "first sentence end (. ! ? then a space), newline, end of sequence or turn",
            "normalisation": "lower case, punctuation and articles removed, spaces collapsed",
            "headline": {c: GenerationTotals(c).as_dict()["rule"] for c in self.contexts},
        }
        if self.judge is not None:
            settings["judge"] = self.judge.describe()
        return {"generation": {c: t.as_dict() for c, t in self.edited.items()},
                "generation_examples": self.examples,
                "generation_unedited": {c: t.as_dict() for c, t in self.unedited.items()},
                "generation_settings": settings}


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

    from .. import __version__

    env = {
        "ultraedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


