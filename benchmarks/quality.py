"""Edit quality on a real model: named configurations over real edit data, in lifelong turns.

For each row (a data set and a number of edits) the model is edited in turns of 100 requests, then
every edited request is scored (teacher-forced token accuracy: ES on the edit prompts, GS on the
rephrases; retention and agreement on the locality prompts) and the perplexity of the package's
held-out text is compared with the unedited model's. The unedited model is scored once per row and
restored between configurations. With ``--eval-every K`` the first turn's requests are scored again
every K turns (a forgetting curve).

    python benchmarks/quality.py --rows zsre:500 counterfact:2000                  # recommended, faithful
    python benchmarks/quality.py --rows zsre:500 --configs recommended+paraphrases --eval-every 1
    python benchmarks/quality.py --rows zsre:100 --configs recommended --set refine.steps=3 --label steps3

The data: ``--data-dir DIR`` (or ``$ULTRAEDIT_DATA``) holding ``zsre-500.json`` (the first 500
records of ZsRE's MEND training split) and ``counterfact-20k.json.gz`` (CounterFact's train and edit
splits, flat; see docs/datasets.md for where both come from). Writes
``benchmarks/results/quality-<model>.json`` (or ``--out``), one entry per row and configuration;
``--table`` prints its table, ``--plot`` draws ``forgetting.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ultraedit import UltraEditor, configuration  # noqa: E402
from ultraedit.datasets import read_requests  # noqa: E402
from ultraedit.evaluation import MetricTotals, perplexity, score_requests  # noqa: E402
from ultraedit.models import load_model  # noqa: E402
from ultraedit.texts import package_text  # noqa: E402

FILES = {"zsre": "zsre-500.json", "counterfact": "counterfact-20k.json.gz"}
TURN = 100
CURVE_KEYS = ("efficacy", "generalization", "retention")


def data_dir(given: str | None) -> Path:
    where = given or os.environ.get("ULTRAEDIT_DATA")
    if not where:
        raise SystemExit("say where the edit data is: --data-dir DIR or ULTRAEDIT_DATA=DIR (docs/datasets.md)")
    return Path(where)


def requests_of(folder: Path, dataset: str, count: int) -> list:
    path = folder / FILES[dataset]
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (docs/datasets.md says where {FILES[dataset]} comes from)")
    reqs = [r for _, r in zip(range(count), read_requests(path, dataset, skip_invalid=True))]
    if len(reqs) < count:
        raise SystemExit(f"{path} provides {len(reqs)} requests; {count} asked for")
    return reqs


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


def run_config(model, tok, saved, reqs, ref, ppl, config, eval_every) -> dict:
    """Edit ``reqs`` in turns of 100 from the unedited weights ``saved``, then score them all."""
    model.load_state_dict(saved)
    editor = UltraEditor(model, config, tokenizer=tok)
    first, first_ref = reqs[:TURN], ref[:TURN]
    curve, seconds, steps, guarded = [], 0.0, [], []
    for turn, start in enumerate(range(0, len(reqs), TURN), 1):
        t = time.perf_counter()
        report = editor.edit(reqs[start : start + TURN])
        seconds += time.perf_counter() - t
        steps.append(report.steps)
        if "guard" in report.stages:
            guarded.append({"turn": turn, **report.stages["guard"]})
        last = start + TURN >= len(reqs)
        if eval_every and not last and (turn == 1 or turn % eval_every == 0):
            point = scores(model, tok, first, first_ref)
            curve.append({"turns": turn, "edits": turn * TURN, **{k: point.get(k) for k in CURVE_KEYS}})
            print(f"  turn {turn}: first turn's requests {curve[-1]}", flush=True)
    m, point = scores(model, tok, reqs, ref, first=TURN)
    if eval_every:
        curve.append({"turns": turn, "edits": len(reqs), **{k: point.get(k) for k in CURVE_KEYS}})
    after = perplexity(model, tok, ppl["lines"])
    return {
        "config": {k: v for k, v in config.to_dict().items() if k != "modules"}, "modules": list(editor.modules),
        "efficacy": m["efficacy"], "generalization": m["generalization"], "retention": m["retention"],
        "locality_vs_unedited": m["locality_vs_unedited"], "specificity": m.get("specificity"),
        "perplexity_before": ppl["before"], "perplexity_after": after, "perplexity_rise": after / ppl["before"] - 1,
        "seconds_per_edit": seconds / len(reqs), "mean_steps": sum(steps) / len(steps), "forgetting_curve": curve,
        "guard": guard_summary(guarded, seconds),
    }


def guard_summary(verdicts: list[dict], seconds: float) -> dict | None:
    """What the damage guard did over a run: turns shrunk and refused, its time and share of the edit
    time, and each turn's verdict."""
    if not verdicts:
        return None
    spent = sum(v["seconds"] for v in verdicts)
    return {"turns": len(verdicts), "shrunk": sum(0 < v["scale"] < 1 for v in verdicts),
            "refused": sum(v["scale"] == 0 for v in verdicts), "seconds": spent, "share_of_edit_time": spent / seconds,
            "verdicts": verdicts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="an ultraedit model spec (default smollm2-135m)")
    p.add_argument("--rows", nargs="*", default=[], metavar="DATASET:EDITS", help="e.g. zsre:500 counterfact:2000")
    p.add_argument("--configs", nargs="+", default=["recommended", "faithful"], help="named configurations or JSON files")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="override a field of every configuration run (repeatable)")
    p.add_argument("--label", help="the row label (default: the configuration's name, with the --set overrides)")
    p.add_argument("--data-dir", help="where zsre-500.json and counterfact-20k.json.gz are (default $ULTRAEDIT_DATA)")
    p.add_argument("--eval-every", type=int, default=0, metavar="K", help="forgetting curve: first turn's requests every K turns")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="results JSON (default benchmarks/results/quality-<model>.json)")
    p.add_argument("--plot", action="store_true", help="only draw forgetting.png from --out")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"quality-{Path(args.model).stem}.json")
    if args.plot or args.table:
        print(table(json.loads(out.read_text()))) if args.table else plot_forgetting(out)
        return 0
    folder = data_dir(args.data_dir) if args.rows else None
    rows = [(d, int(n)) for d, n in (r.split(":") for r in args.rows)]
    for dataset, n in rows:
        requests_of(folder, dataset, n)  # count check before loading the model
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, "cpu")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    lines = package_text("heldout.txt")
    ppl = {"lines": lines, "before": perplexity(model, tok, lines)}
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("rows", {})
    results["model"] = args.model
    for dataset, n in rows:
        reqs = requests_of(folder, dataset, n)
        t = time.perf_counter()
        unedited = score_requests(model, tok, reqs)
        totals = MetricTotals()
        totals.add(unedited)
        base = totals.means()
        row = results["rows"].setdefault(f"{dataset}:{n}", {})
        row["unedited"] = {"efficacy": base["efficacy"], "generalization": base["generalization"],
                           "specificity": base.get("specificity"), "perplexity": ppl["before"],
                           "seconds": time.perf_counter() - t}
        for name in args.configs:
            label = args.label or " ".join([name, *args.sets])
            model.load_state_dict(saved)
            config = configuration(name, model, sets=args.sets).config
            print(f"{dataset}:{n}: {label}", flush=True)
            row[label] = run_config(model, tok, saved, reqs, unedited.locality_predictions, ppl, config, args.eval_every)
            print(json.dumps({k: v for k, v in row[label].items() if k not in ("modules", "forgetting_curve")}), flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def table(results: dict) -> str:
    """One line per row and configuration (the README's and docs/results.md's table)."""
    lines = ["| set | edits | configuration | ES | GS | retention | agreement | perplexity rise | s/edit | steps/turn | guard |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, row in results["rows"].items():
        dataset, edits = key.split(":")
        base = row["unedited"]
        lines.append(f"| {dataset} | {edits} | unedited | {base['efficacy']:.3f} | {base['generalization']:.3f} | 1 | 1 | 0 | | | |")
        for label, r in row.items():
            if label != "unedited":
                lines.append(
                    f"| {dataset} | {edits} | {label} | {r['efficacy']:.3f} | {r['generalization']:.3f} | {r['retention']:.3f} | "
                    f"{r['locality_vs_unedited']:.3f} | {100 * r['perplexity_rise']:+.1f}% | {r['seconds_per_edit']:.2f} | "
                    f"{r['mean_steps']:.1f} | {guard_cell(r.get('guard'))} |")
    return "\n".join(lines)


def guard_cell(guard: dict | None) -> str:
    if not guard:
        return "off"
    return f"{guard['shrunk']} shrunk, {guard['refused']} refused / {guard['turns']}; {100 * guard['share_of_edit_time']:.0f}% of time"


def plot_forgetting(path: Path) -> None:
    """``forgetting.png`` beside ``path``: ES and GS of the first turn's requests against edits applied."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = json.loads(path.read_text())
    fig = Figure(figsize=(11, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = iter(colormaps["tab20"].colors[::2] + colormaps["tab20"].colors[1::2])
    for key, row in results["rows"].items():
        for label, r in row.items():
            curve = r.get("forgetting_curve") if isinstance(r, dict) else None
            if curve:
                edits, color = [c["edits"] for c in curve], next(colors)
                ax.plot(edits, [c["efficacy"] for c in curve], marker="o", color=color, label=f"{key} {label}: ES")
                ax.plot(edits, [c["generalization"] for c in curve], marker="x", linestyle="--", color=color,
                        label=f"{key} {label}: GS")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("first turn's requests: token accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path.with_name("forgetting.png"))


if __name__ == "__main__":
    raise SystemExit(main())
