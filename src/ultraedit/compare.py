"""One table and one plot across ``ultraedit bench`` result directories (``ultraedit compare``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CompareError", "load_runs", "markdown_table", "plot_runs"]

METRICS = (("efficacy", "ES"), ("generalization", "GS"), ("specificity", "LS"))
#: Generation-based columns: ``(results["generation"][context] key, header)``, per context.
SAID = (("efficacy", "ES"), ("generalization", "GS"), ("locality_unchanged", "loc."))


class CompareError(ValueError):
    """A directory holds no readable ``results.json``."""


def load_runs(dirs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """``results.json`` of each directory (a path to the file itself works too), in order."""
    runs = []
    for d in dirs:
        path = Path(d)
        path = path / "results.json" if path.is_dir() else path
        try:
            results = json.loads(path.read_text())
        except FileNotFoundError:
            raise CompareError(f"{d}: no results.json (is it an 'ultraedit bench --out' directory?)") from None
        except (OSError, json.JSONDecodeError) as err:
            raise CompareError(f"{path}: cannot read it: {err}") from None
        if not isinstance(results, dict) or "method" not in results or "timings" not in results:
            raise CompareError(f"{path}: not an ultraedit bench results.json")
        results["_dir"] = str(d)
        runs.append(results)
    return runs


def _pct(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{100 * value:.1f}"


def _rise(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{100 * value:+.1f}%"


def _covariance_seconds(run: dict[str, Any]) -> float | None:
    stats = run["method"].get("key_statistics")
    if not isinstance(stats, dict):
        return None
    return float(stats.get("build_seconds", 0.0))


def _perplexity_rise(run: dict[str, Any]) -> float | None:
    ppl = run.get("perplexity")
    if not isinstance(ppl, dict) or not all(isinstance(ppl.get(k), (int, float)) for k in ("before", "after")):
        return None
    return ppl["after"] / ppl["before"] - 1


def row(run: dict[str, Any]) -> dict[str, Any]:
    """The comparison's numbers for one run."""
    cfg, timings = run.get("config", {}), run["timings"]
    return {
        "method": run["method"].get("name", "?"),
        "model": run.get("model", {}).get("name_or_path", "?"),
        "dataset": cfg.get("dataset", "?"),
        "edits": run.get("edits"),
        "turn_size": cfg.get("turn_size"),
        **{key: run.get(key) for key, _ in METRICS},
        "locality_vs_unedited": run.get("metrics", {}).get("locality_vs_unedited"),
        "retention": run.get("metrics", {}).get("retention"),
        "perplexity_rise": _perplexity_rise(run),
        "seconds_per_edit": run.get("seconds_per_edit"),
        "edits_per_second": run.get("edits_per_second"),
        "edit_seconds": timings.get("edit_seconds"),
        "total_seconds": timings.get("total_seconds"),
        "covariance_seconds": _covariance_seconds(run),
        "peak_mib": run.get("peak_memory", {}).get("bytes", 0) / 2**20,
        "memory_kind": run.get("peak_memory", {}).get("kind", "?"),
        "dir": run["_dir"],
        "generation": run.get("generation") or {},
    }


def _said(r: dict[str, Any], contexts: Sequence[str]) -> str:
    return " | ".join(_pct((r["generation"].get(c) or {}).get(k)) for c in contexts for k, _ in SAID)


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per run (metrics in %: teacher forced, then by generation per context; time per
    edit, edits/s, peak memory)."""
    contexts = [c for c in ("plain", "qa", "chat") if any(c in row(r)["generation"] for r in runs)]
    said_head = "".join(f" {c} {h} |" for c in contexts for _, h in SAID)
    lines = [
        "| method | model | dataset | edits (turn) | ES | GS | LS | retention | loc. vs unedited |" + said_head +
        " ppl rise | s/edit | edits/s | editing s | key stats s | peak MiB | run dir |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(contexts) * len(SAID) +
        "---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in map(row, runs):
        said = _said(r, contexts) + " | " if contexts else ""
        cov = "" if r["covariance_seconds"] is None else f"{r['covariance_seconds']:.0f}"
        lines.append(
            f"| {r['method']} | {r['model']} | {r['dataset']} | {r['edits']} ({r['turn_size']}) | "
            f"{_pct(r['efficacy'])} | {_pct(r['generalization'])} | {_pct(r['specificity'])} | "
            f"{_pct(r['retention'])} | {_pct(r['locality_vs_unedited'])} | {said}"
            f"{_rise(r['perplexity_rise'])} | {r['seconds_per_edit']:.3f} | {r['edits_per_second']:.2f} | "
            f"{r['edit_seconds']:.0f} | {cov} | {r['peak_mib']:.0f} | `{r['dir']}` |"
        )
    kinds = sorted({row(r)["memory_kind"] for r in runs})
    lines += ["", f"Metrics in %: ES/GS/LS teacher-forced token accuracy; '<context> ES/GS/loc.' by greedy "
              "generation in that context (the context's headline rule; loc.: locality prompts generated as by "
              "the unedited model); peak memory: {', '.join(kinds)}; "
              "retention: of the locality tokens the unedited model got right, the share still right; "
              "ppl rise: held-out perplexity after / before - 1; "
              "'key stats s': building MEMIT/AlphaEdit's key statistics (0 when read from the cache), "
              "not part of the editing time."]
    return "\n".join(lines) + "\n"


def plot_runs(runs: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """PNG with three panels: ES/GS/LS per run, seconds per edit (log scale), peak memory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row(r) for r in runs]
    labels = [f"{r['method']}\n{r['dataset']}" for r in rows]
    fig = Figure(figsize=(max(7.0, 1.6 * len(rows) + 4), 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2, 1, 1]})
    bars = [(name, [r[key] for r in rows], None) for key, name in METRICS]
    for context in [c for c in ("plain", "chat") if any(c in r["generation"] for r in rows)]:
        bars += [(f"{context} {name} (said)", [(r["generation"].get(context) or {}).get(key) for r in rows], "//")
                 for key, name in SAID[:2]]
    width = 0.8 / len(bars)
    for i, (name, values, hatch) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(rows))]
        ax1.bar(xs, [100 * v if isinstance(v, (int, float)) else math.nan for v in values], width, label=name,
                hatch=hatch)
    ax1.set_ylabel("% (teacher forced; hatched: by generation)")
    ax1.set_ylim(0, 100)
    ax1.legend(fontsize="small")
    ax2.bar(range(len(rows)), [r["seconds_per_edit"] for r in rows], color="tab:gray")
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds per edit")
    ax3.bar(range(len(rows)), [r["peak_mib"] for r in rows], color="tab:purple")
    ax3.set_ylabel(f"peak memory (MiB, {rows[0]['memory_kind']})" if rows else "peak memory (MiB)")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize="x-small", rotation=45, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
