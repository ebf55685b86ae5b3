"""A benchmark run's reports: ``results.md`` (tables) and ``curve.png`` (metrics against edits)."""

from __future__ import annotations

import math
import os
from typing import Any

from .config import GENERATION_NAMES, METRIC_NAMES


def _lookup(values: dict[str, Any] | None, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(values, dict):
            return None
        values = values.get(part)
    return values


def generation_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines: what the model says, per context, before and after editing."""
    after, before = results.get("generation") or {}, results.get("generation_unedited") or {}
    if not after:
        return []
    contexts = list(after)
    settings = results.get("generation_settings", {})
    lines = ["", "## What the model says (greedy generation, first sentence)", "",
             f"Headline rule per context: {', '.join(f'{c} {r}' for c, r in settings.get('headline', {}).items())}; answers normalised "
             f"({settings.get('normalisation', 'n/a')}).", "",
             "| Metric (%) | " + " | ".join(f"{c} unedited | {c} edited" for c in contexts) + " |",
             "|---|" + "---:|---:|" * len(contexts)]
    for key, label in GENERATION_NAMES.items():
        cells = [(_lookup(before.get(c), key), _lookup(after.get(c), key)) for c in contexts]
        if all(a is None and b is None for a, b in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(f"{_pct(a)} | {_pct(b)}" for a, b in cells) + " |")
    return lines

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
    lines += generation_table(results)
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
    guard = [t["guard"] for t in results.get("turn_log", []) if "guard" in t]
    if guard:
        shrunk, refused = sum(0 < g["scale"] < 1 for g in guard), sum(g["scale"] == 0 for g in guard)
        spent = sum(g["seconds"] for g in guard)
        lines += ["", f"Damage guard: {shrunk} of {len(guard)} turns shrunk, {refused} refused to stay within its "
                      f"budget; {spent:.1f} s of checks ({100 * spent / max(timings['edit_seconds'], 1e-9):.0f}% of the edit time)."]
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
    for context, style in (("plain", "s"), ("chat", "^")):
        said = (results.get("generation") or {}).get(context)
        if said:
            for key, color in (("efficacy", "tab:blue"), ("generalization", "tab:orange")):
                if said.get(key) is not None:
                    ax.plot([edits[-1]], [100 * said[key]], marker=style, color=color, linestyle="none",
                            label=f"{key.capitalize()}, said ({context})")
    ax.set_ylabel("token accuracy (%); single marks: by greedy generation")
    ax.set_ylim(-2, 102)
    ax.set_xlim(0, max(edits) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", title="dashed: unedited", title_fontsize="x-small")
    ax.set_title(f"{results['method']['name']} on {results['config']['dataset']}: {results['model']['name_or_path']}",
                 fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
