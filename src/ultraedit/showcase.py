"""What the demo shows: a few requests before and after (greedy answers), and the teacher-forced
efficacy, generalization and locality of a set of requests."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .core.batching import EditRequest
from .evaluation import teacher_forced
from .generation import match


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
    """The before/after table of greedy answers; a row is ``ok`` when the answer after editing starts with
    the wanted one (the first-span rule of :mod:`ultraedit.generation`)."""
    width = max((len(p) for _, p, _ in rows), default=10)
    out(f"{'':10s} {'question':{width}s}  {'before':>22s} -> {'after':22s} (wanted)")
    for (kind, prompt, wanted), a, b in zip(rows, before, after):
        mark = "ok" if match(b, wanted, "first_span") else "--"
        out(f"{kind:10s} {prompt:{width}s}  {short(a):>22s} -> {short(b):22s} ({wanted}) {mark}")


def generation_lines(after: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """The demo's lines on what the model says, one block per context."""
    lines = []
    for context, now in after.items():
        was = before[context]
        rule = "the target starts the answer" if now["rule"] == "first_span" else "the target is in the reply"
        lines.append(f"By greedy generation, asked {'through the chat template' if context == 'chat' else context} "
                     f"({rule}; exact match in brackets):")
        for key, label in (("efficacy", "Efficacy (ES)      "), ("generalization", "Generalization (GS)")):
            lines.append(f"  {label} {_fmt(now[key])}   (exact {_fmt(now['exact'][key])}; before editing "
                         f"{_fmt(was[key])})")
        lines.append(f"  Locality           {_fmt(now['locality_unchanged'])}   (untouched facts generated as "
                     f"before; still right {_fmt(now['locality_kept'])})")
    return lines


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def short(text: str, limit: int = 22) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def score(model: Any, tokenizer: Any, requests: Sequence[EditRequest], batch_size: int = 64,
          known: Sequence[int] | None = None) -> dict[str, Any]:
    """Mean teacher-forced token accuracy of the edits, their rephrasings and the (distinct) locality
    pairs (all scored in one batched pass), and ``known``: the locality pairs answered right (every
    token the argmax). Given the unedited model's ``known``, also ``retention``: the share of those
    still answered right."""
    groups = {
        "efficacy": [(r.prompt, r.target) for r in requests],
        "generalization": [(p, r.target) for r in requests for p in r.rephrases],
        "locality": list(dict.fromkeys(pair for r in requests for pair in r.locality)),
    }
    pairs = [pair for group in groups.values() for pair in group]
    scored = teacher_forced(model, tokenizer, pairs, batch_size=batch_size) if pairs else None
    accuracy, exact = (scored.accuracy, scored.exact) if scored else ([], [])
    out: dict[str, Any] = {}
    start = 0
    for name, group in groups.items():
        out[name] = mean(accuracy[start : start + len(group)])
        start += len(group)
    right = exact[len(pairs) - len(groups["locality"]):]
    out["known"] = [i for i, r in enumerate(right) if r == 1.0]
    if known is not None:
        out["retention"] = sum(right[i] == 1.0 for i in known) / len(known) if known else 1.0
    return out
