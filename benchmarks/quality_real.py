"""Edit quality on a real model: the faithful method next to the recommended configuration.

Reproduces the README's table "Edit quality on a real model": for each row (a data set and a
number of edits), the model is edited in turns of 100 requests, then every edited request is
scored (teacher-forced token accuracy: ES on the edit prompts, GS on the rephrases; retention and
agreement on the locality prompts) and the perplexity of the package's held-out text is compared
with the unedited model's. The unedited model is scored once per row and restored between
configurations. A forgetting curve follows the first turn's requests (``--eval-every K``).

    python benchmarks/quality_real.py --model smollm2-135m --rows zsre:500 counterfact:2000
    python benchmarks/quality_real.py --model smollm2-135m --sweep zsre:100   # Pareto points

Writes ``benchmarks/results/quality_real.json`` (or ``--out``); ``--plot`` draws the Pareto plot
and the forgetting curves from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ultraedit import EditConfig, UltraEditor
from ultraedit.datasets import read_requests
from ultraedit.evaluation import MetricTotals, perplexity, score_requests
from ultraedit.models import load_model
from ultraedit.stages.common import package_text
from ultraedit.methods.common import mlp_out_name, scaled_layers
from ultraedit.core.anatomy import num_layers
from ultraedit.core.presets import resolve_modules

DATA = ROOT.parent / "shared" / "data"
FILES = {"zsre": DATA / "zsre-500.json", "counterfact": DATA / "counterfact-20k.json.gz"}
TURN = 100
CURVE_KEYS = ("efficacy", "generalization", "retention")

#: What stop 20 added to the recommended configuration, switched off: the earlier configurations
#: below are the recommended one with their own changes on top of this.
BEFORE_STOP20 = {k: EditConfig.__dataclass_fields__[k].default
                 for k in ("subject_optimise", "subject_clamp", "preserve_text", "preserve_base")}
#: The family preset's modules (gate/up_proj for Llama) instead of the recommended layers.
PRESET = {"recommended": True, **BEFORE_STOP20, "modules": "preset"}
#: The recommended configuration of stop 9 (family preset, width lr 5e-6, 5 steps, preserve 300).
STOP9 = {**PRESET, "lr": 5e-6, "memory": 0.0, "confidence": 0.0}

#: Stop 10's recommended configuration: down_proj 14-25 of 30, target rows only.
STOP10 = {"recommended": True, **BEFORE_STOP20, "layers": (14, 25), "subject_keys": 0.0, "subject_depth": 0.0, "key_outliers": 0.0}

#: The recommended configuration of stops 13-19: the same layers and options,
#: without the subject search, the generated text and the pull-back (``preserve_base``).
STOP13 = {"recommended": True, **BEFORE_STOP20}

#: Pareto sweep (one turn: the memory plays no part): (label, EditConfig fields) on top of the
#: faithful or recommended configuration.
SWEEP = [
    ("faithful lr 1e-6 (authors)", {"lr": 1e-6}),
    ("width lr 1e-6", {"lr": 1e-6, "lr_scale": "width"}),
    ("width lr 5e-6", {"lr": 5e-6, "lr_scale": "width"}),
    ("preset modules, 5 steps, preserve 300 (stop 9)", STOP9),
    ("stop 9 + confidence 0.8", {**STOP9, "confidence": 0.8}),
    ("stop 9 + confidence 0.8 + neighbours 4", {**STOP9, "confidence": 0.8, "neighbours": 4}),
    ("recommended (MLP output layers)", STOP10),
    ("recommended + neighbours 4", {**STOP10, "neighbours": 4}),
    ("recommended + prefixes 2", {**STOP10, "prefixes": 2}),
    ("subject rows everywhere (down_proj 4-25)", {**STOP13, "subject_depth": 0.0}),
    ("subject rows in 4-12, target rows in 13-25 (stop 13)", STOP13),
    ("stop 13 + neighbours 4 (subject rows)", {**STOP13, "neighbours": 4}),
    ("recommended (subject search, generated text, preserve_base 20)", "recommended"),
]

#: Ablation over turns (``--ladder zsre:500``): stop 9's recommended configuration, one option
#: added at a time, to the current one.
LADDER = [
    ("preset modules, 5 steps, preserve 300 (stop 9)", STOP9),
    ("stop 9 + memory 1", {**STOP9, "memory": 1.0}),
    ("stop 9 + memory 1 + confidence 0.8", {**STOP9, "memory": 1.0, "confidence": 0.8}),
    ("stop 9 + memory 1 + confidence 0.8 + prefixes 2", {**STOP9, "memory": 1.0, "confidence": 0.8, "prefixes": 2}),
    ("stop 10: MLP output layers 14-25, lr 1e-5, memory 1, confidence 0.8", STOP10),
    ("stop 13: + subject rows in layers 4-12, key outliers 4, neighbours 8", STOP13),
    ("stop 13 + subject_optimise 8, clamp 0.4", {**STOP13, "subject_optimise": 8, "subject_clamp": 0.4}),
    ("the same + preserve_text generated", {**STOP13, "subject_optimise": 8, "subject_clamp": 0.4,
                                             "preserve_text": "generated"}),
    ("recommended: + preserve_base 20", "recommended"),
]


#: ``--configs`` names beyond "faithful" and "recommended": (row label, configuration).
NAMED = {"paraphrases": ("recommended + paraphrases 2", {"recommended": True, "paraphrases": 2})}


def requests_of(dataset: str, count: int) -> list:
    path = FILES[dataset]
    reqs = [r for _, r in zip(range(count), read_requests(path, dataset, skip_invalid=True))]
    if len(reqs) < count:
        raise SystemExit(f"{path} provides {len(reqs)} requests; {count} asked for")
    return reqs


def config_of(kind, model) -> EditConfig:
    if kind == "faithful":
        return EditConfig()
    if kind == "recommended":
        return EditConfig.recommended(model)
    fields = dict(kind)
    if fields.get("modules") == "preset":
        fields["modules"] = resolve_modules(model)
    if "layers" in fields:  # (first, last) of the MLP output projections, for a 30-layer model
        first, last = fields.pop("layers")
        fields["modules"] = [mlp_out_name(model, i) for i in scaled_layers(list(range(first, last + 1)), 30, num_layers(model))]
    if fields.pop("recommended", False):
        return EditConfig.recommended(model, **fields)
    return EditConfig(**fields)


def scores(model, tok, reqs, ref, first: int | None = None):
    """Metric means over ``reqs`` (and, with ``first``, also over the first ``first`` of them)."""
    scored = score_requests(model, tok, reqs, reference=ref)
    totals = MetricTotals()
    totals.add(scored)
    if first is None:
        return totals.means()
    head = MetricTotals()
    head.add(type(scored)(
        {g: v[:first] for g, v in scored.accuracy.items()}, {g: v[:first] for g, v in scored.exact.items()},
        scored.locality_predictions[:first], scored.locality_agreement[:first],
        scored.locality_known[:first], scored.locality_kept[:first],
    ))
    return totals.means(), head.means()


def run_config(model, tok, saved, reqs, ref, ppl_lines, ppl_before, config, eval_every) -> dict:
    model.load_state_dict(saved)
    editor = UltraEditor(model, config, tokenizer=tok)
    first, first_ref = reqs[:TURN], ref[:TURN]
    curve, seconds, steps = [], 0.0, []
    for turn, start in enumerate(range(0, len(reqs), TURN), 1):
        t = time.perf_counter()
        steps.append(editor.edit(reqs[start : start + TURN]).steps)
        seconds += time.perf_counter() - t
        last = start + TURN >= len(reqs)
        if eval_every and not last and (turn == 1 or turn % eval_every == 0):
            point = scores(model, tok, first, first_ref)
            curve.append({"turns": turn, "edits": turn * TURN, **{k: point.get(k) for k in CURVE_KEYS}})
            print(f"  turn {turn}: first turn's requests {curve[-1]}", flush=True)
    m, point = scores(model, tok, reqs, ref, first=TURN)
    if eval_every:
        curve.append({"turns": turn, "edits": len(reqs), **{k: point.get(k) for k in CURVE_KEYS}})
    ppl_after = perplexity(model, tok, ppl_lines)
    return {
        "config": {k: v for k, v in config.to_dict().items() if k != "modules"},
        "modules": list(editor.modules),
        "efficacy": m["efficacy"], "generalization": m["generalization"], "retention": m["retention"],
        "locality_vs_unedited": m["locality_vs_unedited"], "specificity": m.get("specificity"),
        "perplexity_before": ppl_before, "perplexity_after": ppl_after, "perplexity_rise": ppl_after / ppl_before - 1,
        "seconds_per_edit": seconds / len(reqs), "mean_steps": sum(steps) / len(steps), "forgetting_curve": curve,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model name, path or ultraedit model spec")
    p.add_argument("--rows", nargs="*", default=[], metavar="DATASET:EDITS", help="table rows, e.g. zsre:500")
    p.add_argument("--sweep", metavar="DATASET:EDITS", help="Pareto sweep (SWEEP configurations) on these edits")
    p.add_argument("--ladder", metavar="DATASET:EDITS", help="ablation (LADDER configurations) on these edits")
    p.add_argument("--configs", nargs="+", default=["recommended", "faithful"],
                   choices=["faithful", "recommended", *NAMED])
    p.add_argument("--curve-configs", nargs="*", default=["recommended", NAMED["paraphrases"][0]],
                   help="configurations (row labels) that get the forgetting curve")
    p.add_argument("--eval-every", type=int, default=0, metavar="K", help="forgetting curve: first turn's requests every K turns")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_real.json"))
    p.add_argument("--plot", action="store_true", help="only draw the PNGs from --out")
    p.add_argument("--table", action="store_true", help="only print the README table from --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.plot:
        plot(out)
        return 0
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0
    rows = [(d, int(n)) for d, n in (r.split(":") for r in args.rows)]
    extra = [tuple(spec.split(":")) for spec in (args.sweep, args.ladder) if spec]
    for dataset, n in rows + extra:
        requests_of(dataset, int(n))  # count check before loading the model
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, "cpu")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ppl_lines = package_text("heldout.txt")
    ppl_before = perplexity(model, tok, ppl_lines)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("rows", {})
    results["model"] = args.model
    jobs = [(f"{d}:{n}", d, n, [NAMED.get(k, (k, k)) for k in args.configs], args.eval_every) for d, n in rows]
    for name, spec, configs in (("sweep", args.sweep, SWEEP), ("ladder", args.ladder, LADDER)):
        if spec:
            d, n = spec.split(":")
            jobs.append((f"{name} {d}:{n}", d, int(n), configs, 0))
    for key, dataset, n, configs, eval_every in jobs:
        reqs = requests_of(dataset, n)
        t = time.perf_counter()
        unedited = score_requests(model, tok, reqs)
        ref = unedited.locality_predictions
        totals = MetricTotals()
        totals.add(unedited)
        base = totals.means()
        row = results["rows"].setdefault(key, {})
        row["unedited"] = {"efficacy": base["efficacy"], "generalization": base["generalization"],
                           "specificity": base.get("specificity"), "perplexity": ppl_before,
                           "seconds": time.perf_counter() - t}
        for label, kind in configs:
            print(f"{key}: {label}", flush=True)
            every = eval_every if label in args.curve_configs else 0
            row[label] = run_config(model, tok, saved, reqs, ref, ppl_lines, ppl_before, config_of(kind, model), every)
            print(json.dumps({k: v for k, v in row[label].items() if k not in ("modules", "forgetting_curve")}), flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def table(results: dict) -> str:
    """The README tables: the rows (one line per configuration), then each sweep or ladder."""
    out = [_table({k: v for k, v in results["rows"].items() if not k.startswith(("sweep", "ladder"))})]
    out += [f"\n{key}:\n\n" + _table({key.split(" ", 1)[1]: row})
            for key, row in results["rows"].items() if key.startswith(("sweep", "ladder"))]
    return "\n".join(out)


def _table(rows: dict) -> str:
    lines = ["| set | edits | configuration | ES | GS | retention | agreement | perplexity rise | s/edit | steps/turn |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, row in rows.items():
        dataset, edits = key.split(":")
        base = row["unedited"]
        lines.append(f"| {dataset} | {edits} | unedited | {base['efficacy']:.3f} | {base['generalization']:.3f} | 1 | 1 | 0 | | |")
        for label, r in row.items():
            if label == "unedited":
                continue
            lines.append(
                f"| {dataset} | {edits} | {label} | {r['efficacy']:.3f} | {r['generalization']:.3f} | {r['retention']:.3f} | "
                f"{r['locality_vs_unedited']:.3f} | {100 * r['perplexity_rise']:+.1f}% | {r['seconds_per_edit']:.2f} | "
                f"{r['mean_steps']:.1f} |"
            )
    return "\n".join(lines)


def plot(path: Path) -> None:
    """``pareto.png`` (ES and GS against retention, sweep points) and ``forgetting.png`` next to ``path``."""
    results = json.loads(path.read_text())
    sweeps = {k: v for k, v in results["rows"].items() if k.startswith(("sweep", "ladder"))}
    if sweeps:
        plot_pareto(results, sweeps, path.with_name("pareto.png"))
    plot_forgetting(results, path.with_name("forgetting.png"))


def plot_pareto(results: dict, sweeps: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, metric in enumerate(("efficacy", "generalization")):
        ax = fig.add_subplot(1, 2, i + 1)
        for row in sweeps.values():
            for label, r in row.items():
                if label == "unedited":
                    continue
                marker = "*" if label == "recommended" else ("s" if label.startswith("faithful") else "o")
                ax.scatter(r["retention"], r[metric], marker=marker, s=60 if marker == "*" else 25)
                ax.annotate(label, (r["retention"], r[metric]), fontsize=5, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("retention")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Pareto: {', '.join(sweeps)} ({results['model']})", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def plot_forgetting(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, row in results["rows"].items():
        for label, r in row.items():
            curve = r.get("forgetting_curve") if isinstance(r, dict) else None
            if curve:
                edits = [c["edits"] for c in curve]
                ax.plot(edits, [c["efficacy"] for c in curve], marker="o", label=f"{key} {label}: ES")
                ax.plot(edits, [c["generalization"] for c in curve], marker="x", linestyle="--", label=f"{key} {label}: GS")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("first turn's requests: token accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
