"""``ultraedit demo``: lifelong editing of the shipped testbed model, before and after.

Loads the testbed model, shows what it answers (greedy generation) to a few edit prompts, their
held-out rephrasings and untouched neighbours, applies a few hundred edits in lifelong turns,
shows the same questions again and prints Efficacy / Generalization / Specificity (teacher-forced
token accuracy, the authors' metrics, scored once after the whole sequence).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..batching import EditRequest
from ..editor import EditConfig, UltraEditor
from ..demo import pick, print_answers, questions
from ..evaluation import complete, score_pairs

__all__ = ["edit_and_score", "run_demo"]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def edit_and_score(
    model: Any,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    config: EditConfig,
    turn_size: int = 100,
    progress: bool = True,
    eval_batch_size: int = 256,
    on_turn: Callable[[int, Any], None] | None = None,
) -> dict[str, Any]:
    """Edit ``requests`` in lifelong turns of ``turn_size``, then score them all (the paper's protocol).

    Efficacy: (prompt, target); Generalization: every (rephrase, target); Specificity: every
    locality (prompt, answer), also split into ``neighbor`` (the first probe: same relation, same
    true answer as the edited fact) and ``other`` (the rest). Locality is scored before editing
    too, so ``specificity_relative`` = after / before (the issue's "of the unedited model's own
    score"). Scores are teacher-forced token accuracies in [0, 1].

    Returns:
        A dict of scores (``efficacy``, ``generalization``, ``specificity``, ``..._before``,
        ``specificity_relative``, ``neighbor``/``other`` parts), counts and seconds.
    """
    from tqdm.auto import tqdm

    if turn_size < 1:
        raise ValueError(f"turn_size must be >= 1, got {turn_size}")
    if not requests:
        raise ValueError("edit_and_score needs at least one request")
    edit_pairs = [(r.prompt, r.target) for r in requests]
    rephrase_pairs = [(p, r.target) for r in requests for p in r.rephrases]
    neighbor_pairs = [r.locality[0] for r in requests if r.locality]
    other_pairs = [pair for r in requests for pair in r.locality[1:]]

    def score(pairs: list[tuple[str, str]]) -> list[float]:
        return score_pairs(model, tokenizer, pairs, batch_size=eval_batch_size)["accuracy"] if pairs else []

    t0 = time.perf_counter()
    before = {
        "efficacy": _mean(score(edit_pairs)),
        "generalization": _mean(score(rephrase_pairs)),
        "neighbor": score(neighbor_pairs),
        "other": score(other_pairs),
    }
    editor = UltraEditor(model, config, tokenizer=tokenizer)
    turns = [requests[i : i + turn_size] for i in range(0, len(requests), turn_size)]
    t1 = time.perf_counter()
    bar = tqdm(turns, desc=f"editing ({len(requests)} edits, turns of {turn_size})", unit="turn", disable=not progress)
    for turn in bar:
        report = editor.edit(turn)
        bar.set_postfix(loss=f"{report.loss:.2f}")
        if on_turn is not None:
            on_turn(editor.turns, report)
    t2 = time.perf_counter()
    neighbor, other = score(neighbor_pairs), score(other_pairs)
    efficacy, generalization = _mean(score(edit_pairs)), _mean(score(rephrase_pairs))
    t3 = time.perf_counter()
    loc_before = _mean(before["neighbor"] + before["other"])
    loc_after = _mean(neighbor + other)
    return {
        "edits": len(requests),
        "turns": len(turns),
        "turn_size": turn_size,
        "efficacy": efficacy,
        "generalization": generalization,
        "specificity": loc_after,
        "specificity_before": loc_before,
        "specificity_relative": loc_after / loc_before if loc_before > 0 else float("nan"),
        "neighbor_specificity": _mean(neighbor),
        "neighbor_specificity_before": _mean(before["neighbor"]),
        "other_specificity": _mean(other),
        "other_specificity_before": _mean(before["other"]),
        "efficacy_before": before["efficacy"],
        "generalization_before": before["generalization"],
        "pairs": {"edit": len(edit_pairs), "rephrase": len(rephrase_pairs), "locality": len(neighbor_pairs) + len(other_pairs)},
        "edit_seconds": round(t2 - t1, 2),
        "seconds_per_edit": round((t2 - t1) / len(requests), 5),
        "eval_seconds": round((t1 - t0) + (t3 - t2), 2),
        "config": config.to_dict(),
    }


def run_demo(
    edits: int = 300,
    turn_size: int = 100,
    show: int = 3,
    config: EditConfig | None = None,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    progress: bool = True,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ``ultraedit demo`` session; returns the scores of :func:`edit_and_score`."""
    from . import TESTBED_CONFIG, load_requests, load_testbed

    if edits < 1:
        raise ValueError(f"--edits must be >= 1, got {edits}")
    config = config or TESTBED_CONFIG
    start = time.perf_counter()
    model, tokenizer = load_testbed(device=device, data_dir=data_dir)
    requests = load_requests(edits, data_dir)
    n_params = sum(p.numel() for p in model.parameters())
    out(f"Testbed model: Llama, {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
        f"{n_params / 1e6:.2f}M parameters, trained on a fictional world (no download).")
    out(f"Editing {len(requests)} facts in turns of {turn_size} with UltraEdit "
        f"(lr {config.lr:g}, {len(config.modules or [])} modules: {', '.join(config.modules or ['preset'])}).")
    rows = questions(pick(requests, show))
    answers_before = complete(model, tokenizer, [p for _, p, _ in rows])

    scores = edit_and_score(model, tokenizer, requests, config, turn_size=turn_size, progress=progress)
    answers_after = complete(model, tokenizer, [p for _, p, _ in rows])

    out("")
    print_answers(rows, answers_before, answers_after, out)
    out("")
    out(f"After {scores['edits']} edits ({scores['turns']} turns), teacher-forced token accuracy:")
    out(f"  Efficacy (ES)       {scores['efficacy']:.3f}   (before editing {scores['efficacy_before']:.3f})")
    out(f"  Generalization (GS) {scores['generalization']:.3f}   (held-out rephrasings; before {scores['generalization_before']:.3f})")
    out(f"  Specificity (LS)    {scores['specificity']:.3f}   (unedited model {scores['specificity_before']:.3f}; "
        f"relative {scores['specificity_relative']:.3f})")
    out(f"Edit time {scores['edit_seconds']:.1f} s ({1000 * scores['seconds_per_edit']:.1f} ms/edit); "
        f"total {time.perf_counter() - start:.1f} s.")
    return scores
